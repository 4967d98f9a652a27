"""A tcp check run by the monitor either way it can run one: TcpChecker (in TunnelChecker for a tunnel spec)
in a prober task, or the batched engine (healthchecks/tcpengine.py), as it runs every tcp key by default.
Tests of tcp behaviour are parametrized over HOWS: both must give the same results."""

from __future__ import annotations

import asyncio
import ctypes
import functools
import os
import socket
import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from healthchecks.base import Result, Target
from healthchecks.factory import make_checker
from healthchecks.machine import Health
from healthchecks.monitor import CheckKey, HealthMonitor, Observation, Resolve
from healthchecks.spec import CheckSpec
from healthchecks.tunnel import Disturbed

HOWS = ("checker", "engine")
UP = Health(up=True)
T = TypeVar("T")


@dataclass(frozen=True)
class Opening(Target):
    """A Target that records the sockets it (and its direct twin) opens, and fails to open one through the
    tunnel with errno `fail` when set: a check gets its sockets from Target.socket()."""

    opened: list[Target] = field(default_factory=list, compare=False)
    fail: int = field(default=0, compare=False)

    def socket(self, kind: socket.SocketKind = socket.SOCK_STREAM) -> socket.socket:
        self.opened.append(self)
        if self.fail and self.tunnelled:
            raise OSError(self.fail, os.strerror(self.fail))
        return super().socket(kind)

    def direct(self) -> Target:
        return Opening(self.backend_address, self.port, vip=self.vip, opened=self.opened)


async def first_results(how: str, spec: CheckSpec, targets: Sequence[Target], *,
                        resolve: Resolve = lambda target: target,
                        started: Callable[[], None] = lambda: None,
                        disturbed: Disturbed | None = None) -> list[tuple[Result, Observation]]:
    """Each target's first check, as the monitor records it; `started` runs once the checks are set up, just
    before the first begins."""
    seen: dict[CheckKey, tuple[Result, Observation]] = {}
    checkers = functools.partial(make_checker, disturbed=disturbed)
    monitor = HealthMonitor(checkers, lambda *a: None, rand=lambda: 0.0, resolve=resolve,
                            on_result=lambda key, result, obs: seen.setdefault(key, (result, obs)),
                            batch_tcp=how == "engine")
    keys = [CheckKey(t, spec) for t in targets]
    monitor.start(dict.fromkeys(keys, UP))
    assert (monitor._engine is not None and set(monitor._engine) == set(keys)) == (how == "engine")
    started()
    try:
        async with asyncio.timeout(10):
            while len(seen) < len(keys):
                await asyncio.sleep(0.01)
    finally:
        await monitor.stop()
    return [seen[k] for k in keys]


async def first_result(how: str, spec: CheckSpec, target: Target, *, resolve: Resolve = lambda target: target,
                       started: Callable[[], None] = lambda: None) -> Result:
    return (await first_results(how, spec, [target], resolve=resolve, started=started))[0][0]


def in_new_netns(main: Callable[[], Awaitable[T]]) -> T:
    """asyncio.run(main()) in a thread of its own in a new, empty network namespace (only lo, down: no route
    to anywhere). The namespace is the thread's alone and is gone with it: nothing to clean up. Root only."""
    box: list[T | BaseException] = []

    def run() -> None:
        try:
            if ctypes.CDLL(None, use_errno=True).unshare(0x40000000) != 0:  # CLONE_NEWNET
                raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), "unshare(CLONE_NEWNET)")
            box.append(asyncio.run(main()))
        except BaseException as exc:
            box.append(exc)

    thread = threading.Thread(target=run, name="netns test")
    thread.start()
    thread.join(30)
    assert box, "the namespaced test did not finish in 30 s"
    if isinstance(box[0], BaseException):
        raise box[0]
    return box[0]
