"""The labs' backends set up as an operator sets one up: `edge-lb backend setup` in the backend's namespace.

    setup_backends(servers, ["10.77.100.1"])              every backend at once (each compiles decap.c)
    backend_argv(server, "check", [VIP], "--json")         any `edge-lb backend` command for one of them

Each backend's state file lives in the lab's tmpdir, so it goes with the lab.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from edge_lb.errors import LabError

if TYPE_CHECKING:
    from edge_lb.lab.labs import Node


def backend_state(server: Node) -> Path:
    """Where the lab's `edge-lb backend setup` of `server` records its changes (gone with the lab)."""
    return server.ns.lab.tmpdir / f"backend-{server.ns.name}.json"


def backend_argv(server: Node, command: str, vips: list[str], *extra: str) -> list[str]:
    """`edge-lb backend COMMAND` for `server`'s eth0 (its state file in the lab's tmpdir)."""
    argv = [sys.executable, "-m", "edge_lb", "backend", command, *(a for v in vips for a in ("--vip", v))]
    if command != "teardown":
        argv += ["--interface", "eth0"]
    if command != "check":
        argv += ["--state", str(backend_state(server))]
    return [*argv, *extra]


def setup_backends(servers: list[Node], vips: list[str], overhead: int | None = None,
                   timeout: float = 120.0) -> None:
    """`edge-lb backend setup --mode xdp` in each backend's namespace, all at once (each compiles decap.c):
    the VIPs on lo, ARP and rp_filter settings, decap.c on eth0 (for eth0's addresses, IPv4 and IPv6), the
    advertised MSS lowered on the route the replies take. The same code an operator runs on a backend."""
    extra = ["--mode", "xdp", *(["--overhead", str(overhead)] if overhead is not None else [])]
    procs = [(s, subprocess.Popen([*s.ns.prefix(), *backend_argv(s, "setup", vips, *extra)], text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT)) for s in servers]
    deadline = time.monotonic() + timeout
    failed = []
    for server, proc in procs:
        try:
            out, _ = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        if proc.returncode != 0:
            failed.append(f"{server.ns.name}: exit {proc.returncode}: {out.strip()}")
    if failed:
        raise LabError("edge-lb backend setup failed: " + "; ".join(failed))
