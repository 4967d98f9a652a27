"""The batched tcp engine (healthchecks/tcpengine.py) through the monitor, on loopback: every outcome at once
in one batch, no route in a namespace of the test's own, its schedule, its bound, stop and prune closing
every socket, a stall, a bug. tcp behaviour shared with the prober tasks is tested both ways elsewhere
(tests/unit/tcpcheck.py's HOWS in test_checkers, test_local_faults, test_tunnel_checks)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import itertools
import os
import socket
import time
from collections.abc import Callable, Iterator

import pytest

from healthchecks import local
from healthchecks.base import Result, Target
from healthchecks.factory import make_checker
from healthchecks.machine import NEW
from healthchecks.monitor import CheckKey, HealthMonitor, Observation
from healthchecks.spec import CheckSpec

from .tcpcheck import UP, first_results, in_new_netns

LO = ipaddress.ip_address("127.0.0.1")
SPEC = CheckSpec(via="direct", timeout=0.3, interval=0.2, fast_interval=0.05, jitter=0, rise=1, fall=1)


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@contextlib.contextmanager
def servers() -> Iterator[dict[str, int]]:
    """Ports on 127.0.0.1 that accept, refuse, and never answer (an accept queue that is full: Linux drops
    the SYN, so the connect hangs until its timeout)."""
    with contextlib.ExitStack() as stack:
        ports: dict[str, int] = {}
        for name, backlog in (("accepts", 64), ("refuses", None), ("hangs", 0)):
            server = stack.enter_context(socket.socket())
            server.bind(("127.0.0.1", 0))
            ports[name] = server.getsockname()[1]
            if backlog is not None:
                server.listen(backlog)
        for _ in range(3):  # fill the hanging one's queue
            filler = stack.enter_context(socket.socket())
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", ports["hangs"]))
        yield ports


def test_every_outcome_in_one_batch() -> None:
    with servers() as ports:
        targets = [Target(LO, ports[name]) for name in ("accepts", "refuses", "hangs")]
        results = [r for r, _ in asyncio.run(first_results("engine", SPEC, targets))]
    assert results == [Result(True, "connected"), Result(False, "connect: refused"),
                       Result(False, "connect: timeout after 0.3s")]


def test_no_route_is_this_nodes_fault() -> None:
    """In an empty namespace (lo down) nothing is routed: ENETUNREACH from this node's own table, local."""
    target = Target(ipaddress.ip_address("10.200.7.1"), 80)
    [(result, seen)] = in_new_netns(lambda: first_results("engine", SPEC, [target]))
    assert result == Result(False, "connect: network unreachable", "ENETUNREACH")
    assert seen.local == "ENETUNREACH" and seen.health.up, "a local fault leaves the backend as it was"


async def until(cond: Callable[[], bool], what: str, seconds: float = 5.0) -> None:
    async with asyncio.timeout(seconds):
        while not cond():
            await asyncio.sleep(0.01)
    assert cond(), what


def test_it_checks_fast_while_changing_then_at_the_interval() -> None:
    spec = CheckSpec(via="direct", interval=0.6, fast_interval=0.05, jitter=0, rise=3)
    times: list[float] = []
    with servers() as ports:
        async def main() -> Observation | None:
            monitor = HealthMonitor(make_checker, lambda *a: None, rand=lambda: 0.0,
                                    on_result=lambda *a: times.append(time.monotonic()))
            key = CheckKey(Target(LO, ports["accepts"]), spec)
            monitor.start({key: NEW})
            await until(lambda: len(times) >= 4, "four checks")
            seen = monitor.observation(key)
            await monitor.stop()
            return seen

        seen = asyncio.run(main())
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(gap < 0.4 for gap in gaps[:2]) and gaps[2] >= 0.55, gaps  # rise 3: two fast, then steady
    assert seen is not None and seen.health.up and seen.checks >= 4 and seen.began_at is not None


def test_in_flight_is_bounded_and_stop_closes_every_socket() -> None:
    peak = 0
    with servers() as ports:
        async def main() -> None:
            nonlocal peak
            monitor = HealthMonitor(make_checker, lambda *a: None, concurrency=5, rand=lambda: 0.0)
            specs = [CheckSpec(via="direct", timeout=0.3, path=f"/{i}") for i in range(20)]  # 20 keys
            keys = {CheckKey(Target(LO, ports["hangs"]), spec): UP for spec in specs}  # whose connects hang
            before = fds()
            monitor.start(keys)
            assert monitor.running() == set(keys)
            engine = monitor._engine
            assert engine is not None
            for _ in range(60):  # 0.6 s: two rounds of timeouts
                peak = max(peak, engine.in_flight)
                await asyncio.sleep(0.01)
            assert engine.in_flight == 5, "connects in flight when stopped"
            await monitor.stop()
            assert fds() == before and monitor.running() == set() and not monitor.observations()

        asyncio.run(main())
    assert peak == 5


