"""BGP's pure core: the announce policy, the command renderer, the announcer's diffs; the [bgp] config."""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Any

import pytest

from edge_lb.bgp.policy import Announcer, FakeSpeaker, Route, desired_routes, host_prefix, render, withheld
from edge_lb.config import Config, parse_config
from edge_lb.configbgp import Bgp, Peer, RouteAttrs
from edge_lb.dataplane.desired import VipKey
from edge_lb.errors import BgpError, ConfigError

V4, V6 = ipaddress.ip_address("10.200.1.1"), ipaddress.ip_address("fd00::1")


def config(bgp_table: dict[str, Any] | None = None, **vip: Any) -> Config:
    first = {"address": str(V4), "port": 80, "protocol": "tcp", "min_healthy": 2,
             "backend": [{"address": "10.0.0.1"}, {"address": "10.0.0.2"}, {"address": "10.0.0.3",
                                                                             "weight": 0}]}
    first.update(vip)
    data: dict[str, Any] = {"node": {"interface": "eth0"}, "vip": [
        first,
        {"address": str(V4), "port": 443, "protocol": "tcp", "backend": [{"address": "10.0.0.1"}]},
        {"address": str(V6), "port": 80, "protocol": "tcp", "backend": [{"address": "fd01::1"}],
         "bgp": {"med": 10, "communities": ["65000:100", "65000:200"]}},
    ]}
    if bgp_table is not None:
        data["bgp"] = bgp_table
    return parse_config(data)


def up(*pairs: tuple[int, str]) -> dict[Any, bool]:
    """(port, backend) pairs that are healthy."""
    out = {}
    for port, backend in pairs:
        vip = V6 if ":" in backend else V4
        out[(VipKey(vip, port, 6), ipaddress.ip_address(backend))] = True
    return out


CASES = [
    ("everything healthy", up((80, "10.0.0.1"), (80, "10.0.0.2"), (443, "10.0.0.1"), (80, "fd01::1")),
     True, False, {str(V4), str(V6)}),
    ("not attached: nothing", up((80, "10.0.0.1"), (80, "10.0.0.2"), (443, "10.0.0.1"), (80, "fd01::1")),
     False, False, set()),
    ("disabled: nothing", up((80, "10.0.0.1"), (80, "10.0.0.2"), (443, "10.0.0.1"), (80, "fd01::1")),
     True, True, set()),
    ("one VIP of an address below min_healthy withdraws the address",
     up((80, "10.0.0.1"), (443, "10.0.0.1"), (80, "fd01::1")), True, False, {str(V6)}),
    ("a drained backend does not count towards min_healthy",
     up((80, "10.0.0.1"), (80, "10.0.0.3"), (443, "10.0.0.1"), (80, "fd01::1")), True, False, {str(V6)}),
    ("the other VIP on the address down withdraws it too",
     up((80, "10.0.0.1"), (80, "10.0.0.2"), (80, "fd01::1")), True, False, {str(V6)}),
]


