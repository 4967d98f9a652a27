"""The program ExaBGP runs as its API `process`: relays lines between ExaBGP and the supervisor's socket, and
withdraws every route itself when the supervisor stops beating.

    python -m edge_lb.bgp.exabgp_bridge --socket /run/edge-lb/INSTANCE.bgp/api.sock --heartbeat-timeout 2

    supervisor --(commands, heartbeats)--> socket --> bridge --> stdout --> ExaBGP
    supervisor <--(acks, neighbor changes, "edge-lb withdrew N")-- socket <-- bridge <-- stdin <-- ExaBGP

The first line on the socket is "bridge <ExaBGP's pid>", so the supervisor only takes the bridge of the ExaBGP
it started. After that lines are relayed unchanged, except:

    edge-lb heartbeat   (supervisor -> bridge, not relayed) the supervisor's event loop and health checks
                        make progress. From the first one on, a silence of --heartbeat-timeout seconds makes
                        the bridge withdraw every route it relayed an announce of: a hung supervisor (SIGSTOP,
                        a blocked loop) must not keep attracting traffic its node no longer checks. ExaBGP's
                        acks of those withdraws are the bridge's own and are not relayed.
    edge-lb withdrew N  (bridge -> supervisor) the bridge withdrew N routes: the supervisor re-sends what it
                        wants announced (Announcer.forget). Until heartbeats resume, announces are held (the
                        bridge answers "done" itself) and withdraws go through; the next heartbeat sends what
                        the supervisor then wants announced. A supervisor whose loop runs but whose checks
                        stall (no heartbeats) thus stays withdrawn too: routes come back only when it says so.

The bridge exits as soon as either side closes: ExaBGP gone (stdin EOF) or supervisor gone (socket EOF);
ExaBGP then respawns it, or is itself on its way out. Stdlib only, blocking I/O, one thread per direction
and one for the heartbeat: each side may block without stalling the other.
"""

from __future__ import annotations

import argparse
import collections
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator

CONNECT_WINDOW = 10.0  # s: ExaBGP gives up after 5 process deaths in ~64 s; retrying beats dying
HEARTBEAT = "edge-lb heartbeat"
WITHDREW = "edge-lb withdrew"
_CONNECT_RETRY = 0.1
_LINE_LIMIT = 1 << 20


def connect(path: str) -> socket.socket:
    """Connect to the supervisor's Unix socket, retrying for CONNECT_WINDOW seconds; OSError after that."""
    deadline = time.monotonic() + CONNECT_WINDOW
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            return sock
        except OSError:
            sock.close()
            if time.monotonic() >= deadline:
                raise
        time.sleep(_CONNECT_RETRY)


def route_of(command: str) -> tuple[str, str, str] | None:
    """(action, "<selector> <prefix>", withdraw command) of an announce or withdraw of a route; else None.

    `announce route 10.0.0.1/32 next-hop self med 10` -> ("announce", "10.0.0.1/32", "withdraw route
    10.0.0.1/32 next-hop self med 10"); a neighbor selector before the action is part of the key and of the
    withdraw."""
    words = command.split()
    for i in range(len(words) - 2):
        if words[i] in ("announce", "withdraw") and words[i + 1] == "route":
            key = " ".join([*words[:i], words[i + 2]])
            return words[i], key, " ".join([*words[:i], "withdraw", *words[i + 1:]])
    return None


