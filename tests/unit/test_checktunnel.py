"""The tunnel checks' encapsulator kept in place (control/checktunnel.py) with fakes for the netlink side:
restored when removed from outside (said so), retried with a bounded backoff after a failure, and a tunnelled
VIP that is a local address on the node named in a warning."""

from __future__ import annotations

import asyncio
import copy
import errno
from typing import Any

import pytest

from edge_lb import events
from edge_lb.config import Config, Dataplane, parse_config
from edge_lb.control import checktunnel
from edge_lb.control.checktunnel import TunnelKeeper, tunnelled_vips
from edge_lb.control.status import _check_tunnel
from edge_lb.dataplane.checkencap import Ensured, mark_of
from edge_lb.errors import DataplaneError

BASE: dict[str, Any] = {
    "node": {"interface": "eth0"},
    "vip": [{"address": "10.0.0.1", "port": 80, "protocol": "tcp", "backend": [{"address": "10.1.0.1"}]},
            {"address": "10.0.0.1", "port": 443, "protocol": "tcp", "backend": [{"address": "10.1.0.1"}]},
            {"address": "10.0.0.2", "port": 80, "protocol": "tcp", "healthcheck": {"via": "direct"},
             "backend": [{"address": "10.1.0.1"}]},
            {"address": "10.0.0.3", "port": 80, "protocol": "tcp", "backend": [{"address": "10.1.0.1"}]}],
}


class State:
    def __init__(self, config: Config) -> None:
        self.tunnel_ready = False
        self.config = config


class FakeKernel:
    """The filter and the rule as the kernel holds them; ensure() puts back what is missing (as the real)."""

    def __init__(self, local: tuple[str, ...] = ()) -> None:
        self.filter = self.rule = False
        self.fail = 0  # this many next calls raise
        self.calls = 0
        self.local = local
        self.looked: list[tuple[list[str], int]] = []

    def ensure(self, settings: Dataplane, ifname: str) -> Ensured:
        self.calls += 1
        if self.fail:
            self.fail -= 1
            raise DataplaneError("check encapsulator on eth0: netlink busy")
        origin = "adopted" if self.filter else "compiled"
        added = 0 if self.rule else 1
        self.filter = self.rule = True
        return Ensured(origin, ["10.9.0.1"], added)

    def local_under_mark(self, addresses: list[str], mark: int) -> list[str]:
        self.looked.append((addresses, mark))
        return [a for a in addresses if a in self.local]


def keeper(kernel: FakeKernel, data: dict[str, Any] = BASE) -> tuple[TunnelKeeper, State]:
    state = State(parse_config(copy.deepcopy(data)))
    return TunnelKeeper(state, "eth0", kernel.ensure, kernel.local_under_mark), state


@pytest.fixture
def emitted(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict[str, Any]]]:
    seen: list[tuple[str, dict[str, Any]]] = []
    monkeypatch.setattr(events, "emit", lambda kind, *args, **fields: seen.append((kind, fields)))
    return seen


def test_a_filter_or_rule_removed_from_outside_is_restored_and_said_so(emitted: list[Any]) -> None:
    kernel = FakeKernel()
    k, state = keeper(kernel)
    assert asyncio.run(k.once()) and state.tunnel_ready
    assert [f.get("phase") for kind, f in emitted] == ["check tunnel"]  # startup's line, no restore
    assert asyncio.run(k.once()) and k.restores == 0  # all in place: nothing said
    kernel.filter = False  # `tc filter del dev eth0 egress` (or the clsact qdisc deleted)
    assert asyncio.run(k.once()) and kernel.filter and k.restores == 1
    kernel.rule = False  # `ip rule del` of the fwmark rule
    assert asyncio.run(k.once()) and kernel.rule and k.restores == 2
    restored = [f for kind, f in emitted if f.get("result") == "restored"]
    assert [(f["filter"], f["rules_added"]) for f in restored] == [("compiled and re-attached", 0),
                                                                    ("in place", 1)]


