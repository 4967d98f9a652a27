"""kill -9 of the supervisor -> a new one answering `status` and checking again:
`python benchmarks/restart_bench.py [--json] [--runs N]`.

Needs root. The lab and the measurement are edge_lb/bench/restart.py (its docstring says how), which
`edge-lb bench --restart` runs too. Figures are reported, never asserted.
"""

from __future__ import annotations

import json
import sys

from killbench import parse_args, spread

from edge_lb.bench.restart import restarts
from edge_lb.errors import BenchError


def main() -> int:
    args = parse_args(__doc__.splitlines()[0], "kill -9 and restarts")
    try:
        results = restarts(args.runs)
    except BenchError as exc:
        print(f"restart_bench: {exc}", file=sys.stderr)
        return 1
    summary = {"runs": results, "status": spread([r["status_s"] for r in results], "s"),
               "checking": spread([r["checking_s"] for r in results], "s"),
               "rss": spread([r["rss_mb"] for r in results], "mb"),
               "origins": sorted({r["origin"] for r in results})}
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    for r in results:
        print(f"kill -9 -> status {r['status_s']:.2f} s, checking {r['checking_s']:.2f} s, "
              f"program {r['origin']}, RSS {r['rss_mb']:.0f} MB")
    s, c = summary["status"], summary["checking"]
    print(f"median: status {s['median_s']:.2f} s (min {s['min_s']:.2f}, max {s['max_s']:.2f}), checking "
          f"{c['median_s']:.2f} s (min {c['min_s']:.2f}, max {c['max_s']:.2f}) of {len(results)} restarts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
