"""edge_lb.control.gwwatch without root: which neighbour entries and netlink events count, and the watcher's
state machine driven by its poll and a fake resolver. With the kernel: tests/integration/test_gwwatch.py."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import pytest

from edge_lb import netlink
from edge_lb.control import gwwatch
from edge_lb.control.gwwatch import GatewayWatcher, is_relevant, usable_mac
from edge_lb.errors import NetlinkError

NO_INTERFACE = "gwtest-none0"  # exists nowhere: the tests drive the watcher by its poll and a fake resolver


@pytest.mark.parametrize(
    ("state", "lladdr", "usable"),
    [
        (netlink.NUD_REACHABLE, "02:00:00:00:00:01", True),
        (netlink.NUD_STALE, "02:00:00:00:00:01", True),
        (netlink.NUD_DELAY, "02:00:00:00:00:01", True),
        (netlink.NUD_PROBE, "02:00:00:00:00:01", True),
        (netlink.NUD_PERMANENT, "02:00:00:00:00:01", True),
        (netlink.NUD_INCOMPLETE, "02:00:00:00:00:01", False),
        (netlink.NUD_FAILED, "02:00:00:00:00:01", False),
        (netlink.NUD_NOARP, "02:00:00:00:00:01", False),
        (0, "02:00:00:00:00:01", False),
        (netlink.NUD_REACHABLE, None, False),
        (netlink.NUD_REACHABLE, "", False),
        (netlink.NUD_STALE, "00:00:00:00:00:00", False),
    ],
)
def test_which_neighbour_entries_count(state: int, lladdr: str | None, usable: bool) -> None:
    assert netlink.usable_neighbour(state, lladdr) is usable


def test_usable_mac() -> None:
    assert usable_mac("02:79:00:00:00:02")
    assert not usable_mac("00:00:00:00:00:00")
    assert not usable_mac("ff:ff:ff:ff:ff:ff")
    assert not usable_mac("02:79:00:00:00")
    assert not usable_mac("None")


class FakeMsg(dict[str, object]):
    """Just what is_relevant reads of a pyroute2 message: fields by get(), attributes by get_attr()."""

    def __init__(self, attrs: dict[str, str] | None = None, **fields: object) -> None:
        super().__init__(fields)
        self.attrs = attrs or {}

    def get_attr(self, name: str) -> str | None:
        return self.attrs.get(name)


@pytest.mark.parametrize(
    ("msg", "relevant"),
    [
        (FakeMsg(event="RTM_NEWNEIGH", ifindex=7), True),
        (FakeMsg(event="RTM_DELNEIGH", ifindex=7), True),
        (FakeMsg(event="RTM_NEWNEIGH", ifindex=8), False),
        (FakeMsg(event="RTM_NEWROUTE", dst_len=0), True),
        (FakeMsg(event="RTM_DELROUTE", dst_len=0), True),
        (FakeMsg(event="RTM_NEWROUTE", dst_len=24), False),
        (FakeMsg(event="RTM_NEWLINK", index=7), True),
        (FakeMsg(event="RTM_NEWLINK", index=9, attrs={"IFLA_IFNAME": "eth0"}), True),
        (FakeMsg(event="RTM_DELLINK", index=9, attrs={"IFLA_IFNAME": "eth1"}), False),
        (FakeMsg(event="RTM_NEWADDR", index=7), False),
    ],
)
def test_which_events_wake_the_watcher(msg: FakeMsg, relevant: bool) -> None:
    assert is_relevant(msg, 7, "eth0") is relevant


class FakeResolver:
    """Answers from a script, then repeats its last answer; an exception in the script is raised."""

    def __init__(self, *answers: str | Exception) -> None:
        self.answers = list(answers)
        self.calls = 0

    def __call__(self, ifname: str) -> str:
        self.calls += 1
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


async def _until(predicate: Callable[[], object], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def test_watcher_reports_only_changes_and_keeps_the_last_mac(caplog: pytest.LogCaptureFixture) -> None:
    gone = NetlinkError("no usable neighbour entry")
    resolver = FakeResolver("02:00:00:00:00:01", "02:00:00:00:00:01", gone, gone, "00:00:00:00:00:00", gone,
                            "02:00:00:00:00:02")
    changes: list[str] = []

    async def run() -> None:
        watcher = GatewayWatcher(NO_INTERFACE, changes.append, poll_interval=0.01, resolve=resolver)
        assert await watcher.start() == "02:00:00:00:00:01"
        await _until(lambda: changes)
        assert watcher.current == "02:00:00:00:00:02"
        await watcher.stop()
        await watcher.stop()

    with caplog.at_level(logging.DEBUG, logger="edge_lb"):
        asyncio.run(run())
    assert changes == ["02:00:00:00:00:02"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "keeping=02:00:00:00:00:01" in warnings[0].getMessage()


def test_start_fails_with_a_hint_when_nothing_resolves(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gwwatch, "START_WINDOW", 0.3)
    resolver = FakeResolver(NetlinkError("no usable neighbour entry"))

    async def run() -> None:
        watcher = GatewayWatcher(NO_INTERFACE, lambda mac: None, resolve=resolver)
        with pytest.raises(NetlinkError, match=r"within 0.3 s .*node.gateway_mac.*no usable neighbour"):
            await watcher.start()
        assert watcher.current is None
        await watcher.stop()

    began = time.monotonic()
    asyncio.run(run())
    assert time.monotonic() - began < 2.0
    assert resolver.calls >= 3  # the first try, then retries until the window closes
