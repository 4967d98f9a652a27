"""ExaBGP as the supervisor's child: its config, its process, and the API channel to it.

    speaker = ExaBgpSpeaker(config.bgp, "default", Path("/run/edge-lb/default.bgp"), on_restart)
    await speaker.start()     # renders exabgp.conf, starts ExaBGP, waits (bounded) for its bridge to connect
    await speaker.send("announce route 10.0.0.1/32 next-hop self")   # returns on "done", else BgpError
    speaker.peers()           # {"10.200.1.1": "up"}
    await speaker.stop()      # SIGTERM, bounded wait, SIGKILL, reap; idempotent

Files in run_dir (0700): exabgp.conf (rendered from exabgp_conf/*.tmpl), exabgp.env (empty: ExaBGP's options
are in its environment), api.sock (where the bridge connects), exabgp.log (ExaBGP's stdout and stderr and the
bridge's stderr; moved to exabgp.log.1 past 1 MiB at a start).

ExaBGP runs edge_lb.exabgp_bridge as its one API process; the bridge relays between ExaBGP's pipes and
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
import ipaddress
import logging
import os
import pwd
import re
import signal
import string
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from edge_lb import events
from edge_lb.configbgp import Bgp
from edge_lb.errors import BgpError

log = logging.getLogger("edge_lb.exabgp")

TEMPLATES = Path(__file__).resolve().parent.parent / "exabgp_conf"
PROCESS = "edge-lb"  # the bridge's process name in exabgp.conf
ENV_FILE = "exabgp.env"
ACK_TIMEOUT = 10.0  # s for ExaBGP to answer one command
CONNECT_TIMEOUT = 15.0  # s from starting ExaBGP until its bridge connects (ExaBGP alone takes ~1 s)
STOP_GRACE = 5.0  # s between SIGTERM and SIGKILL
RESTART_DELAYS = (1.0, 2.0, 4.0, 8.0, 10.0)  # s before restart 1, 2, ...; the last repeats
STABLE_RUN = 60.0  # s: an ExaBGP that ran this long before dying restarts the backoff from the first delay
_HELLO_TIMEOUT = 5.0  # s for a new connection to say "bridge <pid>"
_REAP_TIMEOUT = 5.0
_LINE_LIMIT = 1 << 20
_LOG_ROTATE = 1 << 20
_LOG_TAIL = 2000  # characters of exabgp.log quoted in a start failure
_SUN_PATH_MAX = 107  # bytes of a Unix socket path (sun_path is 108 with the NUL)
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_TOKEN = re.compile(r"[A-Za-z0-9_./:+=@%-]+")
_NOTIFICATION = re.compile(r"neighbor (\S+) (connected|up|down)(?: -(?: (.*))?)?")


# --- the config ---------------------------------------------------------------------------------------------


@functools.cache
def _template(name: str) -> string.Template:
    try:
        return string.Template((TEMPLATES / name).read_text())
    except OSError as exc:
        raise BgpError(f"ExaBGP config template {TEMPLATES / name}: {exc}") from exc


def _token(what: str, value: object) -> str:
    """One word of the config. ExaBGP's tokeniser ends a statement at ';', '{' or '}', a line at a newline,
    and splits on spaces, ',' and '[]': a value holding any of them would rewrite the config: refused."""
    text = str(value)
    if not _TOKEN.fullmatch(text):
        raise BgpError(f"refusing {what} {text!r} in the ExaBGP config: only letters, digits and _./:+=@%- "
                       "are allowed (no spaces, control characters, ';', '{', '}')")
    return text


def render_config(bgp: Bgp, router_id: str, local_addresses: Mapping[str, str],
                  bridge_argv: list[str]) -> str:
    """exabgp.conf: the bridge process and one neighbor per peer. local_addresses maps each peer's address
    (as str(peer.address)) to the local address of its session. A peer's family follows its address: IPv4
    VIPs go to IPv4 peers, IPv6 VIPs to IPv6 peers (next-hop self needs an address of the VIP's family)."""
    try:
        ipaddress.IPv4Address(_token("router id", router_id))
    except ValueError:
        raise BgpError(f"router id {router_id!r}: not an IPv4 address") from None
    blocks = []
    for peer in bgp.peers:
        address = str(peer.address)
        if address not in local_addresses:
            raise BgpError(f"peer {address}: no local address to render")
        blocks.append(_template("neighbor.conf.tmpl").substitute(
            process=PROCESS,
            peer_address=_token("peer address", address),
            router_id=router_id,
            local_address=_token(f"local address of peer {address}", local_addresses[address]),
            local_as=_token("local AS", bgp.local_as),
            peer_as=_token(f"AS of peer {address}", peer.asn),
            hold_time=_token(f"hold time of peer {address}", peer.hold_time),
            afi="ipv4" if peer.address.version == 4 else "ipv6",
        ))
    bridge = " ".join(_token("bridge command word", word) for word in bridge_argv)
    neighbors = "\n".join(blocks)
    return _template("exabgp.conf.tmpl").substitute(process=PROCESS, bridge=bridge, neighbors=neighbors)


def source_address(peer: str) -> str:
    """The kernel's source address towards `peer` (route get -> RTA_PREFSRC). Blocking: run it in a thread,
    pyroute2's sync IPRoute runs its own event loop."""
    from pyroute2 import IPRoute

    try:
        with IPRoute() as ipr:
            routes = list(ipr.route("get", dst=peer))
    except Exception as exc:  # pyroute2's NetlinkError (no route), OSError
        raise BgpError(f"peer {peer}: no route to it to take the local address from ({exc}); "
                       "set bgp.peer.local_address") from exc
    for route in routes:
        if src := route.get_attr("RTA_PREFSRC"):
            return str(src)
    raise BgpError(f"peer {peer}: the kernel has no source address towards it; set bgp.peer.local_address")


def default_router_id(bgp: Bgp, local_addresses: Mapping[str, str]) -> str:
    """bgp.router_id, else the first IPv4 local address in peer order."""
    if bgp.router_id is not None:
        return str(bgp.router_id)
    for peer in bgp.peers:
        local = local_addresses[str(peer.address)]
        if ipaddress.ip_address(local).version == 4:
            return local
    raise BgpError("no IPv4 local address to take the BGP router id from: set bgp.router_id")


def exabgp_environment(base: Mapping[str, str], run_dir: Path, instance: str) -> dict[str, str]:
    """ExaBGP's environment: ours without any exabgp* variable (a stray exabgp_cli_pipe turns ExaBGP into a
    CLI client), plus the settings it must run with. ExaBGP reads `exabgp.section.option` before its env
    file."""
    env = {k: v for k, v in base.items() if not k.lower().startswith("exabgp")}
    env.update({
        # ExaBGP setuid()s to daemon.user even with drop=false (bgp-lab gotcha 1); as nobody it could not talk
        # to the bridge. Staying our own user also keeps PR_SET_PDEATHSIG: a credential change clears it.
        "exabgp.daemon.user": _user(),
        "exabgp.daemon.drop": "false",
        "exabgp.daemon.daemonize": "false",
        "exabgp.daemon.pid": "",
        "exabgp.api.ack": "true",  # every command answered "done" or "error": send() waits for it
        "exabgp.api.cli": "false",  # no named pipes: several instances share /run (gotcha 4)
        "exabgp.api.pipename": f"edge-lb-{_token('instance', instance)}",
        "exabgp.log.destination": "stdout",  # our stdout is exabgp.log
        "exabgp.log.short": "false",  # timestamps in exabgp.log
        "EXABGP_ENVFILE": str(run_dir / ENV_FILE),  # ours, not a host-wide one
    })
    return env


def _user() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return "root" if os.getuid() == 0 else "nobody"  # ExaBGP only switches users when it runs as root


@dataclass(frozen=True)
class PeerChange:
    peer: str  # the peer's address, normalised like str(ipaddress.ip_address(...))
    state: str  # "connected", "up" or "down"
    reason: str = ""


def parse_notification(line: str) -> PeerChange | None:
    """A neighbor-change line of ExaBGP's text encoder, or None for any other line."""
    match = _NOTIFICATION.fullmatch(line.rstrip("\r\n"))
    if match is None:
        return None
    try:
        peer = str(ipaddress.ip_address(match[1]))
    except ValueError:
        return None
    return PeerChange(peer, match[2], match[3] or "")


# --- the channel --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Bridge:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    pid: int  # ExaBGP's pid, as the bridge reported it


class ApiChannel:
    """The supervisor's end of the bridge: a Unix socket taking one bridge at a time, one command in flight.

    A connection starts with "bridge <pid>"; accept(pid) decides whether it is the bridge of our ExaBGP. A
    newer accepted bridge replaces the current one (ExaBGP respawned its process). Every line ExaBGP writes is
    read as it comes: acks answer the command in flight, neighbor changes update peers(). An ack that comes
    after its command timed out is counted and dropped, so it is never taken for the next command's."""

    def __init__(self, path: Path, peers: Iterable[str], *,
                 accept: Callable[[int], bool] = lambda pid: True,
                 on_connect: Callable[[int], None] = lambda pid: None,
                 ack_timeout: float = ACK_TIMEOUT) -> None:
        self.path = path
        self.ack_timeout = ack_timeout
        self.connected = asyncio.Event()
        self.closing = False  # set while ExaBGP is being stopped: losing the bridge is then expected
        self._accept = accept
        self._on_connect = on_connect
        self._peers = dict.fromkeys(peers, "down")
        self._server: asyncio.Server | None = None
        self._bridge: _Bridge | None = None
        self._pending: asyncio.Future[str] | None = None
        self._orphans = 0  # acks still owed to commands that timed out
        self._lock = asyncio.Lock()
        self._handlers: set[asyncio.Task[None]] = set()

    def peers(self) -> dict[str, str]:
        return dict(self._peers)

    def reset_peers(self, state: str) -> None:
        self._peers = dict.fromkeys(self._peers, state)

    async def open(self) -> None:
        if len(os.fsencode(self.path)) > _SUN_PATH_MAX:
            raise BgpError(f"{self.path}: too long for a Unix socket path ({_SUN_PATH_MAX} bytes at most)")
        self.closing = False
        try:  # a stale socket file of a killed supervisor is replaced
            self._server = await asyncio.start_unix_server(self._handle, path=self.path, limit=_LINE_LIMIT)
        except OSError as exc:
            raise BgpError(f"listening on {self.path} for the ExaBGP bridge: {exc}") from exc

    async def close(self) -> None:
        self.disconnect("channel closed")
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()
            with contextlib.suppress(OSError):
                self.path.unlink()
        if self._handlers:
            await asyncio.wait(set(self._handlers), timeout=_HELLO_TIMEOUT)

    def disconnect(self, why: str) -> None:
        if self._bridge is not None:
            self._lost(self._bridge, why)

    async def send(self, command: str) -> None:
        if not command or not command.isprintable():
            raise BgpError(f"refusing an API command with control characters: {command!r}")
        async with self._lock:
            bridge = self._bridge
            if bridge is None:
                raise BgpError(f"ExaBGP is not running or its bridge is not connected: "
                               f"cannot send {command!r}")
            pending = self._pending = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(self.ack_timeout):
                    bridge.writer.write(f"{command}\n".encode())
                    await bridge.writer.drain()
                    answer = await pending
            except TimeoutError:
                if bridge is self._bridge:
                    self._orphans += 1
                raise BgpError(f"ExaBGP did not answer {command!r} within {self.ack_timeout:g} s") from None
            except OSError as exc:
                raise BgpError(f"sending {command!r} to ExaBGP: {exc}") from exc
            finally:
                self._pending = None
        if answer != "done":
            raise BgpError(f"ExaBGP answered {answer!r} to {command!r}")

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            bridge = await self._greet(reader, writer)
            if bridge is not None:
                await self._read(bridge)
        finally:
            writer.close()
            self._handlers.discard(task)

    async def _greet(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> _Bridge | None:
        hello = b""
        with contextlib.suppress(TimeoutError, OSError, ValueError):
            hello = await asyncio.wait_for(reader.readline(), _HELLO_TIMEOUT)
        words = hello.decode(errors="replace").split()
        ours = len(words) == 2 and words[0] == "bridge" and words[1].isdigit()
        if not ours or not self._accept(int(words[1])):
            events.emit("exabgp", logging.WARNING, phase="bridge refused", hello=hello[:80])
            return None
        bridge = _Bridge(reader, writer, int(words[1]))
        self.disconnect("replaced by a new bridge")
        self._bridge, self._orphans = bridge, 0
        self.connected.set()
        events.emit("exabgp", phase="bridge connected", pid=bridge.pid)
        try:
            self._on_connect(bridge.pid)
        except Exception:
            log.exception("ExaBGP bridge connected: the callback failed")
        return bridge

    async def _read(self, bridge: _Bridge) -> None:
        why = "bridge closed the connection"
        try:
            while line := await bridge.reader.readline():
                self._dispatch(line.decode(errors="replace").rstrip("\r\n"))
        except (OSError, ValueError) as exc:  # ValueError: a line longer than _LINE_LIMIT
            why = f"reading from the bridge: {exc!r}"
        finally:
            self._lost(bridge, why)

    def _dispatch(self, line: str) -> None:
        if line in ("done", "error"):
            if self._orphans:
                self._orphans -= 1
                log.debug("late ExaBGP ack %r of a command that timed out: dropped", line)
            elif self._pending is not None and not self._pending.done():
                self._pending.set_result(line)
            else:
                log.warning("ExaBGP ack %r with no command in flight: dropped", line)
            return
        change = parse_notification(line)
        if change is None:
            if line:  # ExaBGP ends each notification with an extra empty line
                log.debug("ExaBGP: %s", line)
            return
        self._peers[change.peer] = change.state
        events.emit("exabgp", phase="peer", peer=change.peer, state=change.state,
                    reason=change.reason or None)

    def _lost(self, bridge: _Bridge, why: str) -> None:
        bridge.writer.close()
        if bridge is not self._bridge:
            return
        self._bridge = None
        self.connected.clear()
        # ExaBGP may still be up with its sessions; we cannot tell until it reports again.
        self.reset_peers("unknown")
        if self._pending is not None and not self._pending.done():
            self._pending.set_exception(BgpError(f"ExaBGP bridge lost before the answer: {why}"))
        level = logging.INFO if self.closing else logging.WARNING
        events.emit("exabgp", level, phase="bridge lost", pid=bridge.pid, reason=why)


# --- the process --------------------------------------------------------------------------------------------


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
    """The Speaker (edge_lb.bgp) backed by an ExaBGP child process; see the module docstring.

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
                                  ack_timeout=ack_timeout)
        self._proc: asyncio.subprocess.Process | None = None
        self._launched_at = 0.0
        self._connects = 0
        self._supervisor: asyncio.Task[None] | None = None
        self._started = False

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

    async def start(self) -> None:
        if self._started:
            raise BgpError(f"ExaBGP speaker {self.instance}: already started")
        self._started, self._connects = True, 0
        try:
            local = await self._local_addresses()
            text = render_config(self.bgp, default_router_id(self.bgp, local), local, self._bridge_argv())
            await asyncio.to_thread(self._write_config, text)
            await self.channel.open()
            await self._launch()
        except BaseException:
            await self.stop()
            raise
        self._supervisor = asyncio.create_task(self._supervise(), name=f"exabgp-{self.instance}")

    async def stop(self) -> None:
        """Stop supervising, SIGTERM ExaBGP, SIGKILL after STOP_GRACE, reap, close the socket. Idempotent."""
        task, self._supervisor = self._supervisor, None
        if task is not None:
            task.cancel()
            await asyncio.wait({task}, timeout=_REAP_TIMEOUT)
        proc = self._proc
        self.channel.closing = True
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), STOP_GRACE)
            except TimeoutError:
                await self._kill(proc)
            events.emit("exabgp", phase="stopped", pid=proc.pid, code=proc.returncode)
        await self.channel.close()
        self._started = False

    def _bridge_argv(self) -> list[str]:
        return [sys.executable, "-m", "edge_lb.exabgp_bridge", "--socket", str(self.channel.path)]

    async def _local_addresses(self) -> dict[str, str]:
        local = {}
        for peer in self.bgp.peers:
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
                                             "edge_lb/exabgp.py, exabgp_environment()\n")

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
            await asyncio.wait_for(proc.wait(), _REAP_TIMEOUT)
        except TimeoutError:
            log.error("ExaBGP pid %d did not exit within %g s of SIGKILL", proc.pid, _REAP_TIMEOUT)

    def _is_ours(self, pid: int) -> bool:
        return self._proc is not None and self._proc.returncode is None and pid == self._proc.pid

    def _bridge_connected(self, pid: int) -> None:
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
