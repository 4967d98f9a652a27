"""The interface's MTU followed live (when [node].mtu does not fix it): `ip link set eth0 mtu 1400` reaches
the ctl map within a second, so the data plane's too-big check uses the MTU the driver enforces.

Link events from netlink wake the watcher at once; a re-read every `poll` seconds catches anything missed
(events lost to ENOBUFS, a socket that could not be opened).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from edge_lb import events, netlink
from edge_lb.errors import NetlinkError

_POLL = 1.0  # seconds between re-reads without an event
_MIN_MTU = 576  # below this an MTU is a misreading, not a setting to follow (IPv4's minimum datagram size)


def is_link_event(msg: Any, ifname: str) -> bool:
    """An RTM_NEWLINK about `ifname`: the only event that carries an MTU change."""
    return bool(msg.get("event") == "RTM_NEWLINK" and msg.get_attr("IFLA_IFNAME") == ifname)


def acceptable(mtu: int | None, current: int) -> bool:
    """A new MTU worth writing: read, plausible and different."""
    return mtu is not None and mtu >= _MIN_MTU and mtu != current


class MtuWatcher:
    def __init__(self, ifname: str, current: int, on_change: Callable[[int], None], *,
                 read: Callable[[str], int] = netlink.interface_mtu, poll: float = _POLL) -> None:
        self.ifname = ifname
        self.current = current
        self._on_change = on_change
        self._read = read
        self._poll = poll
        self._wake = asyncio.Event()

    async def run(self) -> None:
        """Until cancelled."""
        listener = asyncio.create_task(self._listen(), name=f"mtu events {self.ifname}")
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._poll):  # not wait_for: it can swallow a cancel
                        await self._wake.wait()
                self._wake.clear()
                await self._refresh()
        finally:
            listener.cancel()
            await asyncio.wait({listener}, timeout=2.0)  # bounded, and a second cancel of ours is not eaten

    async def _refresh(self) -> None:
        try:
            mtu: int | None = await asyncio.to_thread(self._read, self.ifname)
        except Exception as exc:  # interface gone for a moment: keep the MTU written, say so at debug
            logging.getLogger("edge_lb").debug("mtu of %s unreadable: %r", self.ifname, exc)
            mtu = None
        if acceptable(mtu, self.current):
            assert mtu is not None
            events.emit("link", interface=self.ifname, old_mtu=self.current, new_mtu=mtu,
                        result="ctl map update queued")
            self.current = mtu
            self._on_change(mtu)

    async def _listen(self) -> None:
        """Wake the loop on a link event; without a socket the poll alone follows the MTU."""
        try:
            sock = await netlink.NetlinkEvents.open(f"the MTU of {self.ifname}")
        except NetlinkError as exc:
            events.emit("link", logging.WARNING, interface=self.ifname, result="no netlink events, polling",
                        error=exc)
            return
        try:
            async for msg in sock.messages():
                if is_link_event(msg, self.ifname):
                    self._wake.set()
        except Exception as exc:  # events lost or the socket broke: the poll carries on
            events.emit("link", logging.WARNING, interface=self.ifname, result="netlink events lost, polling",
                        error=repr(exc))
        finally:
            sock.close()
