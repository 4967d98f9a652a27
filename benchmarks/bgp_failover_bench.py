"""BGP failover timeline: `python benchmarks/bgp_failover_bench.py [--runs N] [--json] [--seed S]`.

Needs root, BIRD 2 and ExaBGP. Builds the BGP lab (edge_lb.lab.bgplab: a BIRD router doing ECMP, LB nodes lb1
and lb2 each running the real supervisor and its ExaBGP, backends b1-b3). Both nodes get the same config:
the lab's HTTP VIP checked with bgplab.FAST_CHECK and `min_healthy = 3` on its 3 backends, so the death of
any one backend takes every node below min_healthy and every node withdraws the VIP. Then `--runs` times:
kill b2's HTTP server and read, per node, on the host's one wall clock (CLOCK_REALTIME):

    t0  kill       time.time() in the benchmark, once the killed server has been reaped
    t1  health     the node's `event=health vip=VIP:80/tcp backend=B2 ... to=down` log line
    t2  ring       the `event=ring vip=VIP:80/tcp ... trigger=health` line after t1 (after the map write)
    t3  withdraw   the `event=bgp action=withdraw` line after t1 (logged once ExaBGP acknowledged it; the
                   withdraw is sent before the ring rewrite, so t3 usually precedes t2)
    t4  router     the first route message for the VIP, printed by `ip -ts monitor route` in the router's
                   namespace, whose next hops no longer include the node's address

Then b2 is restarted, the benchmark waits until the router's route has both nodes' next hops again (which
needs both nodes to announce), and pauses a random 0..interval so that the next kill lands at a random phase
of the check cycle. Figures are reported, never asserted.
"""

from __future__ import annotations

import json
import random
import re
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from killbench import BenchError, parse_args, spread

from edge_lb import paths
from edge_lb.errors import EdgeLbError
from edge_lb.lab.bgplab import FAST_CHECK, HTTP_PORT, VIP, BgpLab
from edge_lb.lab.netns import Lab
from healthchecks.spec import CheckSpec

VICTIM = "b2"
NODES = (1, 2)
MIN_HEALTHY = 3
POLL = 0.02  # seconds between two looks at the logs while a round runs
ROUND_BOUND = 30.0  # seconds from the kill until every node's withdraw has reached the router
RESTORE_BOUND = 30.0  # seconds from the restart until the router has both next hops again
UP_BOUND = 60.0  # seconds for both nodes to announce after the supervisors started
TCP_VIP = f"{VIP}:{HTTP_PORT}/tcp"
STEPS = (  # name, from, to: the stamps of one node's round
    ("kill -> health down", "t0", "t1"),
    ("health down -> withdraw acked", "t1", "t3"),
    ("withdraw -> router route", "t3", "t4"),
    ("health down -> ring written", "t1", "t2"),
    ("total: kill -> router route", "t0", "t4"),
)
_LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3})Z \w+ (event=.*)$")
_MON_LINE = re.compile(r"^\[(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6})\] (.*)$")


def check_settings() -> dict[str, Any]:
    """FAST_CHECK as a dict, with the CheckSpec defaults of the keys it leaves out."""
    given = tomllib.loads(FAST_CHECK)
    default = CheckSpec()
    return {"type": given["type"]} | {k: given.get(k, getattr(default, k))
                                      for k in ("interval", "fast_interval", "timeout", "fall", "rise",
                                                "jitter")}


@dataclass
class Tail:
    """The complete lines a file gained since `offset`."""

    path: Path
    offset: int = 0

    @classmethod
    def at_end(cls, path: Path) -> Tail:
        return cls(path, path.stat().st_size if path.exists() else 0)

    def read(self) -> list[str]:
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1  # a line still being written waits for the next read
        self.offset += end
        return data[:end].decode(errors="replace").splitlines()


def log_event(line: str) -> tuple[float, dict[str, str]] | None:
    """(wall-clock stamp, fields) of a supervisor log line (logfmt; UTC stamp with ms); None otherwise."""
    m = _LOG_LINE.match(line)
    if m is None:
        return None
    try:
        tokens = shlex.split(m.group(2))
    except ValueError:
        return None
    stamp = datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S.%f").replace(tzinfo=UTC).timestamp()
    return stamp, dict(t.split("=", 1) for t in tokens if "=" in t)


