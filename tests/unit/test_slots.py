"""Slots, the probers' concurrency bound: never more holders than slots, first come first served, and a
cancelled waiter neither takes nor loses a slot."""

from __future__ import annotations

import asyncio

import pytest

from healthchecks.slots import Slots


def test_at_most_count_hold_a_slot_and_waiters_go_in_order() -> None:
    async def go() -> tuple[int, list[int]]:
        slots, holding, most, order = Slots(3), 0, 0, []

        async def work(i: int) -> None:
            nonlocal holding, most
            async with slots:
                holding += 1
                most = max(most, holding)
                order.append(i)
                await asyncio.sleep(0.001)
                holding -= 1

        await asyncio.gather(*(work(i) for i in range(50)))
        assert slots.free == 3
        return most, order

    most, order = asyncio.run(go())
    assert most == 3
    assert order == list(range(50))


def test_a_cancelled_waiter_neither_takes_nor_loses_a_slot() -> None:
    async def go() -> None:
        slots = Slots(1)
        await slots.acquire()
        waiter = asyncio.create_task(slots.acquire())
        second = asyncio.create_task(slots.acquire())
        await asyncio.sleep(0)
        waiter.cancel()
        await asyncio.sleep(0)
        slots.release()  # skips the cancelled waiter, hands the slot to the second
        await asyncio.wait_for(second, 1)
        slots.release()
        assert slots.free == 1

    asyncio.run(go())


def test_a_waiter_cancelled_after_it_was_handed_the_slot_passes_it_on() -> None:
    async def go() -> None:
        slots = Slots(1)
        await slots.acquire()
        first = asyncio.create_task(slots.acquire())
        await asyncio.sleep(0)
        slots.release()  # handed to first, which has not run yet
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        assert slots.free == 1

    asyncio.run(go())


def test_at_least_one_slot() -> None:
    with pytest.raises(ValueError, match="at least one slot"):
        Slots(0)
