"""The program ExaBGP runs as its API `process`: relays lines between ExaBGP and the supervisor's socket.

    python -m edge_lb.bgp.exabgp_bridge --socket /run/edge-lb/INSTANCE.bgp/api.sock

    supervisor --(commands)--> socket --> bridge --> stdout --> ExaBGP
    supervisor <--(acks, neighbor changes)-- socket <-- bridge <-- stdin <-- ExaBGP

The first line on the socket is "bridge <ExaBGP's pid>", so the supervisor only takes the bridge of the ExaBGP
it started. After that bytes are relayed unchanged. The bridge exits as soon as either side closes: ExaBGP
gone (stdin EOF) or supervisor gone (socket EOF); ExaBGP then respawns it, or is itself on its way out.

Stdlib only, blocking I/O, one thread per direction: each side may block without stalling the other.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import threading
import time
from collections.abc import Callable

CONNECT_WINDOW = 10.0  # s: ExaBGP gives up after 5 process deaths in ~64 s; retrying beats dying
_CONNECT_RETRY = 0.1
_CHUNK = 65536


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


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _pump(read: Callable[[int], bytes], write: Callable[[bytes], None], done: threading.Event) -> None:
    try:
        while chunk := read(_CHUNK):
            write(chunk)
    except OSError:
        pass  # either side gone: the same as EOF
    finally:
        done.set()


def relay(sock: socket.socket, stdin: int = 0, stdout: int = 1) -> None:
    """Relay until either side closes."""
    sock.sendall(f"bridge {os.getppid()}\n".encode())
    done = threading.Event()
    for read, write in ((lambda n: os.read(stdin, n), sock.sendall),
                        (sock.recv, lambda data: _write_all(stdout, data))):
        threading.Thread(target=_pump, args=(read, write, done), daemon=True).start()
    done.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edge_lb.bgp.exabgp_bridge", description=__doc__.splitlines()[0])
    parser.add_argument("--socket", required=True, help="the supervisor's Unix socket")
    args = parser.parse_args(argv)
    try:
        sock = connect(args.socket)
    except OSError as exc:
        print(f"edge-lb bridge: cannot connect to {args.socket}: {exc}", file=sys.stderr, flush=True)
        return 1
    relay(sock)
    return 0


if __name__ == "__main__":
    # os._exit: the other direction's thread may sit in a read that never returns; nothing is buffered.
    os._exit(main())
