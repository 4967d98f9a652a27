"""BGP end to end: real BIRD (ECMP, L4 hashing), two LB nodes each running `edge-lb run` + ExaBGP + XDP, three
backends. Every assertion looks at the router's kernel route, BIRD's sessions or real client connections."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator

import pytest

from edge_lb.lab.bgplab import BgpLab
from edge_lb.lab.labs import PY, wait_for
from edge_lb.lab.netns import Lab

pytestmark = pytest.mark.root


@pytest.fixture
def blab(lab: Lab) -> Iterator[BgpLab]:
    b = BgpLab(lab)
    try:
        b.build()
        b.start_supervisors()
        b.wait_nexthops({b.node(1).address, b.node(2).address}, 15)
        # Both nodes pick the same backend for a flow only when they see the same healthy set: wait for it.
        wait_for(lambda: all(all(r["state"] == "up" for r in b.status(n)["vips"][0]["backends"])
                             for n in b.nodes), 15, "every backend up on both nodes")
        yield b
    finally:
        for n in b.nodes:
            print(f"--- supervisor lb{n} ---\n{b.supervisor_log(n)[-4000:]}")
        b.close()


def both(b: BgpLab) -> set[str]:
    return {b.node(1).address, b.node(2).address}


def test_router_spreads_udp_flows_over_both_nodes(blab: BgpLab) -> None:
    assert blab.router_nexthops() == both(blab)
    before = {n: blab.node_vip_packets(n) for n in (1, 2)}
    assert blab.send_udp_flows(1000) == 1000
    time.sleep(0.5)
    split = {n: blab.node_vip_packets(n) - before[n] for n in (1, 2)}
    print(f"1000 UDP flows: lb1 {split[1]}, lb2 {split[2]}")
    assert sum(split.values()) == 1000
    assert all(300 <= count <= 700 for count in split.values()), split
    assert blab.http_get(30)["failures"] == 0
    status = blab.status(1)["bgp"]
    assert status["announced"] == ["10.88.100.1/32"] and set(status["peers"].values()) == {"up"}


def test_all_backends_down_withdraws_everywhere_and_one_back_announces(blab: BgpLab) -> None:
    for role in ("b1", "b2", "b3"):
        blab.stop_http(role)
    took = blab.wait_nexthops(set(), 10)
    print(f"every backend dead -> route gone in {took:.2f} s")
    blab.start_http("b2")
    took = blab.wait_nexthops(both(blab), 10)
    print(f"one backend back -> both next hops in {took:.2f} s")
    result = blab.http_get(20)
    assert result["failures"] == 0 and set(result["served"]) == {"b2"}, result


def test_disabled_node_is_dropped_and_50_connections_move_to_the_other(blab: BgpLab) -> None:
    held = blab.hold(50)
    before = held.round()
    assert not [s for s in before if s.startswith("error")], before
    out = subprocess.run([PY, "-m", "edge_lb", "disable", "-c", str(blab.config_path(1))],
                         capture_output=True, text=True, timeout=30, check=True)
    assert "disabled" in out.stdout
    took = blab.wait_nexthops({blab.node(2).address}, 5)
    print(f"disable -> lb1 next hop dropped in {took:.2f} s")
    assert blab.bird_protocols()["lb1"] == "up", "only the route goes; the session stays"
    assert held.round() == before, "all 50 connections keep their backends through lb2 (same Maglev tables)"
    assert blab.status(1)["bgp"]["disabled"] is True
    subprocess.run([PY, "-m", "edge_lb", "enable", "-c", str(blab.config_path(1))], timeout=30, check=True)
    blab.wait_nexthops(both(blab), 5)
    assert held.round() == before


def _exabgp_pids(blab: BgpLab, node: int) -> list[str]:
    out = subprocess.run(["ip", "netns", "pids", blab.node(node).ns.name], capture_output=True, text=True,
                         timeout=10, check=True).stdout.split()
    return [p for p in out if "exabgp" in _cmdline(p)]


def _cmdline(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def test_kill9_supervisor_takes_its_exabgp_down_and_restart_announces_again(blab: BgpLab) -> None:
    assert _exabgp_pids(blab, 1), "ExaBGP runs beside the supervisor"
    blab.kill_supervisor(1, signal.SIGKILL)
    took = blab.wait_nexthops({blab.node(2).address}, 5)
    print(f"kill -9 of lb1's supervisor -> its next hop dropped in {took:.2f} s")
    for _ in range(150):  # bounded at ~15 s: ExaBGP gets SIGKILL from the kernel when its parent dies, its
        if not _exabgp_pids(blab, 1):  # bridge exits on the socket's EOF (slow to reap on a loaded machine)
            break
        time.sleep(0.1)
    left = [_cmdline(p) for p in _exabgp_pids(blab, 1)]
    assert not left, f"no orphaned ExaBGP keeps announcing: {left}"
    assert blab.http_get(20)["failures"] == 0
    blab.start_supervisor(1)
    took = blab.wait_nexthops(both(blab), 15)
    print(f"restart -> lb1 back as a next hop {took:.2f} s after it answered status")


def test_sigterm_withdraws_before_stopping(blab: BgpLab) -> None:
    blab.kill_supervisor(1, signal.SIGTERM)
    for _ in range(500):  # bounded at ~5 s
        if blab.router_nexthops() == {blab.node(2).address}:
            break
        time.sleep(0.01)
    session = blab.bird_protocols()["lb1"]
    assert blab.router_nexthops() == {blab.node(2).address}
    assert session == "up", "the route was withdrawn while the BGP session was still established"
    assert blab.wait_supervisor_exit(1, 30) == 0
    log = blab.supervisor_log(1)
    order = [log.index(s) for s in ("event=shutdown phase=requested", "event=bgp action=withdraw",
                                    "event=shutdown phase=withdrawn", 'event=shutdown phase="bgp stopped"',
                                    "event=shutdown phase=done")]
    assert order == sorted(order), log[-3000:]
    assert blab.bird_protocols()["lb1"] != "up"
