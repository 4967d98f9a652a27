"""The BGP lab: a client, a BIRD router doing ECMP, two LB nodes and three backends, each in its own
namespace.

                  +--- lb1  AS 65001  (supervisor, or ExaBGP + `edge-lb load`; XDP on eth0)
    client --- router  AS 65000: BIRD 2, ECMP over the LB nodes that announce the VIP, L4 hashing
                  +--- lb2  AS 65002
                  |
                 b1 b2 b3   (`edge-lb backend setup`: decap.c on eth0, the VIP on lo, ARP, rp_filter, MSS;
                             an HTTP server on port 80)

The router learns 10.88.100.1/32 from every LB node that announces it (eBGP, next hop = the node's address)
and installs one kernel route with a next hop per node. The VIP serves TCP 80 (HTTP) and UDP 5353 (nothing
answers: UDP flows are counted on each LB node's XDP counters). Each LB node encapsulates with its own
outer-source prefix, routed back to it by the router. Replies go backend -> router -> client.
All addresses live inside the lab's namespaces (10.88.0.0/16), apart from DataplaneLab's 10.77.0.0/16.

    with Lab(prefix="bgp") as lab:
        bl = BgpLab(lab)
        try:
            bl.build()
            bl.start_supervisor(1); bl.start_supervisor(2)
            bl.wait_nexthops({bl.node(1).address, bl.node(2).address}, 10)
        finally:
            bl.close()

Teardown: close() stops the supervisors gracefully and removes their sockets and pins; the Lab's own close
(also on an exception, Ctrl-C, or interpreter exit) kills whatever is left by PID, runs the same removal, and
deletes the namespaces.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_lb import paths
from edge_lb.dataplane import bpfsys
from edge_lb.dataplane.counters import reason_names
from edge_lb.errors import LabError
from edge_lb.lab.bird import Bird
from edge_lb.lab.frr import Frr, FrrPeer, frr_conf
from edge_lb.lab.labbackend import setup_backends
from edge_lb.lab.labs import (
    PY,
    Holder,
    Node,
    http_get,
    remove_instance,
    role_of,
    router_link,
    spawn_http,
    spawn_supervisor,
    stop_http,
    supervisor_status,
    wait_for,
    wait_http_ready,
    wait_supervisor,
)
from edge_lb.lab.netns import Lab, Netns

VIP = "10.88.100.1"
HTTP_PORT = 80
UDP_PORT = 5353
ROUTER_AS = 65000
ROUTER_ID = "10.88.1.1"  # the router's address towards the client
VIP_NUMS = {"tcp": 0, "udp": 1}  # the numbers a fresh instance gives the lab's VIPs (config order)
FAST_CHECK = ('  type = "http"\n  interval = 1.0\n  fast_interval = 0.25\n  timeout = 0.5\n'
              '  fall = 2\n  rise = 2\n')
UNCHECKED = '  type = "none"\n'  # the UDP VIP: nothing answers on it


@dataclass
class LbNode:
    """LB node n: namespace "lbN", eth0 = 10.88.(10+n).2/24 towards the router's 10.88.(10+n).1."""

    number: int
    link: Node
    router_address: str
    instance: str  # its [dataplane] instance: pin directory and control socket
    encap_src: str  # its outer-source prefix, routed back to it by the router
    supervisor: subprocess.Popen[bytes] | None = None

    @property
    def name(self) -> str:
        return f"lb{self.number}"

    @property
    def asn(self) -> int:
        return ROUTER_AS + self.number

    @property
    def ns(self) -> Netns:
        return self.link.ns

    @property
    def address(self) -> str:
        return self.link.address


