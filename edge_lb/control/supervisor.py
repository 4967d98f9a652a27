"""`edge-lb run`: the long-running supervisor. Lifecycle only, in named phases:

    startup    config -> control socket -> load/adopt the pinned data plane -> MACs -> node state ->
               first change (Reconciler.change "startup") -> attach -> BGP; the running node is then served
               to the API (control.operations.NodeOperations)
    main_loop  the node's workers: the change path's health loop, the counter sampler, BGP, the attachment,
               the tunnel checks' encapsulator kept in place (control/checktunnel.py)
    shutdown   SIGTERM/SIGINT: every step startup took is undone in reverse, each bounded: BGP withdraws and
               drains first, then checks stop and sockets close. The program stays attached and the maps
               pinned, so a restarted supervisor adopts them and no established flow is dropped.
               `edge-lb unload` detaches and unpins for uninstall. A SIGTERM during startup stops it where it
               is (nothing more is started) and undoes what it did. Whatever hangs, even a blocked event
               loop, the process ends within shutdown_bound(drain_time) of the signal (a timer thread).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import os
import signal
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from edge_lb import events, paths
from edge_lb.api import accept_log, sockets
from edge_lb.api.metrics import Metrics
from edge_lb.bgp.controller import BgpController
from edge_lb.bgp.policy import Speaker
from edge_lb.config import Config, load_config
from edge_lb.control import limits, overrides
from edge_lb.control.attachment import Attachment
from edge_lb.control.checktunnel import TunnelKeeper
from edge_lb.control.document import ProgramStatus
from edge_lb.control.gwwatch import GatewayWatcher
from edge_lb.control.instance import SECOND_RUN, InstanceLock
from edge_lb.control.linkwatch import LinkWatch
from edge_lb.control.nodestate import NodeState
from edge_lb.control.operations import NodeOperations, RunningNode
from edge_lb.control.reconciler import NoRoutes, Reconciler
from edge_lb.control.watchdog import Watchdog, notify
from edge_lb.dataplane.counters import CounterSampler
from edge_lb.dataplane.loader import Dataplane
from edge_lb.dataplane.node import Link, NodeMaps, link_for
from edge_lb.errors import EdgeLbError
from healthchecks.factory import make_checker

_STEP_BOUND = 5.0  # seconds per shutdown step; then it is abandoned (the data plane keeps running)
_BGP_BOUND = 20.0  # seconds past drain_time for the BGP step: withdraw (10 s at most) and stopping ExaBGP
_HARD_STOP = 50.0  # seconds past drain_time, about the steps' bounds together; then the process is ended
EXIT_HUNG = 70  # the exit status when the backstop had to end a shutdown that overran its bound


def shutdown_bound(drain_time: float) -> float:
    """Seconds from SIGTERM to the end of the process, at most, in every phase (systemd's TimeoutStopSec must
    be above it with the default drain_time)."""
    return _HARD_STOP + drain_time


def _hard_exit(bound: float) -> None:
    # A raw write, not the logger: the thread that hung may hold the log handler's lock (a full pipe).
    line = events.render("shutdown", phase="overran", bound=f"{bound:g}s", result="exiting now")
    with contextlib.suppress(OSError):
        os.write(2, f"error {line}\n".encode())
    os._exit(EXIT_HUNG)

MakeSpeaker = Callable[[Config, Callable[[], None]], Speaker]


def exabgp_speaker(config: Config, on_restart: Callable[[], None]) -> Speaker:
    from edge_lb.bgp.exabgp import ExaBgpSpeaker

    assert config.bgp is not None
    run_dir = paths.exabgp_run(config.dataplane.instance)
    return ExaBgpSpeaker(config.bgp, config.dataplane.instance, run_dir, on_restart)


class Supervisor:
    def __init__(self, config_path: str | os.PathLike[str], socket_path: Path | None = None,
                 make_speaker: MakeSpeaker = exabgp_speaker) -> None:
        self.config_path = os.fspath(config_path)
        self.socket_path = socket_path
        self.make_speaker = make_speaker
        self.stopping = asyncio.Event()
        self.ops = NodeOperations(self.config_path)
        self.watchdog = self.ops.watchdog = Watchdog()  # systemd's WatchdogSec and the BGP bridge's heartbeat
        self.metrics = Metrics(self.ops)
        self.control = sockets.ControlServer(self.ops, [self.metrics.add_routes])
        self.ops.api = self.control.connections  # status and /metrics show the API's connections
        self.node: RunningNode | None = None  # set at the end of startup
        self._early_mac: str | None = None  # a gateway MAC change seen before the node existed
        self._undo = contextlib.AsyncExitStack()  # what startup did, undone in reverse by shutdown
        self._tasks: list[asyncio.Task[Any]] = []
        self._starting: asyncio.Task[None] | None = None  # cancelled by a SIGTERM that comes while starting
        self._drain_time = 0.0  # [bgp].drain_time once the config is read: part of the shutdown bound
        self._backstop: threading.Timer | None = None
        self._tunnel: TunnelKeeper | None = None  # the tunnel checks' encapsulator, kept once started

    async def serve(self) -> None:
        try:
            self._starting = asyncio.create_task(self.startup(), name="startup")
            try:
                await self._starting
            except asyncio.CancelledError:
                if not self.stopping.is_set():
                    raise
                events.emit("shutdown", phase="startup stopped", started="undone in reverse")
                return
            await self.main_loop()
        finally:
            await self.shutdown()

    def disarm(self) -> None:
        """The process is ending on its own: the backstop is not needed."""
        if self._backstop is not None:
            self._backstop.cancel()

    # -- startup
    async def startup(self) -> None:
        self._install_signals()
        config = load_config(self.config_path)
        self._drain_time = config.bgp.drain_time if config.bgp is not None else 0.0
        instance = config.dataplane.instance
        self._undo.callback(InstanceLock.take(instance, "edge-lb run", SECOND_RUN).release)  # undone last
        limits.raise_nofile()
        events.emit("startup", phase="config", config=self.config_path, vips=len(config.vips),
                    instance=instance)
        attachment = Attachment(config.node.interface)
        self._undo.push_async_callback(self._final_look, attachment)  # undone last: says how it ends
        path = self.socket_path or paths.socket(instance)
        await self.control.start(path)  # first: a second supervisor on the instance stops here
        self._on_shutdown("control socket", self.control.stop)
        await self.control.start_tcp(config.api)  # a taken port or a bad token file fails before attach
        dp, program = await self._dataplane(config)
        self._undo.callback(dp.close)
        maps = NodeMaps(dp.io, config, await self._link(config), adopt=True)
        counters = CounterSampler(dp.io)
        counters.refresh()
        checkers = functools.partial(make_checker, disturbed=self._tunnel_disturbed)
        state = NodeState(maps, config, overrides.load(paths.weights(instance)), checkers)
        state.tunnel_ready = False  # until the TunnelKeeper has the encapsulator in place
        self._on_shutdown("health checks", state.stop)
        await self._watch_link(config, state)
        self._emit_adopted(maps)
        bgp = self._bgp(config, state, attachment)
        rec = Reconciler(state, bgp or NoRoutes(), weights_file=paths.weights(instance),
                         observe=self.metrics.observe_apply)
        report = await rec.change("startup")
        await asyncio.to_thread(dp.attach, config.node.interface, config.dataplane.xdp_mode)
        await attachment.record()
        self._tunnel = TunnelKeeper(state, config.node.interface)  # a main-loop worker: ensures, then keeps
        if bgp is not None:  # after attach: a VIP is announced only while the program that serves it is
            self._on_shutdown("bgp", bgp.drain)  # undone first: withdraw, drain, then stop the rest
            await bgp.start()
        self.node = RunningNode(self.config_path, state, rec, counters, attachment, bgp, program=program,
                                tunnel=self._tunnel)
        self.ops.serve(self.node)
        if self._early_mac is not None and self._early_mac != state.link.gw_mac:
            self._gateway_changed(self._early_mac)
        events.emit("startup", phase="ready", interface=config.node.interface, mode=config.dataplane.xdp_mode,
                    ring_slots_written=sum(report.ring_slots.values()), socket=path, pid=os.getpid())
        notify("READY=1")  # systemd Type=notify: started only now
        # What startup built (config, modules, probers, rings) lives as long as the process: out of the
        # collector's reach, a full collection no longer walks it while holding the GIL (at 500 VIPs such
        # a pass stalled the loop and the apply thread for tens of ms).
        gc.freeze()

    @staticmethod
    async def _dataplane(config: Config) -> tuple[Dataplane, ProgramStatus]:
        """The pinned program and maps adopted by fd when they are the same build and still attached (no
        compiler: the restart answers at once); else compiled in a thread, so status answers meanwhile."""
        d, began = config.dataplane, time.monotonic()
        # threads: both read the interface with pyroute2's sync IPRoute (its own event loop)
        got = await asyncio.to_thread(Dataplane.adopt, d, config.node.interface, d.xdp_mode)
        if isinstance(got, str):
            events.emit("startup", phase="program", program="compiling", why=f"not adopted: {got}")
            got = await asyncio.to_thread(Dataplane.load, d, True)
        took = time.monotonic() - began
        events.emit("startup", phase="program", program=got.origin, digest=got.digest[:16],
                    seconds=f"{took:.3f}")
        return got, {"origin": got.origin, "digest": got.digest, "seconds": round(took, 3)}

    async def _tunnel_disturbed(self, start: float, end: float) -> bool:
        """For tunnel checks about to blame a backend: was this node's encapsulator out of place then?"""
        return self._tunnel is None or await self._tunnel.disturbed(start, end)

    def _bgp(self, config: Config, state: NodeState, attachment: Attachment) -> BgpController | None:
        if config.bgp is None:
            return None
        return BgpController(state, lambda restarted: self.make_speaker(config, restarted),
                             lambda: attachment.on_interface, state.local_fault)

    async def _watch_link(self, config: Config, state: NodeState) -> None:
        """The node's own link, followed before the first check: checks that fail while it is down are not
        counted against their backends (control/localfaults.py); its MTU is followed too."""
        def mtu_changed(mtu: int) -> None:  # a link fact: the next change writes it
            state.follow_link(replace(state.link, mtu=mtu), "mtu")
        followed = not config.node.mtu  # [node].mtu fixes it; else the interface's is followed live
        watch = LinkWatch(config.node.interface, mtu=state.link.mtu if followed else None, on_mtu=mtu_changed)
        await watch.start()
        self._on_shutdown("link watch", watch.stop)
        state.follow_own_link(watch)

    @staticmethod
    def _emit_adopted(maps: NodeMaps) -> None:
        adopted = maps.adopted_up()
        events.emit("startup", phase="dataplane", adopted_backends=len(adopted),
                    adopted_up=sum(adopted.values()), own_mac=maps.link.own_mac, gateway_mac=maps.link.gw_mac,
                    mtu=maps.link.mtu)

    async def _link(self, config: Config) -> Link:
        node = config.node
        gateway: str | None = None
        if not node.gateway_mac:
            watcher = GatewayWatcher(node.interface, self._gateway_changed)
            gateway = await watcher.start()
            self._on_shutdown("gateway watcher", watcher.stop)
        # pyroute2's sync IPRoute runs its own event loop: it must not run in this loop's thread.
        return await asyncio.to_thread(link_for, node, gateway_mac=gateway)

    def _gateway_changed(self, mac: str) -> None:
        """The watcher's word, written by the next change. Before the node exists it is kept for the end of
        startup (the startup change wrote the MAC its Link was built with)."""
        if self.node is None:
            self._early_mac = mac
            events.emit("gateway", new=mac, result="seen during startup, written once ready")
            return
        state = self.node.state
        events.emit("gateway", old=state.link.gw_mac, new=mac, result="ctl map update queued")
        state.follow_link(replace(state.link, gw_mac=mac), "gateway")

    def _on_shutdown(self, what: str, step: Callable[[], Awaitable[None]]) -> None:
        async def bounded() -> None:
            bound = _BGP_BOUND + self._drain_time if what == "bgp" else _STEP_BOUND
            try:
                async with asyncio.timeout(bound):  # not wait_for: it can swallow a cancel (Python 3.11)
                    await step()
            except Exception as exc:
                events.emit("shutdown", logging.WARNING, phase="step failed", step=what, error=repr(exc))
        self._undo.push_async_callback(bounded)

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        accept_log.install(loop)  # a listener out of file descriptors: one line a minute, not 100 a second
        loop.add_signal_handler(signal.SIGTERM, self._stop, "SIGTERM")
        loop.add_signal_handler(signal.SIGINT, self._stop, "SIGINT")
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)

    def _stop(self, why: str) -> None:
        events.emit("shutdown", phase="requested", signal=why)
        self.ops.stopping = True
        self.stopping.set()
        if self._backstop is None:
            bound = shutdown_bound(self._drain_time)
            self._backstop = threading.Timer(bound, _hard_exit, (bound,))
            self._backstop.daemon = True
            self._backstop.start()
        if self._starting is not None and not self._starting.done():
            self._starting.cancel()  # startup stops where it is; shutdown undoes what it did

    def _on_sighup(self) -> None:
        if self.node is None:
            events.emit("reload", logging.WARNING, result="ignored", why="still starting")
            return
        self._tasks = [t for t in self._tasks if not t.done()]
        self._tasks.append(asyncio.create_task(self.ops.reload(), name="reload"))

    # -- main loop
    async def main_loop(self) -> None:
        assert self.node is not None and self._tunnel is not None  # startup finished
        node = self.node
        workers = [asyncio.create_task(node.reconciler.run(), name="reconciler"),
                   asyncio.create_task(node.counters.run(), name="counters"),
                   asyncio.create_task(node.attachment.run(node.bgp.poke if node.bgp else _nothing),
                                       name="attachment"),
                   asyncio.create_task(self._tunnel.run(), name="check tunnel")]
        if node.bgp is not None:
            workers.append(asyncio.create_task(node.bgp.run(), name="bgp"))
        workers.append(asyncio.create_task(self.watchdog.run(node.state.monitor, node.bgp), name="watchdog"))
        stopper = asyncio.create_task(self.stopping.wait(), name="stop")
        done, _ = await asyncio.wait({*workers, stopper}, return_when=asyncio.FIRST_COMPLETED)
        for task in (*workers, stopper):
            task.cancel()
        # Let them unwind (bounded): a command cut off mid-flight is accounted for before shutdown withdraws.
        _, stuck = await asyncio.wait({*workers, stopper}, timeout=_STEP_BOUND)
        for task in stuck:
            events.emit("shutdown", logging.WARNING, phase="worker did not stop", worker=task.get_name())
        failed = [t for t in workers if t.done() and not t.cancelled() and t.exception() is not None]
        for task in failed:
            if task in done:
                raise EdgeLbError(f"{task.get_name()} stopped: {task.exception()}")

    # -- shutdown
    async def shutdown(self) -> None:
        """Undo startup in reverse, each step bounded on its own: one stuck step does not skip the others."""
        notify("STOPPING=1")
        loop = asyncio.get_running_loop()
        signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        for sig in signals:  # kept, not removed: a second SIGTERM or a SIGHUP must not cut the withdraw short
            loop.add_signal_handler(sig, self._already_stopping, sig.name)
        self.ops.stopping = True
        for task in self._tasks:
            task.cancel()
        try:
            await self._undo.aclose()
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)

    @staticmethod
    def _already_stopping(name: str) -> None:
        events.emit("shutdown", phase="already stopping", signal=name, effect="none: the shutdown is bounded")

    @staticmethod
    async def _final_look(attachment: Attachment) -> None:
        if not attachment.attached:
            events.emit("shutdown", phase="done", attached="no (startup did not finish)")
        elif not await attachment.final_look(_STEP_BOUND):
            events.emit("shutdown", phase="done", attached="no (detached from outside)", maps="pinned")
        else:
            events.emit("shutdown", phase="done", attached="kept", maps="pinned")


def _nothing() -> None:
    return None


def run(config_path: str) -> int:
    """Foreground until SIGTERM/SIGINT (what a systemd unit starts). Startup errors propagate to the CLI."""
    events.setup()
    supervisor = Supervisor(config_path)
    try:
        asyncio.run(supervisor.serve())
    finally:
        supervisor.disarm()
    return 0
