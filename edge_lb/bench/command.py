"""`edge-lb bench`: the per-packet cost (edge_lb/dataplane/bench.py), then issue 13's other targets: the
reaction (real maps) and the API's event-loop time by default, the restart (--restart) and the health checks
at scale (--checks) on request, as they need a namespace lab and take minutes. One document, one "targets"
block (edge_lb/bench/targets.py); printed as tables or as JSON.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edge_lb.bench import targets
from edge_lb.bench.reaction import Sizes
from edge_lb.errors import BenchError

API_VIPS, API_BACKENDS, API_RUNS = 500, 10, 10
RESTART_RUNS = 3  # default kill -9 and restarts with --restart
MAX_RESTART_RUNS = 20
CHECK_SECONDS = 20.0  # default measurement window of each --checks profile
MAX_CHECK_SECONDS = 600.0
CHECK_PROFILES = ("http1k", "tcp10k")  # item 4's two targets, direct checks


@dataclass(frozen=True)
class Options:
    json_out: bool = False
    packets: int = 20000
    restart: bool = False
    checks: bool = False
    restart_runs: int | None = None  # None: RESTART_RUNS
    check_seconds: float | None = None  # None: CHECK_SECONDS


def validate(opts: Options) -> None:
    """A bad argument: BenchError naming it, before anything is measured."""
    from edge_lb.dataplane.bench import MAX_PACKETS

    if not 1 <= opts.packets <= MAX_PACKETS:
        raise BenchError(f"--packets must be between 1 and {MAX_PACKETS}, got {opts.packets}")
    if opts.restart_runs is not None:
        if not opts.restart:
            raise BenchError("--restart-runs needs --restart (or --all)")
        if not 1 <= opts.restart_runs <= MAX_RESTART_RUNS:
            raise BenchError(f"--restart-runs must be between 1 and {MAX_RESTART_RUNS}, "
                             f"got {opts.restart_runs}")
    if opts.check_seconds is not None:
        if not opts.checks:
            raise BenchError("--check-seconds needs --checks (or --all)")
        if not 1 <= opts.check_seconds <= MAX_CHECK_SECONDS:
            raise BenchError(f"--check-seconds must be between 1 and {MAX_CHECK_SECONDS:g}, "
                             f"got {opts.check_seconds:g}")


def reaction(sizes: Sizes | None = None) -> dict[str, Any]:
    """Item 3's apply figures over the real program's maps (loaded once, for the largest size)."""
    from edge_lb.bench import reaction as r

    sizes = sizes or Sizes()
    with r.kernel_maps(r.pool_config(sizes.max_vips, sizes.backends, sizes.ring_size)) as io:
        return r.measure(sizes, io)


def api_cost() -> dict[str, Any]:
    from edge_lb.bench import apicost

    return apicost.measure(API_VIPS, API_BACKENDS, API_RUNS, apicost.TARGET_READS)


def restart(runs: int) -> dict[str, Any]:
    from edge_lb.bench import restart as r

    return r.measure(runs)


def checks(seconds: float) -> dict[str, Any]:
    """Item 4's two profiles, direct checks, the supervisor pinned to the highest CPU this process may use."""
    from edge_lb.bench import checkscale

    cpu = max(os.sched_getaffinity(0))
    return {profile: checkscale.measure(profile, "direct", seconds, cpu) for profile in CHECK_PROFILES}


def run(opts: Options) -> dict[str, Any]:
    """Measure every part asked for; the assembled document."""
    from edge_lb.dataplane import bench

    durations: dict[str, float] = {}

    def timed(name: str, work: Callable[[], Any]) -> Any:
        began = time.monotonic()
        try:
            return work()
        finally:
            durations[name] = time.monotonic() - began

    doc = timed("per_packet", lambda: bench.report(opts.packets))
    parts: dict[str, Any] = {"reaction": timed("reaction", reaction), "api": timed("api", api_cost)}
    if opts.restart:
        parts["restart"] = timed("restart", lambda: restart(opts.restart_runs or RESTART_RUNS))
    if opts.checks:
        parts["checks"] = timed("checks", lambda: checks(opts.check_seconds or CHECK_SECONDS))
    return targets.assemble(doc, parts, durations)


def render(doc: dict[str, Any], json_out: bool) -> str:
    from edge_lb.dataplane import bench

    if json_out:
        return json.dumps(doc, indent=2)
    return bench.format_table(doc) + "\n\n" + targets.format_targets(doc)


def main(opts: Options) -> int:
    """Measure; print tables (or one JSON document). 0 even when a target is missed: figures, not tests."""
    validate(opts)
    print(render(run(opts), opts.json_out))
    return 0
