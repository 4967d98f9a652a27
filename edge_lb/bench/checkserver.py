"""The backend server of the health-checks-at-scale lab (edge_lb/bench/checkscale.py), run inside its "be"
namespace: `python -m edge_lb.bench.checkserver --kind tcp|http --port P`.

One selectors-based server on 0.0.0.0:P that accepts and closes (tcp) or answers each request with 200 and
closes (http), counting what it served and, per backend address (the local address a check dialled), the
gap between two checks. Each line on stdin is answered with the counts as one JSON line; EOF ends it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import selectors
import socket
import sys
import time
from dataclasses import dataclass, field

INTERVAL = 1.0  # the lab's check interval
STALE_AFTER = 2 * INTERVAL  # a gap longer than this: a check missed
ON_TIME = 1.1 * INTERVAL  # the longest gap between two checks of a backend the default jitter (0.1) allows
HTTP_REPLY = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n"


def serve(kind: str, port: int) -> None:
    """Accept on 0.0.0.0:port until stdin closes; each line on stdin is answered with the counts as JSON."""
    sel = selectors.DefaultSelector()
    listener = socket.create_server(("0.0.0.0", port), backlog=4096)
    listener.setblocking(False)
    sel.register(listener, selectors.EVENT_READ, "listen")
    sel.register(sys.stdin.fileno(), selectors.EVENT_READ, "control")
    counts = {"accepted": 0, "served": 0}
    gaps = Gaps()
    print(json.dumps({"ready": True}), flush=True)
    while True:
        for key, _ in sel.select():
            if key.data == "listen":
                _accept(sel, listener, kind, counts, gaps)
            elif key.data == "control":
                if not _answer_control(counts, gaps):
                    return
            elif isinstance(key.fileobj, socket.socket):
                _read_request(sel, key.fileobj, key.data, counts)


@dataclass
class Gaps:
    """Per backend address (the local address a check dialled), the seconds between two checks' accepts."""

    last: dict[str, float] = field(default_factory=dict)
    seen: list[float] = field(default_factory=list)  # gaps since the last report

    def accepted(self, conn: socket.socket) -> None:
        now, address = time.monotonic(), conn.getsockname()[0]
        before = self.last.get(address)
        self.last[address] = now
        if before is not None:
            self.seen.append(now - before)

    def report(self) -> dict[str, float | int]:
        gaps, self.seen = sorted(self.seen), []
        if not gaps:
            return {"gaps": 0}
        def pct(p: float) -> float:
            return gaps[min(len(gaps) - 1, int(p * len(gaps)))]
        # lateness of a gap: how far past ON_TIME it ended (0 when on time); percentiles over every gap
        return {"gaps": len(gaps), "gap_p50_s": pct(0.5), "gap_p99_s": pct(0.99), "gap_max_s": gaps[-1],
                "late": sum(g > ON_TIME for g in gaps), "late_over_2x": sum(g > STALE_AFTER for g in gaps),
                "lateness_p50_s": max(0.0, pct(0.5) - ON_TIME),
                "lateness_p99_s": max(0.0, pct(0.99) - ON_TIME),
                "lateness_max_s": max(0.0, gaps[-1] - ON_TIME)}


def _accept(sel: selectors.BaseSelector, listener: socket.socket, kind: str, counts: dict[str, int],
            gaps: Gaps) -> None:
    while True:
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            return
        counts["accepted"] += 1
        gaps.accepted(conn)
        if kind == "tcp":
            conn.close()
            counts["served"] += 1
        else:
            conn.setblocking(False)
            sel.register(conn, selectors.EVENT_READ, bytearray())


def _read_request(sel: selectors.BaseSelector, conn: socket.socket, buf: bytearray,
                  counts: dict[str, int]) -> None:
    try:
        chunk = conn.recv(4096)
    except OSError:
        chunk = b""
    buf += chunk
    if chunk and b"\r\n\r\n" not in buf:
        return
    if chunk:
        with contextlib.suppress(OSError):
            conn.send(HTTP_REPLY)
        counts["served"] += 1
    sel.unregister(conn)
    conn.close()


def _answer_control(counts: dict[str, int], gaps: Gaps) -> bool:
    """"count": the counts (and the gaps since the last count, which also starts a new window)."""
    if not os.read(sys.stdin.fileno(), 4096):
        return False
    print(json.dumps(counts | {"time": time.monotonic()} | gaps.report()), flush=True)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edge_lb.bench.checkserver",
                                     description="(internal) the checks lab's backend server")
    parser.add_argument("--kind", choices=("tcp", "http"), required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    serve(args.kind, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
