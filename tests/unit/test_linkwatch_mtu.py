"""The link watcher's MTU following without a kernel: which readings it writes, and that it reports each
change once, through the same read that follows the link state."""

from __future__ import annotations

import asyncio

import pytest

from edge_lb.control.linkwatch import LinkWatch, new_mtu


@pytest.mark.parametrize(("mtu", "current", "write"), [
    (1400, 1500, True),
    (9000, 1500, True),
    (1500, 1500, False),  # unchanged
    (1400, None, False),  # not followed: [node].mtu fixes it
    (0, 1500, False),  # a misreading
    (575, 1500, False),
    (576, 1500, True),
])
def test_which_readings_are_written(mtu: int, current: int | None, write: bool) -> None:
    assert new_mtu(mtu, current) is write


def test_each_change_is_reported_once_and_an_unreadable_moment_keeps_it() -> None:
    readings: list[object] = [(True, "UP", 1500), (True, "UP", 1400), (True, "UP", 1400),
                              OSError(24, "Too many open files"), (True, "DOWN", 9000)]
    seen: list[int] = []

    def read(ifname: str) -> tuple[bool, str, int]:
        answer = readings.pop(0)
        if isinstance(answer, Exception):
            raise answer
        assert isinstance(answer, tuple)
        return answer

    async def main() -> LinkWatch:
        watch = LinkWatch("eth0", read=read, mtu=1500, on_mtu=seen.append)
        for _ in range(5):
            await watch._refresh()
        return watch

    watch = asyncio.run(main())
    assert seen == [1400, 9000]
    assert watch.mtu == 9000 and watch.fault == "eth0 operstate DOWN", "the state is followed alongside"


def test_not_followed_when_the_config_fixes_it() -> None:
    seen: list[int] = []

    async def main() -> None:
        watch = LinkWatch("eth0", read=lambda ifname: (True, "UP", 1400), on_mtu=seen.append)
        await watch._refresh()

    asyncio.run(main())
    assert seen == []
