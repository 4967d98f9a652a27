"""The data-plane lab: a client, a router, one LB node and three backends, each in its own namespace.

    client --- router --- lb        (XDP balancer on lb's veth; router's VIP route points at it)
                 |  \\
                b1  b2  b3          (`edge-lb backend setup`: decap.c on each veth, the VIP on lo, ARP,
                                     rp_filter, MSS; an HTTP server on VIP:80)

Replies go backend -> router -> client and never cross the LB (direct server return).
All addresses live inside the lab's namespaces (10.77.0.0/16).

With ipv6=True every link also gets a /64 (fd00:77:NET::/64, the router ::1, the node ::2; no DAD), the
router forwards IPv6, and the LB serves two more VIPs with the backends' IPv6 addresses: VIP6 (IP6IP6) and
VIP4_OVER_V6 (an IPv4 VIP, 4in6); the outer IPv6 sources (ENCAP_PREFIX_V6) are routed back to the LB.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_lb import paths
from edge_lb.api import sockets
from edge_lb.dataplane import bpfsys
from edge_lb.dataplane.counters import reason_names
from edge_lb.dataplane.loader import remove_pins
from edge_lb.errors import EdgeLbError, LabError
from edge_lb.lab.labbackend import setup_backends
from edge_lb.lab.netns import Lab, Netns

VIP = "10.77.100.1"
VIP_PORT = 80
ENCAP_PREFIX = "10.77.200.0/24"  # outer sources; the router routes them back towards the LB
VIP6 = "fd00:77:100::1"  # ipv6 labs: an IPv6 VIP with IPv6 backends (IP6IP6)
VIP4_OVER_V6 = "10.77.100.2"  # ipv6 labs: an IPv4 VIP with IPv6 backends (4in6)
ENCAP_PREFIX_V6 = "fd00:77:200::/64"
PY = sys.executable


@dataclass
class Node:
    ns: Netns
    address: str  # its address on the link to the router
    router_if: str  # the router's end of that link
    address6: str | None = None  # its IPv6 address on that link (ipv6 labs)


@dataclass
class DataplaneLab:
    lab: Lab
    backends: int = 3
    ipv6: bool = False  # dual-stack links and the IPv6-backend VIPs (module docstring)
    backend_overhead: int | None = None  # `backend setup --overhead` (0: MSS not lowered); None: its default
    client: Node | None = None
    router: Netns | None = None
    lb: Node | None = None
    servers: list[Node] = field(default_factory=list)
    http: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)  # role -> its HTTP server
    supervisor: subprocess.Popen[bytes] | None = None

    @property
    def instance(self) -> str:
        return f"lab{self.lab.id}"

    def build(self) -> None:
        self.router = self.lab.netns("rt")
        self.router.sysctl("net.ipv4.ip_forward", 1)
        self.router.sysctl("net.ipv4.conf.all.rp_filter", 0)
        if self.ipv6:
            no_dad(self.router)
            self.router.sysctl("net.ipv6.conf.all.forwarding", 1)
        self.client = self._link("cl", 1)
        # veth hands packets on with checksums left to "offload"; a packet the LB re-builds in XDP loses that
        # promise and the backend would drop it (TcpInCsumErrors). A real NIC computes them: do so here too.
        self.client.ns.run(["ethtool", "-K", "eth0", "tx", "off"])
        self.lb = self._link("lb", 2)
        self.servers = [self._link(f"b{i + 1}", 10 + i) for i in range(self.backends)]
        self.router.route(f"{VIP}/32", via=self.lb.address)
        self.router.route(ENCAP_PREFIX, via=self.lb.address)
        if self.ipv6:
            assert self.lb.address6 is not None
            self.router.route(f"{VIP6}/128", via=self.lb.address6)
            self.router.route(f"{VIP4_OVER_V6}/32", via=self.lb.address)
            self.router.route(ENCAP_PREFIX_V6, via=self.lb.address6)
        setup_backends(self.servers, self.vips, self.backend_overhead)
        for server in self.servers:
            self.http[role_of(server)] = spawn_http(server, VIP_PORT, "::" if self.ipv6 else "0.0.0.0")

    def _link(self, role: str, net: int) -> Node:
        assert self.router is not None
        return router_link(self.lab, self.router, role, f"10.77.{net}",
                           f"fd00:77:{net}:" if self.ipv6 else None)

    @property
    def vips(self) -> list[str]:
        """Every VIP address the backends hold on lo."""
        return [VIP, VIP6, VIP4_OVER_V6] if self.ipv6 else [VIP]

    def start_http(self, role: str) -> None:
        """The backend's HTTP server on every address: the VIP (clients) and its own (health checks)."""
        self.http[role] = spawn_http(self.server(role), VIP_PORT, "::" if self.ipv6 else "0.0.0.0")

    def stop_http(self, role: str) -> None:
        """Kill the backend's HTTP server: connections to it are refused from now on."""
        stop_http(self.http.pop(role))

    def server(self, role: str) -> Node:
        return next(s for s in self.servers if role_of(s) == role)

    def config_text_v6(self, check: str = "") -> str:
        """The ipv6 lab's LB config: VIP6 and VIP4_OVER_V6, each with every backend's IPv6 address."""
        assert self.ipv6
        backends = "".join(f'  [[vip.backend]]\n  address = "{s.address6}"\n' for s in self.servers)
        vips = "".join(f'[[vip]]\naddress = "{vip}"\nport = {VIP_PORT}\nprotocol = "tcp"\n'
                       f'  [vip.healthcheck]\n{check}\n{backends}\n' for vip in (VIP6, VIP4_OVER_V6))
        return (f'[node]\ninterface = "eth0"\n\n[dataplane]\ninstance = "{self.instance}"\n'
                f'conn_table_size = 65536\nmax_vips = 4\nmax_backends = 64\n'
                f'encap_src_v4 = "{ENCAP_PREFIX}"\nencap_src_v6 = "{ENCAP_PREFIX_V6}"\n\n{vips}')

    def config_text(self, weights: dict[str, int] | None = None, roles: list[str] | None = None,
                    check: str = "") -> str:
        """The LB config: the VIP with the given backends (default all), weights, and check settings
        (TOML lines for [vip.healthcheck])."""
        assert self.lb is not None
        weights = weights or {}
        chosen = [s for s in self.servers if roles is None or role_of(s) in roles]
        backends = "".join(f'  [[vip.backend]]\n  address = "{s.address}"\n'
                           f'  weight = {weights.get(role_of(s), 1)}\n'
                           for s in chosen)
        return (f'[node]\ninterface = "eth0"\n\n[dataplane]\ninstance = "{self.instance}"\n'
                f'conn_table_size = 65536\nmax_vips = 4\nmax_backends = 64\n'
                f'encap_src_v4 = "{ENCAP_PREFIX}"\n\n'
                f'[[vip]]\naddress = "{VIP}"\nport = {VIP_PORT}\nprotocol = "tcp"\n'
                f'  [vip.healthcheck]\n{check}\n{backends}')

    @property
    def config_path(self) -> Path:
        return self.lab.tmpdir / "lb.toml"

    def prepare_lb(self) -> None:
        """The router's peer of the LB link runs an XDP program (veth XDP_TX needs one); the LB's neighbour
        entry for the router is filled."""
        assert self.lb is not None and self.router is not None
        self.router.run([PY, "-m", "edge_lb.lab.labtools", "attach-pass", self.lb.router_if], timeout=120)
        self.lb.ns.run(["ping", "-c", "1", "-W", "2", "10.77.2.1"])
        if self.ipv6:  # the router's IPv6 neighbour entry too (the gateway MAC is the IPv4 one's, the same)
            self.lb.ns.run(["ping", "-6", "-c", "1", "-W", "2", "fd00:77:2::1"])

    def start_supervisor(self, timeout: float = 120.0) -> subprocess.Popen[bytes]:
        """`edge-lb run` in the LB namespace (host mounts: bpffs and /run); returns once it answers status."""
        assert self.lb is not None
        log_path = self.lab.tmpdir / "supervisor.log"
        self.supervisor = spawn_supervisor(self.lb.ns, self.config_path, log_path)
        wait_supervisor(self.supervisor, self.instance, log_path, timeout)
        return self.supervisor

    def reload(self) -> str:
        """`edge-lb reload -c CONFIG`: the CLI's one-line answer."""
        out = subprocess.run([PY, "-m", "edge_lb", "reload", "-c", str(self.config_path)],
                             capture_output=True, text=True, timeout=60, check=False)
        if out.returncode != 0:
            raise LabError(f"edge-lb reload: exit {out.returncode}: {out.stderr.strip()}")
        return out.stdout.strip()

    def supervisor_log(self) -> str:
        return (self.lab.tmpdir / "supervisor.log").read_text(errors="replace")

    def status(self) -> dict[str, Any]:
        return supervisor_status(self.instance)

    def backend_states(self) -> dict[str, tuple[str, int]]:
        """role -> (state, ring slots) of the lab VIP's backends, from the supervisor."""
        roles = {s.address: role_of(s) for s in self.servers}
        vip = self.status()["vips"][0]
        return {roles[b["address"]]: (b["state"], b["ring_slots"]) for b in vip["backends"]}

    def load_balancer(self, weights: dict[str, int] | None = None) -> str:
        """Attach the balancer in the LB namespace with `edge-lb load` (gateway MAC from the kernel)."""
        assert self.lb is not None
        self.prepare_lb()
        cfg = self.config_path
        cfg.write_text(self.config_text(weights))
        return self.lb.ns.run([PY, "-m", "edge_lb", "load", "-c", str(cfg)], timeout=180,
                              host_mounts=True).stdout.strip()

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Until every backend's HTTP server answers on every VIP from inside its own namespace."""
        for vip in self.vips:
            wait_http_ready(self.servers, vip, VIP_PORT, timeout)

    def http_get(self, count: int, vip: str = VIP) -> dict[str, Any]:
        assert self.client is not None
        return http_get(self.client.ns, vip, VIP_PORT, count)

    def hold(self, count: int) -> Holder:
        assert self.client is not None
        return Holder(self.client.ns, self.lab.tmpdir / "hold.log", VIP, VIP_PORT, count)

    def lb_reasons(self) -> dict[str, int]:
        names = reason_names()
        counts = bpfsys.pinned_counters(paths.pins(self.instance) / "reason_stats", len(names))
        return {names[i]: pk for i, (pk, _) in enumerate(counts)}

    def close(self) -> None:
        remove_instance(self.supervisor, self.instance)


