"""The MTU follower without a kernel: which events wake it, which readings it writes, and its loop."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from edge_lb.control import mtuwatch
from edge_lb.control.mtuwatch import MtuWatcher, acceptable, is_link_event


class Msg:
    def __init__(self, event: str, name: str | None) -> None:
        self.fields = {"event": event}
        self.name = name

    def get(self, key: str) -> Any:
        return self.fields.get(key)

    def get_attr(self, key: str) -> Any:
        return self.name if key == "IFLA_IFNAME" else None


@pytest.mark.parametrize(("msg", "wakes"), [
    (Msg("RTM_NEWLINK", "eth0"), True),
    (Msg("RTM_NEWLINK", "eth1"), False),
    (Msg("RTM_DELLINK", "eth0"), False),
    (Msg("RTM_NEWNEIGH", None), False),
    (Msg("RTM_NEWROUTE", None), False),
])
def test_only_a_new_link_event_for_the_interface_wakes_it(msg: Msg, wakes: bool) -> None:
    assert is_link_event(msg, "eth0") is wakes


@pytest.mark.parametrize(("mtu", "current", "write"), [
    (1400, 1500, True),
    (9000, 1500, True),
    (1500, 1500, False),  # unchanged
    (None, 1500, False),  # unreadable: keep what is written
    (0, 1500, False),  # a misreading
    (575, 1500, False),
    (576, 1500, True),
])
def test_which_readings_are_written(mtu: int | None, current: int, write: bool) -> None:
    assert acceptable(mtu, current) is write


def test_the_loop_reports_each_change_once_and_survives_unreadable_moments(
        monkeypatch: pytest.MonkeyPatch) -> None:
    readings: list[int | Exception] = [1500, 1400, 1400, OSError("no such device"), 1400, 9000]
    seen: list[int] = []

    def read(ifname: str) -> int:
        value = readings.pop(0) if len(readings) > 1 else readings[0]
        if isinstance(value, Exception):
            raise value
        return value

    async def no_events(self: MtuWatcher) -> None:  # the poll alone, no netlink socket in a unit test
        return None

    monkeypatch.setattr(MtuWatcher, "_listen", no_events)

    async def main() -> None:
        watcher = MtuWatcher("eth0", 1500, seen.append, read=read, poll=0.01)
        task = asyncio.create_task(watcher.run())
        for _ in range(300):
            if seen == [1400, 9000]:
                break
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert seen == [1400, 9000]
    assert mtuwatch._MIN_MTU == 576