@pytest.mark.parametrize(("serving", "attached", "disabled", "announced"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_policy(serving: dict[Any, bool], attached: bool, disabled: bool, announced: set[str]) -> None:
    routes = desired_routes(config(), serving, attached, disabled)
    assert {str(p.network_address) for p in routes} == announced


def test_min_healthy_zero_announces_without_healthy_backends() -> None:
    routes = desired_routes(config(min_healthy=0), up((443, "10.0.0.1")), True, False)
    assert host_prefix(V4) in routes


RENDER = [
    (Route(host_prefix(V4)), "announce", "announce route 10.200.1.1/32 next-hop self"),
    (Route(host_prefix(V6), RouteAttrs(med=10, communities=("65000:100", "65000:200"))), "withdraw",
     "withdraw route fd00::1/128 next-hop self med 10 community [65000:100 65000:200]"),
    (Route(host_prefix(V4), RouteAttrs(next_hop="10.9.9.9")), "announce",
     "announce route 10.200.1.1/32 next-hop 10.9.9.9"),
]


@pytest.mark.parametrize(("route", "action", "command"), RENDER)
def test_render(route: Route, action: str, command: str) -> None:
    assert render(action, route) == command


@pytest.mark.parametrize("bad", ["self\nwithdraw route 0.0.0.0/0 next-hop self", "self; x", "se\x00lf"])
def test_render_refuses_a_second_command(bad: str) -> None:
    with pytest.raises(ValueError, match="control characters"):
        render("announce", Route(host_prefix(V4), RouteAttrs(next_hop=bad)))


def test_announcer_sends_only_the_difference_and_stops_at_a_refusal() -> None:
    speaker = FakeSpeaker()
    announcer = Announcer(speaker)
    a, b = Route(host_prefix(V4)), Route(host_prefix(V6), RouteAttrs(med=5))

    async def main() -> None:
        assert await announcer.sync({a.prefix: a, b.prefix: b}, "test") == 2
        assert await announcer.sync({a.prefix: a, b.prefix: b}, "test") == 0, "idempotent"
        assert await announcer.sync({b.prefix: b}, "test") == 1
        changed = Route(b.prefix, RouteAttrs(med=7))
        assert await announcer.sync({changed.prefix: changed}, "test") == 1
        speaker.refuse = True
        with pytest.raises(BgpError):
            await announcer.sync({}, "test")
        assert announcer.announced == {changed.prefix: changed}, "a refused withdraw is still announced"
        speaker.refuse = False
        announcer.forget()
        assert await announcer.sync({changed.prefix: changed}, "restart") == 1

    asyncio.run(main())
    assert speaker.commands == [
        "announce route 10.200.1.1/32 next-hop self", "announce route fd00::1/128 next-hop self med 5",
        "withdraw route 10.200.1.1/32 next-hop self", "announce route fd00::1/128 next-hop self med 7",
        "announce route fd00::1/128 next-hop self med 7"]


def test_bgp_config_parses() -> None:
    cfg = config({"local_as": 65001, "router_id": "10.0.0.9", "drain_time": 1,
                  "peer": [{"address": "10.200.0.1", "as": 65000},
                           {"address": "fd00:200::1", "as": 65000, "hold_time": 9,
                            "local_address": "fd00:200::2"}]})
    assert cfg.bgp == Bgp(local_as=65001, router_id=ipaddress.IPv4Address("10.0.0.9"), drain_time=1.0,
                          peers=(Peer(address=ipaddress.ip_address("10.200.0.1"), asn=65000),
                                 Peer(address=ipaddress.ip_address("fd00:200::1"), asn=65000, hold_time=9,
                                      local_address=ipaddress.ip_address("fd00:200::2"))))
    assert config().bgp is None


P4, P6 = {"address": "10.0.0.1", "as": 2}, {"address": "fd00:9::1", "as": 2}
BOTH = {"local_as": 1, "peer": [P4, P6]}


@pytest.mark.parametrize(("bgp", "vip", "problem"), [
    ({"peer": [P4, P6]}, {}, "bgp.local_as: required"),
    ({"local_as": 1}, {}, "bgp.peer: at least one [[bgp.peer]] is required"),
    ({"local_as": 1, "peer": [P6]}, {},
     "bgp.router_id: required when no peer is IPv4 (a BGP identifier is an IPv4 address)"),
    ({"local_as": 1, "router_id": "10.0.0.9", "peer": [P4]}, {},
     "vip[2].address: an IPv6 VIP needs an IPv6 [[bgp.peer]] to be announced"),
    (BOTH, {"bgp": {"next_hop": "fd00::9"}}, "vip[0].bgp.next_hop: an IPv4 VIP needs an IPv4 next hop"),
    ({"local_as": 1, "peer": [{"address": "10.0.0.1"}, P6]}, {}, "bgp.peer[0].as: required"),
    ({"local_as": 1, "peer": [{**P4, "hold_time": 1}, P6]}, {},
     "bgp.peer[0].hold_time: must be an integer 3..65535"),
    ({"local_as": 1, "peer": [{**P4, "local_address": "fd00::2"}, P6]}, {},
     "bgp.peer[0].local_address: IPv6 address for an IPv4 peer"),
    ({**BOTH, "router_id": "fd00::1"}, {},
     "bgp.router_id: must be an IPv4 address (BGP identifiers are 32 bits)"),
    ({**BOTH, "disable_file": "/var/lib/"}, {},
     "bgp.disable_file: must be an absolute path to a file"),
    (BOTH, {"bgp": {"communities": ["65000:70000"]}},
     "vip[0].bgp.communities: '65000:70000' is not \"ASN:VALUE\" with both parts 0..65535"),
    (BOTH, {"bgp": {"med": 5}},
     "vip[1].bgp: route attributes differ from vip[0], which has the same address (one route per address)"),
    (BOTH, {"min_healthy": 4},
     "vip[0].min_healthy: 4 is more than the VIP's 3 backends: it could never be announced"),
])
def test_bgp_config_problems(bgp: dict[str, Any], vip: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config(bgp, **vip)
    assert problem in caught.value.problems


def test_withheld_says_why_per_address() -> None:
    healthy = up((80, "10.0.0.1"), (80, "10.0.0.2"), (80, "fd01::1"))  # 443 on the V4 address has none
    why = withheld(config(), healthy, True, False)
    assert why[host_prefix(V6)] is None
    assert why[host_prefix(V4)] == "10.200.1.1:443/tcp: 0 backends take new flows, min_healthy is 1"
    assert set(withheld(config(), healthy, False, False).values()) == {"the XDP program is not attached"}
    assert set(withheld(config(), healthy, True, True).values()) == {"the node is disabled for maintenance"}
