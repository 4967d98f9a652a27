"""The BGP lab before the supervisor speaks BGP: each LB node announces the VIP with a static ExaBGP (a test
scaffold) and balances with `edge-lb load`; the router (BIRD 2, and again FRR) spreads flows over both with
ECMP; a withdraw on a live session and a lost session each leave one next hop.

    client --- router (BIRD or FRR, AS 65000) ---+--- lb1 (ExaBGP AS 65001 + XDP)
                 |                         +--- lb2 (ExaBGP AS 65002 + XDP)
                b1 b2 b3 (decap + HTTP on the VIP)
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_lb.lab.bgplab import BgpLab
from edge_lb.lab.labs import PY, wait_for
from edge_lb.lab.netns import Lab
from edge_lb.lab.staticbgp import set_static_route, start_static_exabgp

pytestmark = pytest.mark.root

UDP_FLOWS = 1000


@pytest.fixture(params=["bird", "frr"])
def blab(lab: Lab, request: pytest.FixtureRequest) -> Iterator[BgpLab]:
    """The lab with BIRD 2 or FRR as the router (the versions the README names)."""
    if request.param == "frr" and not Path("/usr/lib/frr/bgpd").exists():
        pytest.skip("needs FRR (apt-get install frr; scripts/setup.sh installs it)")
    bl = BgpLab(lab, router_kind=request.param)
    try:
        bl.build()
        yield bl
    finally:
        if bl.frr is not None:
            print(f"--- frr ---\n{bl.frr.log()[-4000:]}")
        bl.close()


def load_both(bl: BgpLab) -> None:
    for n in bl.nodes:
        path = bl.write_config(n)
        check = subprocess.run([PY, "-m", "edge_lb", "check", "-c", str(path)], capture_output=True,
                               text=True, timeout=60, check=False)
        assert check.returncode == 0, check.stderr
        bl.load_balancer(n)


def udp_split(bl: BgpLab, flows: int, first_port: int) -> dict[int, int]:
    """UDP VIP packets counted by each node while `flows` single-datagram flows are sent."""
    before = {n: bl.node_vip_packets(n) for n in bl.nodes}
    assert bl.send_udp_flows(flows, first_port=first_port) == flows

    def delta() -> dict[int, int]:
        return {n: bl.node_vip_packets(n) - before[n] for n in bl.nodes}

    wait_for(lambda: sum(delta().values()) >= flows, 5, f"{flows} UDP packets counted by the LB nodes")
    return delta()


def test_static_exabgp_ecmp_split_and_failover(blab: BgpLab) -> None:
    load_both(blab)
    lb1, lb2 = blab.node(1).address, blab.node(2).address
    started = time.monotonic()
    speakers = {n: start_static_exabgp(blab, n) for n in blab.nodes}
    blab.wait_nexthops({lb1, lb2}, 30)
    print(f"\nroute with both next hops {time.monotonic() - started:.2f} s after starting both ExaBGPs")
    sessions = blab.router_sessions()
    assert sessions == {"lb1": "up", "lb2": "up"}, sessions

    split = udp_split(blab, UDP_FLOWS, 20000)
    print(f"{UDP_FLOWS} UDP flows: lb1 {split[1]}, lb2 {split[2]}")
    assert sum(split.values()) == UDP_FLOWS
    assert all(0.3 * UDP_FLOWS <= n <= 0.7 * UDP_FLOWS for n in split.values()), split

    result = blab.http_get(40)
    assert result["failures"] == 0, result["errors"]
    assert set(result["served"]) <= {"b1", "b2", "b3"} and len(result["served"]) >= 2, result

    # A withdraw on a live session: lb1's ExaBGP re-reads a config without the route (SIGUSR1)
    set_static_route(blab, 1, speakers[1], announce=False)
    reloaded = time.monotonic()
    blab.wait_nexthops({lb2}, 10)
    print(f"lb1 withdrew: its next hop gone {1000 * (time.monotonic() - reloaded):.0f} ms after SIGUSR1")
    assert blab.router_sessions()["lb1"] == "up", "a withdraw, not a lost session"
    set_static_route(blab, 1, speakers[1], announce=True)
    blab.wait_nexthops({lb1, lb2}, 10)

    speakers[1].kill()  # SIGKILL by PID: the kernel closes its TCP session, the router withdraws at once
    killed = time.monotonic()
    blab.wait_nexthops({lb2}, 10)
    print(f"lb1's next hop gone {1000 * (time.monotonic() - killed):.0f} ms after its ExaBGP was killed")
    assert blab.router_sessions()["lb1"] != "up"

    after = udp_split(blab, 200, 30000)
    assert after == {1: 0, 2: 200}, after
    result = blab.http_get(20)
    assert result["failures"] == 0, result["errors"]
    assert speakers[2].poll() is None
