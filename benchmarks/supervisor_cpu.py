"""Supervisor CPU for 1,000 or 10,000 backends at a 1 s interval on one core: `benchmarks/supervisor_cpu.py`.

Needs root. One run per profile (default: tcp1k, then http1k; `--profile tcp10k`: 10,000 tcp backends) and
check path (`--via`: tunnel, then direct), each in its own namespace lab:

    lb (edge-lb run, pinned to one CPU; XDP generic on eth0) --- veth --- be (10.78.0.0/16 local, one server)

"be" holds every address of 10.78.0.0/16 through one local route (AnyIP), and one selectors-based server on
0.0.0.0:8080 (this file's `_backend` mode) that accepts and closes (tcp) or answers each request with
200 and closes (http), counting what it served and, per backend address, the gap between two checks. The
supervisor runs 10 VIPs x 100 (or x 1,000) backends in 10.78.0.0/16, ring_size 4099 (--ring-size), with
[healthcheck] interval = 1.0, via = tunnel or direct, and the other check settings at their defaults (jitter
0.1: a gap of up to 1.1 s is on time; what is above is lateness). "be" also holds the VIPs 10.79.0.0/24
through a local route. Tunnel checks go to VIP:8080 wrapped in IPIP toward their backend's address
(checkencap.c on lb's eth0, the fwmark route through lb's default route to "be"); "be" strips that with
decap.c (for every backend address: 4,096 at most, so not tcp10k) and answers from the VIP straight back.
A tunnel check arrives at its VIP's address, so the per-backend gaps are measured for direct checks only.

Once status shows every backend up and a settle time has passed, the supervisor's CPU is read from
/proc/<pid>/stat (utime + stime, whole process) over a `--seconds` window: the share of one core it used.
Checks per second are what the backend server counted over the same window; afterwards status must show
every backend up and checked within 2 intervals. Figures are reported, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import select
import selectors
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_lb import paths
from edge_lb.api import sockets
from edge_lb.dataplane.maglev import is_prime
from edge_lb.errors import EdgeLbError
from edge_lb.lab.labs import remove_instance
from edge_lb.lab.netns import Lab, Netns

PY = sys.executable
HERE = Path(__file__).resolve()
VIPS = 10
PROFILES = {"tcp1k": ("tcp", 100), "http1k": ("http", 100), "tcp10k": ("tcp", 1000)}  # -> (kind, per VIP)
RING_SIZE = 4099  # default --ring-size: prime, and Maglev rebuilds 16x cheaper than at the default 65,537
INTERVAL = 1.0
CHECK_PORT = 8080
LB_ADDR, BE_ADDR = "10.80.0.1", "10.80.0.2"  # the veth between the namespaces, a /30
BACKEND_NET = "10.78.0.0/16"
VIP_NET = "10.79.0.0/24"  # the VIPs 10.79.0.1..10
TUNNEL_MAX = 4096  # backends decap.c can decapsulate for (its address map)
UP_BOUND = 240.0  # seconds for the supervisor to start (bcc compiles the balancer) and every backend to rise
SETTLE = 3.0  # seconds after the last backend came up, so start-up flips and ring writes are over
STALE_AFTER = 2 * INTERVAL  # a backend whose last check is older than this when the window ends is stale
ON_TIME = 1.1 * INTERVAL  # the longest gap between two checks of a backend the default jitter (0.1) allows
HTTP_REPLY = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n"


class BenchError(Exception):
    """The lab, the supervisor or the backend server failed: no figures."""


# -- the backend server (`python supervisor_cpu.py _backend --kind tcp|http`), run inside "be"


def serve(kind: str, port: int) -> None:
    """Accept on 0.0.0.0:port until stdin closes; each line on stdin is answered with the counts as JSON."""
    sel = selectors.DefaultSelector()
    listener = socket.create_server(("0.0.0.0", port), backlog=4096)
    listener.setblocking(False)
    sel.register(listener, selectors.EVENT_READ, "listen")
    sel.register(sys.stdin.fileno(), selectors.EVENT_READ, "control")
    counts = {"accepted": 0, "served": 0}
    gaps = Gaps()
    print(json.dumps({"ready": True}), flush=True)
    while True:
        for key, _ in sel.select():
            if key.data == "listen":
                _accept(sel, listener, kind, counts, gaps)
            elif key.data == "control":
                if not _answer_control(counts, gaps):
                    return
            elif isinstance(key.fileobj, socket.socket):
                _read_request(sel, key.fileobj, key.data, counts)


@dataclass
class Gaps:
    """Per backend address (the local address a check dialled), the seconds between two checks' accepts."""

    last: dict[str, float] = field(default_factory=dict)
    seen: list[float] = field(default_factory=list)  # gaps since the last report

    def accepted(self, conn: socket.socket) -> None:
        now, address = time.monotonic(), conn.getsockname()[0]
        before = self.last.get(address)
        self.last[address] = now
        if before is not None:
            self.seen.append(now - before)

    def report(self) -> dict[str, float | int]:
        gaps, self.seen = sorted(self.seen), []
        if not gaps:
            return {"gaps": 0}
        def pct(p: float) -> float:
            return gaps[min(len(gaps) - 1, int(p * len(gaps)))]
        # lateness of a gap: how far past ON_TIME it ended (0 when on time); percentiles over every gap
        return {"gaps": len(gaps), "gap_p50_s": pct(0.5), "gap_p99_s": pct(0.99), "gap_max_s": gaps[-1],
                "late": sum(g > ON_TIME for g in gaps), "late_over_2x": sum(g > STALE_AFTER for g in gaps),
                "lateness_p50_s": max(0.0, pct(0.5) - ON_TIME),
                "lateness_p99_s": max(0.0, pct(0.99) - ON_TIME),
                "lateness_max_s": max(0.0, gaps[-1] - ON_TIME)}


