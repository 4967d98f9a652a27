"""Time Maglev for 10, 100 and 1000 members at 65,537 slots:
`python benchmarks/maglev_bench.py [--json] [--python]`.

Times `owner_table` (what the apply path calls: the members' permutations, blake2b cached per key, and the
fill, in C when the extension is built) and `build_table` (the same, mapped to keys). `--python` runs the
pure-Python fill instead of the C one, in the same process and conditions. Reports the best and median of
several runs (a loaded VM adds noise upward, never downward).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import statistics
import time
from collections.abc import Callable

from edge_lb.dataplane import maglev
from edge_lb.dataplane.maglev import DEFAULT_RING_SIZE, Member, build_table, owner_table


def members(count: int, weighted: bool) -> list[Member]:
    return [
        Member(ipaddress.IPv4Address(0x0A000001 + n).packed, 1 + n % 3 if weighted else 1)
        for n in range(count)
    ]


def measure(build: Callable[[list[Member], int], object], group: list[Member], ring_size: int,
            runs: int) -> tuple[float, float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        build(group, ring_size)
        times.append((time.perf_counter() - start) * 1000)
    return round(min(times), 2), round(statistics.median(times), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", action="store_true", help="one JSON object a line")
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--ring-size", type=int, default=DEFAULT_RING_SIZE)
    parser.add_argument("--python", action="store_true", help="the pure-Python fill, not the C one")
    args = parser.parse_args()
    if args.python:
        maglev._maglevfill, maglev._WHY_PYTHON = None, "--python"  # type: ignore[assignment]
    fill = "C" if maglev.compiled() else "python"
    for weighted in (False, True):
        for count in (10, 100, 1000):
            group = members(count, weighted)
            result: dict[str, object] = {"members": count, "weights": "1..3" if weighted else "equal",
                                         "ring_size": args.ring_size, "fill": fill}
            for name, build in (("owner_table", owner_table), ("build_table", build_table)):
                best, median = measure(build, group, args.ring_size, args.runs)
                result |= {f"{name}_best_ms": best, f"{name}_median_ms": median}
            if args.json:
                print(json.dumps(result))
            else:
                print(f"{count:5} members, {result['weights']:5} weights, {args.ring_size} slots, "
                      f"{fill} fill: owner_table median {result['owner_table_median_ms']} ms "
                      f"(best {result['owner_table_best_ms']}), build_table median "
                      f"{result['build_table_median_ms']} ms (best {result['build_table_best_ms']})")


if __name__ == "__main__":
    main()
