"""Slots: the probers' concurrency bound, O(1) per acquire and release however many wait.

asyncio.Semaphore (3.11) scans its waiters on every acquire (locked()), release (_wake_up_next) and wake-up
(deque.remove): with 10,000 probers behind a bound of 1,000, a check cost ~100 us more in that scan alone
(cProfile, benchmarks/README.md). Here a released slot is handed to the first waiter still waiting; waiters
that were cancelled are skipped (each once) when they reach the front.
"""

from __future__ import annotations

import asyncio
from collections import deque
from types import TracebackType


class Slots:
    def __init__(self, count: int) -> None:
        if count < 1:
            raise ValueError(f"Slots needs at least one slot, not {count}")
        self._free = count
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def free(self) -> int:
        return self._free

    async def acquire(self) -> None:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter  # release() hands its slot over: _free was not given back
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # handed a slot, then cancelled: pass it on
                self.release()
            raise

    def release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._free += 1

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.release()
