"""Real traffic through namespaces: client -> router -> LB (XDP) -> IPIP -> backends (decap) -> client."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from edge_lb.lab.labs import DataplaneLab
from edge_lb.lab.netns import Lab

from .conftest import ready_lab

pytestmark = pytest.mark.root

REQUESTS = 300


@pytest.fixture
def dlab(lab: Lab) -> Iterator[DataplaneLab]:
    """Loaded with `edge-lb load`: the program attached, no supervisor."""
    yield from ready_lab(lab, DataplaneLab.load_balancer)


def test_fresh_requests_spread_and_replies_bypass_the_lb(dlab: DataplaneLab) -> None:
    before = dlab.lb_reasons()
    result = dlab.http_get(REQUESTS)
    after = dlab.lb_reasons()
    print("served:", result["served"], "lb counters:", after)

    assert result["failures"] == 0, result["errors"]
    served = result["served"]
    assert sum(served.values()) == REQUESTS
    assert set(served) == {"b1", "b2", "b3"}
    for name, n in served.items():
        assert 0.20 * REQUESTS <= n <= 0.45 * REQUESTS, f"{name} served {n} of {REQUESTS}"

    sent = after["STAT_TX"] - before["STAT_TX"]
    # Each request is at least SYN, ACK, request, FIN-ACK from the client: all of them crossed the LB ...
    assert sent >= 4 * REQUESTS
    # ... but no reply did: a reply (VIP -> client) at the LB would be counted as "not to a VIP".
    assert after["STAT_PASS_NOT_VIP"] - before["STAT_PASS_NOT_VIP"] == 0
    assert after["STAT_CT_HIT"] - before["STAT_CT_HIT"] >= 2 * REQUESTS


def _xdp_prog_id(dlab: DataplaneLab) -> int:
    assert dlab.lb is not None
    out = dlab.lb.ns.run(["ip", "-d", "link", "show", "eth0"]).stdout
    return int(out.split("prog/xdp id ")[1].split()[0])


def test_reload_adopts_maps_and_replaces_program(dlab: DataplaneLab) -> None:
    first_id = _xdp_prog_id(dlab)
    assert dlab.http_get(30)["failures"] == 0
    # Reload with b2 drained: the pinned maps are adopted (only changed slots written), the program replaced.
    message = dlab.load_balancer(weights={"b2": 0})
    written = int(message.rsplit(" ", 1)[1])
    assert 0 < written < 65537, message
    assert _xdp_prog_id(dlab) != first_id
    result = dlab.http_get(150)
    assert result["failures"] == 0, result["errors"]
    assert "b2" not in result["served"] and sum(result["served"].values()) == 150
