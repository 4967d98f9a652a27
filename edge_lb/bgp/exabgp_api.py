"""ExaBGP's API, the supervisor's end: a Unix socket the bridge process connects to, one command in flight,
every line read (acks and neighbor-change notifications), as ExaBGP deadlocks when its answers are not read.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from edge_lb import events
from edge_lb.bgp.exabgp_bridge import HEARTBEAT, WITHDREW
from edge_lb.errors import BgpError

log = logging.getLogger("edge_lb.bgp.exabgp")
ACK_TIMEOUT = 10.0  # s for ExaBGP to answer one command
_HELLO_TIMEOUT = 5.0  # s for a new connection to say "bridge <pid>"
_LINE_LIMIT = 1 << 20
_NOTIFICATION = re.compile(r"neighbor (\S+) (connected|up|down)(?: -(?: (.*))?)?")
_SUN_PATH_MAX = 107  # bytes of a Unix socket path (sun_path is 108 with the NUL)


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
                 on_withdrawn: Callable[[], None] = lambda: None,
                 ack_timeout: float = ACK_TIMEOUT) -> None:
        self.path = path
        self.ack_timeout = ack_timeout
        self.connected = asyncio.Event()
        self.closing = False  # set while ExaBGP is being stopped: losing the bridge is then expected
        self._accept = accept
        self._on_connect = on_connect
        self._on_withdrawn = on_withdrawn
        # Liveness (monotonic): when the command in flight was written, and when ExaBGP last answered one.
        self.sent_at: float | None = None
        self.answered_at: float | None = None
        self._peers = dict.fromkeys(peers, "down")
        self._server: asyncio.Server | None = None
        self._bridge: _Bridge | None = None
        self._pending: asyncio.Future[str] | None = None
        self._answer_lines: list[str] | None = None  # the command in flight's answer, when it wants it
        self._orphans = 0  # acks still owed to commands that timed out
        self._lock = asyncio.Lock()
        self._handlers: set[asyncio.Task[None]] = set()

    def peers(self) -> dict[str, str]:
        return dict(self._peers)

    def reset_peers(self, state: str) -> None:
        self._peers = dict.fromkeys(self._peers, state)

    def set_peers(self, peers: Iterable[str]) -> None:
        """The peer list changed (a reload): new peers start "down", the others keep their state."""
        self._peers = {peer: self._peers.get(peer, "down") for peer in peers}

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

    def heartbeat(self) -> None:
        """Tell the bridge the supervisor makes progress (it withdraws every route when these stop)."""
        bridge = self._bridge
        if bridge is not None and not bridge.writer.is_closing():
            bridge.writer.write(f"{HEARTBEAT}\n".encode())

    def unanswered_for(self, now: float | None = None) -> float:
        """Seconds the command in flight has waited for ExaBGP's answer (0 with none in flight)."""
        sent = self.sent_at
        return 0.0 if sent is None else (time.monotonic() if now is None else now) - sent

    def busy(self) -> bool:
        return self._lock.locked()

    def disconnect(self, why: str) -> None:
        if self._bridge is not None:
            self._lost(self._bridge, why)

    async def send(self, command: str, answer_lines: list[str] | None = None) -> None:
        """One command, returning on its "done"; BgpError on "error", a timeout or no bridge. `answer_lines`
        collects the lines ExaBGP writes before the ack (the answer of a "show ..." command)."""
        if not command or not command.isprintable():
            raise BgpError(f"refusing an API command with control characters: {command!r}")
        async with self._lock:
            bridge = self._bridge
            if bridge is None:
                raise BgpError(f"ExaBGP is not running or its bridge is not connected: "
                               f"cannot send {command!r}")
            pending = self._pending = asyncio.get_running_loop().create_future()
            self._answer_lines = answer_lines
            written = False
            try:
                async with asyncio.timeout(self.ack_timeout):
                    bridge.writer.write(f"{command}\n".encode())
                    written, self.sent_at = True, time.monotonic()
                    await bridge.writer.drain()
                    answer = await pending
            except TimeoutError:
                # The ack may never come, and every later ack would be misread: start a fresh bridge (ExaBGP
                # respawns it; the reconnect makes the announcer re-send what it is unsure of).
                if bridge is self._bridge:
                    self.disconnect(f"no answer to {command!r}: resetting the bridge")
                raise BgpError(f"ExaBGP did not answer {command!r} within {self.ack_timeout:g} s") from None
            except asyncio.CancelledError:
                if written and bridge is self._bridge:
                    self._orphans += 1  # its ack is still coming: it must not answer the next command
                raise
            except OSError as exc:
                raise BgpError(f"sending {command!r} to ExaBGP: {exc}") from exc
            finally:
                self._pending, self.sent_at = None, None
                self._answer_lines = None
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
            async with asyncio.timeout(_HELLO_TIMEOUT):  # not wait_for: it can swallow a cancel (3.11)
                hello = await reader.readline()
        words = hello.decode(errors="replace").split()
        ours = len(words) == 2 and words[0] == "bridge" and words[1].isdigit()
        if not ours or not self._accept(int(words[1])):
            events.emit("exabgp", logging.WARNING, phase="bridge refused", hello=hello[:80])
            return None
        bridge = _Bridge(reader, writer, int(words[1]))
        self.disconnect("replaced by a new bridge")
        self._bridge, self._orphans = bridge, 0
        self.answered_at = time.monotonic()  # a new bridge: ExaBGP just ran it
        self.heartbeat()  # arms the bridge's watch at once: a hang before the first worker beat is caught too
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
            self.answered_at = time.monotonic()
            if self._orphans:
                self._orphans -= 1
                log.debug("late ExaBGP ack %r of a command that timed out: dropped", line)
            elif self._pending is not None and not self._pending.done():
                self._pending.set_result(line)
            else:
                log.warning("ExaBGP ack %r with no command in flight: dropped", line)
            return
        if line.startswith(f"{WITHDREW} "):
            events.emit("bgp", logging.WARNING, action="withdrawn by the bridge", routes=line.split()[-1],
                        reason="no heartbeat from the supervisor (it was hung): re-announcing what serves")
            self._on_withdrawn()
            return
        change = parse_notification(line)
        if change is None:
            if line and self._answer_lines is not None:
                self._answer_lines.append(line)
            elif line:  # ExaBGP ends each notification with an extra empty line
                log.debug("ExaBGP: %s", line)
            return
        if change.peer in self._peers:  # not a peer a reload just removed (its "down" comes after)
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
