"""Small tools the lab runs INSIDE a namespace (`ip netns exec NS python -m edge_lb.lab.labtools ...`): XDP
attachment and counters are per network namespace, so they must run there."""

from __future__ import annotations

import argparse
import json
import socket
import struct
import sys
import urllib.request
from collections import Counter
from collections.abc import Sequence
from typing import Any

from edge_lb.assets import asset_dir

BPF_DIR = asset_dir("bpf")


def attach_pass(ifname: str) -> None:
    from edge_lb.dataplane import loader  # the only module that imports bcc

    _, fn = loader.load_xdp(BPF_DIR / "xdp_pass.c", "xdp_pass")
    loader.attach_xdp(ifname, fn, "native")


def http_get(url: str, count: int, timeout: float) -> dict[str, Any]:
    """`count` fresh connections (urllib opens one per request); body = serving backend's name."""
    served: Counter[str] = Counter()
    failures: list[str] = []
    for _ in range(count):
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                served[resp.read().decode().strip()] += 1
        except OSError as exc:
            failures.append(str(exc))
    return {"served": dict(served), "failures": len(failures), "errors": failures[:5]}


def _get(sock: socket.socket) -> str:
    """One GET on an open keep-alive connection; the body names the backend."""
    sock.sendall(b"GET / HTTP/1.1\r\nHost: lab\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed by the server")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed mid-response")
        body += chunk
    return body.decode().strip()


def hold(host: str, port: int, count: int, timeout: float) -> None:
    """Open `count` long-lived connections and, for each line on stdin, send one request on every one of
    them (never reconnecting) and print a JSON list: the serving backend, or "error: ..." per connection."""
    socks = [socket.create_connection((host, port), timeout=timeout) for _ in range(count)]
    try:
        for _ in sys.stdin:
            served = []
            for sock in socks:
                try:
                    served.append(_get(sock))
                except OSError as exc:
                    served.append(f"error: {exc}")
            print(json.dumps(served), flush=True)
    finally:
        for sock in socks:
            sock.close()


def udp_flows(host: str, port: int, count: int, first_port: int) -> dict[str, int]:
    """One datagram from each of `count` source ports first_port.. (distinct flows, for ECMP and the ring);
    nothing is awaited: backends need not answer."""
    sent = 0
    for sport in range(first_port, first_port + count):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(("0.0.0.0", sport))
            sock.sendto(b"edge-lb lab flow", (host, port))
            sent += 1
    return {"sent": sent}


def syn_flood(host: str, port: int, count: int, first: int) -> dict[str, int]:
    """`count` TCP SYNs to host:port, each from its own spoofed source (198.18.0.0/15, RFC 2544's benchmarking
    space, and a port), through a raw socket: a flood of new flows that nothing answers. Flows are numbered
    from `first`, so two floods can be told apart. Checksums are left 0: the LB reads none."""
    dst = socket.inet_aton(host)
    sent = 0
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as sock:
        for n in range(first, first + count):
            src = (0xC6120000 + (n >> 4)).to_bytes(4, "big")
            ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 0, 0x4000, 64, socket.IPPROTO_TCP, 0, src, dst)
            tcp = struct.pack("!HHIIBBHHH", 1024 + (n & 15), port, n, 0, 5 << 4, 0x02, 65535, 0, 0)
            sent += sock.sendto(ip + tcp, (host, 0)) > 0
    return {"sent": sent}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edge_lb.lab.labtools")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("attach-pass").add_argument("interface")
    g = sub.add_parser("http-get")
    g.add_argument("url")
    g.add_argument("--count", type=int, default=1)
    g.add_argument("--timeout", type=float, default=3.0)
    h = sub.add_parser("hold")
    h.add_argument("host")
    h.add_argument("port", type=int)
    h.add_argument("--count", type=int, default=50)
    h.add_argument("--timeout", type=float, default=3.0)
    u = sub.add_parser("udp-flows")
    u.add_argument("host")
    u.add_argument("port", type=int)
    u.add_argument("--count", type=int, default=100)
    u.add_argument("--first-port", type=int, default=20000)
    f = sub.add_parser("syn-flood")
    f.add_argument("host")
    f.add_argument("port", type=int)
    f.add_argument("--count", type=int, default=1000)
    f.add_argument("--first", type=int, default=0)
    args = p.parse_args(argv)
    if args.cmd == "attach-pass":
        attach_pass(args.interface)
    elif args.cmd == "hold":
        hold(args.host, args.port, args.count, args.timeout)
    elif args.cmd == "syn-flood":
        json.dump(syn_flood(args.host, args.port, args.count, args.first), sys.stdout)
    elif args.cmd == "udp-flows":
        json.dump(udp_flows(args.host, args.port, args.count, args.first_port), sys.stdout)
    else:
        json.dump(http_get(args.url, args.count, args.timeout), sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
