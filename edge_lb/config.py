"""The TOML config: frozen dataclasses, and a parser that reports every problem at once.

Each problem is one line, "key.path: message", with 0-based indexes into arrays of tables:
    vip[1].backend[0].address: not an IP address
A config with any problem raises ConfigError(problems, source); nothing is half-accepted.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from edge_lb.configbgp import BGP, Bgp, RouteAttrs, check_families, parse_bgp, parse_route
from edge_lb.configtools import (
    Invalid,
    Table,
    address,
    argv,
    boolean,
    choice,
    dns_name,
    file_path,
    integer,
    mac,
    mark_base,
    network,
    number,
    pattern,
    statuses,
    string,
    text,
    url_path,
)
from edge_lb.dataplane.maglev import is_prime
from edge_lb.errors import ConfigError
from healthchecks.base import IPAddress as IPAddress  # re-exported: the config's address type
from healthchecks.spec import KINDS, VIAS, CheckSpec

_INSTANCE = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
_INTERFACE = re.compile(r"(?!\.\.?\Z)[^/\s:]{1,15}")  # what the kernel's dev_valid_name() accepts
_MAX_RING_SLOTS = 2**28  # max_vips * ring_size: the data plane's ring array
_ENCAP_SRC_V4 = ipaddress.IPv4Network("172.16.0.0/16")
_ENCAP_SRC_V6 = ipaddress.IPv6Network("fd00:e1b::/64")


@dataclass(frozen=True, kw_only=True)
class Backend:
    address: IPAddress
    weight: int = 1  # 0..1000; 0 = drained: keeps its existing flows, gets no new ones
    healthcheck: CheckSpec = field(default_factory=CheckSpec)  # effective: the VIP's + this backend's keys
    encap: str = "ipip"  # effective: this backend's `encap`, else its VIP's (ENCAPS)


@dataclass(frozen=True, kw_only=True)
class Vip:
    address: IPAddress
    port: int  # 0..65535; 0 = every port of this address
    protocol: str  # "tcp" or "udp"
    backends: tuple[Backend, ...]
    healthcheck: CheckSpec = field(default_factory=CheckSpec)  # default of its backends
    min_healthy: int = 1  # announced while at least this many backends are healthy and not drained
    route: RouteAttrs = field(default_factory=RouteAttrs)  # [vip.bgp]
    icmp_echo: bool = True  # ICMP echo to the address answered by the data plane; off if a VIP on it says no
    hash: str = "flow"  # a new flow's Maglev slot: "flow" (addresses, protocol, ports) or "source" (client)
    encap: str = "ipip"  # default of its backends: "ipip" (IPIP / IP6IP6 / 4in6) or "gue" (the same in UDP)
    conntrack: bool = True  # False: stateless (DNS...): no connection-table lookup or insert, always the ring

    @property
    def name(self) -> str:
        return vip_name(self.address, self.port, self.protocol)


def vip_name(address: IPAddress, port: int, protocol: str) -> str:
    """A VIP as people write it, in logs, status and the API: 10.200.1.1:80/tcp or [fd00::1]:80/tcp."""
    host = f"[{address}]" if address.version == 6 else str(address)
    return f"{host}:{port}/{protocol}"


@dataclass(frozen=True, kw_only=True)
class Node:
    interface: str  # where XDP attaches (run mode)
    mac: str | None = None  # lower-case "aa:bb:cc:dd:ee:ff"; None: the interface's MAC
    gateway_mac: str | None = None  # None: resolved from the kernel for the default gateway
    mtu: int | None = None  # 1280..65535, the largest packet sent; None: the interface's (1500 in simulate)
    # Seconds the node may be unable to judge its backends (its checks failing for local reasons: no file
    # descriptors, its link down) before it withdraws its routes; None: 2 x the longest interval x fall.
    local_fault_after: float | None = None


@dataclass(frozen=True, kw_only=True)
class Dataplane:
    instance: str = "default"  # names the bpffs pin directory
    ring_size: int = 65537  # Maglev slots per VIP, prime
    conn_table_size: int = 262144  # connection-table entries
    max_vips: int = 64
    max_backends: int = 4096  # backend array size; slot 0 is reserved in the data plane
    encap_src_v4: ipaddress.IPv4Network = _ENCAP_SRC_V4  # outer source prefix, IPIP
    encap_src_v6: ipaddress.IPv6Network = _ENCAP_SRC_V6  # outer source prefix, IP6IP6 and 4in6
    xdp_mode: str = "native"  # "native" or "generic"
    # ICMP frag-needed / packet-too-big replies to clients whose packets are too big once encapsulated, per
    # CPU per second (a flood of big packets must not make an ICMP cannon); 0 = none: such packets are dropped
    icmp_too_big_rate: int = 1000
    # UDP destination port of GUE-encapsulated packets (backends with encap = "gue"); the backends' decap
    # listens on the same port. 6080 as Katran's GUE_DPORT
    gue_port: int = 6080
    # Connection-table inserts per CPU per second (the flood guard); new flows beyond it are served from the
    # ring without an insert. None: conn_table_size / (possible CPUs x FLOW_TURNOVER_S), dataplane/node.py.
    # Written into the ctl map by every apply, so a reload changes it live.
    new_flow_rate_limit: int | None = None
    # Tunnel health checks mark their sockets check_mark_base | backend index (low 20 bits): pick a base no
    # other use of marks on the node shares. The fwmark rule and table follow it (dataplane/checkencap.py).
    check_mark_base: int = 0x4C500000


@dataclass(frozen=True, kw_only=True)
class Api:
    enabled: bool = True
    host: str = "127.0.0.1"  # from listen = "host:port" or "[v6]:port"; beyond loopback only when written
    port: int = 9100
    token: str | None = None  # bearer token for mutations (or token_file); without one, mutations get 401
    token_file: str | None = None

    @property
    def listen(self) -> str:
        """host:port as in the config file, for messages."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, kw_only=True)