def role_of(node: Node) -> str:
    """The role part of a lab namespace name: "b2" of "elbt1a2b3c-b2"."""
    return node.ns.name.rsplit("-", 1)[1]


def spawn_http(server: Node, port: int, bind: str = "0.0.0.0") -> subprocess.Popen[bytes]:
    """The backend's HTTP server on every address: the VIP (clients) and its own (health checks); the body
    names the backend. bind="::" listens on both families (net.ipv6.bindv6only is 0 in a new namespace)."""
    role = role_of(server)
    return server.ns.spawn(
        [PY, "-m", "edge_lb.lab.labhttp", "--bind", bind, "--port", str(port), "--name", role],
        server.ns.lab.tmpdir / f"http-{role}.log")


def stop_http(proc: subprocess.Popen[bytes]) -> None:
    """Kill a backend's HTTP server: connections to it are refused from now on."""
    proc.kill()
    proc.wait(timeout=5)


def wait_http_ready(servers: list[Node], vip: str, port: int, timeout: float = 20.0) -> None:
    """Until every backend's HTTP server answers on the VIP from inside its own namespace."""
    probe_src = (f"import socket; s=socket.create_connection(('{vip}', {port}), 1); "
                 "s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n'); assert s.recv(64)")
    deadline = time.monotonic() + timeout
    for server in servers:
        while True:
            probe = server.ns.run([PY, "-c", probe_src], check=False, timeout=5)
            if probe.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise LabError(f"backend {server.ns.name}: HTTP server not up within {timeout} s")
            time.sleep(0.2)


