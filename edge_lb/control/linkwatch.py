"""This node's own link, followed from netlink link events (at once) and a re-read every 0.5 s: is it up,
and its MTU (when [node].mtu does not fix it: `ip link set eth0 mtu 1400` reaches the ctl map within a second,
so the data plane's too-big check uses the MTU the driver enforces).

While the link is down, and for a moment after it is back, a failed check says nothing about its backend: the
health monitor asks `during(start, end)` for every failed check and counts it as this node's fault
(healthchecks.local.LINK_DOWN), so no backend is marked down by a cable pulled from this node.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from edge_lb import events, netlink
from edge_lb.errors import NetlinkError
from healthchecks.local import LINK_DOWN

_POLL = 0.5  # seconds between re-reads without an event
_BACKOFF = 5.0  # ... while reads fail (out of descriptors: each try costs pyroute2 a half-built event loop)
AFTER_UP = 1.0  # seconds after the link is back during which a failed check is still blamed on it
_MIN_MTU = 576  # below this an MTU is a misreading, not a setting to follow (IPv4's minimum datagram size)
_DOWN_STATES = frozenset({"DOWN", "LOWERLAYERDOWN", "NOTPRESENT"})  # UNKNOWN (no carrier info) counts as up


def link_fault(ifname: str, admin_up: bool, operstate: str) -> str | None:
    """Why the link cannot carry the checks ("eth0 operstate DOWN"), or None while it can."""
    if not admin_up:
        return f"{ifname} administratively down"
    if operstate in _DOWN_STATES:
        return f"{ifname} operstate {operstate}"
    return None


def new_mtu(mtu: int, current: int | None) -> bool:
    """A read MTU worth writing: followed (current is not None), plausible and different."""
    return current is not None and mtu >= _MIN_MTU and mtu != current


def down_during(start: float, end: float, down_since: float | None, up_at: float | None,
                after_up: float = AFTER_UP) -> bool:
    """Whether the link was down at some moment of [start, end] (monotonic), counting `after_up` seconds past
    its return: neighbours are re-resolved and queues drained then."""
    if down_since is not None and down_since <= end:
        return True
    return up_at is not None and up_at + after_up >= start


class LinkWatch:
    def __init__(self, ifname: str, *, read: Callable[[str], tuple[bool, str, int]] = netlink.link_state,
                 poll: float = _POLL, clock: Callable[[], float] = time.monotonic,
                 mtu: int | None = None, on_mtu: Callable[[int], None] | None = None) -> None:
        self.ifname = ifname
        self.mtu = mtu  # the MTU written; None: not followed ([node].mtu fixes it)
        self._on_mtu = on_mtu
        self.fault: str | None = None  # why the link is down now
        self.down_since: float | None = None  # monotonic
        self.up_at: float | None = None  # when it last came back
        self._read = read
        self._poll = poll
        self._clock = clock
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._readable = True

    def during(self, start: float, end: float) -> str | None:
        """LINK_DOWN when the link was down during a check that ran from `start` to `end` (monotonic)."""
        return LINK_DOWN if down_during(start, end, self.down_since, self.up_at) else None

    def set(self, fault: str | None) -> None:
        """The link's state as read: a change is logged and timed."""
        if (fault is None) == (self.fault is None):
            self.fault = fault
            return
        now = self._clock()
        if fault is not None:
            self.down_since = now
            events.emit("link", logging.WARNING, interface=self.ifname, state="down", why=fault,
                        checks="failures not counted against backends")
        else:
            lasted = now - self.down_since if self.down_since is not None else 0.0
            self.down_since, self.up_at = None, now
            events.emit("link", interface=self.ifname, state="up", down_for=f"{lasted:.1f}s")
        self.fault = fault

    async def start(self) -> None:
        await self._refresh()
        self._task = asyncio.create_task(self._run(), name=f"link state {self.ifname}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait({task}, timeout=2.0)

    async def _run(self) -> None:
        listener = asyncio.create_task(self._listen(), name=f"link events {self.ifname}")
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._poll if self._readable else _BACKOFF):  # not wait_for
                        await self._wake.wait()
                self._wake.clear()
                await self._refresh()
        finally:
            listener.cancel()
            await asyncio.wait({listener}, timeout=2.0)

    async def _refresh(self) -> None:
        try:
            admin_up, operstate, mtu = await asyncio.to_thread(self._read, self.ifname)
        except NetlinkError as exc:  # the interface is gone
            self.set(f"{self.ifname}: {exc}")
            return
        except Exception as exc:  # no descriptor for a netlink socket (EMFILE) ...: keep the last answer
            logging.getLogger("edge_lb").debug("link state of %s unreadable: %r", self.ifname, exc)
            self._readable = False
            return
        self._readable = True
        self.set(link_fault(self.ifname, admin_up, operstate))
        if new_mtu(mtu, self.mtu) and self._on_mtu is not None:
            events.emit("link", interface=self.ifname, old_mtu=self.mtu, new_mtu=mtu,
                        result="ctl map update queued")
            self.mtu = mtu
            self._on_mtu(mtu)

    async def _listen(self) -> None:
        """Wake the loop on a link event about our interface; without a socket the poll alone follows it."""
        try:
            sock = await netlink.NetlinkEvents.open(f"the link state of {self.ifname}")
        except NetlinkError as exc:
            events.emit("link", logging.WARNING, interface=self.ifname, result="no netlink events, polling",
                        error=exc)
            return
        try:
            async for msg in sock.messages():
                if _about(msg, self.ifname):
                    self._wake.set()
        except Exception as exc:  # events lost or the socket broke: the poll carries on
            events.emit("link", logging.WARNING, interface=self.ifname, result="netlink events lost, polling",
                        error=repr(exc))
        finally:
            sock.close()


def _about(msg: Any, ifname: str) -> bool:
    return bool(msg.get("event") in ("RTM_NEWLINK", "RTM_DELLINK") and msg.get_attr("IFLA_IFNAME") == ifname)