class Config:
    node: Node
    dataplane: Dataplane
    vips: tuple[Vip, ...]
    bgp: Bgp | None = None  # None: no [bgp] table, nothing is announced
    api: Api = field(default_factory=Api)


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and parse a TOML config file; every failure is a ConfigError naming the file."""
    source = os.fspath(path)
    try:
        with open(source, "rb") as file:
            data = tomllib.load(file)
    except OSError as exc:
        raise ConfigError([f"{source}: cannot read: {exc.strerror or exc}"], source) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{source}: invalid TOML: {exc}"], source) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{source}: not UTF-8 text: {exc}"], source) from exc
    return parse_config(data, source)


def instance_of(path: str | os.PathLike[str]) -> str:
    """Only [dataplane].instance: enough to find a running supervisor even while the file has other errors."""
    source = os.fspath(path)
    data = _read_toml(source)
    problems: list[str] = []
    table = Table(data.get("dataplane", {}), "dataplane", problems, tuple(_DATAPLANE))
    instance = table.get("instance", _DATAPLANE["instance"])
    problems = [p for p in problems if p.startswith(("dataplane.instance", "dataplane: must"))]
    if problems:
        raise ConfigError(problems, source)
    return str(instance or Dataplane().instance)


def disable_file_of(path: str | os.PathLike[str]) -> str | None:
    """Only [bgp].disable_file (None when absent): `edge-lb disable` must work while other parts of the file
    are being edited. ConfigError when there is no [bgp] table or the key is invalid."""
    source = os.fspath(path)
    data = _read_toml(source)
    if not isinstance(data.get("bgp"), Mapping):
        raise ConfigError([f"{source}: has no [bgp] table: this node announces nothing to disable"], source)
    problems: list[str] = []
    value = Table(data["bgp"], "bgp", problems, tuple(data["bgp"])).get("disable_file", BGP["disable_file"])
    problems = [p for p in problems if p.startswith("bgp.disable_file")]
    if problems:
        raise ConfigError(problems, source)
    return str(value) if value else None


def _read_toml(source: str) -> dict[str, Any]:
    try:
        with open(source, "rb") as file:
            return tomllib.load(file)
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{source}: cannot read: {exc}"], source) from exc


def parse_config(data: Mapping[str, Any], source: str = "config") -> Config:
    """Validate parsed TOML (or an equivalent dict) into a Config; raise ConfigError listing every problem."""
    problems: list[str] = []
    root = Table(data, "", problems, ("node", "dataplane", "healthcheck", "bgp", "api", "vip"))
    node = _node(root.table("node", tuple(_NODE)))
    dataplane = _dataplane(root.table("dataplane", tuple(_DATAPLANE)))
    check_table = root.table("healthcheck", tuple(_CHECK))
    check = _check(check_table, CheckSpec())
    vips = _vips(root, dataplane, check, "type" in check_table.data)  # (table, Vip) pairs
    bgp = parse_bgp(root)
    api = _api(root.table("api", tuple(_API)))
    if bgp is not None:
        check_families(bgp, [(table, vip.address, vip.route) for table, vip in vips])
    if problems or node is None:
        raise ConfigError(problems, source)
    return Config(node=node, dataplane=dataplane, vips=tuple(vip for _, vip in vips), bgp=bgp, api=api)


def _ring_size(value: Any) -> int:
    size = integer(1009, 1_000_003)(value)
    if not is_prime(size):
        raise Invalid(f"{size} is not prime")
    return size


_NODE = {
    "interface": pattern(_INTERFACE, "an interface name (1..15 characters, no '/', ':' or space)"),
    "mac": mac,
    "gateway_mac": mac,
    "mtu": integer(1280, 65535),
    "local_fault_after": number(0.5, 3600),
}
_DATAPLANE = {
    "instance": pattern(_INSTANCE, "[a-z0-9][a-z0-9_-]{0,31}"),
    "ring_size": _ring_size,
    "conn_table_size": integer(1024, 100_000_000),
    "max_vips": integer(1, 4096),
    "max_backends": integer(2, 1_000_000),
    "encap_src_v4": network(4, 8, 30, "172.16.0.0/16"),
    "encap_src_v6": network(6, 32, 124, "fd00:e1b::/64"),
    "xdp_mode": choice("native", "generic"),
    "icmp_too_big_rate": integer(0, 1_000_000),
    "gue_port": integer(1, 65535),
    "new_flow_rate_limit": integer(1, 1_000_000_000),
    "check_mark_base": mark_base,
}


_CHECK: dict[str, Callable[[Any], Any]] = {
    "type": choice(*KINDS),
    "port": integer(1, 65535),
    "interval": number(0.05, 3600),
    "fast_interval": number(0.05, 3600),
    "timeout": number(0.01, 600),
    "rise": integer(1, 100),
    "fall": integer(1, 100),
    "jitter": number(0, 0.5, "a fraction of the delay,"),
    "method": choice("GET", "HEAD", "POST", "OPTIONS"),
    "path": url_path,
    "status": statuses,
    "body": text,
    "host": text,
    "tls_verify": boolean,
    "query_name": dns_name,
    "query_type": choice("A", "AAAA", "NS", "SOA", "TXT", "MX", "CNAME", "SRV", "PTR"),
    "rcode": choice("NOERROR", "NXDOMAIN", "SERVFAIL", "REFUSED", "FORMERR", "NOTIMP"),
    "command": argv,
    "via": choice(*VIAS),
}
VIP_HASHES = ("flow", "source")  # [[vip]] hash: what picks the Maglev slot of a new flow
ENCAPS = ("ipip", "gue")  # [[vip]] / [[vip.backend]] encap: how packets travel to the backend
_VIP = {"address": address, "port": integer(0, 65535), "protocol": choice("tcp", "udp")}
_BACKEND = {"address": address, "weight": integer(0, 1000), "encap": choice(*ENCAPS)}


def _listen(value: Any) -> tuple[str, int]:
    """host:port with an IP host ([v6]:port for IPv6), as (host, port)."""
    text = string(value)
    host, sep, port = text.rpartition(":")
    try:
        address = ipaddress.ip_address(host[1:-1] if host.startswith("[") and host.endswith("]") else host)
        number = int(port)
    except ValueError:
        raise Invalid('must be "address:port", like "127.0.0.1:9100" or "[::1]:9100"') from None
    if not sep or not 1 <= number <= 65535 or (address.version == 6 and not host.startswith("[")):
        raise Invalid('must be "address:port", like "127.0.0.1:9100" or "[::1]:9100"')
    return str(address), number


def check_token(value: Any) -> str:
    """An [api] token, inline or from token_file: Invalid unless 16 characters or more without spaces."""
    token = text(value)
    if len(token) < 16 or " " in token:
        raise Invalid("must be at least 16 characters without spaces")
    return token


_API = {"enabled": boolean, "listen": _listen, "token": check_token, "token_file": file_path}


def _api(table: Table) -> Api:
    values = table.values(_API)
    if "token" in values and "token_file" in values:
        table.problem("token_file", "set token or token_file, not both")
    if "listen" in values:
        values["host"], values["port"] = values.pop("listen")
    return Api(**values)


def _node(table: Table) -> Node | None:
    values = table.values(_NODE, required=("interface",))
    return Node(**values) if "interface" in values else None


def _dataplane(table: Table) -> Dataplane:
    dataplane = Dataplane(**table.values(_DATAPLANE))
    if dataplane.max_vips * dataplane.ring_size > _MAX_RING_SLOTS:
        table.problem("max_vips", f"max_vips * ring_size must be at most 2**28 ({_MAX_RING_SLOTS})")
    return dataplane


def _check(table: Table, base: CheckSpec, port0: bool = False, explicit: bool = False) -> CheckSpec:
    """`base` with the keys this table sets. A problem of the whole is reported only at a table that sets
    one of the keys involved, so an inherited mistake is reported once, where it was written."""
    values = table.values(_CHECK)
    if "type" in values:
        values["kind"] = values.pop("type")
    spec = replace(base, **values)
    sets = set(table.data)
    if spec.fast_interval > spec.interval and sets & {"interval", "fast_interval"}:
        table.problem("fast_interval", f"{spec.fast_interval} must not exceed interval ({spec.interval})")
    _check_timeout(table, spec, sets)
    if spec.kind == "exec" and not spec.command and "type" in sets and "command" not in sets:
        table.problem("command", 'required when type = "exec"')
    if port0 and spec.port is None and spec.kind not in ("exec", "none") and (explicit or "type" in sets):
        table.problem("port", f'required for a port-0 VIP (type = "{spec.kind}")')
    return spec


def _check_timeout(table: Table, spec: CheckSpec, sets: set[str]) -> None:
    """timeout > interval is refused, not clamped: the next check waits for the one in flight, so detection
    would take fall * (interval + timeout), not what the interval promises; a clamp would silently change a
    time the operator chose, and a refused reload keeps the running config."""
    if spec.timeout <= spec.interval or not sets & {"interval", "timeout"}:
        return
    key = "timeout" if "timeout" in sets else "interval"
    table.problem(key, f"timeout ({spec.timeout:g}) must not exceed interval ({spec.interval:g}): "
                       "a check may not run longer than the time between checks")


def _implicit(spec: CheckSpec, port: int | None, protocol: str | None) -> CheckSpec:
    """No check type written at any level: a port-0 VIP has no port to connect to, and a UDP service does
    not answer a TCP connect; both are served unchecked rather than black-holed."""
    return replace(spec, kind="none") if port == 0 or protocol == "udp" else spec


def _vips(root: Table, dataplane: Dataplane, check: CheckSpec, explicit: bool) -> list[tuple[Table, Vip]]:
    tables = root.array("vip", (*_VIP, "min_healthy", "icmp_echo", "hash", "encap", "conntrack",
                                "healthcheck", "bgp", "backend"))
    vips = [(table, _vip(table, check, explicit)) for table in tables]
    valid = [(table, vip) for table, vip in vips if vip is not None]
    _check_unique_vips(valid)
    _check_shared_routes(valid)
    if len(tables) > dataplane.max_vips:
        root.problem("vip", f"{len(tables)} VIPs are more than dataplane.max_vips ({dataplane.max_vips})")
    backends = sum(len(vip.backends) for _, vip in valid)
    if backends > dataplane.max_backends - 1:
        root.problem(
            "vip",
            f"{backends} backends are more than dataplane.max_backends - 1 "
            f"({dataplane.max_backends - 1}; slot 0 is reserved)",
        )
    return valid


def _vip(table: Table, check: CheckSpec, explicit: bool) -> Vip | None:
    values = table.values(_VIP, required=tuple(_VIP))
    check_table = table.table("healthcheck", tuple(_CHECK))
    port0 = values.get("port") == 0
    spec = _check(check_table, check, port0, explicit)
    if not explicit and "type" not in check_table.data:
        spec = _implicit(spec, values.get("port"), values.get("protocol"))
    backend_tables = table.array("backend", (*_BACKEND, "healthcheck"))
    encap = table.get("encap", choice(*ENCAPS)) or "ipip"
    backends = _backends(backend_tables, values.get("address"), spec, port0, encap)
    min_healthy = table.get("min_healthy", integer(0, 100_000))
    if min_healthy is not None and min_healthy > len(backend_tables):
        table.problem("min_healthy", f"{min_healthy} is more than the VIP's {len(backend_tables)} backends: "
                                     "it could never be announced")
    route = parse_route(table)
    icmp_echo = table.get("icmp_echo", boolean)
    hash_by = table.get("hash", choice(*VIP_HASHES))
    conntrack = table.get("conntrack", boolean)
    if len(values) != len(_VIP):
        return None
    return Vip(**values, backends=backends, healthcheck=spec, route=route,
               min_healthy=1 if min_healthy is None else min_healthy, icmp_echo=icmp_echo is not False,
               hash=hash_by or "flow", encap=encap, conntrack=conntrack is not False)


def _backends(tables: list[Table], vip_address: IPAddress | None, check: CheckSpec,
              port0: bool, encap: str) -> tuple[Backend, ...]:
    """The valid backends of one VIP; a repeated address or an IPv4 backend of an IPv6 VIP is a problem."""
    seen: dict[IPAddress, str] = {}
    backends = []
    for table in tables:
        values = table.values(_BACKEND, required=("address",))
        address = values.get("address")
        if address is None:
            continue
        if address in seen:
            table.problem("address", f"duplicate of {seen[address]}")
        elif vip_address is not None and vip_address.version == 6 and address.version == 4:
            table.problem("address", "IPv6 VIP needs IPv6 backends")
        else:
            own = table.table("healthcheck", tuple(_CHECK))
            spec = _check(own, check, port0) if own.data else check
            backends.append(Backend(**{"encap": encap, **values}, healthcheck=spec))
        seen.setdefault(address, table.path)
    return tuple(backends)


def _check_unique_vips(vips: list[tuple[Table, Vip]]) -> None:
    """Two VIPs with the same address, port and protocol are a problem (port 0 next to port 80 is fine)."""
    seen: dict[tuple[IPAddress, int, str], str] = {}
    for table, vip in vips:
        key = (vip.address, vip.port, vip.protocol)
        if key in seen:
            table.problem("", f"duplicate of {seen[key]} ({vip.name})")
        seen.setdefault(key, table.path)


def _check_shared_routes(vips: list[tuple[Table, Vip]]) -> None:
    """VIPs on one address share its route (a /32 or /128): they must ask for the same attributes."""
    first: dict[IPAddress, tuple[str, RouteAttrs]] = {}
    for table, vip in vips:
        path, attrs = first.setdefault(vip.address, (table.path, vip.route))
        if attrs != vip.route:
            table.problem("bgp", f"route attributes differ from {path}, which has the same address "
                                 "(one route per address)")