@dataclass
class BgpLab:
    lab: Lab
    lb_nodes: int = 2
    backends: int = 3
    client: Node | None = None
    router: Netns | None = None
    nodes: dict[int, LbNode] = field(default_factory=dict)  # number (1..) -> LB node
    servers: list[Node] = field(default_factory=list)
    http: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)  # role -> its HTTP server
    bird: Bird | None = None  # BIRD on the router (router="bird")
    router_kind: str = "bird"  # or "frr": FRR (zebra + bgpd) as the router, lab/frr.py
    frr: Frr | None = None

    # -- building ----------------------------------------------------------------------------------------
    def build(self) -> None:
        """Namespaces, links, routes, backends (decap + HTTP), BIRD; each LB link made ready for XDP_TX."""
        if not (1 <= self.lb_nodes <= 9 and 1 <= self.backends <= 9):
            raise LabError("the address plan has room for 1..9 LB nodes and 1..9 backends")
        self.lab.add_cleanup(self._remove_instances)  # pins and sockets live outside the namespaces
        self.router = self.lab.netns("rt")
        for key, value in (("net.ipv4.ip_forward", 1), ("net.ipv4.conf.all.rp_filter", 0),
                           ("net.ipv4.conf.default.rp_filter", 0),
                           ("net.ipv4.fib_multipath_hash_policy", 1)):  # L4: flows, not hosts, spread
            self.router.sysctl(key, value)
        self.client = self._link("cl", 1)
        # veth leaves checksums to "offload"; a packet rebuilt in XDP loses that promise (see DataplaneLab).
        self.client.ns.run(["ethtool", "-K", "eth0", "tx", "off"])
        for n in range(1, self.lb_nodes + 1):
            link = self._link(f"lb{n}", 10 + n)
            node = LbNode(n, link, f"10.88.{10 + n}.1", instance=f"{self.lab.id.lower()}-lb{n}",
                          encap_src=f"10.88.{200 + n}.0/24")
            self.router.route(node.encap_src, via=node.address)
            self.nodes[n] = node
        self.servers = [self._link(f"b{i + 1}", 21 + i) for i in range(self.backends)]
        setup_backends(self.servers, [VIP])
        for server in self.servers:
            self.http[role_of(server)] = spawn_http(server, HTTP_PORT)
        self._start_router()
        for node in self.nodes.values():
            self._prepare_lb(node)
        self.client.ns.run(["ping", "-c", "1", "-W", "2", ROUTER_ID])  # the client's ARP entry, up front
        wait_http_ready(self.servers, VIP, HTTP_PORT)

    def _link(self, role: str, net: int) -> Node:
        assert self.router is not None
        return router_link(self.lab, self.router, role, f"10.88.{net}")

    def _prepare_lb(self, node: LbNode) -> None:
        """The router's end of the link runs an XDP program (a veth delivers XDP_TX frames only then); the
        node's neighbour entry for the router is filled (the data plane's gateway MAC)."""
        assert self.router is not None
        self.router.run([PY, "-m", "edge_lb.lab.labtools", "attach-pass", node.link.router_if], timeout=120)
        node.ns.run(["ping", "-c", "1", "-W", "2", node.router_address])

    def node(self, number: int) -> LbNode:
        try:
            return self.nodes[number]
        except KeyError:
            raise LabError(f"no LB node {number}: the lab has {sorted(self.nodes)}") from None

    def server(self, role: str) -> Node:
        return next(s for s in self.servers if role_of(s) == role)

    # -- the router ----------------------------------------------------------------------------------------
    def bird_conf(self) -> str:
        """BIRD 2: BGP routes to the kernel with merged (ECMP) paths; only VIP /32s accepted; fast timers."""
        peers = "".join(f"protocol bgp {n.name} from lbpeer {{ neighbor {n.address} as {n.asn}; "
                        f"source address {n.router_address}; }}\n" for n in self.nodes.values())
        return (f"router id {ROUTER_ID};\n"
                "log stderr all;\n"
                "protocol device { scan time 5; }\n"
                "protocol kernel kern4 {\n"
                "  ipv4 { import none; export filter { if source = RTS_BGP then accept; reject; }; };\n"
                "  merge paths on limit 16; learn off; persist off;\n"
                "}\n"
                "filter vip_in { if net ~ [ 10.88.100.0/24{32,32} ] then accept; reject; }\n"
                "template bgp lbpeer {\n"
                f"  local as {ROUTER_AS}; hold time 3; keepalive time 1;\n"
                "  connect retry time 1; connect delay time 1;\n"
                "  error wait time 1, 2; error forget time 10;\n"
                "  ipv4 { import filter vip_in; export none; };\n"
                "}\n" + peers)

    def _start_router(self) -> None:
        assert self.router is not None
        if self.router_kind == "frr":
            self.frr = Frr(self.router, self.lab.tmpdir)
            self.frr.start(frr_conf(ROUTER_ID, ROUTER_AS, [FrrPeer(n.address, n.asn, n.router_address)
                                                           for n in self.nodes.values()], "10.88.100.0/24"))
            return
        self.bird = Bird(self.router, self.lab.tmpdir)
        self.bird.start(self.bird_conf())

    def bird_protocols(self) -> dict[str, str]:
        """name -> state ("up", "start", "down") of every BIRD protocol; BGP is "up" when Established."""
        assert self.bird is not None
        return self.bird.protocols()

    def router_sessions(self) -> dict[str, str]:
        """LB node name ("lb1") -> its BGP session's state on the router, "up" when Established."""
        if self.frr is not None:
            by_address = self.frr.sessions()
            return {n.name: by_address.get(n.address, "none") for n in self.nodes.values()}
        protocols = self.bird_protocols()
        return {n.name: protocols.get(n.name, "none") for n in self.nodes.values()}

    def router_nexthops(self) -> set[str]:
        """Gateways of the router's kernel route for the VIP (empty without one)."""
        assert self.router is not None
        routes = json.loads(self.router.ip("-j", "route", "show", "exact", f"{VIP}/32").stdout or "[]")
        hops: set[str] = set()
        for route in routes:
            for hop in route.get("nexthops", [route]):
                if "gateway" in hop:
                    hops.add(hop["gateway"])
        return hops

    def wait_nexthops(self, expected: set[str], timeout: float = 10.0) -> float:
        """Seconds until the router's VIP route has exactly `expected` next hops; LabError after `timeout`."""
        try:
            return wait_for(lambda: self.router_nexthops() == expected, timeout,
                            f"router next hops for {VIP} == {sorted(expected)}")
        except LabError as exc:
            raise LabError(f"{exc}; they are {sorted(self.router_nexthops())}; {self.router_kind}: "
                           f"{self.router_sessions()}") from None

    # -- LB node config and processes -------------------------------------------------------------------
    def config_path(self, node: int) -> Path:
        return self.lab.tmpdir / f"lb{node}.toml"

    def disable_file(self, node: int) -> Path:
        """The node's [bgp] disable_file: while it exists the node withdraws every VIP."""
        return self.lab.tmpdir / f"lb{node}.disabled"

    def config_text(self, node: int, weights: dict[str, int] | None = None, roles: list[str] | None = None,
                    check: str = FAST_CHECK, disable_file: str | Path | None = None, vip_keys: str = "",
                    route: str = "", bgp: bool = True) -> str:
        """Node `node`'s config: the TCP VIP (HTTP-checked with `check`, TOML lines of [vip.healthcheck]) and
        the UDP VIP (unchecked), both with the given backends (default all) and weights; [bgp] towards the
        router (omitted with bgp=False). `vip_keys`: extra TOML keys of both VIPs (e.g. "min_healthy = 2");
        `route`: TOML lines of both VIPs' [vip.bgp]."""
        lb = self.node(node)
        weights = weights or {}
        chosen = [s for s in self.servers if roles is None or role_of(s) in roles]
        backends = "".join(f'  [[vip.backend]]\n  address = "{s.address}"\n'
                           f'  weight = {weights.get(role_of(s), 1)}\n' for s in chosen)
        route_table = f"  [vip.bgp]\n{route}" if route else ""

        def vip(port: int, proto: str, checks: str) -> str:
            return (f'[[vip]]\naddress = "{VIP}"\nport = {port}\nprotocol = "{proto}"\n{vip_keys}'
                    f'  [vip.healthcheck]\n{checks}{route_table}{backends}\n')

        disable = disable_file if disable_file is not None else self.disable_file(node)
        bgp_table = (f"[bgp]\nlocal_as = {lb.asn}\nrouter_id = \"{lb.address}\"\ndrain_time = 1.0\n"
                     f'disable_file = "{disable}"\n'
                     f'  [[bgp.peer]]\n  address = "{lb.router_address}"\n  as = {ROUTER_AS}\n'
                     f'  hold_time = 3\n  local_address = "{lb.address}"\n\n') if bgp else ""
        return (f'[node]\ninterface = "eth0"\n\n[dataplane]\ninstance = "{lb.instance}"\n'
                f'conn_table_size = 65536\nmax_vips = 4\nmax_backends = 64\n'
                f'encap_src_v4 = "{lb.encap_src}"\n\n{bgp_table}'
                f'{vip(HTTP_PORT, "tcp", check)}{vip(UDP_PORT, "udp", UNCHECKED)}')

    def write_config(self, node: int, **kwargs: Any) -> Path:
        """config_text(node, **kwargs) into the node's config file; returns its path."""
        path = self.config_path(node)
        path.write_text(self.config_text(node, **kwargs))
        return path

    def load_balancer(self, node: int) -> str:
        """`edge-lb load` in the node's namespace (no supervisor): XDP attached, maps written from its config
        file (the default config when none was written)."""
        lb = self.node(node)
        if not self.config_path(node).exists():
            self.write_config(node)
        return lb.ns.run([PY, "-m", "edge_lb", "load", "-c", str(self.config_path(node))], timeout=180,
                         host_mounts=True).stdout.strip()

    def start_supervisor(self, node: int, timeout: float = 120.0) -> subprocess.Popen[bytes]:
        """`edge-lb run` in the node's namespace (the default config when none was written); returns once its
        status answers with phase "running"."""
        lb = self.node(node)
        if not self.config_path(node).exists():
            self.write_config(node)
        log_path = self.supervisor_log_path(node)
        lb.supervisor = spawn_supervisor(lb.ns, self.config_path(node), log_path)
        wait_supervisor(lb.supervisor, lb.instance, log_path, timeout)
        return lb.supervisor

    def start_supervisors(self, timeout: float = 120.0) -> None:
        """Every node's supervisor, started together (each compiles its program: in parallel it is faster)."""
        for number, lb in self.nodes.items():
            if not self.config_path(number).exists():
                self.write_config(number)
            log_path = self.supervisor_log_path(number)
            lb.supervisor = spawn_supervisor(lb.ns, self.config_path(number), log_path)
        for number, lb in self.nodes.items():
            assert lb.supervisor is not None
            wait_supervisor(lb.supervisor, lb.instance, self.supervisor_log_path(number), timeout)

    def kill_supervisor(self, node: int, sig: int = signal.SIGTERM) -> None:
        """Send `sig` to the node's supervisor (its PID only); returns at once."""
        proc = self.node(node).supervisor
        if proc is None or proc.poll() is not None:
            raise LabError(f"lb{node}: no running supervisor")
        os.kill(proc.pid, sig)

    def wait_supervisor_exit(self, node: int, timeout: float = 30.0) -> int:
        """The node's supervisor's exit code, once it has exited (LabError after `timeout`)."""
        proc = self.node(node).supervisor
        if proc is None:
            raise LabError(f"lb{node}: no supervisor was started")
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise LabError(f"lb{node}: supervisor still running after {timeout} s") from None

    def supervisor_log_path(self, node: int) -> Path:
        return self.lab.tmpdir / f"supervisor-lb{node}.log"

    def supervisor_log(self, node: int) -> str:
        path = self.supervisor_log_path(node)
        return path.read_text(errors="replace") if path.exists() else ""

    def status(self, node: int) -> dict[str, Any]:
        return supervisor_status(self.node(node).instance)

    def reload(self, node: int) -> str:
        """`edge-lb reload -c CONFIG` of the node: the CLI's one-line answer."""
        out = subprocess.run([PY, "-m", "edge_lb", "reload", "-c", str(self.config_path(node))],
                             capture_output=True, text=True, timeout=60, check=False)
        if out.returncode != 0:
            raise LabError(f"edge-lb reload lb{node}: exit {out.returncode}: {out.stderr.strip()}")
        return out.stdout.strip()

    # -- traffic and counters --------------------------------------------------------------------------------
    # http_get and hold repeat DataplaneLab's on purpose: each binds the shared http_get/Holder to its own VIP
    def http_get(self, count: int) -> dict[str, Any]:
        assert self.client is not None
        return http_get(self.client.ns, VIP, HTTP_PORT, count)

    def hold(self, count: int) -> Holder:
        assert self.client is not None
        return Holder(self.client.ns, self.lab.tmpdir / "hold.log", VIP, HTTP_PORT, count)

    def send_udp_flows(self, n: int, port: int = UDP_PORT, first_port: int = 20000) -> int:
        """One datagram to the VIP from each of `n` client source ports first_port..: `n` distinct flows."""
        assert self.client is not None
        out = self.client.ns.run([PY, "-m", "edge_lb.lab.labtools", "udp-flows", VIP, str(port),
                                  "--count", str(n), "--first-port", str(first_port)], timeout=30 + n / 100)
        sent: int = json.loads(out.stdout)["sent"]
        return sent

    def node_vip_packets(self, node: int, protocol: str = "udp") -> int:
        """Packets node `node`'s XDP program counted for the lab's TCP or UDP VIP (pinned vip_stats; the
        index is the VIP's number, VIP_NUMS, which holds while the instance's VIPs were never changed)."""
        counts = bpfsys.pinned_counters(paths.pins(self.node(node).instance) / "vip_stats",
                                        VIP_NUMS[protocol] + 1)
        return counts[VIP_NUMS[protocol]][0]

    def node_reasons(self, node: int) -> dict[str, int]:
        """Node `node`'s per-reason packet counters (reason_stats), by name."""
        names = reason_names()
        counts = bpfsys.pinned_counters(paths.pins(self.node(node).instance) / "reason_stats", len(names))
        return {names[i]: pk for i, (pk, _) in enumerate(counts)}

    def start_http(self, role: str) -> None:
        self.http[role] = spawn_http(self.server(role), HTTP_PORT)

    def stop_http(self, role: str) -> None:
        stop_http(self.http.pop(role))

    def wait_ready(self, timeout: float = 20.0) -> None:
        wait_http_ready(self.servers, VIP, HTTP_PORT, timeout)

    # -- teardown ----------------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop every supervisor (SIGTERM to all first, so their drains overlap; bounded), remove their
        control sockets and pins. The Lab's close deletes the rest."""
        for lb in self.nodes.values():
            if lb.supervisor is not None and lb.supervisor.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    lb.supervisor.terminate()
        for lb in self.nodes.values():
            remove_instance(lb.supervisor, lb.instance)

    def _remove_instances(self) -> None:
        """The Lab's cleanup (its processes are already stopped): sockets and pins of every instance."""
        for lb in self.nodes.values():
            with contextlib.suppress(OSError):
                remove_instance(None, lb.instance)