def node_stamps(lines: list[str], victim: str) -> dict[str, float]:
    """t1, t2, t3 (those found so far) from a node's log lines written since the kill."""
    found: dict[str, float] = {}
    for line in lines:
        event = log_event(line)
        if event is None:
            continue
        stamp, f = event
        if "t1" not in found:
            if (f.get("event") == "health" and f.get("vip") == TCP_VIP and f.get("backend") == victim
                    and f.get("to") == "down"):
                found["t1"] = stamp
            continue
        # After the flip the withdraw (sent before the ring rewrite) and the ring line come in either order.
        if "t2" not in found and f.get("event") == "ring" and f.get("vip") == TCP_VIP \
                and f.get("trigger") == "health":
            found["t2"] = stamp
        if "t3" not in found and f.get("event") == "bgp" and f.get("action") == "withdraw" \
                and f.get("prefix") == f"{VIP}/32":
            found["t3"] = stamp
        if "t2" in found and "t3" in found:
            break
    return found


def route_states(lines: list[str]) -> list[tuple[float, set[str]]]:
    """(stamp, next hops) of every message about the VIP in `ip -ts monitor route` output; a deleted route
    has none. -ts stamps are local time with us; a multipath message spans indented continuation lines."""
    messages: list[tuple[float, str, list[str]]] = []
    for line in lines:
        m = _MON_LINE.match(line)
        if m is not None:
            stamp = datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S.%f").timestamp()  # naive: local time
            messages.append((stamp, m.group(2), []))
        elif messages and line[:1].isspace():
            messages[-1][2].append(line)
    states = []
    for stamp, head, more in messages:
        words = head.split()
        deleted = words[:1] == ["Deleted"]
        words = words[1:] if deleted else words
        if not words or words[0] not in (VIP, f"{VIP}/32"):
            continue
        if not deleted and "via" not in words and len(more) < 2:
            continue  # a multipath message not read whole yet (it has at least two next hops)
        hops = set() if deleted else {w[i + 1] for w in [words, *(m.split() for m in more)]
                                      for i in range(len(w) - 1) if w[i] == "via"}
        states.append((stamp, hops))
    return states


def router_loss(states: list[tuple[float, set[str]]], address: str) -> float | None:
    """When the VIP route first lost `address` as a next hop (None: not yet)."""
    return next((stamp for stamp, hops in states if address not in hops), None)


def alive(bl: BgpLab, monitor: subprocess.Popen[bytes]) -> None:
    for n in NODES:
        proc = bl.node(n).supervisor
        if proc is None or proc.poll() is not None:
            raise BenchError(f"lb{n}: the supervisor exited")
    if monitor.poll() is not None:
        raise BenchError(f"ip monitor exited with {monitor.returncode}")


def one_round(bl: BgpLab, monitor: subprocess.Popen[bytes], mon_path: Path, pause: float) -> dict[str, Any]:
    """Kill the victim, collect every node's t1..t4, restart it, wait for both next hops, then pause."""
    victim = bl.server(VICTIM).address
    logs = {n: Tail.at_end(bl.supervisor_log_path(n)) for n in NODES}
    mon = Tail.at_end(mon_path)
    lines: dict[int, list[str]] = {n: [] for n in NODES}
    mon_lines: list[str] = []
    before = time.time()
    bl.stop_http(VICTIM)
    t0 = time.time()
    deadline = time.monotonic() + ROUND_BOUND
    while True:
        for n in NODES:
            lines[n] += logs[n].read()
        mon_lines += mon.read()
        states = route_states(mon_lines)
        stamps = {n: node_stamps(lines[n], victim) | {"t0": t0} for n in NODES}
        for n in NODES:
            loss = router_loss(states, bl.node(n).address)
            if loss is not None:
                stamps[n]["t4"] = loss
        if all(len(s) == 5 for s in stamps.values()):
            break
        alive(bl, monitor)
        if time.monotonic() > deadline:
            raise BenchError(f"not within {ROUND_BOUND:g} s of the kill: every node's t1..t4; have "
                             f"{ {f'lb{n}': sorted(s) for n, s in stamps.items()} }")
        time.sleep(POLL)
    bl.start_http(VICTIM)
    bl.wait_nexthops({bl.node(n).address for n in NODES}, RESTORE_BOUND)
    time.sleep(pause)
    gone = next((stamp for stamp, hops in states if not hops), None)
    return {"kill_reap_ms": (t0 - before) * 1000, "pause_s": pause,
            "route_gone_ms": None if gone is None else (gone - t0) * 1000,
            "nodes": {f"lb{n}": {k: (v - t0) * 1000 for k, v in sorted(s.items()) if k != "t0"}
                      for n, s in stamps.items()}}


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    nodes: dict[str, Any] = {}
    for n in NODES:
        runs = [r["nodes"][f"lb{n}"] | {"t0": 0.0} for r in rounds]
        nodes[f"lb{n}"] = {name: spread([r[b] - r[a] for r in runs], "ms") for name, a, b in STEPS}
    gone = [r["route_gone_ms"] for r in rounds if r["route_gone_ms"] is not None]
    return {"nodes": nodes, "route_gone": spread(gone, "ms") if gone else None}


