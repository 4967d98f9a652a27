"""`edge-lb bench`'s reaction and API parts for real, on a small node: the real program's maps (loaded
unpinned and unattached) and the real NodeState. Every figure is there and positive; none is judged against
its target (figures on a shared VM are no pass/fail criterion). The report's assembly with fake figures:
tests/unit/test_bench_report.py."""

from __future__ import annotations

import pytest

from edge_lb.bench import apicost, command, targets
from edge_lb.bench.reaction import Sizes

from .conftest import needs_root

pytestmark = [pytest.mark.root, needs_root]
SMALL = Sizes(flip_vips=1, pool_vips=3, big_vips=5, backends=3, ring_size=1009, runs=2)


def test_reaction_and_api_figures_are_there() -> None:
    reaction = command.reaction(SMALL)
    api = apicost.measure(vips=5, backends=3, runs=2)

    assert reaction["sizes"] == {"flip_vips": 1, "pool_vips": 3, "big_vips": 5, "backends": 3,
                                 "ring_size": 1009}
    assert len(reaction["flip_ms"]["runs"]) == 2 and len(reaction["pool_dead_ms"]["runs"]) == 1
    for key in ("flip_ms", "pool_dead_ms", "big_first_apply_s", "big_reload_ms"):
        assert all(v > 0 for v in reaction[key]["runs"]), key
    assert reaction["pool_loop_lag_ms"]["max"] >= 0  # a loop that kept every turn waited ~0 ms
    assert all(api[key]["median"] > 0 for key in apicost.READS.values())
    assert set(apicost.measure(vips=2, backends=2, runs=1, reads=apicost.TARGET_READS)) == {
        "vips", "backends", "runs", "metrics_loop_ms", "api_node_ms"}

    doc = targets.assemble({}, {"reaction": reaction, "api": api}, {})
    for name, target in targets.TARGETS.items():
        entry = doc["targets"][name]
        if target.part in ("reaction", "api"):
            assert isinstance(entry["met"], bool) and entry["value"] >= 0, name
        else:
            assert entry["value"] is None and entry["met"] is None, name
    assert doc["targets"]["reaction_pool_death"]["what"] == "one pool backend dead behind 3 VIPs: apply"
