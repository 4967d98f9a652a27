"""Issue 13, item 5: kill -9 of the supervisor -> a new one answering `status` and checking again (root).

Builds the data-plane lab (edge_lb.lab.labs: client, router, LB, b1-b3, HTTP checks at a 1 s interval,
rise 1), starts the real supervisor, waits for every backend up, then `runs` times: SIGKILL, reaped, a new
`edge-lb run` started at once, and its status polled every POLL s. Per run, from the moment the new process
was spawned: `status_s` until status answers with phase "running" (startup finished: data plane adopted or
compiled, first apply, attached); `checking_s` until its watchdog says a health check completed in the new
process; the program's origin ("adopted" or "compiled", from status) and the new supervisor's RSS (VmRSS)
then.
`edge-lb bench --restart` and benchmarks/restart_bench.py both measure through here.
"""

from __future__ import annotations

import signal
import statistics
import time
from pathlib import Path
from typing import Any

from edge_lb import paths
from edge_lb.errors import BenchError, EdgeLbError
from edge_lb.lab.labs import DataplaneLab, spawn_supervisor, supervisor_status, wait_for
from edge_lb.lab.netns import Lab

POLL = 0.02  # seconds between status requests
BOUND = 120.0  # seconds one restart may take before the benchmark gives up
UP_BOUND = 30.0  # seconds for every backend to come up before the first kill
CHECK = '  type = "http"\n  interval = 1.0\n  fast_interval = 0.25\n  timeout = 0.5\n  rise = 1\n  fall = 2\n'


def _status(instance: str) -> dict[str, Any] | None:
    if not paths.socket(instance).exists():
        return None
    try:
        return supervisor_status(instance)
    except EdgeLbError:
        return None


def rss_mb(pid: int) -> float:
    """VmRSS of a process, in MiB."""
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
    return {"status_s": round(status_s or checking_s, 3), "checking_s": round(checking_s, 3),
            "origin": program.get("origin", "?"), "rss_mb": round(rss_mb(int(doc["pid"])), 1)}


def restarts(runs: int) -> list[dict[str, Any]]:
    """`runs` kill -9 and restarts in a fresh lab, 1 s apart; each one's figures."""
    with Lab(prefix="rbench") as lab:
        d = DataplaneLab(lab)
        try:
            d.build()
            d.prepare_lb()
            d.wait_ready()
            d.config_path.write_text(d.config_text(check=CHECK))
            d.start_supervisor()
            wait_for(lambda: all(s == "up" for s, _ in d.backend_states().values()), UP_BOUND,
                     "every backend up")
            out = []
            for _ in range(runs):
                out.append(restart(d))
                time.sleep(1.0)
            return out
        except EdgeLbError as exc:
            tail = d.supervisor_log()[-3000:] if d.supervisor is not None else ""
            raise BenchError(f"restart: {exc}\n--- supervisor.log (tail) ---\n{tail}") from exc
        finally:
            d.close()


def measure(runs: int = 3) -> dict[str, Any]:
    """{"runs": [per restart], "status_s", "checking_s", "rss_mb": medians, "origins": [...]}."""
    results = restarts(runs)
    return {"runs": results,
            "status_s": round(statistics.median(r["status_s"] for r in results), 3),
            "checking_s": round(statistics.median(r["checking_s"] for r in results), 3),
            "rss_mb": round(statistics.median(r["rss_mb"] for r in results), 1),
            "origins": sorted({r["origin"] for r in results})}
