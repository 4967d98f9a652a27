"""Time edge_lb.dataplane.maglev.build_table for 10, 100 and 1000 members:
`python benchmarks/maglev_bench.py [--json]`.

Reports the best and median of several runs (a loaded VM adds noise upward, never downward).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import statistics
import time

from edge_lb.dataplane.maglev import DEFAULT_RING_SIZE, Member, build_table


def members(count: int, weighted: bool) -> list[Member]:
    return [
        Member(ipaddress.IPv4Address(0x0A000001 + n).packed, 1 + n % 3 if weighted else 1)
        for n in range(count)
    ]


def measure(group: list[Member], ring_size: int, runs: int) -> dict[str, float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        build_table(group, ring_size)
        times.append((time.perf_counter() - start) * 1000)
    return {"best_ms": round(min(times), 1), "median_ms": round(statistics.median(times), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", action="store_true", help="one JSON object a line")
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--ring-size", type=int, default=DEFAULT_RING_SIZE)
    args = parser.parse_args()
    for weighted in (False, True):
        for count in (10, 100, 1000):
            result = {
                "members": count,
                "weights": "1..3" if weighted else "equal",
                "ring_size": args.ring_size,
            }
            result |= measure(members(count, weighted), args.ring_size, args.runs)
            if args.json:
                print(json.dumps(result))
            else:
                print(
                    f"{count:5} members, {result['weights']:5} weights, {args.ring_size} slots: "
                    f"best {result['best_ms']} ms, median {result['median_ms']} ms"
                )


if __name__ == "__main__":
    main()
