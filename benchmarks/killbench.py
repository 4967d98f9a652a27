"""What the two kill benchmarks (failover_bench.py, bgp_failover_bench.py) share: their error, the command
line (--json, --runs, --seed) and the median/min/max summary of a list of timings."""

from __future__ import annotations

import argparse
import statistics
from typing import Any


class BenchError(Exception):
    """A wait ran past its bound, or the lab failed: the benchmark cannot report figures."""


def parse_args(description: str, runs_help: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--json", action="store_true", help="one JSON document")
    parser.add_argument("--runs", type=int, default=10, help=f"{runs_help} (default 10)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the random pauses")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    return args


def spread(values: list[float], unit: str) -> dict[str, Any]:
    """{"median_<unit>", "min_<unit>", "max_<unit>", "runs_<unit>"} of the timings."""
    return {f"median_{unit}": statistics.median(values), f"min_{unit}": min(values),
            f"max_{unit}": max(values), f"runs_{unit}": values}
