"""Small tools the lab runs INSIDE a namespace (`ip netns exec NS python -m edge_lb.labtools ...`): XDP
attachment and counters are per network namespace, so they must run there."""

from __future__ import annotations

import argparse
import json
import sys
import urllib.request
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BPF_DIR = Path(__file__).resolve().parent.parent / "bpf"


def attach_pass(ifname: str) -> None:
    from bcc import BPF

    b = BPF(src_file=str(BPF_DIR / "xdp_pass.c").encode())
    BPF.attach_xdp(ifname.encode(), b.load_func(b"xdp_pass", BPF.XDP), 1 << 2)  # native mode


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


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edge_lb.labtools")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("attach-pass").add_argument("interface")
    g = sub.add_parser("http-get")
    g.add_argument("url")
    g.add_argument("--count", type=int, default=1)
    g.add_argument("--timeout", type=float, default=3.0)
    args = p.parse_args(argv)
    if args.cmd == "attach-pass":
        attach_pass(args.interface)
    else:
        json.dump(http_get(args.url, args.count, args.timeout), sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
