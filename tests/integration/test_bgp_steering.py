"""BGP steering end to end: lb1 runs `edge-lb run` with [vip.bgp] as_path_prepend, large_communities and
down = "med"; lb2 is a static ExaBGP announcing the same VIP plainly (a second site). Every assertion reads
the BIRD router: its kernel route (which next hops carry traffic) and `birdc show route ... all` (the
attributes each node's route arrived with).

    client --- router (BIRD, AS 65000) ---+--- lb1  edge-lb, prepends twice, large community, down med 500
                                          +--- lb2  static ExaBGP, plain
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

from edge_lb.lab.bgplab import VIP, BgpLab
from edge_lb.lab.bird import SAME_SINCE, since
from edge_lb.lab.labs import PY, wait_for
from edge_lb.lab.netns import Lab
from edge_lb.lab.staticbgp import set_static_route, start_static_exabgp

pytestmark = pytest.mark.root

STEER = ('  as_path_prepend = 2\n  large_communities = ["65001:1:2"]\n  down = "med"\n'
         '  down_med = 500\n')


@pytest.fixture
def slab(lab: Lab) -> Iterator[BgpLab]:
    bl = BgpLab(lab)
    try:
        bl.build()
        bl.write_config(1, route=STEER)
        bl.start_supervisor(1)
        yield bl
    finally:
        print(f"--- supervisor lb1 ---\n{bl.supervisor_log(1)[-4000:]}")
        bl.close()


def routes(bl: BgpLab) -> dict[str, dict[str, str]]:
    assert bl.bird is not None
    return bl.bird.routes(f"{VIP}/32")


def lb1_route(bl: BgpLab) -> dict[str, str]:
    return routes(bl).get("lb1", {})


def test_prepend_and_large_community_steer_and_down_med_keeps_a_backup_route(slab: BgpLab) -> None:
    lb1, lb2 = slab.node(1).address, slab.node(2).address
    static = start_static_exabgp(slab, 2)
    wait_for(lambda: set(routes(slab)) == {"lb1", "lb2"}, 20, "the router has the VIP from both nodes")
    # lb1 starts before its backends' checks have risen: down = "med" announces it with MED 500 until
    # they have (a backup route, not a black hole), then without.
    # (Its tunnel checks wait for checkencap's first compile, several seconds on a loaded machine: meanwhile
    # it cannot judge its backends and withholds the route, so wait for that first, then for the route.)
    wait_for(lambda: (slab.status(1).get("check_tunnel") or {}).get("ready"), 60, "lb1's tunnel checks ready")
    wait_for(lambda: "as_path" in lb1_route(slab) and "med" not in lb1_route(slab), 30,
             "lb1's route without MED once its backends are up")

    # Prepend: lb1's path is 3 ASes long, lb2's 1: the router uses lb2 only (no ECMP across them).
    route = lb1_route(slab)
    print(f"lb1's route at the router: {route}")
    assert route["as_path"] == "65001 65001 65001", route
    assert route["large_community"] == "(65001, 1, 2)", route
    slab.wait_nexthops({lb2}, 10)
    assert routes(slab)["lb2"]["best"] == "yes"

    # The plain site withdraws: the prepended route is the one left, and it carries the traffic.
    set_static_route(slab, 2, static, announce=False)
    slab.wait_nexthops({lb1}, 10)
    assert slab.http_get(10)["failures"] == 0

    # Every backend down: with down = "med" lb1 keeps announcing, with MED 500 (default: withdrawn).
    for role in ("b1", "b2", "b3"):
        slab.stop_http(role)
    took = wait_for(lambda: lb1_route(slab).get("med") == "500", 15, "lb1's route with MED 500")
    print(f"every backend down -> lb1 announces with MED 500 after {took:.2f} s")
    assert slab.router_nexthops() == {lb1}, "still announced: a backup route, not a withdraw"
    status = slab.status(1)["bgp"]
    assert status["announced"] == [f"{VIP}/32"], status
    assert status["withheld"][f"{VIP}/32"].endswith('announced with med 500 instead (down = "med")'), status
    assert lb1_route(slab)["as_path"] == "65001 65001 65001"

    # A backend back: the normal route again (no MED).
    slab.start_http("b2")
    wait_for(lambda: "med" not in lb1_route(slab), 15, "lb1's route without MED")

    # down = "med" is for health only: the maintenance switch still withdraws.
    subprocess.run([PY, "-m", "edge_lb", "disable", "-c", str(slab.config_path(1))], timeout=30, check=True)
    slab.wait_nexthops(set(), 10)
    assert "lb1" not in routes(slab)
    subprocess.run([PY, "-m", "edge_lb", "enable", "-c", str(slab.config_path(1))], timeout=30, check=True)
    slab.wait_nexthops({lb1}, 10)


@pytest.fixture
def plain(lab: Lab) -> Iterator[BgpLab]:
    bl = BgpLab(lab)
    try:
        bl.build()
        bl.start_supervisor(1)
        yield bl
    finally:
        print(f"--- supervisor lb1 ---\n{bl.supervisor_log(1)[-4000:]}")
        bl.close()


def _since(bl: BgpLab, protocol: str) -> float:
    """BIRD's "Since" of a protocol (changes when its session is reset)."""
    assert bl.bird is not None
    return since(bl.bird.birdc("show", "protocols"), protocol)


