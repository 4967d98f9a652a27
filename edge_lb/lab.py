"""The data-plane lab: a client, a router, one LB node and three backends, each in its own namespace.

    client --- router --- lb        (XDP balancer on lb's veth; router's VIP route points at it)
                 |  \\
                b1  b2  b3          (decap.c on each veth, the VIP on lo, an HTTP server on VIP:80)

Replies go backend -> router -> client and never cross the LB (direct server return).
All addresses live inside the lab's namespaces (10.77.0.0/16).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from edge_lb import bpfsys
from edge_lb.dataplane import pin_dir, remove_pins
from edge_lb.errors import LabError
from edge_lb.netns import Lab, Netns
from edge_lb.stats import reason_names

VIP = "10.77.100.1"
VIP_PORT = 80
ENCAP_PREFIX = "10.77.200.0/24"  # outer sources; the router routes them back towards the LB
PY = sys.executable


@dataclass
class Node:
    ns: Netns
    address: str  # its address on the link to the router
    router_if: str  # the router's end of that link


@dataclass
class DataplaneLab:
    lab: Lab
    backends: int = 3
    client: Node | None = None
    router: Netns | None = None
    lb: Node | None = None
    servers: list[Node] = field(default_factory=list)

    @property
    def instance(self) -> str:
        return f"lab{self.lab.id}"

    def build(self) -> None:
        self.router = self.lab.netns("rt")
        self.router.sysctl("net.ipv4.ip_forward", 1)
        self.router.sysctl("net.ipv4.conf.all.rp_filter", 0)
        self.client = self._link("cl", 1)
        # veth hands packets on with checksums left to "offload"; a packet the LB re-builds in XDP loses that
        # promise and the backend would drop it (TcpInCsumErrors). A real NIC computes them: do so here too.
        self.client.ns.run(["ethtool", "-K", "eth0", "tx", "off"])
        self.lb = self._link("lb", 2)
        self.servers = [self._link(f"b{i + 1}", 10 + i) for i in range(self.backends)]
        self.router.route(f"{VIP}/32", via=self.lb.address)
        self.router.route(ENCAP_PREFIX, via=self.lb.address)
        for server in self.servers:
            self._start_backend(server)

    def _link(self, role: str, net: int) -> Node:
        assert self.router is not None
        ns = self.lab.netns(role)
        self.lab.veth(ns, "eth0", self.router, f"r-{role}")
        ns.addr("eth0", f"10.77.{net}.2/24")
        self.router.addr(f"r-{role}", f"10.77.{net}.1/24")
        ns.route("default", via=f"10.77.{net}.1")
        return Node(ns, f"10.77.{net}.2", f"r-{role}")

    def _start_backend(self, server: Node) -> None:
        name = _role(server)
        server.ns.addr("lo", f"{VIP}/32")
        server.ns.run([PY, "-m", "edge_lb.decap", "attach", "--interface", "eth0"], timeout=120)
        server.ns.spawn([PY, "-m", "edge_lb.labhttp", "--bind", VIP, "--port", str(VIP_PORT), "--name", name],
                        self.lab.tmpdir / f"http-{name}.log")

    def config_text(self, weights: dict[str, int] | None = None) -> str:
        assert self.lb is not None
        weights = weights or {}
        backends = "".join(f'  [[vip.backend]]\n  address = "{s.address}"\n'
                           f'  weight = {weights.get(_role(s), 1)}\n'
                           for s in self.servers)
        return (f'[node]\ninterface = "eth0"\n\n[dataplane]\ninstance = "{self.instance}"\n'
                f'conn_table_size = 65536\nmax_vips = 4\nmax_backends = 64\n'
                f'encap_src_v4 = "{ENCAP_PREFIX}"\n\n'
                f'[[vip]]\naddress = "{VIP}"\nport = {VIP_PORT}\nprotocol = "tcp"\n{backends}')

    def load_balancer(self, weights: dict[str, int] | None = None) -> str:
        """Attach the balancer in the LB namespace with `edge-lb load` (gateway MAC from the kernel)."""
        assert self.lb is not None and self.router is not None
        self.router.run([PY, "-m", "edge_lb.labtools", "attach-pass", self.lb.router_if], timeout=120)
        self.lb.ns.run(["ping", "-c", "1", "-W", "2", "10.77.2.1"])  # fills the neighbour entry
        cfg = self.lab.tmpdir / "lb.toml"
        cfg.write_text(self.config_text(weights))
        return self.lb.ns.run([PY, "-m", "edge_lb", "load", "-c", str(cfg)], timeout=180,
                              host_mounts=True).stdout.strip()

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Until every backend's HTTP server answers on the VIP from inside its own namespace."""
        deadline = time.monotonic() + timeout
        for server in self.servers:
            while True:
                probe = server.ns.run([PY, "-c", _PROBE], check=False, timeout=5)
                if probe.returncode == 0:
                    break
                if time.monotonic() > deadline:
                    raise LabError(f"backend {server.ns.name}: HTTP server not up within {timeout} s")
                time.sleep(0.2)

    def http_get(self, count: int) -> dict[str, Any]:
        assert self.client is not None
        out = self.client.ns.run([PY, "-m", "edge_lb.labtools", "http-get", f"http://{VIP}:{VIP_PORT}/",
                                  "--count", str(count)], timeout=30 + count)
        result: dict[str, Any] = json.loads(out.stdout)
        return result

    def lb_reasons(self) -> dict[str, int]:
        names = reason_names()
        counts = bpfsys.pinned_counters(pin_dir(self.instance) / "reason_stats", len(names))
        return {names[i]: pk for i, (pk, _) in enumerate(counts)}

    def close(self) -> None:
        remove_pins(self.instance)


def _role(node: Node) -> str:
    return node.ns.name.rsplit("-", 1)[1]


_PROBE = (f"import socket; s=socket.create_connection(('{VIP}', {VIP_PORT}), 1); "
          "s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n'); assert s.recv(64)")


