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
from typing import Any, Protocol

from edge_lb import events
from edge_lb.bgp.policy import Announcer, Prefix, Route, Speaker, desired_routes, withheld
from edge_lb.config import Config, IPAddress
from edge_lb.control.overrides import STATE_DIR
from edge_lb.dataplane.desired import VipKey
from edge_lb.errors import BgpError

_POLL = 0.5  # seconds between looks at the disable file
_RETRY = 1.0  # seconds before a refused sync is tried again
_WITHDRAW_BOUND = 10.0  # seconds shutdown keeps trying to withdraw
_FIRST_BOUND = 0.5  # seconds a ring rewrite waits for its withdraw to be acked (ExaBGP takes ~3 ms)


def disable_path(config: Config) -> Path:
    """The maintenance switch: while this file exists the node announces nothing. It lives outside /run so a
    node disabled for maintenance stays disabled across a reboot."""
    assert config.bgp is not None
    return switch_path(config.bgp.disable_file, config.dataplane.instance)


def switch_path(disable_file: str | None, instance: str) -> Path:
    return Path(disable_file) if disable_file else STATE_DIR / f"{instance}.disabled"


def set_switch(path: Path, disabled: bool, by: str) -> None:
    """Create (disable) or remove (enable) the maintenance switch; BgpError saying which file failed."""
    try:
        if disabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"disabled {by}\n")
        else:
            path.unlink(missing_ok=True)
    except OSError as exc:
        raise BgpError(f"maintenance switch {path}: {exc.strerror or exc}") from exc


class Source(Protocol):
    """What the controller reads on every sync, together: the running config, and which backends serve
    (healthy, and written so into the maps: Reconciler.serving)."""

    config: Config

    def serving(self) -> Mapping[tuple[VipKey, IPAddress], bool]: ...


def _always() -> bool:
    return True


class BgpController:
    def __init__(self, source: Source, speaker: Speaker,
                 attached: Callable[[], bool] = _always) -> None:
        self.source = source
        self.speaker = speaker
        self.attached = attached  # the supervisor's view of the interface (it looks, and pokes on a change)
        self.announcer = Announcer(speaker)
        self.stopping = False
        self.dirty = asyncio.Event()
        self._disabled = self.disabled()
        # One sync at a time, its desired state computed under the lock: an older sync half-way through its
        # announcements could otherwise re-announce what a withdraw-first has just withdrawn.
        self._lock = asyncio.Lock()
        self._background: set[asyncio.Task[int]] = set()

    @property
    def config(self) -> Config:
        return self.source.config

    def disabled(self) -> bool:
        return disable_path(self.config).exists()

    def poke(self) -> None:
        self.dirty.set()

    def restarted(self) -> None:
        """The speaker reconnected (maybe with an empty RIB): re-send everything it may lack."""
        self.announcer.forget()
        self.poke()

    def desired(self, config: Config | None = None) -> dict[Prefix, Route]:
        return desired_routes(config or self.config, self.source.serving(), self.attached(), self._disabled)

    async def sync(self, trigger: str) -> int:
        async with self._lock:
            if self.stopping:
                return 0
            return await self.announcer.sync(self.desired(), trigger)

    async def withdraw_early(self) -> None:
        """Before a health-driven ring rewrite (tens of ms of Maglev): withdraw what is no longer servable.
        Announcements wait for the rewrite, so a route never points at a ring that is not written yet."""
        await self._withdraw_first(None, "health")

    async def withdraw_for(self, config: Config) -> None:
        """Before a reload or a drain changes the maps: withdraw what `config` will not announce (a removed
        VIP's route goes before its maps do, so routers never send it to a node that drops it)."""
        await self._withdraw_first(config, "reload or weight")

    async def _withdraw_first(self, config: Config | None, trigger: str) -> None:
        """Withdraw-only, waited for at most _FIRST_BOUND: a slow or restarting speaker must not hold a dead
        backend in the ring. Past the bound the withdraw goes on in the background; what fails is retried by
        the controller's loop."""
        keep = self.desired(config)
        if self.stopping or keep.keys() >= self.announcer.announced.keys():
            return
        task = asyncio.create_task(self._withdraw_locked(config, trigger))
        self._background.add(task)
        task.add_done_callback(self._finished)
        with contextlib.suppress(TimeoutError, BgpError):
            await asyncio.wait_for(asyncio.shield(task), _FIRST_BOUND)

    async def _withdraw_locked(self, config: Config | None, trigger: str) -> int:
        async with self._lock:
            if self.stopping:
                return 0
            return await self.announcer.withdraw(self.desired(config), trigger)

    def _finished(self, task: asyncio.Task[int]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.poke()  # refused: the loop's next sync retries

    async def run(self) -> None:
        """Until cancelled: sync on every poke and whenever the disable switch or the attachment flips."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.dirty.wait(), _POLL)
            trigger = "health or reload" if self.dirty.is_set() else "poll"
            self.dirty.clear()
            trigger = await self._look(trigger)
            try:
                await self.sync(trigger)
            except BgpError:
                await asyncio.sleep(_RETRY)
                self.dirty.set()

    async def _look(self, trigger: str) -> str:
        """The switch no event announces: the disable file (the attachment is read on every sync)."""
        if self.disabled() != self._disabled:
            self._disabled = not self._disabled
            events.emit("maintenance", disabled=self._disabled, file=disable_path(self.config))
            trigger = "disable" if self._disabled else "enable"
        return trigger

    async def withdraw_all(self) -> None:
        """Shutdown's first step: withdraw every route (the speaker keeps running until drained)."""
        self.stopping = True
        async with self._lock:
            await self.announcer.sync({}, "shutdown")

    def status(self) -> dict[str, Any]:
        why = withheld(self.config, self.source.serving(), self.attached(), self._disabled)
        return {"peers": self.speaker.peers(), "announced": sorted(str(p) for p in self.announcer.announced),
                "withheld": {str(p): reason for p, reason in sorted(why.items()) if reason is not None},
                "disabled": self._disabled, "disable_file": str(disable_path(self.config))}


async def drain(controller: BgpController, speaker: Speaker, drain_time: float) -> None:
    """Withdraw first (retrying for up to 10 s: the bridge may be reconnecting), give routers drain_time to
    move traffic away, then stop the speaker (which ends the sessions, withdrawing anything left)."""
    deadline = asyncio.get_running_loop().time() + _WITHDRAW_BOUND
    while True:
        try:
            await asyncio.wait_for(controller.withdraw_all(), _WITHDRAW_BOUND)
            events.emit("shutdown", phase="withdrawn", drain=f"{drain_time:g}s")
            break
        except (BgpError, TimeoutError) as exc:
            if asyncio.get_running_loop().time() > deadline:
                events.emit("shutdown", logging.WARNING, phase="withdraw failed", error=repr(exc))
                break
            await asyncio.sleep(_RETRY / 2)
    await asyncio.sleep(drain_time)
    await speaker.stop()
    events.emit("shutdown", phase="bgp stopped")
