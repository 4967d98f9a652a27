"""BGP steering, the pure parts: [vip.bgp] as_path_prepend / large_communities / down policy and the peers'
TCP MD5 keys (config, key paths), the routes `desired_routes` builds from them, the API commands `render`
writes, the neighbor blocks of exabgp.conf, and the kernel check for TCP MD5."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
from pathlib import Path
from typing import Any

import pytest

from edge_lb.bgp import exabgp_config
from edge_lb.bgp.controller import BgpController
from edge_lb.bgp.exabgp_api import ApiChannel
from edge_lb.bgp.exabgp_config import check_md5, render_config
from edge_lb.bgp.exabgp_reload import summary_peers
from edge_lb.bgp.policy import FakeSpeaker, Route, desired_routes, host_prefix, render
from edge_lb.config import Config, parse_config
from edge_lb.configbgp import Bgp, Peer, RouteAttrs
from edge_lb.control.operations import restart_only
from edge_lb.dataplane.desired import VipKey
from edge_lb.errors import BgpError, ConfigError

V4 = ipaddress.ip_address("10.200.1.1")
PEERS = [{"address": "10.0.0.1", "as": 65000}, {"address": "fd00:9::1", "as": 65000}]


def config(route: dict[str, Any] | None = None, peers: list[dict[str, Any]] | None = None,
           local_as: int = 65001, **bgp: Any) -> Config:
    vip: dict[str, Any] = {"address": str(V4), "port": 80, "protocol": "tcp",
                           "backend": [{"address": "10.0.0.7"}]}
    if route is not None:
        vip["bgp"] = route
    return parse_config({"node": {"interface": "eth0"}, "vip": [vip],
                         "bgp": {"local_as": local_as, "peer": PEERS if peers is None else peers, **bgp}})


def problems(**kwargs: Any) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        config(**kwargs)
    return caught.value.problems


@pytest.mark.parametrize(("route", "attrs"), [
    ({}, RouteAttrs()),
    ({"as_path_prepend": 2, "large_communities": ["65001:1:2", "4294967295:0:07"]},
     RouteAttrs(as_path_prepend=2, large_communities=("65001:1:2", "4294967295:0:7"))),
    ({"as_path_prepend": [65001, 64999]}, RouteAttrs(as_path_prepend=(65001, 64999))),
    ({"med": 10, "down": "med", "down_med": 500}, RouteAttrs(med=10, down="med", down_med=500)),
    ({"down": "withdraw"}, RouteAttrs()),
])
def test_route_attributes_parse(route: dict[str, Any], attrs: RouteAttrs) -> None:
    assert config(route).vips[0].route == attrs


@pytest.mark.parametrize(("kwargs", "problem"), [
    ({"route": {"as_path_prepend": 17}},
     "vip[0].bgp.as_path_prepend: must be a count 0..16 (our AS repeated) or a list of 1..16 ASNs"),
    ({"route": {"as_path_prepend": [65001, 0]}}, "vip[0].bgp.as_path_prepend: must be a count 0..16"),
    ({"route": {"as_path_prepend": []}}, "vip[0].bgp.as_path_prepend: must be a count 0..16"),
    ({"route": {"as_path_prepend": True}}, "vip[0].bgp.as_path_prepend: must be a count 0..16"),
    ({"route": {"as_path_prepend": 1}, "peers": [{"address": "10.0.0.1", "as": 65001}]},
     "vip[0].bgp.as_path_prepend: needs eBGP peers: peer 10.0.0.1 is iBGP (as = local_as)"),
    ({"route": {"large_communities": ["65000:1"]}},
     "vip[0].bgp.large_communities: '65000:1' is not \"GLOBAL:DATA1:DATA2\" with each part 0..4294967295"),
    ({"route": {"large_communities": ["1:2:4294967296"]}},
     "vip[0].bgp.large_communities: '1:2:4294967296' is not \"GLOBAL:DATA1:DATA2\""),
    ({"route": {"large_communities": "1:2:3"}},
     'vip[0].bgp.large_communities: must be a list of "GLOBAL:DATA1:DATA2" strings'),
    ({"route": {"down": "drop"}}, 'vip[0].bgp.down: must be "withdraw" or "med"'),
    ({"route": {"down": "med"}}, 'vip[0].bgp.down_med: required with down = "med"'),
    ({"route": {"down_med": 5}}, 'vip[0].bgp.down_med: only used with down = "med"'),
    ({"route": {"med": 50, "down": "med", "down_med": 50}},
     "vip[0].bgp.down_med: must be worse (greater) than med (50)"),
    ({"route": {"down": "med", "down_med": 0}}, "vip[0].bgp.down_med: must be worse (greater) than med (0)"),
    ({"peers": [{**PEERS[0], "md5_password": ""}]},
     "bgp.peer[0].md5_password: must be 1..80 printable ASCII characters"),
    ({"peers": [{**PEERS[0], "md5_password": "x" * 81}]}, "bgp.peer[0].md5_password: must be 1..80"),
    ({"peers": [{**PEERS[0], "md5_password": "caf\u00e9"}]}, "bgp.peer[0].md5_password: must be 1..80"),
    ({"peers": [{**PEERS[0], "md5_password_file": "/nonexistent/k"}]},
     "bgp.peer[0].md5_password_file: cannot read the TCP MD5 key from /nonexistent/k: No such file"),
    ({"peers": [{**PEERS[0], "md5_password": "a", "md5_password_file": "/etc/hostname"}]},
     "bgp.peer[0].md5_password_file: give md5_password or md5_password_file, not both"),
])
def test_bad_values_are_rejected_with_their_key_path(kwargs: dict[str, Any], problem: str) -> None:
    found = problems(**kwargs)
    assert any(p.startswith(problem) for p in found), found


def test_md5_key_from_a_file_and_kept_out_of_repr(tmp_path: Path) -> None:
    key = tmp_path / "peer.key"
    key.write_text("s3cret with spaces\n")
    cfg = config(peers=[{**PEERS[0], "md5_password_file": str(key)}])
    assert cfg.bgp is not None and cfg.bgp.peers[0].md5_password == "s3cret with spaces"
    assert "s3cret" not in repr(cfg.bgp)
    key.write_text("\x01bad\n")
    assert any(p.startswith(f"bgp.peer[0].md5_password_file: {key}: the key must be 1..80")
               for p in problems(peers=[{**PEERS[0], "md5_password_file": str(key)}]))


# --- desired routes: the as-path and the down policy ------------------------------------------------------

KEY = VipKey(V4, 80, 6)
UP = {(KEY, ipaddress.ip_address("10.0.0.7")): True}
STEER = {"med": 10, "as_path_prepend": 2, "large_communities": ["65001:1:2"], "down": "med", "down_med": 500}

# (case, route table, healthy, attached, disabled, expected rendered announce or None = withdrawn)
POLICY = [
    ("default: as today", {}, UP, True, False, "announce route 10.200.1.1/32 next-hop self"),
    ("default, down: withdrawn", {}, {}, True, False, None),
    ("steered, up", STEER, UP, True, False, "announce route 10.200.1.1/32 next-hop self med 10 "
     "as-path [65001 65001 65001] large-community [65001:1:2]"),
    ("steered, down: the worse MED", STEER, {}, True, False, "announce route 10.200.1.1/32 next-hop self "
     "med 500 as-path [65001 65001 65001] large-community [65001:1:2]"),
    ("down=med, disabled: withdrawn", STEER, {}, True, True, None),
    ("down=med, detached: withdrawn", STEER, UP, False, False, None),
    ("a list of ASNs after ours", {"as_path_prepend": [64999, 64998]}, UP, True, False,
     "announce route 10.200.1.1/32 next-hop self as-path [65001 64999 64998]"),
]


@pytest.mark.parametrize(("route", "healthy", "attached", "disabled", "command"), [c[1:] for c in POLICY],
                         ids=[c[0] for c in POLICY])
def test_desired_routes_carry_the_steering(route: dict[str, Any], healthy: dict[Any, bool], attached: bool,
                                           disabled: bool, command: str | None) -> None:
    routes = desired_routes(config(route), healthy, attached, disabled)
    got = routes.get(host_prefix(V4))
    assert (render("announce", got) if got is not None else None) == command


def test_a_changed_down_state_is_a_changed_route() -> None:
    """The announcer re-announces on any change of Route: up -> down(med) must differ."""
    cfg = config(STEER)
    assert desired_routes(cfg, UP, True, False) != desired_routes(cfg, {}, True, False)


def test_render_withdraw_keeps_the_attributes_and_refuses_nothing_new() -> None:
    route = Route(host_prefix(V4), RouteAttrs(large_communities=("1:2:3",)), (65001,))
    assert render("withdraw", route) == ("withdraw route 10.200.1.1/32 next-hop self as-path [65001] "
                                         "large-community [1:2:3]")


# --- exabgp.conf: MD5 and families ------------------------------------------------------------------------

LOCAL = {"10.0.0.1": "10.0.0.2", "fd00:9::1": "fd00:9::2"}


def _block(conf: str, peer: str) -> list[str]:
    lines = conf.splitlines()
    start = lines.index(f"neighbor {peer} {{")
    return [line.strip() for line in lines[start:lines.index("}", start) + 1]]


def test_neighbor_blocks_have_md5_and_their_family() -> None:
    secret = "a b;c}{"  # spaces and ExaBGP's separators: carried base64-encoded, one safe token
    bgp = Bgp(local_as=65001, peers=(
        Peer(address=ipaddress.ip_address("10.0.0.1"), asn=65000, md5_password=secret),
        Peer(address=ipaddress.ip_address("fd00:9::1"), asn=65000)))
    conf = render_config(bgp, "10.0.0.2", LOCAL, ["/bin/true"])
    v4, v6 = _block(conf, "10.0.0.1"), _block(conf, "fd00:9::1")
    encoded = base64.b64encode(secret.encode()).decode()
    assert f"md5-password {encoded};" in v4 and "md5-base64 true;" in v4
    assert "ipv4 unicast;" in v4 and "ipv6 unicast;" not in v4
    assert not any("md5" in line for line in v6)
    assert "local-address fd00:9::2;" in v6 and "ipv6 unicast;" in v6 and "ipv4 unicast;" not in v6


def test_md5_kernel_check_passes_here_and_names_the_peer_if_refused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    bgp = Bgp(local_as=65001, peers=(
        Peer(address=ipaddress.ip_address("fd00:9::1"), asn=65000, md5_password="k"),))
    check_md5(bgp)  # this kernel has CONFIG_TCP_MD5SIG (CI's too): the real setsockopt succeeds
    check_md5(Bgp(local_as=65001, peers=(Peer(address=ipaddress.ip_address("10.0.0.1"), asn=65000),)))
    # A kernel without it answers the same setsockopt with an error (ENOPROTOOPT): made here with a struct
    # too short, which the kernel refuses (EINVAL) through the same call.
    monkeypatch.setattr(exabgp_config, "_md5sig", lambda address, key: b"short")
    with pytest.raises(BgpError, match=r"peer fd00:9::1: md5_password needs TCP MD5 signatures "
                                       r"\(TCP_MD5SIG\), which this kernel refuses"):
        check_md5(bgp)


# --- reload: what a running node takes live ---------------------------------------------------------------

@pytest.mark.parametrize(("change", "refused"), [
    ({"peers": [PEERS[0], *PEERS[1:], {"address": "10.0.0.9", "as": 65009}]}, None),
    ({"peers": [PEERS[1], {"address": "10.0.0.1", "as": 65000, "md5_password": "k"}]}, None),
    ({"drain_time": 5}, None),
    ({"local_as": 65002}, "bgp.local_as: changed; ExaBGP takes it only when it starts"),
    ({"router_id": "10.9.9.9"}, "bgp.router_id: changed; ExaBGP takes it only when it starts"),
    ({"heartbeat_timeout": 1.5}, "bgp.heartbeat_timeout: changed; ExaBGP takes it only when it starts"),
])
def test_reload_takes_peer_changes_and_refuses_session_wide_ones(change: dict[str, Any],
                                                                 refused: str | None) -> None:
    found = [p for p in restart_only(config(), config(**change)) if p.startswith("bgp")]
    if refused is None:
        assert found == []
    else:
        assert len(found) == 1 and found[0].startswith(refused), found


def test_reload_refuses_adding_or_removing_the_bgp_table() -> None:
    no_bgp = parse_config({"node": {"interface": "eth0"}, "vip": [
        {"address": str(V4), "port": 80, "protocol": "tcp", "backend": [{"address": "10.0.0.7"}]}]})
    assert any(p.startswith("bgp: added or removed; the BGP speaker starts and stops with the node")
               for p in restart_only(no_bgp, config()))


def test_controller_follows_a_reloads_peers_and_announces_to_the_new_one(tmp_path: Path) -> None:
    """The running config's [[bgp.peer]] list changes (a reload): the speaker is told the new list once, then
    every route is sent again (the new peer has none); a refused reload is retried, routes keep flowing."""
    one = config(peers=[PEERS[0]], disable_file=str(tmp_path / "off"))
    two = config(peers=[PEERS[0], {"address": "10.0.0.9", "as": 65009}], disable_file=str(tmp_path / "off"))
    speaker = FakeSpeaker()

    class Source:
        config = one

        def serving(self) -> dict[Any, bool]:
            return UP

    source = Source()
    ctl = BgpController(source, lambda restarted: speaker)
    announce = "announce route 10.200.1.1/32 next-hop self"

    async def main() -> None:
        await ctl.sync("start")
        await ctl.sync("again")
        assert speaker.commands == [announce], "same peers: no reload"
        source.config = two
        speaker.refuse = True
        await ctl.sync("reload")  # the reload is refused, and retried only after _PEERS_RETRY
        await asyncio.sleep(0.05)
        assert ctl._reloading is not None, "a refused reload waits before the next try"
        ctl._reloading.cancel()
        ctl._reloading = None
        speaker.refuse = False
        await ctl.sync("reload")
        for _ in range(100):
            if ctl._reloading is None:
                break
            await asyncio.sleep(0.01)
        await ctl.sync("poked")
        await ctl.sync("quiet")

    asyncio.run(main())
    assert speaker.commands == [announce, "<peers 10.0.0.1 10.0.0.9>", announce], speaker.commands


def test_status_says_a_withheld_route_is_announced_with_its_down_med(tmp_path: Path) -> None:
    speaker = FakeSpeaker()
    healthy: dict[Any, bool] = dict(UP)

    class Source:
        config = config(STEER, disable_file=str(tmp_path / "off"))

        def serving(self) -> dict[Any, bool]:
            return healthy

    ctl = BgpController(Source(), lambda restarted: speaker)

    async def main() -> None:
        await ctl.sync("start")
        assert ctl.status()["withheld"] == {}
        healthy.clear()
        await ctl.sync("health")

    asyncio.run(main())
    assert speaker.commands[-1].startswith("announce route 10.200.1.1/32 next-hop self med 500 ")
    status = ctl.status()
    assert status["announced"] == ["10.200.1.1/32"]
    assert status["withheld"] == {"10.200.1.1/32": (
        '10.200.1.1:80/tcp: 0 backends take new flows, min_healthy is 1; announced with med 500 instead '
        '(down = "med")')}


def test_the_channel_follows_a_reloads_peers_and_a_removed_peers_late_down_stays_out(tmp_path: Path) -> None:
    channel = ApiChannel(tmp_path / "api.sock", ["10.0.0.1", "10.0.0.9"])
    channel._dispatch("neighbor 10.0.0.9 up")
    channel.set_peers(["10.0.0.9", "fd00:9::1"])
    channel._dispatch("neighbor 10.0.0.1 down - stop, message [removed]")
    assert channel.peers() == {"10.0.0.9": "up", "fd00:9::1": "down"}


def test_summary_peers_reads_show_neighbor_summary() -> None:
    lines = ["Peer            AS        up/down state       |     #sent     #recvd",
             "10.88.11.1      65000     0:00:05 established          1          0",
             "fd00:9::1       65000        down active               0          0"]
    assert summary_peers(lines) == {"10.88.11.1", "fd00:9::1"}
    assert summary_peers([]) == set()
