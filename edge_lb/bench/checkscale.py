"""Issue 13, item 4 (health checks at scale): the supervisor's CPU for 1,000 or 10,000 backends at a 1 s
interval on one core, and whether every backend was checked on time (root, namespace lab).

One run per profile and check path (`via`), each in its own lab:

    lb (edge-lb run, pinned to one CPU; XDP generic on eth0) --- veth --- be (10.78.0.0/16 local, one server)

"be" holds every address of 10.78.0.0/16 through one local route (AnyIP) and runs edge_lb/bench/checkserver.py
on 0.0.0.0:8080 (on the other CPUs). The supervisor runs 10 VIPs x 100 (or x 1,000) backends in
10.78.0.0/16, ring_size 4099 by default, [healthcheck] interval = 1.0, via = tunnel or direct, the other
check settings at their defaults (jitter 0.1: a gap of up to 1.1 s is on time). "be" also holds the VIPs
10.79.0.0/24. Tunnel checks go to VIP:8080 wrapped in IPIP toward their backend's address (checkencap.c on
lb's eth0, the fwmark route through lb's default route to "be"); "be" strips that with decap.c (4,096 backend
addresses at most, so not tcp10k) and answers from the VIP straight back; per-backend gaps are measured for
direct checks only.

Once status shows every backend up and SETTLE s more, the supervisor's utime + stime (/proc/<pid>/stat) is
read over a window: the share of one core it used. Checks per second are what the server counted over the
same window; afterwards status must show every backend up and checked within 2 intervals (`stale` counts
those that were not). `edge-lb bench --checks` and benchmarks/supervisor_cpu.py both measure through here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_lb import paths
from edge_lb.api import sockets
from edge_lb.bench.checkserver import INTERVAL, STALE_AFTER
from edge_lb.errors import BenchError, EdgeLbError
from edge_lb.lab.labs import remove_instance
from edge_lb.lab.netns import Lab, Netns

PY = sys.executable
VIPS = 10
PROFILES = {"tcp1k": ("tcp", 100), "http1k": ("http", 100), "tcp10k": ("tcp", 1000)}  # -> (kind, per VIP)
RING_SIZE = 4099  # prime, and Maglev rebuilds 16x cheaper than at the default 65,537
CHECK_PORT = 8080
LB_ADDR, BE_ADDR = "10.80.0.1", "10.80.0.2"  # the veth between the namespaces, a /30
BACKEND_NET = "10.78.0.0/16"
VIP_NET = "10.79.0.0/24"  # the VIPs 10.79.0.1..10
TUNNEL_MAX = 4096  # backends decap.c can decapsulate for (its address map)
UP_BOUND = 240.0  # seconds for the supervisor to start (bcc compiles the balancer) and every backend to rise
SETTLE = 3.0  # seconds after the last backend came up, so start-up flips and ring writes are over


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
        argv = [PY, "-m", "edge_lb.bench.checkserver", "--kind", self.kind, "--port", str(CHECK_PORT)]
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
            "max_check_age_s": max(ages, default=None)} | gaps


def measure(profile: str, via: str, seconds: float, cpu: int, ring_size: int = RING_SIZE) -> dict[str, Any]:
    """One profile's figures: CPU % of a core, checks/s, stale, gaps (direct), RSS, ready_s."""
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
        except (EdgeLbError, OSError) as exc:
            tail = cl.log_tail()
            raise BenchError(f"{profile} via {via}: {exc}\n--- supervisor.log (tail) ---\n{tail}") from exc
        finally:
            cl.close()
    return result | {"rss_mib": mem["VmRSS"] / 1024, "peak_rss_mib": mem["VmHWM"] / 1024,
                     "threads": mem["Threads"]}