def remove_speaker_dirs(bl: BgpLab) -> None:
    """ExaBGP's run directory of each node (/run/edge-lb/INSTANCE.bgp: its config and log), which neither
    BgpLab.close nor the Lab removes. Runs as a Lab cleanup: after every process has stopped."""
    for lb in bl.nodes.values():
        shutil.rmtree(paths.exabgp_run(lb.instance), ignore_errors=True)


def measure(runs: int, rng: random.Random, check: dict[str, Any]) -> list[dict[str, Any]]:
    with Lab(prefix="bgpfb") as lab:
        bl = BgpLab(lab)
        lab.add_cleanup(lambda: remove_speaker_dirs(bl))
        mon_path = lab.tmpdir / "route-monitor.log"
        try:
            bl.build()
            assert bl.router is not None
            for n in NODES:
                bl.write_config(n, vip_keys=f"min_healthy = {MIN_HEALTHY}\n")
            monitor = bl.router.spawn(["ip", "-ts", "monitor", "route"], mon_path)
            for n in NODES:
                bl.start_supervisor(n)
            bl.wait_nexthops({bl.node(n).address for n in NODES}, UP_BOUND)
            time.sleep(rng.uniform(0, check["interval"]))
            return [one_round(bl, monitor, mon_path, rng.uniform(0, check["interval"])) for _ in range(runs)]
        except (EdgeLbError, BenchError) as exc:
            tails = "".join(f"\n--- supervisor-lb{n}.log (tail) ---\n{bl.supervisor_log(n)[-2500:]}"
                            for n in bl.nodes)
            mon = mon_path.read_text(errors="replace")[-1500:] if mon_path.exists() else ""
            raise BenchError(f"{exc}{tails}\n--- route monitor (tail) ---\n{mon}") from exc
        finally:
            bl.close()


def render(doc: dict[str, Any]) -> str:
    names = [f"lb{n}" for n in NODES]
    head = f"{'step (ms)':<29}" + "".join(f" | {name + ' med':>8} {'min':>6} {'max':>6}" for name in names)
    lines = [head, "-" * len(head)]
    for name, a, b in STEPS:
        cells = [doc["summary"]["nodes"][node][name] for node in names]
        row = "".join(f" | {c['median_ms']:>8.1f} {c['min_ms']:>6.1f} {c['max_ms']:>6.1f}" for c in cells)
        lines.append(f"{name:<29}{row}   ({b}-{a})")
    gone = doc["summary"]["route_gone"]
    if gone is not None:
        lines.append(f"kill -> VIP route deleted (both nodes withdrawn): median {gone['median_ms']:.1f} ms, "
                     f"min {gone['min_ms']:.1f}, max {gone['max_ms']:.1f}")
    c = doc["check"]
    lines.append(f"{doc['runs']} kills of {VICTIM}'s HTTP server; both nodes alike: min_healthy = "
                 f"{MIN_HEALTHY} of 3, check {c['type']} interval {c['interval']:g} s, fast_interval "
                 f"{c['fast_interval']:g} s, timeout {c['timeout']:g} s, fall {c['fall']}, rise {c['rise']}, "
                 f"jitter {c['jitter']:g} (bgplab.FAST_CHECK).")
    lines.append(f"health-down bound: interval + (fall-1)*fast_interval = {doc['health_bound_ms']:.0f} ms "
                 f"(x (1 + jitter) = {doc['health_bound_ms'] * (1 + c['jitter']):.0f} ms).")
    lines.append("t0 = kill reaped (time.time()); t1-t3 = supervisor log stamps (UTC, ms, truncated); "
                 "t4 = `ip -ts monitor route` in the router's namespace (us).")
    return "\n".join(lines)


def main() -> int:
    args = parse_args(__doc__.splitlines()[0], "kills")
    check = check_settings()
    try:
        rounds = measure(args.runs, random.Random(args.seed), check)
    except BenchError as exc:
        print(f"bgp_failover_bench: {exc}", file=sys.stderr)
        return 1
    doc = {"victim": VICTIM, "min_healthy": MIN_HEALTHY, "check": check, "runs": args.runs,
           "health_bound_ms": (check["interval"] + (check["fall"] - 1) * check["fast_interval"]) * 1000,
           "route_watch": "ip -ts monitor route (router namespace)", "summary": summarize(rounds),
           "rounds": rounds}
    print(json.dumps(doc, indent=2) if args.json else render(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
