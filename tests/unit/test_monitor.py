"""The health monitor: bounded concurrency, jitter, stopping mid-check, shared probers, eager checkers."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest

from healthchecks.base import Result, Target
from healthchecks.machine import NEW, Health
from healthchecks.monitor import CheckKey, HealthMonitor, jittered
from healthchecks.spec import CheckSpec

SPEC = CheckSpec(interval=0.05, fast_interval=0.05, jitter=0, rise=1, fall=1, timeout=1.0)


def key(i: int, spec: CheckSpec = SPEC) -> CheckKey:
    return CheckKey(Target(ipaddress.ip_address(f"10.9.0.{i}"), 80), spec)


class SlowChecker:
    """Each check takes `delay`; counts how many run at once."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.now = self.peak = self.done = 0

    async def check(self, target: Target) -> Result:
        self.now += 1
        self.peak = max(self.peak, self.now)
        try:
            await asyncio.sleep(self.delay)
        finally:
            self.now -= 1
        self.done += 1
        return Result(True, "slow ok")

    async def aclose(self) -> None:
        pass


def test_jitter_spreads_within_its_bounds() -> None:
    assert jittered(2.0, 0.1, lambda: 0.0) == pytest.approx(1.8)
    assert jittered(2.0, 0.1, lambda: 1.0) == pytest.approx(2.2)
    assert jittered(2.0, 0.0, lambda: 0.3) == 2.0


def test_concurrency_is_bounded() -> None:
    checker = SlowChecker(0.05)

    async def main() -> None:
        monitor = HealthMonitor(lambda s: checker, lambda *a: None, concurrency=5)
        monitor.start({key(i): NEW for i in range(40)})
        for _ in range(300):
            if checker.done >= 80:
                break
            await asyncio.sleep(0.01)
        await monitor.stop()

    asyncio.run(main())
    assert checker.peak == 5 and checker.done >= 80


def test_stop_during_a_check_is_clean_and_bounded() -> None:
    checker = SlowChecker(30)
    changes: list[object] = []

    async def main() -> None:
        monitor = HealthMonitor(lambda s: checker, lambda *a: changes.append(a))
        monitor.start({key(1): NEW})
        await asyncio.sleep(0.2)  # the check is in flight
        assert checker.now == 1
        await asyncio.wait_for(monitor.stop(), 3)
        assert monitor.running() == set() and monitor.observation(key(1)) is None

    asyncio.run(main())
    assert checker.now == 0 and changes == []


def test_flips_are_reported_and_a_spec_without_checker_fails_before_anything_starts() -> None:
    flips: list[tuple[CheckKey, Health, Health]] = []

    def make(spec: CheckSpec) -> SlowChecker:
        if spec.kind == "none":
            raise ValueError("no checker for 'none'")
        return SlowChecker(0)

    async def main() -> None:
        monitor = HealthMonitor(make, lambda k, old, new: flips.append((k, old, new)))
        with pytest.raises(ValueError):
            monitor.start({key(1): NEW, key(2, CheckSpec(kind="none")): NEW})
        assert monitor.running() == set()
        monitor.start({key(1): NEW})
        for _ in range(100):
            if flips:
                break
            await asyncio.sleep(0.01)
        await monitor.stop()

    asyncio.run(main())
    assert flips and flips[0][2].up and flips[0][2].reason == "slow ok"


class StubbornChecker:
    """A check that takes 0.5 s to clean up when cancelled (like killing an exec check's process group)."""

    def __init__(self) -> None:
        self.running = 0

    async def check(self, target: Target) -> Result:
        self.running += 1
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            await asyncio.sleep(0.5)
            raise
        return Result(True, "never")

    async def aclose(self) -> None:
        pass


def test_a_stop_that_is_cancelled_ends_at_once() -> None:
    """A bounded shutdown step cancels stop() at its bound: the cancellation must end it there (it used to be
    swallowed while waiting for one prober, and stop() went on through every other)."""
    checker = StubbornChecker()

    async def main() -> None:
        monitor = HealthMonitor(lambda s: checker, lambda *a: None)
        monitor.start({key(i): NEW for i in range(3)})
        for _ in range(100):
            if checker.running == 3:
                break
            await asyncio.sleep(0.01)
        stopping = asyncio.create_task(monitor.stop())
        await asyncio.sleep(0.1)
        stopping.cancel()
        began = asyncio.get_running_loop().time()
        with pytest.raises(asyncio.CancelledError):
            await stopping
        assert asyncio.get_running_loop().time() - began < 0.3
        await monitor.stop()

    asyncio.run(main())
