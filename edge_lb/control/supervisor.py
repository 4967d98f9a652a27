"""`edge-lb run`: the long-running supervisor, in named phases.

    startup    config -> control socket -> load/adopt the pinned data plane -> MACs -> first apply -> attach
    main_loop  health flips, gateway MAC changes and reloads -> Reconciler.apply (changed slots only)
    shutdown   SIGTERM/SIGINT: stop checks, close the socket, close our fds. The program stays attached
               and the maps pinned, so a restarted supervisor adopts them and no established flow is
               dropped. `edge-lb unload` detaches and unpins for uninstall.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from edge_lb import events, netlink
from edge_lb.api import sockets
from edge_lb.api.metrics import Metrics
from edge_lb.bgp.controller import BgpController, disable_path, drain, set_switch
from edge_lb.bgp.policy import Speaker
from edge_lb.config import Config, load_config
from edge_lb.control import overrides, status
from edge_lb.control.gwwatch import GatewayWatcher
from edge_lb.control.reconciler import Reconciler
from edge_lb.dataplane.counters import reason_names
from edge_lb.dataplane.loader import Dataplane
from edge_lb.dataplane.node import Link, NodeMaps
from edge_lb.errors import BgpError, ConfigError, EdgeLbError, SupervisorError
from healthchecks.factory import make_checker

_STEP_BOUND = 5.0  # seconds per shutdown step; then it is abandoned (the data plane keeps running)
_ATTACH_POLL = 0.5  # seconds between looks at the interface's XDP program (BGP withdraws on a detach)


def restart_only(old: Config, new: Config) -> list[str]:
    """Changes a reload cannot apply live: map sizes and the interface are fixed while the program runs."""
    problems = []
    if new.dataplane != old.dataplane:
        problems.append("dataplane: changed; map sizes, instance and XDP mode need a restart "
                        "(`edge-lb run` adopts the pinned maps, established flows survive)")
    if new.node != old.node:
        problems.append("node: changed; interface, MACs and MTU need a restart")
    if new.api != old.api:
        problems.append("api: changed; the listen address and token need a restart")
    if new.bgp != old.bgp:
        problems.append("bgp: changed; peers and session settings need a restart (routes follow health "
                        "and [vip.bgp] live)")
    return problems


def exabgp_speaker(config: Config, on_restart: Callable[[], None]) -> Speaker:
    from edge_lb.bgp.exabgp import ExaBgpSpeaker

    assert config.bgp is not None
    run_dir = sockets.RUN_DIR / f"{config.dataplane.instance}.bgp"
    return ExaBgpSpeaker(config.bgp, config.dataplane.instance, run_dir, on_restart)


class Supervisor:
    def __init__(self, config_path: str | os.PathLike[str], socket_path: Path | None = None,
                 make_speaker: Callable[[Config, Callable[[], None]], Speaker] = exabgp_speaker) -> None:
        self.config_path = os.fspath(config_path)
        self.socket_path = socket_path
        self.started = time.time()
        self.stopping = asyncio.Event()
        self.dp: Dataplane | None = None
        self.maps: NodeMaps | None = None
        self.rec: Reconciler | None = None
        self.watcher: GatewayWatcher | None = None
        self.metrics = Metrics(self)
        self.control = sockets.ControlServer(self, [self.metrics.add_routes])
        self._reload_lock = asyncio.Lock()
        self.attached = False  # startup attached the program
        self.on_interface = False  # ...and it is still the one on the interface, as last looked
        self.prog_id: int | None = None
        self.counters_cache: status.Counters | None = None
        self.make_speaker = make_speaker
        self.speaker: Speaker | None = None
        self.bgp: BgpController | None = None
        self._tasks: list[asyncio.Task[Any]] = []

    async def serve(self) -> None:
        try:
            await self.startup()
            await self.main_loop()
        finally:
            await self.shutdown()

    # -- startup
    async def startup(self) -> None:
        self._install_signals()
        config = load_config(self.config_path)
        events.emit("startup", phase="config", config=self.config_path, vips=len(config.vips),
                    instance=config.dataplane.instance)
        path = self.socket_path or sockets.socket_path(config.dataplane.instance)
        await self.control.start(path)  # first: a second supervisor on the instance stops here
        await self.control.start_tcp(config.api)  # a taken port or a bad token file fails before attach
        self.dp = Dataplane.load(config.dataplane, pin=True)
        link = await self._link(config)
        self.maps = NodeMaps(self.dp.io, config, link, adopt=True)
        self.counters_cache = status.Counters(self.dp.io)
        self.counters_cache.refresh()
        adopted = self.maps.adopted_up()
        events.emit("startup", phase="dataplane", adopted_backends=len(adopted),
                    adopted_up=sum(adopted.values()), own_mac=link.own_mac, gateway_mac=link.gw_mac,
                    mtu=link.mtu)
        self.rec = Reconciler(self.maps, config, make_checker,
                              overrides_file=overrides.state_file(config.dataplane.instance))
        report = await self.rec.start(adopted)
        self.dp.attach(config.node.interface, config.dataplane.xdp_mode)
        self.attached = self.on_interface = True
        self.prog_id = await asyncio.to_thread(netlink.xdp_prog_id, config.node.interface)
        self.rec.observe = self.metrics.observe_apply
        await self._start_bgp(config)
        events.emit("startup", phase="ready", interface=config.node.interface, mode=config.dataplane.xdp_mode,
                    ring_slots_written=sum(report.ring_slots.values()), socket=path, pid=os.getpid())

    async def _start_bgp(self, config: Config) -> None:
        """After attach: a VIP is announced only while the program that serves it is attached."""
        if config.bgp is None:
            return
        assert self.rec is not None
        self.speaker = self.make_speaker(config, self._bgp_restarted)
        await self.speaker.start()
        self.bgp = BgpController(self.rec, self.speaker, lambda: self.on_interface)
        self.rec.notify = self.bgp.poke
        self.rec.before_apply = self.bgp.withdraw_early
        try:
            sent = await self.bgp.sync("startup")
        except BgpError as exc:  # the controller's loop retries every second
            events.emit("startup", logging.WARNING, phase="bgp", result="first announce failed", error=exc)
            self.bgp.poke()
            return
        events.emit("startup", phase="bgp", peers=len(config.bgp.peers), announced=sent,
                    disabled=self.bgp.disabled())

    async def _still_attached(self) -> bool:
        """Our program is still the one on the interface (not detached or replaced behind our back)."""
        assert self.rec is not None
        now = await asyncio.to_thread(netlink.xdp_prog_id, self.rec.config.node.interface)
        return now is not None and now == self.prog_id

    def _bgp_restarted(self) -> None:
        if self.bgp is not None:
            events.emit("bgp", action="re-announce", reason="speaker restarted")
            self.bgp.restarted()

    async def _link(self, config: Config) -> Link:
        node = config.node
        # pyroute2's sync IPRoute runs its own event loop: it must not run in this loop's thread.
        own = node.mac if node.mac else await asyncio.to_thread(netlink.interface_mac, node.interface)
        mtu = node.mtu if node.mtu else await asyncio.to_thread(netlink.interface_mtu, node.interface)
        if node.gateway_mac:
            return Link(own, node.gateway_mac, mtu)
        self.watcher = GatewayWatcher(node.interface, self._gateway_changed)
        return Link(own, await self.watcher.start(), mtu)

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._stop, "SIGTERM")
        loop.add_signal_handler(signal.SIGINT, self._stop, "SIGINT")
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)

    def _stop(self, why: str) -> None:
        events.emit("shutdown", phase="requested", signal=why)
        self.stopping.set()

    def _on_sighup(self) -> None:
        if self.rec is None:
            events.emit("reload", logging.WARNING, result="ignored", why="still starting")
            return
        self._tasks = [t for t in self._tasks if not t.done()]
        self._tasks.append(asyncio.create_task(self.reload(), name="reload"))

    # -- main loop
    async def main_loop(self) -> None:
        assert self.rec is not None
        workers = [asyncio.create_task(self.rec.run(), name="reconciler"),
                   asyncio.create_task(self.metrics.run(), name="metrics")]
        if self.counters_cache is not None:
            workers.append(asyncio.create_task(self.counters_cache.run(), name="counters"))
        if self.bgp is not None:
            workers.append(asyncio.create_task(self.bgp.run(), name="bgp"))
        workers.append(asyncio.create_task(self._watch_attachment(), name="attachment"))
        stopper = asyncio.create_task(self.stopping.wait(), name="stop")
        done, _ = await asyncio.wait({*workers, stopper}, return_when=asyncio.FIRST_COMPLETED)
        for task in (*workers, stopper):
            task.cancel()
        # Let them unwind: a command cut off mid-flight is accounted for before shutdown withdraws.
        await asyncio.gather(*workers, stopper, return_exceptions=True)
        for task in workers:
            if task in done and not task.cancelled() and task.exception():
                raise EdgeLbError(f"{task.get_name()} stopped: {task.exception()}")

    async def _watch_attachment(self) -> None:
        """Report a program detached or replaced behind our back, and have BGP withdraw at once (it is not
        put back: whoever removed it may have meant it; `edge-lb run` again attaches it)."""
        assert self.rec is not None
        error = ""
        while True:
            await asyncio.sleep(_ATTACH_POLL)
            try:
                now = await self._still_attached()
            except Exception as exc:  # cannot tell (interface gone?): keep the last answer, say so once
                if repr(exc) != error:
                    error = repr(exc)
                    events.emit("dataplane", logging.WARNING, check="attachment", error=exc)
                continue
            error = ""
            if now != self.on_interface:
                self.on_interface = now
                events.emit("dataplane", logging.INFO if now else logging.WARNING, check="attachment",
                            attached=now, interface=self.rec.config.node.interface)
                if self.bgp is not None:
                    self.bgp.poke()

    def _gateway_changed(self, mac: str) -> None:
        assert self.maps is not None and self.rec is not None
        old = self.maps.link.gw_mac
        self.maps.link = replace(self.maps.link, gw_mac=mac)
        try:
            self.rec.apply("gateway")
        except EdgeLbError as exc:
            # The reconciler's loop retries until the map takes it.
            events.emit("gateway", logging.ERROR, old=old, new=mac, result="write failed, retrying",
                        error=exc)
            self.rec.dirty.set()
            return
        events.emit("gateway", old=old, new=mac, result="ctl map updated")

    async def reload(self) -> dict[str, Any]:
        """SIGHUP or POST /v1/reload: a valid config is applied as a diff; anything else changes nothing."""
        if self.rec is None:
            raise SupervisorError("still starting: reload once the node is running")
        async with self._reload_lock:
            try:
                config = load_config(self.config_path)
            except ConfigError as exc:
                return self._rejected(exc.problems)
            problems = restart_only(self.rec.config, config)
            if problems:
                return self._rejected(problems)
            try:
                if self.bgp is not None:
                    effective = overrides.apply(config, overrides.prune(config, self.rec.overrides))
                    with contextlib.suppress(BgpError):  # what fails is retried by the controller's loop
                        await self.bgp.withdraw_for(effective)
                report = await self.rec.reload(config)
            except EdgeLbError as exc:
                return self._rejected([f"the data plane refused the change: {exc}"])
        changes = {"vips_added": report.vips_added, "vips_removed": report.vips_removed,
                   "backends_written": report.backends_written, "backends_cleared": report.backends_cleared,
                   "ring_slots": sum(report.ring_slots.values())}
        events.emit("reload", result="applied", config=self.config_path, **changes)
        return {"ok": True, "config": self.config_path, "changes": changes}

    def _rejected(self, problems: list[str]) -> dict[str, Any]:
        events.emit("reload", logging.ERROR, result="rejected", config=self.config_path,
                    problems=len(problems), detail="; ".join(problems))
        return {"ok": False, "config": self.config_path, "problems": problems}

    # -- the operator's interface (edge_lb.control.operations.Operations)
    def events(self, limit: int = 100) -> list[dict[str, Any]]:
        return events.recent(limit)

    async def set_weight(self, vip: str, backend: str, weight: int | None) -> dict[str, Any]:
        """Drain (0), set, or clear (None) a backend's runtime weight. KeyError for an unknown one."""
        if self.rec is None:
            raise SupervisorError("still starting")
        async with self._reload_lock:  # not interleaved with a reload's swap
            if self.bgp is not None:  # draining the last backends: the route goes before the ring empties
                candidate, _ = self.rec.weighted(vip, backend, weight)
                with contextlib.suppress(BgpError):  # what fails is retried by the controller's loop
                    await self.bgp.withdraw_for(candidate)
            self.rec.set_weight(vip, backend, weight)
        running = self.rec.config
        now = next(b.weight for v in running.vips if v.name == vip
                   for b in v.backends if str(b.address) == backend)
        return {"vip": vip, "backend": backend, "weight": now, "override": weight is not None}

    async def set_disabled(self, disabled: bool) -> dict[str, Any]:
        """The maintenance switch, as `edge-lb disable|enable` sets it: a file, so it outlives a restart."""
        if self.rec is None or self.rec.config.bgp is None:
            raise SupervisorError("this node has no [bgp] table: nothing is announced, nothing to disable")
        path = disable_path(self.rec.config)
        set_switch(path, disabled, "through the API")
        if self.bgp is not None:
            self.bgp.poke()
        return {"disabled": disabled, "disable_file": str(path)}

    def counters(self) -> dict[str, Any]:
        if self.dp is None:
            return {"reasons": {}}
        names = reason_names()
        counts = self.counters_cache.reasons if self.counters_cache else {}
        return {"reasons": {name: counts.get(i, (0, 0))[0] for i, name in enumerate(names)}}

    def status(self) -> dict[str, Any]:
        if self.rec is None or self.dp is None or self.maps is None:
            return {"phase": "starting", "pid": os.getpid(), "config": self.config_path, "vips": []}
        assert self.counters_cache is not None
        doc = status.document(self.rec, self.counters_cache)
        doc["phase"] = "stopping" if self.stopping.is_set() else "running"
        node = self.rec.config.node
        doc.update(instance=self.rec.config.dataplane.instance, interface=node.interface, pid=os.getpid(),
                   uptime=time.time() - self.started, config=self.config_path,
                   gateway_mac=self.maps.link.gw_mac, applies=self.rec.applies,
                   bgp=self.bgp.status() if self.bgp is not None else None,
                   attached=self.on_interface)
        return doc

    async def _final_look(self) -> bool:
        """The attachment now, not as last polled (up to a second old); the last poll if it cannot tell."""
        try:
            async with asyncio.timeout(_STEP_BOUND):
                return await self._still_attached()
        except Exception:
            return self.on_interface

    # -- shutdown
    async def shutdown(self) -> None:
        """Each step bounded on its own, so one stuck step does not skip the others."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        for task in self._tasks:
            task.cancel()
        if self.bgp is not None and self.speaker is not None:
            assert self.rec is not None
            # Withdraw first, then wait for routers to move traffic away, then stop: nothing is black-holed.
            await drain(self.bgp, self.speaker, self.rec.config.bgp.drain_time if self.rec.config.bgp else 0)
        elif self.speaker is not None:
            await self.speaker.stop()
        steps = [("control socket", self.control.stop())]
        if self.watcher is not None:
            steps.append(("gateway watcher", self.watcher.stop()))
        if self.rec is not None:
            steps.append(("health checks", self.rec.stop()))
        for what, step in steps:
            try:
                await asyncio.wait_for(step, _STEP_BOUND)
            except Exception as exc:
                events.emit("shutdown", logging.WARNING, phase="step failed", step=what, error=repr(exc))
        if self.dp is not None:
            self.dp.close()
        if self.attached and not await self._final_look():
            events.emit("shutdown", phase="done", attached="no (detached from outside)", maps="pinned")
        elif self.attached:
            events.emit("shutdown", phase="done", attached="kept", maps="pinned")
        else:
            events.emit("shutdown", phase="done", attached="no (startup did not finish)")


def run(config_path: str) -> int:
    """Foreground until SIGTERM/SIGINT (what a systemd unit starts). Startup errors propagate to the CLI."""
    events.setup()
    asyncio.run(Supervisor(config_path).serve())
    return 0