def _accept(sel: selectors.BaseSelector, listener: socket.socket, kind: str, counts: dict[str, int],
            gaps: Gaps) -> None:
    while True:
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            return
        counts["accepted"] += 1
        gaps.accepted(conn)
        if kind == "tcp":
            conn.close()
            counts["served"] += 1
        else:
            conn.setblocking(False)
            sel.register(conn, selectors.EVENT_READ, bytearray())


def _read_request(sel: selectors.BaseSelector, conn: socket.socket, buf: bytearray,
                  counts: dict[str, int]) -> None:
    try:
        chunk = conn.recv(4096)
    except OSError:
        chunk = b""
    buf += chunk
    if chunk and b"\r\n\r\n" not in buf:
        return
    if chunk:
        with contextlib.suppress(OSError):
            conn.send(HTTP_REPLY)
        counts["served"] += 1
    sel.unregister(conn)
    conn.close()


def _answer_control(counts: dict[str, int], gaps: Gaps) -> bool:
    """"count": the counts (and the gaps since the last count, which also starts a new window)."""
    if not os.read(sys.stdin.fileno(), 4096):
        return False
    print(json.dumps(counts | {"time": time.monotonic()} | gaps.report()), flush=True)
    return True


# -- the lab


@dataclass
class CpuLab:
    lab: Lab
    kind: str
    per_vip: int
    cpu: int
    ring_size: int
    via: str = "direct"
    lb: Netns | None = None
    be: Netns | None = None
    server: subprocess.Popen[str] | None = None
    supervisor: subprocess.Popen[bytes] | None = None

    @property
    def instance(self) -> str:
        return f"{self.lab.id}{self.kind}{self.per_vip}{self.via[0]}"

    @property
    def config_path(self) -> Path:
        return self.lab.tmpdir / "lb.toml"

    def build(self) -> None:
        self.lb, self.be = self.lab.netns("lb"), self.lab.netns("be")
        self.lab.veth(self.lb, "eth0", self.be, "eth0")
        self.lb.addr("eth0", f"{LB_ADDR}/30")
        self.be.addr("eth0", f"{BE_ADDR}/30")
        self.lb.route("default", via=BE_ADDR)  # also the tunnel checks' policy route (checkencap.py)
        self.be.ip("route", "add", "local", BACKEND_NET, "dev", "lo")  # every 10.78.x.y is "be"'s own
        self.be.ip("route", "add", "local", VIP_NET, "dev", "lo")  # and every VIP: "be" is each backend
        if self.via == "tunnel":  # decap.c for the backends' addresses, the outer destinations
            addresses = [a for i in range(VIPS * self.per_vip) for a in ("--address", backend_address(i))]
            self.be.run([PY, "-m", "edge_lb.dataplane.decap", "attach", "--interface", "eth0", *addresses],
                        timeout=180)
        others = ",".join(str(c) for c in sorted(os.sched_getaffinity(0)) if c != self.cpu) or str(self.cpu)
        argv = [PY, str(HERE), "_backend", "--kind", self.kind, "--port", str(CHECK_PORT)]
        self.server = self.be.interactive(["taskset", "-c", others, *argv], self.lab.tmpdir / "backend.log")
        self._server_line(30.0)  # its first line says it listens

    def server_counts(self) -> dict[str, Any]:
        """The backend server's counts: {"accepted", "served", "time" (its monotonic clock)}."""
        assert self.server is not None and self.server.stdin is not None
        self.server.stdin.write("count\n")
        self.server.stdin.flush()
        return self._server_line(10.0)

    def _server_line(self, timeout: float) -> dict[str, Any]:
        proc = self.server
        assert proc is not None and proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        line = proc.stdout.readline() if ready else ""
        if not line:
            raise BenchError(f"the backend server gave no answer within {timeout:g} s (exit {proc.poll()})")
        doc: dict[str, Any] = json.loads(line)
        return doc

    def gateway_mac(self) -> str:
        assert self.be is not None
        link = json.loads(self.be.ip("-j", "link", "show", "eth0").stdout)
        return str(link[0]["address"])

    def config_text(self) -> str:
        head = (f'[node]\ninterface = "eth0"\ngateway_mac = "{self.gateway_mac()}"\n\n'
                f'[dataplane]\ninstance = "{self.instance}"\nring_size = {self.ring_size}\n'
                f'conn_table_size = 65536\nmax_vips = 16\nmax_backends = {max_backends(self.per_vip)}\n'
                f'xdp_mode = "generic"\n\n'
                f'[healthcheck]\ntype = "{self.kind}"\nport = {CHECK_PORT}\ninterval = {INTERVAL}\n'
                f'via = "{self.via}"\n')
        vips = []
        for v in range(VIPS):
            backends = "".join(f'  [[vip.backend]]\n  address = "{backend_address(v * self.per_vip + b)}"\n'
                               for b in range(self.per_vip))
            vips.append(f'\n[[vip]]\naddress = "10.79.0.{v + 1}"\nport = 80\nprotocol = "tcp"\n{backends}')
        return head + "".join(vips)

    def start_supervisor(self) -> int:
        assert self.lb is not None
        self.config_path.write_text(self.config_text())
        argv = ["taskset", "-c", str(self.cpu), PY, "-m", "edge_lb", "run", "-c", str(self.config_path)]
        # nsenter and taskset both exec: the PID is the supervisor's own.
        self.supervisor = self.lb.spawn(argv, self.lab.tmpdir / "supervisor.log", host_mounts=True)
        return self.supervisor.pid

    def all_up(self, doc: dict[str, Any]) -> bool:
        rows = backends_of(doc)
        return doc.get("phase") == "running" and len(rows) == VIPS * self.per_vip and all(
            b["state"] == "up" for b in rows)

    def status(self) -> dict[str, Any]:
        """{"phase": the node's, "vips": every VIP with its backends}, from the API over the Unix socket."""
        async def get(url: str) -> Any:
            code, doc = await sockets.request(paths.socket(self.instance), "GET", url, None, 30)
            if code != 200:
                raise BenchError(f"GET {url} answered HTTP {code}")
            return doc
        return {"phase": asyncio.run(get("/api/v1/node"))["phase"], "vips": asyncio.run(get("/api/v1/vips"))}

    def wait_all_up(self) -> float:
        """Seconds from start until status shows every backend up."""
        start = time.monotonic()
        while time.monotonic() - start < UP_BOUND:
            self.check_alive()
            with contextlib.suppress(EdgeLbError):
                if paths.socket(self.instance).exists() and self.all_up(self.status()):
                    return time.monotonic() - start
            time.sleep(1.0)
        raise BenchError(f"not every backend up within {UP_BOUND:g} s")

    def check_alive(self) -> None:
        if self.supervisor is not None and self.supervisor.poll() is not None:
            raise BenchError(f"edge-lb run exited with {self.supervisor.returncode}")

    def log_tail(self) -> str:
        path = self.lab.tmpdir / "supervisor.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def close(self) -> None:
        remove_instance(self.supervisor, self.instance)


