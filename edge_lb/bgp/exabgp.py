"""ExaBGP as the supervisor's child: its process and the API channel to it (its config: exabgp_config).

    speaker = ExaBgpSpeaker(config.bgp, "default", Path("/run/edge-lb/default.bgp"), on_restart)
    await speaker.start()     # renders exabgp.conf, starts ExaBGP, waits (bounded) for its bridge to connect
    await speaker.send("announce route 10.0.0.1/32 next-hop self")   # returns on "done", else BgpError
    speaker.peers()           # {"10.200.1.1": "up"}
    await speaker.stop()      # SIGTERM, bounded wait, SIGKILL, reap; idempotent

Files in run_dir (0700): exabgp.conf (rendered from exabgp_conf/*.tmpl), exabgp.env (empty: ExaBGP's options
are in its environment), api.sock (where the bridge connects), exabgp.log (ExaBGP's stdout and stderr and the
bridge's stderr; moved to exabgp.log.1 past 1 MiB at a start).

ExaBGP runs edge_lb.bgp.exabgp_bridge as its one API process; the bridge relays between ExaBGP's pipes and
api.sock. What ExaBGP 5.0.15 writes to it with `encoder text` (exabgp/reactor/api/response/{text,answer}.py):

    done | error                        the ack of the command in flight; every command gets exactly one
    neighbor 10.0.0.1 connected         TCP connection to the peer established
    neighbor 10.0.0.1 up                BGP session established
    neighbor 10.0.0.1 down - <reason>   session gone (the reason is escaped onto the one line)
    shutdown <pid> <ppid>               ExaBGP is exiting

If ExaBGP exits unexpectedly it is restarted with backoff, and on_restart() runs once the new bridge is
connected: ExaBGP's RIB starts empty, so the supervisor must announce everything again.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from edge_lb import events
from edge_lb.bgp.exabgp_api import ACK_TIMEOUT, ApiChannel
from edge_lb.bgp.exabgp_config import (
    ENV_FILE,
    check_md5,
    default_router_id,
    exabgp_environment,
    render_config,
    source_address,
)
from edge_lb.bgp.exabgp_liveness import Liveness
from edge_lb.bgp.exabgp_reload import reload_peers
from edge_lb.configbgp import Bgp
from edge_lb.control.document import SpeakerStatus
from edge_lb.errors import BgpError

log = logging.getLogger("edge_lb.bgp.exabgp")

CONNECT_TIMEOUT = 15.0  # s from starting ExaBGP until its bridge connects (ExaBGP alone takes ~1 s)
STOP_GRACE = 5.0  # s between SIGTERM and SIGKILL
RESTART_DELAYS = (1.0, 2.0, 4.0, 8.0, 10.0)  # s before restart 1, 2, ...; the last repeats
STABLE_RUN = 60.0  # s: an ExaBGP that ran this long before dying restarts the backoff from the first delay
_REAP_TIMEOUT = 5.0
_LOG_ROTATE = 1 << 20
_LOG_TAIL = 2000  # characters of exabgp.log quoted in a start failure
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


@functools.cache
def _prctl() -> Callable[..., int]:
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return prctl


def _die_with(parent: int) -> Callable[[], None]:
    """preexec_fn: the kernel SIGKILLs the child when its parent dies, even by SIGKILL.

    Without it a supervisor killed with -9 (or by the OOM killer) leaves ExaBGP announcing every VIP from a
    node nobody checks any more, and the restarted supervisor would start a second ExaBGP beside it. With it
    ExaBGP dies with us, its TCP sessions close and the routers withdraw the node at once (no hold timer).
    Caveats: it fires when the forking *thread* exits (our event loop's thread lives as long as the speaker),
    and a credential change clears it (hence ExaBGP's daemon.user is our own user). prctl is looked up before
    fork: between fork and exec only the call itself runs."""
    prctl = _prctl()

    def preexec() -> None:
        if prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
        if os.getppid() != parent:  # the parent died before prctl: nobody would kill us
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


class ExaBgpSpeaker:
    """The Speaker (edge_lb.bgp.policy) backed by an ExaBGP child process; see the module docstring.

    `exabgp`: the ExaBGP 5.0 executable (default: the one beside sys.executable). It must exec ExaBGP, not
    fork it: the bridge is accepted only if its parent is the process we started."""

    def __init__(self, bgp: Bgp, instance: str, run_dir: Path, on_restart: Callable[[], None], *,
                 exabgp: str | None = None, ack_timeout: float = ACK_TIMEOUT,
                 connect_timeout: float = CONNECT_TIMEOUT) -> None:
        self.bgp = bgp
        self.instance = instance
        self.run_dir = Path(run_dir)
        self.exabgp = exabgp or str(Path(sys.executable).parent / "exabgp")
        self.connect_timeout = connect_timeout
        self._on_restart = on_restart
        self.channel = ApiChannel(self.run_dir / "api.sock", [str(p.address) for p in bgp.peers],
                                  accept=self._is_ours, on_connect=self._bridge_connected,
                                  on_withdrawn=self._bridge_withdrew, ack_timeout=ack_timeout)
        self.liveness = Liveness(self.channel, self._kill_wedged)
        self._proc: asyncio.subprocess.Process | None = None
        self._launched_at = 0.0
        self._connects = 0
        self._supervisor: asyncio.Task[None] | None = None
        self._watch: asyncio.Task[None] | None = None
        self._started = False
        self._router_id = ""  # chosen at start()

    @property
    def config_path(self) -> Path:
        return self.run_dir / "exabgp.conf"

    @property
    def log_path(self) -> Path:
        return self.run_dir / "exabgp.log"

    @property
    def pid(self) -> int | None:
        """ExaBGP's pid while it runs."""
        return self._proc.pid if self._proc is not None and self._proc.returncode is None else None

    def peers(self) -> dict[str, str]:
        """Peer address -> "down" (also before the first report), "connected", "up", or "unknown" (the bridge
        was lost while ExaBGP may still be running)."""
        return self.channel.peers()

    async def send(self, command: str) -> None:
        await self.channel.send(command)

    def heartbeat(self) -> None:
        """The supervisor makes progress: the bridge keeps the routes (edge_lb.bgp.exabgp_bridge)."""
        self.channel.heartbeat()

    def liveness_status(self) -> SpeakerStatus:
        return self.liveness.status(self.pid)

    async def start(self) -> None:
        if self._started:
            raise BgpError(f"ExaBGP speaker {self.instance}: already started")
        self._started, self._connects = True, 0
        try:
            check_md5(self.bgp)
            local = await self._local_addresses()
            self._router_id = default_router_id(self.bgp, local)
            text = render_config(self.bgp, self._router_id, local, self._bridge_argv())
            await asyncio.to_thread(self._write_config, text)
            await self.channel.open()
            await self._launch()
        except BaseException:
            await self.stop()
            raise
        self._supervisor = asyncio.create_task(self._supervise(), name=f"exabgp-{self.instance}")
        self._watch = asyncio.create_task(self.liveness.run(), name=f"exabgp-{self.instance} liveness")

    async def stop(self) -> None:
        """Stop supervising, SIGTERM ExaBGP, SIGKILL after STOP_GRACE, reap, close the socket. Idempotent."""
        task, self._supervisor = self._supervisor, None
        if self._watch is not None:
            self._watch.cancel()
        self.liveness.stopped()
        if task is not None:
            task.cancel()
            await asyncio.wait({task}, timeout=_REAP_TIMEOUT)
        proc = self._proc
        self.channel.closing = True
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                async with asyncio.timeout(STOP_GRACE):  # not wait_for: it can swallow a cancel (3.11)
                    await proc.wait()
            except TimeoutError:
                await self._kill(proc)
            events.emit("exabgp", phase="stopped", pid=proc.pid, code=proc.returncode)
        await self.channel.close()
        self._started = False

    def _bridge_argv(self) -> list[str]:
        return [sys.executable, "-m", "edge_lb.bgp.exabgp_bridge", "--socket", str(self.channel.path),
                "--heartbeat-timeout", f"{self.bgp.heartbeat_timeout:g}"]

    async def reconfigure(self, bgp: Bgp) -> None:
        """A reload's new peer list: exabgp.conf rendered again and ExaBGP told to re-read it; only the peers
        that changed move (exabgp_reload). BgpError (nothing rewritten) when it cannot be rendered; BgpError
        after the rewrite when ExaBGP did not take it (a restart of ExaBGP would read it)."""
        check_md5(bgp)
        local = await self._local_addresses(bgp)
        # The router id the sessions run with, even when the peer it was taken from went: a new one would
        # re-establish every session.
        text = render_config(bgp, str(bgp.router_id or self._router_id), local, self._bridge_argv())
        await asyncio.to_thread(self._write_config, text)
        self.bgp = bgp
        self.channel.set_peers(str(p.address) for p in bgp.peers)
        await reload_peers(self.channel, {str(p.address) for p in bgp.peers})

    async def _local_addresses(self, bgp: Bgp | None = None) -> dict[str, str]:
        local = {}
        for peer in (bgp or self.bgp).peers:
            address = str(peer.address)
            if peer.local_address is not None:
                local[address] = str(peer.local_address)
            else:
                local[address] = await asyncio.to_thread(source_address, address)
        return local

    def _write_config(self, text: str) -> None:
        self.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.run_dir, 0o700)
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.config_path)
        # Present, so ExaBGP does not advise creating one; the settings are in its environment.
        (self.run_dir / ENV_FILE).write_text("# edge-lb sets ExaBGP's options in its environment: "
                                             "edge_lb/bgp/exabgp_config.py, exabgp_environment()\n")

    def _open_log(self) -> BinaryIO:
        with contextlib.suppress(FileNotFoundError):
            if self.log_path.stat().st_size > _LOG_ROTATE:
                self.log_path.replace(self.log_path.with_name(self.log_path.name + ".1"))
        out = open(self.log_path, "ab")  # noqa: SIM115 -- handed to the child, closed in _launch
        out.write(f"--- edge-lb: starting ExaBGP at {time.strftime('%Y-%m-%dT%H:%M:%S')}\n".encode())
        out.flush()
        return out

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-_LOG_TAIL:]
        except OSError as exc:
            return f"({exc})"

    async def _launch(self) -> None:
        """Start ExaBGP and wait until its bridge connects; BgpError (ExaBGP reaped) otherwise."""
        argv = [self.exabgp, str(self.config_path)]
        self.channel.reset_peers("down")
        try:
            out = await asyncio.to_thread(self._open_log)
        except OSError as exc:
            raise BgpError(f"opening {self.log_path}: {exc}") from exc
        try:
            # A session of its own: a terminal's Ctrl-C reaches only us, and we withdraw before stopping it.
            self._proc = await asyncio.create_subprocess_exec(
                *argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=self.run_dir,
                env=exabgp_environment(os.environ, self.run_dir, self.instance), start_new_session=True,
                preexec_fn=_die_with(os.getpid()))
        except (OSError, subprocess.SubprocessError) as exc:
            raise BgpError(f"starting ExaBGP ({' '.join(argv)}): {exc}") from exc
        finally:
            out.close()
        self._launched_at = time.monotonic()
        events.emit("exabgp", phase="started", pid=self._proc.pid, config=self.config_path, log=self.log_path)
        await self._wait_bridge(self._proc)

    async def _wait_bridge(self, proc: asyncio.subprocess.Process) -> None:
        connected = asyncio.create_task(self.channel.connected.wait())
        exited = asyncio.create_task(proc.wait())
        try:
            await asyncio.wait({connected, exited}, timeout=self.connect_timeout,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            connected.cancel()
            exited.cancel()
        if self.channel.connected.is_set() and proc.returncode is None:
            return
        if proc.returncode is not None:
            why = f"exited with code {proc.returncode} before its bridge connected"
        else:
            why = f"started, but its bridge did not connect within {self.connect_timeout:g} s"
            await self._kill(proc)
        tail = await asyncio.to_thread(self._log_tail)
        raise BgpError(f"ExaBGP {why}; {self.log_path} ends with:\n{tail}")

    async def _kill(self, proc: asyncio.subprocess.Process) -> None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        try:
            async with asyncio.timeout(_REAP_TIMEOUT):
                await proc.wait()
        except TimeoutError:
            log.error("ExaBGP pid %d did not exit within %g s of SIGKILL", proc.pid, _REAP_TIMEOUT)

    def _is_ours(self, pid: int) -> bool:
        return self._proc is not None and self._proc.returncode is None and pid == self._proc.pid

    def _kill_wedged(self) -> None:
        """Liveness judged ExaBGP wedged: SIGKILL (it works on a stopped process too); _supervise restarts."""
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()

    def _bridge_withdrew(self) -> None:
        """The bridge withdrew every route (no heartbeat): announce again what should be."""
        try:
            self._on_restart()
        except Exception:
            log.exception("the bridge withdrew: on_restart failed")

    def _bridge_connected(self, pid: int) -> None:
        self.liveness.connected()
        self._connects += 1
        if self._connects == 1:
            return
        events.emit("exabgp", phase="restarted", pid=pid, connects=self._connects)
        try:
            self._on_restart()
        except Exception:
            log.exception("ExaBGP restarted: on_restart failed")

    async def _supervise(self) -> None:
        """Restart ExaBGP whenever it exits, with backoff. (ExaBGP itself exits after 5 deaths of its bridge
        in ~64 s, bgp-lab gotcha 3; the bridge retries its connect rather than die, so that needs a real
        fault, and ends here as one more restart.)"""
        attempt = 0
        while True:
            assert self._proc is not None
            code = await self._proc.wait()
            ran = time.monotonic() - self._launched_at
            events.emit("exabgp", logging.WARNING, phase="died", code=code, pid=self._proc.pid,
                        ran=f"{ran:.1f}s")
            self.liveness.died(code)
            self.channel.disconnect("ExaBGP exited")
            self.channel.reset_peers("down")
            if ran >= STABLE_RUN:
                attempt = 0
            while True:
                delay = RESTART_DELAYS[min(attempt, len(RESTART_DELAYS) - 1)]
                attempt += 1
                events.emit("exabgp", phase="restarting", attempt=attempt, delay=f"{delay:g}s")
                await asyncio.sleep(delay)
                try:
                    await self._launch()
                    break
                except BgpError as exc:
                    events.emit("exabgp", logging.ERROR, phase="restart failed", attempt=attempt,
                                error=str(exc).splitlines()[0])
