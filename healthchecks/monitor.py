"""Runs the checks: one prober task per (target, spec), bounded concurrency, jittered delays; tcp checks all
in one batch instead (healthchecks/tcpengine.py: no task, timer or future per check), recorded the same way.
`concurrency` bounds each of the two: tasks checking at once, and tcp connects in flight.

The monitor owns only health. It calls on_change(key, old, new) when a backend's up/down state flips; what
that means for the data plane is the supervisor's business. A result that failed for a reason on this node
(Result.local, or the node's own fault during the check: `node_fault`) leaves the state as it was; every
result is passed to `on_result`, so the node can count and judge its local faults.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field

from healthchecks import local
from healthchecks.base import Checker, Result, Target
from healthchecks.machine import Health, step
from healthchecks.slots import Slots
from healthchecks.spec import CheckSpec
from healthchecks.tcp import TcpChecker
from healthchecks.tcpengine import TcpEngine
from healthchecks.tunnel import TunnelChecker

log = logging.getLogger("edge_lb.health")

OnChange = Callable[["CheckKey", Health, Health], None]
OnResult = Callable[["CheckKey", Result, "Observation"], None]
NodeFault = Callable[[float, float], str | None]  # a check's (start, end), monotonic -> the node's fault then
Resolve = Callable[[Target], Target | None]  # a tunnel target -> the same with its socket mark; None: not yet
_STOP_GRACE = 2.0  # seconds the probers get to finish a check in flight on stop()
_BACKSTOP = 1.0  # seconds past spec.timeout after which a checker that overran is cancelled


@dataclass(frozen=True)
class CheckKey:
    """One prober: identical checks of one address (a backend in several VIPs) are run once."""

    target: Target
    spec: CheckSpec
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((self.target, self.spec)))

    def __hash__(self) -> int:
        """Hashed once: a key is looked up a few times a check, and a spec hashes its ~20 fields each time
        (10% of the CPU of a tcp check, cProfile)."""
        return self._hash


@dataclass(frozen=True)
class Observation:
    health: Health
    checked_at: float | None = None  # time.time() of the last result; None: not checked yet
    checks: int = 0
    latency: float | None = None  # seconds the last check took
    local: str | None = None  # the last result failed for this reason on this node (healthchecks.local)
    local_since: float | None = None  # time.monotonic() when the current run of local results began
    began_at: float | None = None  # time.time() when the last completed check began (its answer may be older
    #                                than checked_at: a reply read after a stall was sent before it)


def jittered(delay: float, jitter: float, rand: Callable[[], float]) -> float:
    """delay scaled by a factor in [1 - jitter, 1 + jitter], so checks of many backends do not line up."""
    return delay * (1 + jitter * (2 * rand() - 1))


class HealthMonitor:
    def __init__(self, make_checker: Callable[[CheckSpec], Checker], on_change: OnChange, *,
                 concurrency: int = 1000, rand: Callable[[], float] = random.random,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 node_fault: NodeFault = lambda start, end: None, on_result: OnResult | None = None,
                 resolve: Resolve = lambda target: target, batch_tcp: bool = True) -> None:
        self._make_checker = make_checker
        self._resolve = resolve
        self._on_change = on_change
        self._node_fault = node_fault
        self._on_result = on_result
        self._crashes: set[str] = set()  # checker exceptions logged with their traceback (once each)
        self._sem = Slots(concurrency)  # not asyncio.Semaphore: its waiter scans made 10,000 probers slow
        self._rand = rand
        self._sleep = sleep
        self._checkers: dict[CheckSpec, Checker] = {}
        self._concurrency = concurrency
        self._batch_tcp = batch_tcp  # False: tcp checks in prober tasks too (the engine's twin in tests)
        self._tasks: dict[CheckKey, asyncio.Task[None]] = {}
        self._engine: TcpEngine | None = None  # the tcp checks' keys (built on the first)
        self._seen: dict[CheckKey, Observation] = {}

    def observation(self, key: CheckKey) -> Observation | None:
        return self._seen.get(key)

    def running(self) -> set[CheckKey]:
        return set(self._tasks) | set(self._engine or ())

    def observations(self) -> list[Observation]:
        """The running probers' observations (what the node judges its local faults on)."""
        return [seen for key, seen in self._seen.items() if self._probing(key)]

    def _probing(self, key: CheckKey) -> bool:
        return key in self._tasks or (self._engine is not None and key in self._engine)

    def start(self, wanted: Mapping[CheckKey, Health]) -> None:
        """Start the wanted probers not running yet, from the given health; running ones keep theirs.
        Checkers are built first, so a spec no checker can run raises here, before anything started."""
        built = {spec: self._make_checker(spec) for spec in {k.spec for k in wanted} - set(self._checkers)}
        self._checkers.update(built)
        for key, initial in wanted.items():
            if self._probing(key):
                continue
            self._seen[key] = Observation(initial)
            first = self._rand() * key.spec.fast_interval  # the first check soon, but not all at once
            checker = self._checkers[key.spec]
            if self._batch_tcp and batched(checker):
                disturbed = checker.disturbed if isinstance(checker, TunnelChecker) else None
                self._batch().add(key, first, disturbed)
            else:
                self._tasks[key] = asyncio.create_task(self._probe(key, first), name=f"check {key.target}")

    def _batch(self) -> TcpEngine:
        if self._engine is None:
            self._engine = TcpEngine(self._completed, self._resolve, self._concurrency)
        return self._engine

    async def prune(self, keep: Collection[CheckKey]) -> None:
        """Stop every prober not in keep (bounded) and close the checkers no prober uses."""
        if self._engine is not None:
            gone = [k for k in self._engine if k not in keep]
            self._engine.remove(gone)  # their sockets closed at once
            for key in gone:
                self._seen.pop(key, None)
        await self._stop_probers([k for k in self._tasks if k not in keep])
        running = {k.spec for k in self.running()}
        for spec in [s for s in self._checkers if s not in running]:
            await self._checkers.pop(spec).aclose()

    async def stop(self) -> None:
        """Stop every prober (bounded) and close the checkers."""
        await self.prune(())
        if self._engine is not None:
            self._engine.close()
            self._engine = None

    async def _stop_probers(self, keys: list[CheckKey]) -> None:
        """All cancelled at once, then waited for together: 5,000 probers stopped one after another took
        longer than shutdown's bound for this step."""
        tasks = {key: self._tasks.pop(key) for key in keys}
        for task in tasks.values():
            task.cancel()
        if tasks:
            # asyncio.wait, not wait_for under suppress(CancelledError): that also swallowed the cancellation
            # of whoever was stopping us (a bounded shutdown step), which then never ended.
            await asyncio.wait(tasks.values(), timeout=_STOP_GRACE)
        for key, task in tasks.items():
            if task.done() and not task.cancelled() and task.exception() is not None:
                log.error("prober of %s ended with %r", key.target, task.exception())
            self._seen.pop(key, None)

    def _checker(self, spec: CheckSpec) -> Checker:
        if spec not in self._checkers:
            self._checkers[spec] = self._make_checker(spec)
        return self._checkers[spec]

    async def _probe(self, key: CheckKey, delay: float) -> None:
        while True:
            await self._sleep(delay)
            result, took = await self._check_once(key)
            if self._tasks.get(key) is not asyncio.current_task():
                return  # stopped while checking (3.11's wait_for can swallow that cancellation)
            delay = self._completed(key, result, took)

    def _completed(self, key: CheckKey, result: Result, took: float) -> float:
        """A check's end, from a prober or the tcp engine: recorded, a flip told; the delay to the next."""
        seen, new = self._record(key, result, took)
        if new.up != seen.health.up:
            try:
                self._on_change(key, seen.health, new)
            except Exception:  # the prober must outlive a faulty listener
                log.exception("health change listener failed for %s", key.target)
        spec = key.spec
        return jittered(spec.fast_interval if new.changing else spec.interval, spec.jitter, self._rand)

    def _record(self, key: CheckKey, result: Result, took: float) -> tuple[Observation, Health]:
        """The result into the key's observation: judged by the machine unless it was this node's fault."""
        spec, seen, now = key.spec, self._seen[key], time.monotonic()
        result = local.blamed(result, self._node_fault(now - took, now))
        new = step(seen.health, result.ok, result.reason, spec.rise, spec.fall, result.local)
        since = (seen.local_since or now) if result.local else None
        wall = time.time()
        self._seen[key] = Observation(new, wall, seen.checks + 1, took, result.local, since, wall - took)
        if self._on_result is not None:
            try:
                self._on_result(key, result, self._seen[key])
            except Exception:  # the prober must outlive a faulty listener
                log.exception("health result listener failed for %s", key.target)
        return seen, new

    async def _check_once(self, key: CheckKey) -> tuple[Result, float]:
        """One check and the seconds it took (not counting the wait for a concurrency slot)."""
        async with self._sem:
            began = time.monotonic()
            target = self._resolve(key.target)
            if target is None:  # its backend is not in the data plane yet: nothing to tunnel to
                return Result(False, "tunnel: not in place yet", local.NOT_WRITTEN), 0.0
            try:
                async with asyncio.timeout(key.spec.budget + _BACKSTOP):  # no extra task, unlike wait_for
                    result = await self._checker(key.spec).check(target)
            except TimeoutError:  # the checker broke its own contract (or the loop stalled): not the backend
                result = Result(False, f"checker overran its timeout ({key.spec.budget:g}s)",
                                local.CHECKER_OVERRAN)
            except Exception as exc:  # a checker bug must not kill the prober, nor count against the backend
                name = f"{key.spec.kind} {exc.__class__.__name__}"
                if name not in self._crashes:  # the traceback once; the node counts and logs the rest
                    self._crashes.add(name)
                    log.exception("checker %s failed on %s", key.spec.kind, key.target)
                result = Result(False, f"checker error: {exc.__class__.__name__}", local.CHECKER_ERROR)
            return result, time.monotonic() - began


def batched(checker: Checker) -> bool:
    """A plain tcp check (tunnelled or not) runs in the tcp engine; anything else (a test's fake too) in a
    prober task."""
    inner = checker.inner if isinstance(checker, TunnelChecker) else checker
    return isinstance(inner, TcpChecker)