def backends_of(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [b for vip in doc["vips"] for b in vip["backends"]]


def backend_address(i: int) -> str:
    """The i-th backend: 10.78.0.1 .. 10.78.0.250, 10.78.1.1, ... (10,000 fit in 10.78.0.0/16)."""
    return f"10.78.{i // 250}.{i % 250 + 1}"


def max_backends(per_vip: int) -> int:
    """A power of two above every backend plus the reserved slot 0."""
    size = 1024
    while size <= VIPS * per_vip:
        size *= 2
    return size


# -- /proc


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def check_is_supervisor(pid: int) -> None:
    """nsenter and taskset exec what they run, so the spawned PID must by now be `python -m edge_lb run`."""
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    if b"edge_lb" not in argv or b"run" not in argv:
        raise BenchError(f"pid {pid} is not the supervisor: {b' '.join(argv).decode(errors='replace')}")


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM in KiB, and the thread count, from /proc/<pid>/status."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "Threads"):
            out[key] = int(value.split()[0])
    return out


# -- one measurement


def window(cl: CpuLab, pid: int, seconds: float) -> dict[str, Any]:
    """CPU and checks served over `seconds`, then freshness from status."""
    counts0, cpu0, wall0 = cl.server_counts(), cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    cpu1, wall1, counts1 = cpu_seconds(pid), time.monotonic(), cl.server_counts()
    cl.check_alive()
    doc, now = cl.status(), time.time()
    rows = backends_of(doc)
    ages = [now - b["last_check"] for b in rows if b["last_check"] is not None]
    served = counts1["served"] - counts0["served"]
    gaps = {k: v for k, v in counts1.items() if k.startswith(("gap", "late"))}  # over the window only
    server_s = counts1["time"] - counts0["time"]
    return {"window_s": wall1 - wall0, "cpu_s": cpu1 - cpu0,
            "cpu_pct_of_one_core": 100 * (cpu1 - cpu0) / (wall1 - wall0),
            "checks_per_s": served / server_s,
            "accepted_per_s": (counts1["accepted"] - counts0["accepted"]) / server_s,
            "backends": len(rows), "up": sum(b["state"] == "up" for b in rows),
            "never_checked": len(rows) - len(ages), "stale": sum(a > STALE_AFTER for a in ages),
            "max_check_age_s": max(ages, default=float("nan"))} | gaps


def measure(profile: str, via: str, seconds: float, cpu: int, ring_size: int) -> dict[str, Any]:
    kind, per_vip = PROFILES[profile]
    if via == "tunnel" and VIPS * per_vip > TUNNEL_MAX:
        raise BenchError(f"{profile} via tunnel: decap.c on 'be' takes {TUNNEL_MAX} backend addresses")
    with Lab(prefix="scpu") as lab:
        cl = CpuLab(lab, kind, per_vip, cpu, ring_size, via)
        try:
            cl.build()
            pid = cl.start_supervisor()
            ready_s = cl.wait_all_up()
            check_is_supervisor(pid)
            time.sleep(SETTLE)
            result = {"profile": profile, "type": kind, "via": via, "pid": pid, "ready_s": ready_s}
            result |= window(cl, pid, seconds)
            if via == "tunnel":  # every check of a VIP arrives at the VIP's address: no per-backend gaps
                result = {k: v for k, v in result.items() if not k.startswith(("gap", "late"))}
            mem = proc_status(pid)
        except (EdgeLbError, BenchError, OSError) as exc:
            tail = cl.log_tail()
            raise BenchError(f"{profile} via {via}: {exc}\n--- supervisor.log (tail) ---\n{tail}") from exc
        finally:
            cl.close()
    return result | {"rss_mib": mem["VmRSS"] / 1024, "peak_rss_mib": mem["VmHWM"] / 1024,
                     "threads": mem["Threads"]}


def render(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    head = (f"{'profile':<7} {'via':<6} {'backends':>8} {'up':>6} {'CPU % 1 core':>12} {'checks/s':>9} "
            f"{'want/s':>7} {'stale':>5} {'gap p50/p99/max s':>18} {'late':>6} {'RSS MiB':>8} "
            f"{'peak MiB':>8} {'ready s':>7}")
    lines = [head, "-" * len(head)]
    for r in results:
        gaps = (f"{r['gap_p50_s']:.2f}/{r['gap_p99_s']:.2f}/{r['gap_max_s']:.2f}" if "gap_p50_s" in r
                else "-")
        lines.append(
            f"{r['profile']:<7} {r['via']:<6} {r['backends']:>8} {r['up']:>6} "
            f"{r['cpu_pct_of_one_core']:>12.1f} {r['checks_per_s']:>9.1f} {r['backends'] / INTERVAL:>7.0f} "
            f"{r['stale']:>5} {gaps:>18} "
            f"{r.get('late', '-'):>6} {r['rss_mib']:>8.1f} {r['peak_rss_mib']:>8.1f} {r['ready_s']:>7.1f}")
    lines.append(f"{VIPS} VIPs, interval {INTERVAL:g} s, ring_size {args.ring_size}, "
                 f"XDP generic; supervisor pinned to CPU {args.cpu}; CPU = utime+stime over a "
                 f"{args.seconds:g} s window.")
    lines.append("checks/s = connections the backend server answered in the window; stale = last check "
                 f"older than {STALE_AFTER:g} s when the window ended;\n"
                 f"gap = seconds between two checks of one backend address in the window; late = gaps over "
                 f"{ON_TIME:g} s (interval + 10% jitter).")
    return "\n".join(lines)


def serve_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="supervisor_cpu.py _backend",
                                     description="(internal) the lab's backend server")
    parser.add_argument("--kind", choices=("tcp", "http"), required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    serve(args.kind, args.port)
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["_backend"]:
        return serve_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="one JSON document")
    parser.add_argument("--seconds", type=float, default=30.0, help="measurement window (default 30)")
    parser.add_argument("--cpu", type=int, default=max(os.sched_getaffinity(0)),
                        help="the CPU the supervisor is pinned to (default: the highest usable)")
    parser.add_argument("--profile", action="append", choices=sorted(PROFILES),
                        help="tcp1k, http1k (the default: both) or tcp10k; repeatable")
    parser.add_argument("--via", default="tunnel,direct",
                        help="check paths to measure, comma-separated (default tunnel,direct)")
    parser.add_argument("--ring-size", type=int, default=RING_SIZE,
                        help=f"Maglev slots per VIP, prime (default {RING_SIZE})")
    args = parser.parse_args(argv)
    if args.seconds <= 0:
        parser.error("--seconds must be positive")
    if args.cpu not in os.sched_getaffinity(0):
        parser.error(f"--cpu {args.cpu}: not one of the CPUs this process may use")
    vias = args.via.split(",")
    if any(v not in ("tunnel", "direct") for v in vias):
        parser.error("--via: tunnel and/or direct, comma-separated")
    if not is_prime(args.ring_size) or not 1009 <= args.ring_size <= 1_000_003:
        parser.error("--ring-size must be a prime 1009..1000003")
    try:
        results = [measure(profile, via, args.seconds, args.cpu, args.ring_size)
                   for profile in args.profile or ("tcp1k", "http1k") for via in vias]
    except BenchError as exc:
        print(f"supervisor_cpu: {exc}", file=sys.stderr)
        return 1
    doc = {"vips": VIPS, "interval_s": INTERVAL, "ring_size": args.ring_size,
           "cpu": args.cpu, "seconds": args.seconds, "runs": results}
    print(json.dumps(doc, indent=2) if args.json else render(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
