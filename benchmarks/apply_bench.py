"""Time one reconciler apply (desired state -> Maglev -> slot diff -> map writes) for many VIPs on one backend
pool: `python benchmarks/apply_bench.py [--vips 50] [--backends 10] [--runs 5] [--kernel] [--loop-lag]`.

When a backend shared by every VIP dies, every VIP's ring is rebuilt at once. By default the maps are the
in-memory twin (mapio.FakeMapIO): the Python side only. `--kernel` (root, bcc) loads the real program
unpinned and unattached, once, and writes its maps through FdMapIO, as the supervisor does. `--loop-lag`
also runs the dead-backend apply under an asyncio loop with a 1 ms ticker and reports the ticker's longest
wait: once with the apply called on the loop, once in a worker thread (as control/reconciler.py runs it).
The measuring functions are edge_lb/bench/reaction.py's, which `edge-lb bench` runs too.
"""

from __future__ import annotations

import argparse
import statistics
from contextlib import nullcontext
from typing import Any

from edge_lb.bench.reaction import apply_times, kernel_maps, loop_lag, pool_config
from edge_lb.dataplane.maglev import DEFAULT_RING_SIZE
from edge_lb.dataplane.mapio import FakeMapIO

CASES = (("first_s", "first apply"), ("reload_s", "reload: one VIP's backend weight"),
         ("dead_s", "one backend of the pool dead"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vips", type=int, default=50)
    parser.add_argument("--backends", type=int, default=10)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--kernel", action="store_true", help="real maps (root, bcc)")
    parser.add_argument("--loop-lag", action="store_true", help="event-loop stall during the apply")
    args = parser.parse_args()
    config = pool_config(args.vips, args.backends)
    maps_kind = "kernel maps" if args.kernel else "in-memory maps"
    context: Any = kernel_maps(config) if args.kernel else nullcontext(None)
    with context as kernel_io:
        def io() -> Any:  # the real maps are re-used; the in-memory twin is fresh each time
            return kernel_io if kernel_io is not None else FakeMapIO(DEFAULT_RING_SIZE)
        runs = [apply_times(config, io()) for _ in range(args.runs)]
        for key, name in CASES:
            values = [r[key] * 1000 for r in runs]
            print(f"{args.vips} VIPs x {args.backends} backends, ring {DEFAULT_RING_SIZE}, {maps_kind}, "
                  f"{name}: "
                  f"median {statistics.median(values):.0f} ms (min {min(values):.0f}, "
                  f"max {max(values):.0f}) of {args.runs}")
        if args.loop_lag:
            for mode, in_thread in (("on the loop", False), ("worker thread", True)):
                lag = loop_lag(config, io(), in_thread)
                print(f"  longest event-loop stall during the dead-backend apply, apply {mode}: "
                      f"{lag * 1000:.1f} ms")


if __name__ == "__main__":
    main()
