"""kill -9 of the supervisor -> a new one answering `status` and checking again:
`python benchmarks/restart_bench.py [--json] [--runs N]`.

Needs root. Builds the data-plane lab (edge_lb.lab.labs: client, router, LB, b1-b3, HTTP checks), starts the
real supervisor, waits for every backend up, then `--runs` times: SIGKILL, reaped, a new `edge-lb run`
started at once, and its status polled every POLL s. Reported per run, from the moment the new process was
spawned: `status_s` until status answers with phase "running" (startup finished: data plane adopted or
compiled, first apply, attached); `checking_s` until its watchdog says a health check completed in the new
process; its origin of the program ("adopted" or "compiled", from status) and its RSS (VmRSS) then.
Figures are reported, never asserted.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

from killbench import BenchError, parse_args, spread

from edge_lb import paths
from edge_lb.errors import EdgeLbError
from edge_lb.lab.labs import DataplaneLab, spawn_supervisor, supervisor_status, wait_for
from edge_lb.lab.netns import Lab

POLL = 0.02  # seconds between status requests
BOUND = 120.0  # seconds one restart may take before the benchmark gives up
CHECK = '  type = "http"\n  interval = 1.0\n  fast_interval = 0.25\n  timeout = 0.5\n  rise = 1\n  fall = 2\n'


def _status(instance: str) -> dict[str, Any] | None:
    if not paths.socket(instance).exists():
        return None
    try:
        return supervisor_status(instance)
    except EdgeLbError:
        return None


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise BenchError(f"no VmRSS for pid {pid}")


def restart(d: DataplaneLab) -> dict[str, Any]:
    """One kill -9 and restart; the figures of the new supervisor."""
    assert d.supervisor is not None and d.lb is not None
    d.supervisor.send_signal(signal.SIGKILL)
    d.supervisor.wait(timeout=10)
    paths.socket(d.instance).unlink(missing_ok=True)  # the dead one's socket: status must come from the new
    began = time.monotonic()
    d.supervisor = spawn_supervisor(d.lb.ns, d.config_path, d.lab.tmpdir / "supervisor.log")
    status_s = checking_s = None
    doc: dict[str, Any] = {}
    while checking_s is None:
        now = time.monotonic() - began
        if now > BOUND or d.supervisor.poll() is not None:
            raise BenchError(f"restart not answering with checks within {now:.1f} s")
        doc = _status(d.instance) or {}
        if doc.get("phase") == "running":
            status_s = now if status_s is None else status_s
            age = (doc.get("watchdog") or {}).get("checks_age")
            if age is not None and age < time.monotonic() - began:
                checking_s = time.monotonic() - began
        time.sleep(POLL)
    program = doc.get("program") or {}
    return {"status_s": status_s, "checking_s": checking_s, "origin": program.get("origin", "?"),
            "rss_mb": round(rss_mb(int(doc["pid"])), 1)}


def measure(runs: int) -> list[dict[str, Any]]:
    with Lab(prefix="rbench") as lab:
        d = DataplaneLab(lab)
        try:
            d.build()
            d.prepare_lb()
            d.wait_ready()
            d.config_path.write_text(d.config_text(check=CHECK))
            d.start_supervisor()
            wait_for(lambda: all(s == "up" for s, _ in d.backend_states().values()), 30, "every backend up")
            out = []
            for _ in range(runs):
                out.append(restart(d))
                time.sleep(1.0)
            return out
        except (EdgeLbError, BenchError) as exc:
            tail = d.supervisor_log()[-3000:] if d.supervisor is not None else ""
            raise BenchError(f"{exc}\n--- supervisor.log (tail) ---\n{tail}") from exc
        finally:
            d.close()


def main() -> int:
    args = parse_args(__doc__.splitlines()[0], "kill -9 and restarts")
    try:
        results = measure(args.runs)
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
