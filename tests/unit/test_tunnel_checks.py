"""Tunnel health checks without a kernel: the config key, which prober a (VIP, backend) gets, the socket mark
a tunnel check carries (the backend's index as the change path wrote it), the direct re-check that tells a
setup problem from a dead service, exec's placeholders, and what status shows."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import errno
import ipaddress
import socket
from typing import Any

import pytest

from edge_lb.config import parse_config
from edge_lb.control.nodestate import check_keys
from edge_lb.dataplane.checkencap import MARK_MASK, mark_of, rule_priority, table_of
from edge_lb.dataplane.desired import VipKey, desired_state
from edge_lb.dataplane.mapio import FakeMapIO
from edge_lb.dataplane.node import Link, NodeMaps
from edge_lb.errors import ConfigError
from healthchecks import local
from healthchecks.base import Result, Target
from healthchecks.command import ExecChecker
from healthchecks.monitor import CheckKey, HealthMonitor
from healthchecks.spec import CheckSpec
from healthchecks.tunnel import TunnelChecker

from .tcpcheck import HOWS, Opening, first_results
from .test_reconciler import B1, B2, VIP, Harness, config, run

VIP_A = ipaddress.ip_address("10.0.0.1")
BASE: dict[str, Any] = {
    "node": {"interface": "eth0"},
    "vip": [{"address": "10.0.0.1", "port": 80, "protocol": "tcp",
             "backend": [{"address": "10.1.0.1"}, {"address": "fd00::1"}]},
            {"address": "10.0.0.1", "port": 443, "protocol": "tcp", "healthcheck": {"port": 80},
             "backend": [{"address": "10.1.0.1"}]},
            {"address": "10.0.0.2", "port": 80, "protocol": "tcp", "backend": [{"address": "10.1.0.1"}]}],
}


def parsed(check: dict[str, Any] | None = None, **dataplane: Any) -> Any:
    data = copy.deepcopy(BASE)
    if check is not None:
        data["healthcheck"] = check
    if dataplane:
        data["dataplane"] = dataplane
    return parse_config(data)


def test_via_defaults_to_tunnel_and_is_validated_with_its_key_path() -> None:
    assert all(b.healthcheck.effective_via == "tunnel" for v in parsed().vips for b in v.backends)
    assert parsed({"via": "direct"}).vips[0].backends[0].healthcheck.effective_via == "direct"
    data = copy.deepcopy(BASE)
    data["vip"][0]["backend"][1]["healthcheck"] = {"via": "gre"}
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    assert caught.value.problems == ['vip[0].backend[1].healthcheck.via: must be "tunnel" or "direct"']


@pytest.mark.parametrize("base", [0, 0x4C500001, 0x100000000, True, "0x4c500000"])
def test_check_mark_base_must_leave_the_index_bits_free(base: Any) -> None:
    with pytest.raises(ConfigError) as caught:
        parsed(check_mark_base=base)
    assert caught.value.problems[0].startswith("dataplane.check_mark_base: must be a multiple of 0x100000")


def test_marks_tables_and_rules_follow_the_base() -> None:
    cfg = parsed(check_mark_base=0x7A300000)
    base = cfg.dataplane.check_mark_base
    assert mark_of(base, 5) == 0x7A300005 and mark_of(base, 5) & MARK_MASK == base
    assert (table_of(base), rule_priority(base)) == (0x10000 + 0x7A3, 20000 + 0x7A3)
    assert table_of(parsed().dataplane.check_mark_base) not in (253, 254, 255)
    with pytest.raises(ValueError):
        mark_of(base, 1 << 20)


def test_a_tunnel_check_is_one_prober_per_vip_address_and_backend() -> None:
    keys = check_keys(parsed())
    targets = {(vip.name, str(address)): key.target for (vip, address), key in keys.items() if key}
    b1 = ipaddress.ip_address("10.1.0.1")
    assert targets[("10.0.0.1:80/tcp", "10.1.0.1")] == Target(VIP_A, 80, backend=b1, vip=VIP_A)
    # 443 checks port 80 of the same VIP address through the same backend: the same prober
    assert targets[("10.0.0.1:443/tcp", "10.1.0.1")] == targets[("10.0.0.1:80/tcp", "10.1.0.1")]
    other = targets[("10.0.0.2:80/tcp", "10.1.0.1")]
    assert other.address == ipaddress.ip_address("10.0.0.2") and other.backend == b1, "its own VIP on lo"


def test_direct_checks_stay_shared_by_address_and_exec_learns_the_vip() -> None:
    keys = check_keys(parsed({"via": "direct"}))
    b1 = ipaddress.ip_address("10.1.0.1")
    assert {key.target for (_, a), key in keys.items() if key and a == b1} == {Target(b1, 80)}
    execs = check_keys(parsed({"via": "direct", "type": "exec", "command": ["/bin/true"]}))
    assert {key.target.vip for key in execs.values() if key} == {VIP_A, ipaddress.ip_address("10.0.0.2")}


class Scripted:
    """A checker answering by where the check goes (the VIP through a tunnel, or the backend itself)."""

    def __init__(self, tunnel: Result, direct: Result) -> None:
        self.tunnel, self.direct = tunnel, direct
        self.calls: list[Target] = []

    async def check(self, target: Target) -> Result:
        self.calls.append(target)
        return self.tunnel if target.tunnelled else self.direct

    async def aclose(self) -> None:
        pass


TUNNEL = Target(VIP_A, 80, mark=0x4C500001, backend=ipaddress.ip_address("10.1.0.1"), vip=VIP_A)


@pytest.mark.parametrize(("tunnel", "direct", "reason", "calls"), [
    (Result(True, "HTTP 200"), Result(True, "HTTP 200"), "HTTP 200", 1),
    (Result(False, "timeout (1s)"), Result(True, "HTTP 200"), "direct OK, via tunnel: timeout (1s)", 2),
    (Result(False, "connect: refused"), Result(False, "connect: refused"),
     "connect: refused; direct: connect: refused", 2),
    (Result(False, "connect: EMFILE", "EMFILE"), Result(True, "HTTP 200"), "connect: EMFILE", 1),
])
def test_a_failed_tunnel_check_is_followed_by_a_direct_one(tunnel: Result, direct: Result, reason: str,
                                                          calls: int) -> None:
    inner = Scripted(tunnel, direct)
    result = asyncio.run(TunnelChecker(inner).check(TUNNEL))
    assert (result.ok, result.reason, len(inner.calls)) == (tunnel.ok, reason, calls)
    if calls == 2:
        assert inner.calls[1] == Target(ipaddress.ip_address("10.1.0.1"), 80, vip=VIP_A), "unmarked, itself"


@pytest.mark.parametrize(("disturbed", "reason", "cause"), [
    (False, "direct OK, via tunnel: timeout (1s)", None),
    (True, "tunnel: this node's encapsulator was out of place (timeout (1s))", local.NOT_WRITTEN)])
def test_direct_ok_blames_the_backend_only_when_the_nodes_tunnel_was_in_place(
        disturbed: bool, reason: str, cause: str | None) -> None:
    asked: list[tuple[float, float]] = []

    async def was_disturbed(start: float, end: float) -> bool:
        asked.append((start, end))
        return disturbed

    inner = Scripted(Result(False, "timeout (1s)"), Result(True, "HTTP 200"))
    result = asyncio.run(TunnelChecker(inner, was_disturbed).check(TUNNEL))
    assert (result.ok, result.reason, result.local) == (False, reason, cause)
    assert len(asked) == 1 and asked[0][0] <= asked[0][1], "asked of the tunnel check's own time"
    asked.clear()
    both = asyncio.run(TunnelChecker(Scripted(Result(False, "timeout (1s)"), Result(False, "refused")),
                                     was_disturbed).check(TUNNEL))
    assert both.reason == "timeout (1s); direct: refused" and not asked, "a dead backend: nothing to ask"


def test_a_direct_target_is_not_checked_twice() -> None:
    inner = Scripted(Result(False, "x"), Result(False, "timeout (1s)"))
    result = asyncio.run(TunnelChecker(inner).check(TUNNEL.direct()))
    assert (result.reason, len(inner.calls)) == ("timeout (1s)", 1)


def test_a_tunnel_spec_may_take_two_timeouts() -> None:
    assert CheckSpec(timeout=0.5).budget == 1.0 and CheckSpec(timeout=0.5, via="direct").budget == 0.5


def test_exec_gets_the_backend_the_vip_and_the_mark() -> None:
    spec = CheckSpec(kind="exec", command=("/bin/x", "{address}", "{vip}:{port}", "mark={mark}"))
    assert ExecChecker(spec).argv(TUNNEL) == ["/bin/x", "10.1.0.1", "10.0.0.1:80", f"mark={0x4C500001}"]
    assert ExecChecker(spec).argv(Target(ipaddress.ip_address("10.1.0.1"), 80)) == [
        "/bin/x", "10.1.0.1", ":80", "mark=0"]


def test_the_monitor_waits_for_the_mark_and_never_counts_the_wait() -> None:
    async def main() -> None:
        seen: list[Target] = []

        class Recording:
            async def check(self, target: Target) -> Result:
                seen.append(target)
                return Result(True, "ok")

            async def aclose(self) -> None:
                pass

        resolved: dict[Target, Target | None] = {TUNNEL: None}
        monitor = HealthMonitor(lambda spec: Recording(), lambda *a: None, resolve=resolved.__getitem__)
        key = CheckKey(TUNNEL, CheckSpec())
        result, _ = await monitor._check_once(key)
        assert (result.ok, result.local) == (False, local.NOT_WRITTEN) and not seen
        resolved[TUNNEL] = TUNNEL
        assert (await monitor._check_once(key))[0].ok and seen == [TUNNEL]
    asyncio.run(main())


@pytest.mark.parametrize("how", HOWS)
def test_a_tcp_check_waits_for_the_mark_and_never_counts_the_wait(how: str) -> None:
    """The same for the real tcp check, both ways it runs: not written, no socket opened, no time taken."""
    target = Opening(VIP_A, 80, mark=0x4C500001, backend=ipaddress.ip_address("10.1.0.1"), vip=VIP_A)
    [(result, seen)] = asyncio.run(first_results(how, CheckSpec(), [target], resolve=lambda t: None))
    assert result == Result(False, "tunnel: not in place yet", local.NOT_WRITTEN) and not target.opened
    assert seen.latency == 0.0 and seen.local == local.NOT_WRITTEN and seen.health.up


def test_the_mark_is_the_backend_index_the_change_path_wrote() -> None:
    async def body(h: Harness) -> None:
        await h.start()
        key = h.state.running.keys[(VIP, B2)]
        assert key is not None and key.target.tunnelled and key.target.mark == 0
        target = h.state._resolve(key.target)
        assert target is not None and target.mark == 0x4C500000 | h.index(B2)
        await h.until(lambda: any(t.mark == target.mark for c in h.checkers for t in c.calls), "checked")
    run(body)


def test_a_backend_failing_only_through_its_tunnel_leaves_with_direct_ok() -> None:
    cfg = config((str(B1), 1), (str(B2), 1))

    async def body(h: Harness) -> None:
        await h.start()
        await h.until(lambda: h.index(B2) in h.io.backends and h.io.backends[h.index(B2)].up, "b2 written up")
        for checker in h.checkers:
            checker.set_tunnel(B2, False)
        await h.until(lambda: not h.io.backends[h.index(B2)].up, "b2 written down")
        assert h.state.health_of((VIP, B2)).reason == "direct OK, via tunnel: fake fail"
        assert h.io.backends[h.index(B1)].up and h.state.health_of((VIP, B1)).reason == "fake ok"
    run(body, cfg)



def node_config(*vips: tuple[int, str, tuple[str, ...]]) -> Any:
    """One VIP address, 10.200.1.1: (port, encap, backends) per VIP."""
    return parse_config({
        "node": {"interface": "eth0"}, "dataplane": {"ring_size": 1009, "max_vips": 4, "max_backends": 32},
        "vip": [{"address": "10.200.1.1", "port": port, "protocol": "tcp", "encap": encap,
                 "backend": [{"address": a} for a in backends]} for port, encap, backends in vips]})


def written_maps(cfg: Any) -> NodeMaps:
    maps = NodeMaps(FakeMapIO(ring_size=1009), cfg, Link("02:00:00:00:00:01", "02:00:00:00:00:02", 1500),
                    adopt=False)
    maps.apply(cfg)
    return maps


def test_a_tunnel_check_takes_the_slot_of_its_own_encap() -> None:
    cfg = node_config((80, "gue", ("10.1.0.1",)), (443, "ipip", ("10.1.0.1",)))
    keys = check_keys(cfg)
    b1, vip = ipaddress.ip_address("10.1.0.1"), ipaddress.ip_address("10.200.1.1")
    gue, ipip = (keys[(VipKey(vip, port, 6), b1)] for port in (80, 443))
    assert gue is not None and ipip is not None and (gue.target.gue, ipip.target.gue) == (True, False)
    maps = written_maps(cfg)
    for port, key in ((80, gue), (443, ipip)):
        index = maps.index_of(vip, b1, key.target.gue)
        assert index == maps.backend_index(VipKey(vip, port, 6), b1) and index is not None
        assert maps.programmer.backends[index].gue == key.target.gue, f":{port} wraps as its clients"


def test_a_mark_names_only_the_slot_as_written_not_an_index_the_allocator_handed_on() -> None:
    old = node_config((80, "ipip", ("10.1.0.1", "10.1.0.2")))
    maps = written_maps(old)
    vip, gone, new = (ipaddress.ip_address(a) for a in ("10.200.1.1", "10.1.0.2", "10.1.0.3"))
    freed = maps.index_of(vip, gone, False)
    assert freed is not None
    # a reload mid-apply: the allocator has numbered the new config (10.1.0.2's index freed and handed to
    # 10.1.0.3), the maps still hold the old slots
    desired_state(node_config((80, "ipip", ("10.1.0.1", "10.1.0.3"))), maps.alloc, None, {})
    assert maps.alloc.backend_idx.get((maps.vip_number(VipKey(vip, 80, 6)) or 0, new)) == freed
    assert maps.index_of(vip, new, False) is None, "its check waits: that slot still reaches 10.1.0.2"
    assert maps.index_of(vip, ipaddress.ip_address("10.1.0.1"), False) is not None


def test_exec_defaults_to_direct_and_an_explicit_via_wins() -> None:
    def spec(*tables: dict[str, Any]) -> CheckSpec:
        data = copy.deepcopy(BASE)
        data["healthcheck"], data["vip"][0]["healthcheck"] = tables
        return parse_config(data).vips[0].backends[0].healthcheck
    exec_check = {"type": "exec", "command": ["/bin/true"]}
    # {address} is the backend's own: unless told, exec runs direct, and says so
    assert not spec(exec_check, {}).tunnelled and spec(exec_check, {}).effective_via == "direct"
    assert spec({**exec_check, "via": "tunnel"}, {}).tunnelled, "explicit: today's behaviour"
    assert spec(exec_check, {"type": "tcp"}).tunnelled, "a table that changes the type gets its default"
    assert not spec({"via": "direct"}, exec_check).tunnelled and spec({"via": "tunnel"}, exec_check).tunnelled
    keys = check_keys(parsed(exec_check))
    assert all(key and not key.target.tunnelled and key.target.mark == 0 for key in keys.values())


TUNNELLED_LO = ipaddress.ip_address("127.0.0.2"), ipaddress.ip_address("127.0.0.3")  # the VIP, its backend


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize(("vip_serves", "backend_serves", "fail", "upset", "reason", "opened"), [
    (True, True, 0, None, "connected", 1),
    (False, True, 0, None, "direct OK, via tunnel: connect: refused", 2),
    (False, True, 0, False, "direct OK, via tunnel: connect: refused", 2),
    (False, True, 0, True, "tunnel: this node's encapsulator was out of place (connect: refused)", 2),
    (False, False, 0, True, "connect: refused; direct: connect: refused", 2),  # not asked: a dead backend
    (False, True, errno.EMFILE, None, "socket: too many open files", 1),  # local: not re-checked
])
def test_a_failed_tcp_tunnel_check_is_rechecked_directly(how: str, vip_serves: bool, backend_serves: bool,
                                                         fail: int, upset: bool | None, reason: str,
                                                         opened: int) -> None:
    """Real connects on loopback (unmarked: the tunnel is the kernel's, in the lab tests), both ways the
    monitor runs a tcp check; `upset`: what disturbed() answers (None: no such question)."""
    asked: list[tuple[float, float]] = []

    async def disturbed(start: float, end: float) -> bool:
        asked.append((start, end))
        await asyncio.sleep(0.01)
        return bool(upset)

    vip, backend = TUNNELLED_LO
    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(socket.socket()) for _ in range(2)]
        servers[1].bind((str(backend), 0))
        port = servers[1].getsockname()[1]
        servers[0].bind((str(vip), port))
        for server, serves in zip(servers, (vip_serves, backend_serves), strict=True):
            if serves:
                server.listen()
        target = Opening(vip, port, backend=backend, vip=vip, fail=fail)
        [(result, _)] = asyncio.run(first_results(how, CheckSpec(), [target],
                                                  disturbed=None if upset is None else disturbed))
    assert (result.reason, len(target.opened)) == (reason, opened)
    assert result.ok == (reason == "connected")
    assert (result.local is not None) == bool(fail or (upset and asked)), "local: EMFILE, or tunnel out"
    assert len(asked) == (upset is not None and backend_serves), "asked only before blaming a live backend"
    assert all(start <= end for start, end in asked), "of the tunnel check's own time"
    if opened == 2:
        again = target.opened[1]
        assert (again.address, again.mark, again.tunnelled) == (backend, 0, False), "to the backend, unmarked"