def test_prune_stops_only_the_keys_left_out_and_closes_their_sockets() -> None:
    with servers() as ports:
        async def main() -> None:
            monitor = HealthMonitor(make_checker, lambda *a: None, rand=lambda: 0.0)
            hanging = [CheckKey(Target(LO, ports["hangs"]), CheckSpec(via="direct", timeout=30))]
            serving = [CheckKey(Target(LO, ports["accepts"]), SPEC),
                       CheckKey(Target(LO, ports["refuses"]), SPEC)]
            before = fds()
            monitor.start(dict.fromkeys(hanging + serving, UP))
            engine = monitor._engine
            assert engine is not None
            await until(lambda: engine.in_flight == 1 and all(
                (seen := monitor.observation(k)) is not None and seen.checks >= 2 for k in serving), "checks")
            await monitor.prune(serving)
            assert monitor.running() == set(serving) and engine.in_flight == 0
            assert monitor.observation(hanging[0]) is None and fds() == before + 1, "its epoll object left"
            done = sum(monitor.observation(k).checks for k in serving)  # type: ignore[union-attr]
            await until(lambda: sum(monitor.observation(k).checks for k in serving) > done,  # type: ignore
                        "the others checked on")
            await monitor.stop()
            assert fds() == before, "the engine's own epoll object closed too"

        asyncio.run(main())


def test_a_connect_that_completed_during_a_stall_is_an_answer_not_a_timeout() -> None:
    def stalled(target: Target) -> Target:  # the loop blocks past the connect's deadline once it is sent
        asyncio.get_running_loop().call_soon(time.sleep, 0.5)
        return target

    with servers() as ports:
        [(result, seen)] = asyncio.run(first_results("engine", SPEC, [Target(LO, ports["accepts"])],
                                                     resolve=stalled))
    assert result == Result(True, "connected") and seen.latency is not None and seen.latency > 0.3


def test_a_bug_is_a_checker_error_and_the_engine_goes_on() -> None:
    calls: list[Target] = []

    def resolve(target: Target) -> Target:
        calls.append(target)
        if len(calls) == 1:
            raise RuntimeError("bug")
        return target

    with servers() as ports:
        async def main() -> list[Result]:
            results: list[Result] = []
            monitor = HealthMonitor(make_checker, lambda *a: None, rand=lambda: 0.0, resolve=resolve,
                                    on_result=lambda k, r, o: results.append(r))
            monitor.start({CheckKey(Target(LO, ports["accepts"]), SPEC): UP})
            await until(lambda: len(results) >= 2, "two checks")
            await monitor.stop()
            return results

        results = asyncio.run(main())
    assert results[:2] == [Result(False, "checker error: RuntimeError", local.CHECKER_ERROR),
                           Result(True, "connected")]


@pytest.mark.parametrize("kind", ["http", "exec"])
def test_only_tcp_checks_are_batched(kind: str) -> None:
    async def main() -> None:
        monitor = HealthMonitor(make_checker, lambda *a: None, rand=lambda: 1.0)
        spec = CheckSpec(kind=kind, command=("/bin/true",), fast_interval=30)
        monitor.start({CheckKey(Target(LO, 9), spec): UP})
        assert monitor._engine is None and len(monitor.running()) == 1
        await monitor.stop()

    asyncio.run(main())


def test_stop_while_asking_whether_the_tunnel_was_in_place_cancels_the_question() -> None:
    """A tunnel check whose direct re-check passed waits for disturbed(); stop() must not."""
    vip, backend = ipaddress.ip_address("127.0.0.2"), ipaddress.ip_address("127.0.0.3")
    asking: list[str] = []

    async def disturbed(start: float, end: float) -> bool:
        asking.append("asked")
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            asking.append("cancelled")
            raise
        return False

    with socket.socket() as server, socket.socket() as closed:
        server.bind((str(backend), 0))
        server.listen()
        closed.bind((str(vip), server.getsockname()[1]))  # the VIP refuses: the tunnel check fails

        async def main() -> None:
            checkers = functools.partial(make_checker, disturbed=disturbed)
            monitor = HealthMonitor(checkers, lambda *a: None, rand=lambda: 0.0)
            before = fds()
            monitor.start({CheckKey(Target(vip, server.getsockname()[1], backend=backend), CheckSpec()): UP})
            await until(lambda: asking == ["asked"], "the question asked")
            async with asyncio.timeout(1):
                await monitor.stop()
            await asyncio.sleep(0)
            assert fds() == before

        asyncio.run(main())
    assert asking == ["asked", "cancelled"]
