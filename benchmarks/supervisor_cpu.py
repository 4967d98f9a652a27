"""Supervisor CPU for 1,000 or 10,000 backends at a 1 s interval on one core: `benchmarks/supervisor_cpu.py`.

Needs root. One run per profile (default: tcp1k, then http1k; `--profile tcp10k`: 10,000 tcp backends) and
check path (`--via`: tunnel, then direct), each in its own namespace lab. The lab and the measurement are
edge_lb/bench/checkscale.py (its docstring says how), which `edge-lb bench --checks` runs too; this script
adds the choice of profiles and paths and the table. Figures are reported, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from edge_lb.bench.checkscale import PROFILES, RING_SIZE, TUNNEL_MAX, VIPS, measure
from edge_lb.bench.checkserver import INTERVAL, ON_TIME, STALE_AFTER
from edge_lb.dataplane.maglev import is_prime
from edge_lb.errors import BenchError


def render(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    head = (f"{'profile':<7} {'via':<6} {'backends':>8} {'up':>6} {'CPU % 1 core':>12} {'checks/s':>9} "
            f"{'want/s':>7} {'stale':>5} {'gap p50/p99/max s':>18} {'late':>6} {'RSS MiB':>8} "
            f"{'peak MiB':>8} {'ready s':>7}")
    lines = [head, "-" * len(head)]
    for r in results:
        gaps = (f"{r['gap_p50_s']:.2f}/{r['gap_p99_s']:.2f}/{r['gap_max_s']:.2f}" if "gap_p50_s" in r
                else "-")
        lines.append(
            f"{r['profile']:<7} {r['via']:<6} {r['backends']:>8} {r['up']:>6} "
            f"{r['cpu_pct_of_one_core']:>12.1f} {r['checks_per_s']:>9.1f} {r['backends'] / INTERVAL:>7.0f} "
            f"{r['stale']:>5} {gaps:>18} "
            f"{r.get('late', '-'):>6} {r['rss_mib']:>8.1f} {r['peak_rss_mib']:>8.1f} {r['ready_s']:>7.1f}")
    lines.append(f"{VIPS} VIPs, interval {INTERVAL:g} s, ring_size {args.ring_size}, "
                 f"XDP generic; supervisor pinned to CPU {args.cpu}; CPU = utime+stime over a "
                 f"{args.seconds:g} s window.")
    lines.append("checks/s = connections the backend server answered in the window; stale = last check "
                 f"older than {STALE_AFTER:g} s when the window ended;\n"
                 f"gap = seconds between two checks of one backend address in the window; late = gaps over "
                 f"{ON_TIME:g} s (interval + 10% jitter).")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="one JSON document")
    parser.add_argument("--seconds", type=float, default=30.0, help="measurement window (default 30)")
    parser.add_argument("--cpu", type=int, default=max(os.sched_getaffinity(0)),
                        help="the CPU the supervisor is pinned to (default: the highest usable)")
    parser.add_argument("--profile", action="append", choices=sorted(PROFILES),
                        help="tcp1k, http1k (the default: both) or tcp10k; repeatable")
    parser.add_argument("--via", default=None,
                        help="check paths to measure, comma-separated (default tunnel,direct; tunnel only "
                             f"for profiles of at most {TUNNEL_MAX} backends, decap.c's limit)")
    parser.add_argument("--ring-size", type=int, default=RING_SIZE,
                        help=f"Maglev slots per VIP, prime (default {RING_SIZE})")
    args = parser.parse_args(argv)
    if args.seconds <= 0:
        parser.error("--seconds must be positive")
    if args.cpu not in os.sched_getaffinity(0):
        parser.error(f"--cpu {args.cpu}: not one of the CPUs this process may use")
    vias = (args.via or "tunnel,direct").split(",")
    if any(v not in ("tunnel", "direct") for v in vias):
        parser.error("--via: tunnel and/or direct, comma-separated")
    runs = [(profile, via) for profile in args.profile or ("tcp1k", "http1k") for via in vias
            if args.via or via == "direct" or VIPS * PROFILES[profile][1] <= TUNNEL_MAX]
    if not is_prime(args.ring_size) or not 1009 <= args.ring_size <= 1_000_003:
        parser.error("--ring-size must be a prime 1009..1000003")
    try:
        results = [measure(profile, via, args.seconds, args.cpu, args.ring_size) for profile, via in runs]
    except BenchError as exc:
        print(f"supervisor_cpu: {exc}", file=sys.stderr)
        return 1
    doc = {"vips": VIPS, "interval_s": INTERVAL, "ring_size": args.ring_size,
           "cpu": args.cpu, "seconds": args.seconds, "runs": results}
    print(json.dumps(doc, indent=2) if args.json else render(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