def http_get(client: Netns, vip: str, port: int, count: int) -> dict[str, Any]:
    """`count` fresh HTTP connections from `client` to the VIP: {"served": {backend: n}, "failures": n,
    "errors": [first few]}."""
    host = f"[{vip}]" if ipaddress.ip_address(vip).version == 6 else vip
    out = client.run([PY, "-m", "edge_lb.lab.labtools", "http-get", f"http://{host}:{port}/",
                      "--count", str(count)], timeout=30 + count)
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def spawn_supervisor(ns: Netns, config: Path, log_path: Path) -> subprocess.Popen[bytes]:
    """`edge-lb run -c CONFIG` in `ns` (host mounts: bpffs and /run), output to `log_path`."""
    return ns.spawn([PY, "-m", "edge_lb", "run", "-c", str(config)], log_path, host_mounts=True)


def wait_supervisor(proc: subprocess.Popen[bytes], instance: str, log_path: Path,
                    timeout: float = 120.0) -> None:
    """Until the supervisor's status answers with phase "running"; LabError (with the log's tail) if it
    exits or stays silent for `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise LabError(f"edge-lb run exited with {proc.returncode}: {_tail(log_path)}")
        if paths.socket(instance).exists():
            with contextlib.suppress(EdgeLbError):
                if supervisor_status(instance).get("phase") == "running":
                    return
        time.sleep(0.2)
    raise LabError(f"edge-lb run did not answer within {timeout} s: {_tail(log_path)}")


def supervisor_status(instance: str) -> dict[str, Any]:
    """The node and VIP documents of the supervisor of `instance` (its REST API over the Unix socket)."""
    return asyncio.run(sockets.status_doc(paths.socket(instance), 10))


def _tail(path: Path, chars: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError as exc:
        return f"(no log: {exc})"


def router_link(lab: Lab, router: Netns, role: str, net: str, net6: str | None = None) -> Node:
    """Namespace `role` with eth0 = NET.2/24 on a veth to the router (r-ROLE = NET.1), its default route.
    With `net6` ("fd00:77:1:"): also NET6:2/64 (the router NET6:1), its IPv6 default route, no DAD."""
    ns = lab.netns(role)
    if net6 is not None:
        no_dad(ns)  # before the veth: its link-local address is usable at once too
    lab.veth(ns, "eth0", router, f"r-{role}")
    ns.addr("eth0", f"{net}.2/24")
    router.addr(f"r-{role}", f"{net}.1/24")
    ns.route("default", via=f"{net}.1")
    if net6 is None:
        return Node(ns, f"{net}.2", f"r-{role}")
    ns.addr("eth0", f"{net6}:2/64")
    router.addr(f"r-{role}", f"{net6}:1/64")
    ns.route("default", via=f"{net6}:1")
    return Node(ns, f"{net}.2", f"r-{role}", f"{net6}:2")


def no_dad(ns: Netns) -> None:
    """No IPv6 duplicate address detection in `ns` for interfaces made from now on (and lo): addresses,
    link-local ones included, are usable at once instead of "tentative" for a second or two."""
    for conf in ("all", "default"):
        ns.sysctl(f"net.ipv6.conf.{conf}.accept_dad", 0)


def remove_instance(supervisor: subprocess.Popen[bytes] | None, instance: str) -> None:
    """Stop a lab's supervisor (SIGTERM, bounded) and remove its control socket and pinned maps."""
    if supervisor is not None and supervisor.poll() is None:
        supervisor.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            supervisor.wait(timeout=15)
    with contextlib.suppress(FileNotFoundError):
        paths.socket(instance).unlink()
    paths.lock(instance).unlink(missing_ok=True)  # the instance lock's file (its lock died with its holder)
    shutil.rmtree(paths.exabgp_run(instance), ignore_errors=True)  # ExaBGP's config and log
    with contextlib.suppress(FileNotFoundError):
        paths.weights(instance).unlink()  # runtime weights set through the API
    remove_pins(instance)


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> float:
    """Seconds until cond() holds (polled every 20 ms); LabError after `timeout`."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():
            return time.monotonic() - t0
        time.sleep(0.02)
    raise LabError(f"not within {timeout} s: {what}")


class Holder:
    """The client holding long-lived connections through the LB (`labtools hold`): each round sends one
    request on every connection, never reconnecting, and returns who served each (or "error: ...")."""

    def __init__(self, client: Netns, log_path: Path, vip: str, port: int, count: int) -> None:
        self.proc = client.interactive(
            [PY, "-m", "edge_lb.lab.labtools", "hold", vip, str(port), "--count", str(count)], log_path)

    def round(self, timeout: float = 30.0) -> list[str]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise LabError(f"the holding client gave no answer within {timeout} s")
        line = self.proc.stdout.readline()
        if not line:
            raise LabError(f"the holding client exited ({self.proc.poll()})")
        served: list[str] = json.loads(line)
        return served