def test_reload_adds_and_removes_a_peer_without_touching_the_other_session(plain: BgpLab) -> None:
    """`edge-lb reload` with a second [[bgp.peer]] (the router on a second subnet of the same link), then
    without the first: the new session comes up and gets the route, the removed one ends, the one that stays
    is never reset and the router keeps the VIP's route throughout."""
    lb = plain.node(1)
    assert plain.router is not None and plain.bird is not None
    bird = plain.bird
    second, local2 = "10.88.19.1", "10.88.19.2"  # BIRD takes a second session to one neighbor only this way
    plain.router.addr(lb.link.router_if, f"{second}/24")
    lb.ns.addr("eth0", f"{local2}/24")
    conf = plain.lab.tmpdir / "bird.conf"
    conf.write_text(conf.read_text() + f"protocol bgp lb1b from lbpeer {{ neighbor {local2} as {lb.asn}; "
                                       f"source address {second}; }}\n")
    bird.birdc("configure")
    plain.wait_nexthops({lb.address}, 15)
    since_a = _since(plain, "lb1")
    base = plain.config_text(1)
    peer_b = (f'\n[[bgp.peer]]\naddress = "{second}"\nas = 65000\nhold_time = 3\n'
              f'local_address = "{local2}"\n')

    plain.config_path(1).write_text(base + peer_b)
    assert plain.reload(1).startswith("reloaded ")
    took = wait_for(lambda: bird.protocols().get("lb1b") == "up"
                    and "lb1b" in bird.routes(f"{VIP}/32"), 20, "the added peer up with the route")
    print(f"reload adding a peer: session up with the route {took:.2f} s after the reload answered")
    assert plain.router_nexthops() == {lb.address, local2}, "the route over both sessions (ECMP)"
    assert abs(_since(plain, "lb1") - since_a) < SAME_SINCE, "the other session was not reset"
    assert set(plain.status(1)["bgp"]["peers"]) == {lb.router_address, second}

    since_b = _since(plain, "lb1b")
    only_b = base.replace(f'address = "{lb.router_address}"', f'address = "{second}"')
    only_b = only_b.replace(f'local_address = "{lb.address}"', f'local_address = "{local2}"')
    plain.config_path(1).write_text(only_b)
    assert plain.reload(1).startswith("reloaded ")
    wait_for(lambda: bird.protocols().get("lb1") != "up", 20, "the removed peer's session down")
    plain.wait_nexthops({local2}, 10)
    assert set(bird.routes(f"{VIP}/32")) == {"lb1b"}
    assert abs(_since(plain, "lb1b") - since_b) < SAME_SINCE, "the session that stays was not reset"
    assert set(plain.status(1)["bgp"]["peers"]) == {second}

    plain.config_path(1).write_text(base.replace("local_as = 65001", "local_as = 65009"))
    out = subprocess.run([PY, "-m", "edge_lb", "reload", "-c", str(plain.config_path(1))],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode != 0 and "bgp.local_as: changed; ExaBGP takes it only when it starts" in (
        out.stdout + out.stderr), out
