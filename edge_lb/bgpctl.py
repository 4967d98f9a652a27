"""Keeps this node's BGP announcements equal to the policy: health, attachment and the disable switch in,
announce/withdraw commands out (through a Speaker: ExaBGP, or the fake in tests).

Withdrawal is the safe direction: every trigger that can make a VIP unservable (a health flip, a reload, the
disable file, shutdown) leads to a sync, and a refused command is retried every second until it goes through.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from edge_lb import events
from edge_lb.bgp import Announcer, Speaker, desired_routes
from edge_lb.config import Config, IPAddress
from edge_lb.errors import BgpError
from edge_lb.state import VipKey

_POLL = 0.5  # seconds between looks at the disable file
_RETRY = 1.0  # seconds before a refused sync is tried again

Health = Callable[[], Mapping[tuple[VipKey, IPAddress], bool]]


def disable_path(config: Config) -> Path:
    """The maintenance switch: while this file exists the node announces nothing. It lives outside /run so a
    node disabled for maintenance stays disabled across a reboot."""
    assert config.bgp is not None
    return Path(config.bgp.disable_file or f"/var/lib/edge-lb/{config.dataplane.instance}.disabled")


class BgpController:
    def __init__(self, config: Config, speaker: Speaker, health: Health) -> None:
        self.config = config
        self.speaker = speaker
        self.health = health
        self.announcer = Announcer(speaker)
        self.attached = False
        self.stopping = False
        self.dirty = asyncio.Event()
        self._disabled = self.disabled()

    def disabled(self) -> bool:
        return disable_path(self.config).exists()

    def poke(self) -> None:
        self.dirty.set()

    def restarted(self) -> None:
        """The speaker came back with an empty RIB: announce everything again."""
        self.announcer.forget()
        self.poke()

    async def sync(self, trigger: str) -> int:
        if self.stopping:
            return 0
        desired = desired_routes(self.config, self.health(), self.attached, self._disabled)
        return await self.announcer.sync(desired, trigger)

    async def run(self) -> None:
        """Until cancelled: sync on every poke and whenever the disable switch flips."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.dirty.wait(), _POLL)
            trigger = "health or reload" if self.dirty.is_set() else "poll"
            self.dirty.clear()
            if self.disabled() != self._disabled:
                self._disabled = not self._disabled
                events.emit("maintenance", disabled=self._disabled, file=disable_path(self.config))
                trigger = "disable" if self._disabled else "enable"
            try:
                await self.sync(trigger)
            except BgpError:
                await asyncio.sleep(_RETRY)
                self.dirty.set()

    async def withdraw_all(self) -> None:
        """Shutdown's first step: withdraw every route (the speaker keeps running until drained)."""
        self.stopping = True
        await self.announcer.sync({}, "shutdown")

    def status(self) -> dict[str, Any]:
        return {"peers": self.speaker.peers(), "announced": sorted(str(p) for p in self.announcer.announced),
                "disabled": self._disabled, "disable_file": str(disable_path(self.config))}


async def drain(controller: BgpController, speaker: Speaker, drain_time: float) -> None:
    """Withdraw first, give routers drain_time to move traffic away, then stop the speaker."""
    try:
        await asyncio.wait_for(controller.withdraw_all(), 10)
        events.emit("shutdown", phase="withdrawn", drain=f"{drain_time:g}s")
    except (BgpError, TimeoutError) as exc:
        events.emit("shutdown", logging.WARNING, phase="withdraw failed", error=repr(exc))
    await asyncio.sleep(drain_time)
    await speaker.stop()
    events.emit("shutdown", phase="bgp stopped")
