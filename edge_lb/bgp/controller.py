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
from typing import Protocol

from edge_lb import events, paths
from edge_lb.bgp.policy import Announcer, Prefix, Route, Speaker, desired_routes, withheld
from edge_lb.config import Config, IPAddress
from edge_lb.configbgp import Bgp
from edge_lb.control.document import BgpStatus
from edge_lb.dataplane.desired import VipKey
from edge_lb.errors import BgpError

_POLL = 0.5  # seconds between looks at the disable file
_RETRY = 1.0  # seconds before a refused sync is tried again
_WITHDRAW_BOUND = 10.0  # seconds shutdown keeps trying to withdraw
_PEERS_RETRY = 5.0  # seconds between attempts to have the speaker take a reload's peers
_FIRST_BOUND = 0.5  # seconds a ring rewrite waits for its withdraw to be acked (ExaBGP takes ~3 ms)


def disable_path(config: Config) -> Path:
    """The maintenance switch: while this file exists the node announces nothing. It lives outside /run so a
    node disabled for maintenance stays disabled across a reboot."""
    assert config.bgp is not None
    return switch_path(config.bgp.disable_file, config.dataplane.instance)


def switch_path(disable_file: str | None, instance: str) -> Path:
    return Path(disable_file) if disable_file else paths.disable_switch(instance)


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

    @property
    def config(self) -> Config: ...

    def serving(self) -> Mapping[tuple[VipKey, IPAddress], bool]: ...


def _always() -> bool:
    return True


def _no_fault() -> str | None:
    return None


def _by_family(item: tuple[Prefix, str | None]) -> tuple[int, Prefix]:
    """IPv4 prefixes before IPv6 ones (ipaddress refuses to compare across versions)."""
    return item[0].version, item[0]