class Routes:
    """What the bridge relayed (announced routes, acks owed) and the supervisor's heartbeat. Thread-safe.

    `owed` holds one entry per command written to ExaBGP, in order: True when the bridge sent it itself (its
    ack is swallowed), False when the supervisor did (its ack is relayed). ExaBGP answers in order.
    `announced` is what the supervisor wants announced, by key: it outlives an expiry and is sent again at the
    next heartbeat."""

    def __init__(self, timeout: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout = timeout
        self.clock = clock
        self.announced: dict[str, tuple[str, str]] = {}  # key (see route_of) -> (announce, withdraw)
        self.owed: collections.deque[bool] = collections.deque()
        self.last_beat: float | None = None  # None: no heartbeat yet, nothing is watched
        self.expired = False
        self._lock = threading.Lock()

    def beat(self) -> list[str]:
        """A heartbeat; after an expiry, the announces to send again (their acks are the bridge's)."""
        with self._lock:
            again = [announce for announce, _ in self.announced.values()] if self.expired else []
            self.last_beat, self.expired = self.clock(), False
            self.owed.extend([True] * len(again))
            return again

    def relayed(self, command: str) -> bool:
        """The supervisor's command: True when it is to be written to ExaBGP now, False when it is an announce
        held while the heartbeat is expired (the caller answers "done" for ExaBGP)."""
        with self._lock:
            found = route_of(command)
            if found is not None:
                action, key, withdraw = found
                if action == "announce":
                    self.announced[key] = (command, withdraw)
                    if self.expired:
                        return False
                else:
                    self.announced.pop(key, None)
            self.owed.append(False)
            return True

    def answer_is_ours(self) -> bool:
        """An ack from ExaBGP: True when it answers the bridge's own command (not to be relayed)."""
        with self._lock:
            return self.owed.popleft() if self.owed else False

    def take_expired(self) -> list[str] | None:
        """The withdraws to send when the heartbeat has just expired; else None."""
        with self._lock:
            if self.last_beat is None or self.expired or self.clock() - self.last_beat <= self.timeout:
                return None
            self.expired = True
            commands = [withdraw for _, withdraw in self.announced.values()]
            self.owed.extend([True] * len(commands))
            return commands


def _lines(read: Callable[[int], bytes]) -> Iterator[str]:
    """Lines (without the newline) from a blocking reader until EOF or an error."""
    buffer = b""
    try:
        while chunk := read(65536):
            buffer += chunk
            if len(buffer) > _LINE_LIMIT and b"\n" not in buffer:
                return
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                yield line.decode(errors="replace")
    except OSError:
        return  # either side gone: the same as EOF


class Bridge:
    """The three threads over one Routes; `run()` returns when either side closes."""

    def __init__(self, sock: socket.socket, routes: Routes, stdin: int = 0, stdout: int = 1) -> None:
        self.sock = sock
        self.routes = routes
        self.stdin = stdin
        self.stdout = stdout
        self.done = threading.Event()
        self._to_exabgp = threading.Lock()  # one writer at a time, and owed in the order of the pipe
        self._to_supervisor = threading.Lock()

    def run(self) -> None:
        self._up(f"bridge {os.getppid()}")
        for target in (self._from_supervisor, self._from_exabgp, self._watch):
            threading.Thread(target=self._until_done, args=(target,), daemon=True).start()
        self.done.wait()

    def _until_done(self, target: Callable[[], None]) -> None:
        try:
            target()
        except OSError:
            pass
        finally:
            self.done.set()

    def _up(self, line: str) -> None:
        with self._to_supervisor:
            self.sock.sendall(f"{line}\n".encode())

    def _write(self, commands: list[str]) -> None:
        """To ExaBGP; the caller holds _to_exabgp."""
        data = memoryview("".join(f"{c}\n" for c in commands).encode())
        while data:
            data = data[os.write(self.stdout, data):]

    def _from_supervisor(self) -> None:
        for line in _lines(self.sock.recv):
            if line == HEARTBEAT:
                with self._to_exabgp:
                    again = self.routes.beat()
                    self._write(again)
                if again:
                    print(f"edge-lb bridge: heartbeat back: announced {len(again)} route(s) again",
                          file=sys.stderr, flush=True)
            elif line:
                with self._to_exabgp:
                    now = self.routes.relayed(line)
                    if now:
                        self._write([line])
                if not now:
                    self._up("done")  # held until the next heartbeat

    def _from_exabgp(self) -> None:
        for line in _lines(lambda n: os.read(self.stdin, n)):
            if line in ("done", "error") and self.routes.answer_is_ours():
                if line == "error":
                    print("edge-lb bridge: ExaBGP refused one of the bridge's withdraws", file=sys.stderr,
                          flush=True)
                continue
            self._up(line)

    def _watch(self) -> None:
        step = min(0.1, self.routes.timeout / 10)
        while not self.done.wait(step):
            with self._to_exabgp:  # taken before Routes: the withdraws' owed entries match the pipe's order
                commands = self.routes.take_expired()
                if commands:
                    self._write(commands)
            if commands is not None:
                print(f"edge-lb bridge: no heartbeat for {self.routes.timeout:g} s: withdrew "
                      f"{len(commands)} route(s)", file=sys.stderr, flush=True)
            if commands:  # the supervisor re-sends what it wants once it runs again
                self._up(f"{WITHDREW} {len(commands)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edge_lb.bgp.exabgp_bridge", description=__doc__.splitlines()[0])
    parser.add_argument("--socket", required=True, help="the supervisor's Unix socket")
    parser.add_argument("--heartbeat-timeout", type=float, default=2.0,
                        help="seconds without a heartbeat before every route is withdrawn")
    args = parser.parse_args(argv)
    if not args.heartbeat_timeout > 0:
        parser.error("--heartbeat-timeout must be above 0")
    try:
        sock = connect(args.socket)
    except OSError as exc:
        print(f"edge-lb bridge: cannot connect to {args.socket}: {exc}", file=sys.stderr, flush=True)
        return 1
    Bridge(sock, Routes(args.heartbeat_timeout)).run()
    return 0


if __name__ == "__main__":
    # os._exit: the other direction's thread may sit in a read that never returns; nothing is buffered.
    os._exit(main())