def test_a_failure_is_retried_until_ready_with_a_bounded_backoff(emitted: list[Any],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = FakeKernel()
    kernel.fail = 7  # transient: startup's ensure() and the next six fail
    k, state = keeper(kernel)
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == 10:
            raise asyncio.CancelledError

    monkeypatch.setattr(checktunnel.asyncio, "sleep", sleep)
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(k.run())
    assert state.tunnel_ready and kernel.calls == 10 and k.failures == 7
    assert waits == [2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0, 1.0, 1.0, 1.0]
    errors = [f for kind, f in emitted if f.get("result") == "failed"]
    assert len(errors) == 1  # the same error again is not repeated every retry


def test_a_failure_after_ready_makes_tunnel_checks_wait_until_restored(emitted: list[Any]) -> None:
    kernel = FakeKernel()
    k, state = keeper(kernel)
    asyncio.run(k.once())
    kernel.fail, kernel.filter = 1, False
    assert not asyncio.run(k.once()) and not state.tunnel_ready  # not green lights on a bypassed check
    assert asyncio.run(k.once()) and state.tunnel_ready and kernel.filter


def test_a_pass_that_cannot_ask_the_kernel_keeps_the_tunnel_as_it_was(emitted: list[Any]) -> None:
    """Out of descriptors the pass fails too; the checks report EMFILE themselves (a local fault) and the
    filter was not seen to go: tunnel_ready stays as it was (the fd-exhaustion lab test found this)."""
    k, state = keeper(FakeKernel())
    asyncio.run(k.once())

    def no_fds(*_: Any) -> Any:
        raise OSError(errno.EMFILE, "Too many open files")

    k._ensure = no_fds
    assert not asyncio.run(k.once()) and state.tunnel_ready and k.failures == 1


def test_a_tunnelled_vip_local_on_the_node_is_named_in_a_warning(emitted: list[Any]) -> None:
    kernel = FakeKernel(local=("10.0.0.3", "10.0.0.2"))
    k, state = keeper(kernel)
    asyncio.run(k.once())
    assert tunnelled_vips(state.config) == ["10.0.0.1", "10.0.0.3"]  # 10.0.0.2 is checked directly
    assert kernel.looked == [(["10.0.0.1", "10.0.0.3"], mark_of(state.config.dataplane.check_mark_base, 1))]
    assert k.local_vips == ["10.0.0.3"]
    problems = [f["problem"] for kind, f in emitted if "problem" in f]
    assert problems == ['VIP 10.0.0.3 is a local address on this node: tunnel checks to it are answered '
                        'locally; remove it or use via = "direct"']
    asyncio.run(k.once())
    assert len(kernel.looked) == 1  # looked again only when a reload changes the tunnelled VIPs
    data = copy.deepcopy(BASE)
    data["vip"][3]["healthcheck"] = {"via": "direct"}
    state.config = parse_config(data)
    asyncio.run(k.once())
    assert kernel.looked[-1][0] == ["10.0.0.1"] and k.local_vips == []


def test_status_shows_readiness_restores_and_local_vips(emitted: list[Any]) -> None:
    kernel = FakeKernel(local=("10.0.0.3",))
    k, _ = keeper(kernel)
    asyncio.run(k.once())
    kernel.rule = False
    asyncio.run(k.once())
    kernel.fail = 1
    asyncio.run(k.once())
    assert k.status() == {"ready": False, "restores": 1, "failures": 1, "local_vips": ["10.0.0.3"]}
    lines = _check_tunnel(dict(k.status()))
    assert lines == ["tunnel checks WAIT: encapsulator not in place (1 failed attempts, retrying)",
                     "tunnel checks' tc filter or fwmark rule removed from outside and restored 1 times",
                     'VIP 10.0.0.3 is a local address on this node: tunnel checks to it are answered '
                     'locally; remove it or use via = "direct"']
    assert _check_tunnel({"ready": True, "restores": 0, "failures": 0, "local_vips": []}) == []


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_check_that_overlapped_an_outage_is_told_so_and_many_askers_share_one_pass(
        emitted: list[Any]) -> None:
    """A tunnel check about to blame its backend ("direct OK") asks whether the node's encapsulator was out
    of place during it: found missing by a pass begun after the check failed, it was missing since the last
    pass that saw it whole, so every check that overlapped that time is the node's fault."""
    kernel, clock = FakeKernel(), Clock()
    state = State(parse_config(copy.deepcopy(BASE)))
    k = TunnelKeeper(state, "eth0", kernel.ensure, kernel.local_under_mark, clock)

    async def main() -> None:
        assert await k.shared_pass(clock.now)  # startup: compiled (no check ran before: not ready)
        clock.now = 101.0
        assert await k.shared_pass(clock.now) and kernel.calls == 2  # seen whole at 101
        clock.now = 102.0
        assert not await k.disturbed(101.5, 102.0), "found whole again at 102: the backend's fault"
        assert kernel.calls == 3
        clock.now = 103.0
        kernel.filter = False  # removed from outside some time after 102
        answers = await asyncio.gather(*(k.disturbed(102.5, 103.0) for _ in range(50)))
        assert all(answers) and kernel.filter, "put back, and every check that overlapped it is told"
        assert kernel.calls == 4, "50 checks asking at once share one pass"
        assert await k.disturbed(102.5, 102.8) and kernel.calls == 4, "answered by that same pass"
        clock.now = 104.0
        assert not await k.disturbed(103.5, 104.0), "a check begun after it was put back is judged"
        assert await k.disturbed(102.9, 104.0), "one that began before is not"

    asyncio.run(main())