class BgpController:
    """Owns its speaker (made by `make_speaker`, given the controller's restart callback): started by
    `start()`, stopped by `drain()`."""

    def __init__(self, source: Source, make_speaker: Callable[[Callable[[], None]], Speaker],
                 attached: Callable[[], bool] = _always,
                 local_fault: Callable[[], str | None] = _no_fault) -> None:
        self.source = source
        speaker = make_speaker(self.restarted)
        self.speaker = speaker
        self.attached = attached  # the supervisor's view of the interface (it looks, and pokes on a change)
        # "local fault: ..." while the node cannot judge its backends (NodeState.local_fault), read on
        # every sync: the loop's 0.5 s poll follows it, like the attachment.
        self.local_fault = local_fault
        self.announcer = Announcer(speaker)
        self.stopping = False
        self.dirty = asyncio.Event()
        self._disabled = self.disabled()
        # One sync at a time, its desired state computed under the lock: an older sync half-way through its
        # announcements could otherwise re-announce what a withdraw-first has just withdrawn.
        self._lock = asyncio.Lock()
        self._background: set[asyncio.Task[int]] = set()
        # A change between its withdraw-first and its write: until the maps have it, a sync announces only
        # what both the running config and the candidate serve (else it would re-announce what the
        # withdraw-first just withdrew, while the old ring still looked servable).
        self._pending: Config | None = None
        # The peers the speaker runs; a reload that changes [[bgp.peer]] is followed live (_follow_peers).
        self._peers = self.config.bgp.peers if self.config.bgp is not None else ()
        self._reloading: asyncio.Task[None] | None = None

    @property
    def config(self) -> Config:
        return self.source.config

    def disabled(self) -> bool:
        return disable_path(self.config).exists()

    def poke(self) -> None:
        self.dirty.set()

    def restarted(self) -> None:
        """The speaker reconnected (maybe with an empty RIB): re-send everything it may lack."""
        events.emit("bgp", action="re-announce", reason="speaker restarted")
        self.announcer.forget()
        self.poke()

    async def start(self) -> None:
        """Start the speaker and announce what serves; a refused first announce is retried by run()."""
        await self.speaker.start()
        try:
            sent = await self.sync("startup")
        except BgpError as exc:
            events.emit("startup", logging.WARNING, phase="bgp", result="first announce failed", error=exc)
            self.poke()
            return
        assert self.config.bgp is not None
        events.emit("startup", phase="bgp", peers=len(self.config.bgp.peers), announced=sent,
                    disabled=self._disabled)

    def desired(self, config: Config | None = None) -> dict[Prefix, Route]:
        serving, fault = self.source.serving(), self.local_fault()
        routes = desired_routes(config or self.config, serving, self.attached(), self._disabled, fault)
        if config is None and self._pending is not None:
            pending = desired_routes(self._pending, serving, self.attached(), self._disabled, fault)
            # By prefix, not by route: a prefix both serve keeps its running attributes until the change is
            # written (comparing whole routes withdrew a VIP whose prepend or MED a reload changed).
            routes = {p: r for p, r in routes.items() if p in pending}
        return routes

    async def sync(self, trigger: str) -> int:
        self._follow_peers()
        async with self._lock:
            if self.stopping:
                return 0
            return await self.announcer.sync(self.desired(), trigger)

    def _follow_peers(self) -> None:
        """A reload changed [[bgp.peer]]: the speaker takes the new list in the background (ExaBGP confirms it
        within seconds; routes keep following health meanwhile)."""
        bgp = self.config.bgp
        if bgp is None or bgp.peers == self._peers or self._reloading is not None or self.stopping:
            return
        self._reloading = asyncio.create_task(self._new_peers(bgp), name="bgp peers reload")

    async def _new_peers(self, bgp: Bgp) -> None:
        try:
            await self.speaker.reconfigure(bgp)
        except Exception as exc:  # an OSError writing its config too: without the pause it would spin
            events.emit("bgp", logging.ERROR, action="peers reload", result="failed, retrying", error=exc)
            await asyncio.sleep(_PEERS_RETRY)
            return
        finally:
            self._reloading = None
            self.poke()
        self._peers = bgp.peers
        events.emit("bgp", action="peers reload", result="applied",
                    peers=" ".join(str(p.address) for p in bgp.peers))
        self.announcer.forget()  # a new peer starts with no route; the others see no change on the wire

    async def withdraw_first(self, candidate: Config) -> None:
        """Before the maps change (the change path's first step): withdraw what `candidate`, with the health
        now, will not announce: a dead backend's last VIP, a removed VIP, a drained pool. Announcements wait
        for the write (changed()), so a route never points at a ring that is not written yet.
        Withdraw-only, waited for at most _FIRST_BOUND: a slow or restarting speaker must not hold a dead
        backend in the ring. Past the bound the withdraw goes on in the background; what fails is retried by
        the controller's loop."""
        self._pending = candidate
        keep = self.desired(candidate)
        if self.stopping or keep.keys() >= self.announcer.announced.keys():
            return
        task = asyncio.create_task(self._withdraw_locked(candidate, "change"))
        self._background.add(task)
        task.add_done_callback(self._finished)
        # asyncio.wait leaves the task running past the bound and never raises its error (_finished handles
        # it), while our own cancellation goes through; wait_for(shield(...)) could swallow it (3.11).
        await asyncio.wait({task}, timeout=_FIRST_BOUND)

    async def _withdraw_locked(self, config: Config | None, trigger: str) -> int:
        async with self._lock:
            if self.stopping:
                return 0
            return await self.announcer.withdraw(self.desired(config), trigger)

    def changed(self) -> None:
        """The change is written (or rolled back): sync, announcing what now serves."""
        self._pending = None
        self.poke()

    def _finished(self, task: asyncio.Task[int]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.poke()  # refused: the loop's next sync retries

    async def run(self) -> None:
        """Until cancelled: sync on every poke and whenever the disable switch or the attachment flips."""
        while True:
            # asyncio.timeout, not wait_for: Python 3.11's wait_for swallows a cancel that arrives as the
            # event is set, and this loop is poked often (shutdown would then never finish).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_POLL):
                    await self.dirty.wait()
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

    async def drain(self) -> None:
        """Shutdown: withdraw first (retrying for up to 10 s: the bridge may be reconnecting), give routers
        drain_time to move traffic away, then stop the speaker (which ends the sessions)."""
        drain_time = self.config.bgp.drain_time if self.config.bgp is not None else 0.0
        if not self.announcer.announced:
            drain_time = 0.0  # nothing announced (a stop during startup): no traffic to move away
        deadline = asyncio.get_running_loop().time() + _WITHDRAW_BOUND
        while True:
            try:
                async with asyncio.timeout_at(deadline):  # the whole withdraw, retries included
                    await self.withdraw_all()
                events.emit("shutdown", phase="withdrawn", drain=f"{drain_time:g}s")
                break
            except (BgpError, TimeoutError) as exc:
                if asyncio.get_running_loop().time() + _RETRY / 2 >= deadline:
                    events.emit("shutdown", logging.WARNING, phase="withdraw failed", error=repr(exc))
                    break
                await asyncio.sleep(_RETRY / 2)
        await asyncio.sleep(drain_time)
        await self.speaker.stop()
        events.emit("shutdown", phase="bgp stopped")

    def _down_med(self, prefix: Prefix, reason: str) -> str:
        """A withheld reason, saying so when the route is announced anyway with its down MED."""
        route = self.announcer.announced.get(prefix)
        if route is None or not route.down:
            return reason
        return f'{reason}; announced with med {route.med} instead (down = "med")'

    def status(self) -> BgpStatus:
        why = withheld(self.config, self.source.serving(), self.attached(), self._disabled,
                       self.local_fault())
        return {"peers": self.speaker.peers(), "announced": sorted(str(p) for p in self.announcer.announced),
                "withheld": {str(p): self._down_med(p, reason)
                             for p, reason in sorted(why.items(), key=_by_family) if reason is not None},
                "disabled": self._disabled, "disable_file": str(disable_path(self.config)),
                "speaker": self.speaker.liveness_status()}
