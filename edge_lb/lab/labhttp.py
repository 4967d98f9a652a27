"""A tiny HTTP server for lab backends: every GET gets 200 and the body "NAME\\n".

    python -m edge_lb.lab.labhttp --bind 10.200.1.1 --port 80 --name be1

A client counting response bodies learns which backend served each request. Quiet (no access log),
IPv6-capable, exits cleanly on SIGTERM (what Lab.close() sends).
"""

from __future__ import annotations

import argparse
import ipaddress
import signal
import socket
import sys
import threading
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any


class _NameHandler(BaseHTTPRequestHandler):
    server: LabHTTPServer
    protocol_version = "HTTP/1.1"  # keep-alive, as real backends behind a balancer usually do

    def do_GET(self) -> None:
        body = f"{self.server.backend_name}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per request would drown the lab logs


class LabHTTPServer(ThreadingHTTPServer):
    allow_reuse_address = True  # SO_REUSEADDR: restart on the port while old connections sit in TIME_WAIT
    daemon_threads = True  # a stuck client must not block shutdown

    def __init__(self, bind: str, port: int, name: str) -> None:
        # The class attribute decides the socket family before the base constructor creates the socket.
        self.address_family = socket.AF_INET6 if ipaddress.ip_address(bind).version == 6 else socket.AF_INET
        self.backend_name = name
        super().__init__((bind, port), _NameHandler)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m edge_lb.lab.labhttp",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--bind", required=True, help="IPv4 or IPv6 address to listen on")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", required=True, help="the response body (plus a newline)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        ipaddress.ip_address(args.bind)
    except ValueError:
        print(f"labhttp: --bind {args.bind!r}: not an IP address", file=sys.stderr)
        return 2
    try:
        server = LabHTTPServer(args.bind, args.port, args.name)
    except OSError as exc:
        print(f"labhttp: cannot listen on [{args.bind}]:{args.port}: {exc}", file=sys.stderr)
        return 1

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        # shutdown() waits for serve_forever() to return, so it must not run in serve_forever's own thread.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_sigterm)
    print(f"labhttp {args.name}: listening on [{args.bind}]:{args.port}", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
