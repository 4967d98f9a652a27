"""Event-loop time of the operator's reads on a big node: `python benchmarks/api_cost.py [--vips 500]
[--backends 10] [--runs 20]`.

The node and the timing are edge_lb/bench/apicost.py (its docstring says how), which `edge-lb bench` runs
too (500 VIPs x 10 backends, 10 runs). Prints median and max in ms.
"""

from __future__ import annotations

import argparse

from edge_lb.bench.apicost import measure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--vips", type=int, default=500)
    parser.add_argument("--backends", type=int, default=10)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    figures = measure(args.vips, args.backends, args.runs)
    print(f"{args.vips} VIPs x {args.backends} backends, {args.runs} runs each, ms of event-loop time "
          "(median / max)")
    for value in figures.values():
        if isinstance(value, dict):
            print(f"  {value['what']:<36} {value['median']:8.1f} {value['max']:8.1f}")


if __name__ == "__main__":
    main()
