"""The BGP lab before the supervisor speaks BGP: each LB node announces the VIP with a static ExaBGP (a test
scaffold) and balances with `edge-lb load`; BIRD on the router spreads flows over both with ECMP.

    client --- router (BIRD, AS 65000) ---+--- lb1 (ExaBGP AS 65001 + XDP)
                 |                         +--- lb2 (ExaBGP AS 65002 + XDP)
                b1 b2 b3 (decap + HTTP on the VIP)
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_lb.lab.bgplab import ROUTER_AS, VIP, BgpLab
from edge_lb.lab.labs import PY, wait_for
from edge_lb.lab.netns import Lab

pytestmark = pytest.mark.root

EXABGP = Path(sys.executable).parent / "exabgp"
UDP_FLOWS = 1000


def exabgp_conf(bl: BgpLab, node: int) -> str:
    """A process-less ExaBGP config announcing the VIP to the router (a bare `route` inside `neighbor` is
    rejected by ExaBGP 4.2 and 5: it goes in `static`)."""
    lb = bl.node(node)
    return (f"neighbor {lb.router_address} {{\n"
            f"    router-id {lb.address};\n    local-address {lb.address};\n"
            f"    local-as {lb.asn};\n    peer-as {ROUTER_AS};\n    hold-time 3;\n"
            "    family { ipv4 unicast; }\n"
            f"    static {{ route {VIP}/32 next-hop self; }}\n"
            "}\n")


def start_static_exabgp(bl: BgpLab, node: int) -> subprocess.Popen[bytes]:
    """ExaBGP in the node's namespace, as root (no privilege drop), without its named-pipe CLI (the pipe
    directory is shared by every namespace)."""
    conf = bl.lab.tmpdir / f"exabgp-lb{node}.conf"
    conf.write_text(exabgp_conf(bl, node))
    env = {"exabgp_daemon_user": "root", "exabgp_daemon_drop": "false", "exabgp_api_cli": "false",
           "exabgp_daemon_daemonize": "false"}
    return bl.node(node).ns.spawn([str(EXABGP), "server", str(conf)],
                                  bl.lab.tmpdir / f"exabgp-lb{node}.log", env=env)


@pytest.fixture
def blab(lab: Lab) -> Iterator[BgpLab]:
    bl = BgpLab(lab)
    try:
        bl.build()
        yield bl
    finally:
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
    protocols = blab.bird_protocols()
    assert (protocols["lb1"], protocols["lb2"]) == ("up", "up"), protocols

    split = udp_split(blab, UDP_FLOWS, 20000)
    print(f"{UDP_FLOWS} UDP flows: lb1 {split[1]}, lb2 {split[2]}")
    assert sum(split.values()) == UDP_FLOWS
    assert all(0.3 * UDP_FLOWS <= n <= 0.7 * UDP_FLOWS for n in split.values()), split

    result = blab.http_get(40)
    assert result["failures"] == 0, result["errors"]
    assert set(result["served"]) <= {"b1", "b2", "b3"} and len(result["served"]) >= 2, result

    speakers[1].kill()  # SIGKILL by PID: the kernel closes its TCP session, BIRD withdraws at once
    killed = time.monotonic()
    blab.wait_nexthops({lb2}, 10)
    print(f"lb1's next hop gone {1000 * (time.monotonic() - killed):.0f} ms after its ExaBGP was killed")
    assert blab.bird_protocols()["lb1"] != "up"

    after = udp_split(blab, 200, 30000)
    assert after == {1: 0, 2: 200}, after
    result = blab.http_get(20)
    assert result["failures"] == 0, result["errors"]
    assert speakers[2].poll() is None
