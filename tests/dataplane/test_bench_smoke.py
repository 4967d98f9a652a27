"""Smoke test of `edge-lb bench`: the JSON document is complete and every figure is positive.

No timing asserts: figures on a shared VM are no pass/fail criterion. The parts without root:
tests/unit/test_bench.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from edge_lb.dataplane import bench

from .conftest import needs_root

pytestmark = [pytest.mark.root, needs_root]
STATS_SYSCTL = Path("/proc/sys/kernel/bpf_stats_enabled")

CASES = {"tcp_syn_new_flow", "tcp_syn_flood", "tcp_established", "udp_vip", "tcp_ipv6_vip",
         "tcp_established_gue", "tcp_ipv6_gue", "non_vip", "pass", "floor"}


def test_bench_json(capsys: pytest.CaptureFixture[str]) -> None:
    before = STATS_SYSCTL.read_text()
    affinity = os.sched_getaffinity(0)
    assert bench.main(json_out=True, packets=300) == 0
    doc = json.loads(capsys.readouterr().out)

    assert STATS_SYSCTL.read_text() == before, "kernel.bpf_stats_enabled is left as it was (BPF_ENABLE_STATS)"
    assert os.sched_getaffinity(0) == affinity, "the CPU affinity must be restored"
    assert {"method", "cpu", "kernel", "cases", "ratios", "targets", "maglev_ms"} <= set(doc)
    assert set(doc["cases"]) == CASES
    for name, case in doc["cases"].items():
        assert case["ns_per_packet"] > 0, name
        assert case["runs"] == bench.ROUNDS * 300, name
        assert case["action"] == ("XDP_PASS" if name in {"non_vip", "pass"} else "XDP_TX"), name
        assert doc["ratios"][name]["x_floor"] > 0 and doc["ratios"][name]["x_pass"] > 0, name
    assert doc["ratios"]["floor"]["x_floor"] == 1.0 and doc["ratios"]["pass"]["x_pass"] == 1.0
    for name in ("tcp_established", "tcp_ipv6_vip", "tcp_syn_new_flow", "non_vip", "maglev_1000"):
        assert isinstance(doc["targets"][name]["met"], bool), name
    assert set(doc["maglev_ms"]) == {"10", "100", "1000"}
    assert all(ms > 0 for ms in doc["maglev_ms"].values())


def test_table_has_every_case(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(json_out=False, packets=50) == 0
    table = capsys.readouterr().out
    for name in CASES:
        assert f"\n{name} " in table
    assert "x floor" in table and "maglev 1000" in table


def test_the_gue_cases_measure_gue() -> None:
    """tcp_established_gue / tcp_ipv6_gue go out in GUE (outer protocol / next header 17, UDP to 6080), their
    IPIP twins in IPIP / IP6IP6: the two pairs differ by the UDP header only."""
    from edge_lb.config import parse_config
    from edge_lb.dataplane.simulate import Simulator

    sim = Simulator(parse_config(bench.CONFIG))
    try:
        for frame, at, proto in ((bench.tcp4(0, bench.SYN, dst=bench.GUE_VIP4), 14 + 9, 17),
                                 (bench.tcp6(0, bench.SYN, dst=bench.GUE_VIP6), 14 + 6, 17),
                                 (bench.tcp4(0, bench.SYN), 14 + 9, 4),
                                 (bench.tcp6(0, bench.SYN), 14 + 6, 41)):
            verdict, out = sim.run(frame)
            assert verdict == "XDP_TX" and out[at] == proto
            if proto == 17:
                udp = 14 + (20 if at == 23 else 40)
                assert int.from_bytes(out[udp + 2:udp + 4], "big") == 6080
    finally:
        sim.close()
