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

import dns.exception
import dns.name

from edge_lb.errors import ConfigError
from edge_lb.maglev import is_prime
from healthchecks.spec import KINDS, CheckSpec

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_Kwargs = dict[str, Any]

_MAC = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}")
_INSTANCE = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
_INTERFACE = re.compile(r"(?!\.\.?\Z)[^/\s:]{1,15}")  # what the kernel's dev_valid_name() accepts
_ARRAY_INDEX = re.compile(r"\[\d+\]")
_MAX_RING_SLOTS = 2**28  # max_vips * ring_size: the data plane's ring array
_ENCAP_SRC_V4 = ipaddress.IPv4Network("172.16.0.0/16")
_ENCAP_SRC_V6 = ipaddress.IPv6Network("fd00:e1b::/64")
_BROADCAST = ipaddress.IPv4Address("255.255.255.255")


@dataclass(frozen=True, kw_only=True)
class Backend:
    address: IPAddress
    weight: int = 1  # 0..1000; 0 = drained: keeps its existing flows, gets no new ones
    healthcheck: CheckSpec = field(default_factory=CheckSpec)  # effective: the VIP's + this backend's keys


@dataclass(frozen=True, kw_only=True)
class Vip:
    address: IPAddress
    port: int  # 0..65535; 0 = every port of this address
    protocol: str  # "tcp" or "udp"
    backends: tuple[Backend, ...]
    healthcheck: CheckSpec = field(default_factory=CheckSpec)  # default of its backends

    @property
    def name(self) -> str:
        """The VIP as people write it: 10.200.1.1:80/tcp, or [fd00::1]:80/tcp for IPv6."""
        host = f"[{self.address}]" if self.address.version == 6 else str(self.address)
        return f"{host}:{self.port}/{self.protocol}"


@dataclass(frozen=True, kw_only=True)
class Node:
    interface: str  # where XDP attaches (run mode)
    mac: str | None = None  # lower-case "aa:bb:cc:dd:ee:ff"; None: the interface's MAC
    gateway_mac: str | None = None  # None: resolved from the kernel for the default gateway
    mtu: int | None = None  # 1280..65535, the largest packet sent; None: the interface's (1500 in simulate)


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


@dataclass(frozen=True, kw_only=True)
class Config:
    node: Node
    dataplane: Dataplane
    vips: tuple[Vip, ...]


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
    try:
        with open(source, "rb") as file:
            data = tomllib.load(file)
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{source}: cannot read the instance name: {exc}"], source) from exc
    problems: list[str] = []
    table = _Table(data.get("dataplane", {}), "dataplane", problems, tuple(_DATAPLANE))
    instance = table.get("instance", _DATAPLANE["instance"])
    problems = [p for p in problems if p.startswith(("dataplane.instance", "dataplane: must"))]
    if problems:
        raise ConfigError(problems, source)
    return str(instance or Dataplane().instance)


def parse_config(data: Mapping[str, Any], source: str = "config") -> Config:
    """Validate parsed TOML (or an equivalent dict) into a Config; raise ConfigError listing every problem."""
    problems: list[str] = []
    root = _Table(data, "", problems, ("node", "dataplane", "healthcheck", "vip"))
    node = _node(root.table("node", tuple(_NODE)))
    dataplane = _dataplane(root.table("dataplane", tuple(_DATAPLANE)))
    check_table = root.table("healthcheck", tuple(_CHECK))
    check = _check(check_table, CheckSpec())
    vips = _vips(root, dataplane, check, "type" in check_table.data)
    if problems or node is None:
        raise ConfigError(problems, source)
    return Config(node=node, dataplane=dataplane, vips=vips)


class _Invalid(Exception):
    """A converter's verdict on one value: the message after "key.path: "."""


class _Table:
    """One TOML table being read: hands out converted values, records a problem for each bad one."""

    def __init__(self, data: object, path: str, problems: list[str], keys: tuple[str, ...]) -> None:
        self.path = path
        self.problems = problems
        self.is_table = isinstance(data, Mapping)  # when not, its one problem is that, not missing keys
        self.data: Mapping[str, Any] = data if isinstance(data, Mapping) else {}
        if not self.is_table:
            problems.append(f"{path}: must be a table")
        for key in self.data:
            if key not in keys:
                self.problem(key, "unknown key")

    def key_path(self, key: str) -> str:
        """The dotted path of `key` in this table; "" is the table itself."""
        return f"{self.path}.{key}" if self.path and key else self.path or key

    def problem(self, key: str, message: str) -> None:
        self.problems.append(f"{self.key_path(key)}: {message}")

    def get(self, key: str, convert: Callable[[Any], Any], *, required: bool = False) -> Any:
        """The converted value of `key`, or None when it is absent or invalid (invalid records a problem)."""
        if key not in self.data:
            if required and self.is_table:
                self.problem(key, "required")
            return None
        try:
            return convert(self.data[key])
        except _Invalid as exc:
            self.problem(key, str(exc))
            return None

    def values(
        self, converters: Mapping[str, Callable[[Any], Any]], required: tuple[str, ...] = ()
    ) -> _Kwargs:
        """Every present, valid key of `converters`: keyword arguments for a dataclass with defaults."""
        values = {
            key: self.get(key, convert, required=key in required) for key, convert in converters.items()
        }
        return {key: value for key, value in values.items() if value is not None}

    def table(self, key: str, keys: tuple[str, ...]) -> _Table:
        """A sub-table allowed to hold `keys`; absent is empty."""
        return _Table(self.data.get(key, {}), self.key_path(key), self.problems, keys)

    def array(self, key: str, keys: tuple[str, ...]) -> list[_Table]:
        """An array of tables (`[[key]]`), each allowed to hold `keys`; absent is empty."""
        value = self.data.get(key, [])
        if not isinstance(value, list):
            header = _ARRAY_INDEX.sub("", self.key_path(key))
            self.problem(key, f"must be an array of tables ([[{header}]])")
            return []
        items = [(f"{self.key_path(key)}[{index}]", item) for index, item in enumerate(value)]
        return [_Table(item, path, self.problems, keys) for path, item in items]


# Converters: value -> typed value, or raise _Invalid(message).


def _integer(low: int, high: int) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise _Invalid(f"must be an integer {low}..{high}")
        return value

    return convert


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise _Invalid("must be a string")
    return value


def _choice(*choices: str) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        if value not in choices:
            raise _Invalid("must be " + " or ".join(f'"{choice}"' for choice in choices))
        return str(value)

    return convert


def _pattern(pattern: re.Pattern[str], want: str) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        if not isinstance(value, str) or not pattern.fullmatch(value):
            raise _Invalid(f"must match {want}")
        return value

    return convert


def _mac(value: Any) -> str:
    if not isinstance(value, str) or not _MAC.fullmatch(value):
        raise _Invalid("not a MAC address (want aa:bb:cc:dd:ee:ff)")
    if int(value[:2], 16) & 1:
        raise _Invalid(f"{value} is a multicast MAC address (want a unicast one)")
    return value.lower()


def _ring_size(value: Any) -> int:
    size = _integer(1009, 1_000_003)(value)
    if not is_prime(size):
        raise _Invalid(f"{size} is not prime")
    return size


def _address(value: Any) -> IPAddress:
    """A unicast IP address a VIP or backend can have."""
    try:
        address = ipaddress.ip_address(_string(value))
    except (_Invalid, ValueError):
        raise _Invalid("not an IP address") from None
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
        raise _Invalid(f"{value} has a zone (%{address.scope_id}): not allowed")
    for bad, what in (
        (address.is_multicast, "a multicast address"),
        (address.is_unspecified, "the unspecified address"),
        (address.is_loopback, "a loopback address"),
        (address == _BROADCAST, "the broadcast address"),
    ):
        if bad:
            raise _Invalid(f"{address} is {what}")
    return address


def _network(version: int, low: int, high: int, example: str) -> Callable[[Any], Any]:
    def convert(value: Any) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        try:
            network = ipaddress.ip_network(_string(value))
        except (_Invalid, ValueError):
            raise _Invalid(f"not an IPv{version} prefix without host bits, like {example}") from None
        if network.version != version or not low <= network.prefixlen <= high:
            raise _Invalid(f"must be an IPv{version} prefix of length {low}..{high}")
        return network

    return convert


_NODE = {
    "interface": _pattern(_INTERFACE, "an interface name (1..15 characters, no '/', ':' or space)"),
    "mac": _mac,
    "gateway_mac": _mac,
    "mtu": _integer(1280, 65535),
}
_DATAPLANE = {
    "instance": _pattern(_INSTANCE, "[a-z0-9][a-z0-9_-]{0,31}"),
    "ring_size": _ring_size,
    "conn_table_size": _integer(1024, 100_000_000),
    "max_vips": _integer(1, 4096),
    "max_backends": _integer(2, 1_000_000),
    "encap_src_v4": _network(4, 8, 30, "172.16.0.0/16"),
    "encap_src_v6": _network(6, 32, 124, "fd00:e1b::/64"),
    "xdp_mode": _choice("native", "generic"),
}


def _number(low: float, high: float, what: str = "a number of seconds") -> Callable[[Any], float]:
    def convert(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
            raise _Invalid(f"must be {what} {low:g}..{high:g}")
        return float(value)

    return convert


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Invalid("must be true or false")
    return value


def _text(value: Any) -> str:
    """A string that cannot smuggle a line break or control character into a request or a log line."""
    if not isinstance(value, str) or not value.isprintable():
        raise _Invalid("must be a string of printable characters")
    return value


def _dns_name(value: Any) -> str:
    try:
        dns.name.from_text(_text(value))
    except (_Invalid, dns.exception.DNSException) as exc:
        raise _Invalid(f"not a DNS name: {exc}") from None
    return str(value)


def _url_path(value: Any) -> str:
    if not isinstance(value, str) or not value.startswith("/") or not value.isprintable() or " " in value:
        raise _Invalid("must be a URL path starting with '/', without spaces or control characters")
    return value


def _statuses(value: Any) -> tuple[int, ...]:
    codes = value if isinstance(value, list) else [value]
    if not codes or any(isinstance(c, bool) or not isinstance(c, int) or not 100 <= c <= 599 for c in codes):
        raise _Invalid("must be an HTTP status code 100..599 or a non-empty list of them")
    return tuple(codes)


def _argv(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(a, str) and a for a in value):
        raise _Invalid('must be a non-empty list of non-empty strings, like ["/usr/bin/check", "{address}"]')
    if not value[0].startswith("/"):
        raise _Invalid(f"{value[0]!r}: the program must be an absolute path (no shell, no PATH search)")
    return tuple(value)


_CHECK: dict[str, Callable[[Any], Any]] = {
    "type": _choice(*KINDS),
    "port": _integer(1, 65535),
    "interval": _number(0.05, 3600),
    "fast_interval": _number(0.05, 3600),
    "timeout": _number(0.01, 600),
    "rise": _integer(1, 100),
    "fall": _integer(1, 100),
    "jitter": _number(0, 0.5, "a fraction of the delay,"),
    "method": _choice("GET", "HEAD", "POST", "OPTIONS"),
    "path": _url_path,
    "status": _statuses,
    "body": _text,
    "host": _text,
    "tls_verify": _boolean,
    "query_name": _dns_name,
    "query_type": _choice("A", "AAAA", "NS", "SOA", "TXT", "MX", "CNAME", "SRV", "PTR"),
    "rcode": _choice("NOERROR", "NXDOMAIN", "SERVFAIL", "REFUSED", "FORMERR", "NOTIMP"),
    "command": _argv,
}
_VIP = {"address": _address, "port": _integer(0, 65535), "protocol": _choice("tcp", "udp")}
_BACKEND = {"address": _address, "weight": _integer(0, 1000)}


def _node(table: _Table) -> Node | None:
    values = table.values(_NODE, required=("interface",))
    return Node(**values) if "interface" in values else None


def _dataplane(table: _Table) -> Dataplane:
    dataplane = Dataplane(**table.values(_DATAPLANE))
    if dataplane.max_vips * dataplane.ring_size > _MAX_RING_SLOTS:
        table.problem("max_vips", f"max_vips * ring_size must be at most 2**28 ({_MAX_RING_SLOTS})")
    return dataplane


def _check(table: _Table, base: CheckSpec, port0: bool = False, explicit: bool = False) -> CheckSpec:
    """`base` with the keys this table sets. A problem of the whole is reported only at a table that sets
    one of the keys involved, so an inherited mistake is reported once, where it was written."""
    values = table.values(_CHECK)
    if "type" in values:
        values["kind"] = values.pop("type")
    spec = replace(base, **values)
    sets = set(table.data)
    if spec.fast_interval > spec.interval and sets & {"interval", "fast_interval"}:
        table.problem("fast_interval", f"{spec.fast_interval} must not exceed interval ({spec.interval})")
    if spec.kind == "exec" and not spec.command and "type" in sets and "command" not in sets:
        table.problem("command", 'required when type = "exec"')
    if port0 and spec.port is None and spec.kind not in ("exec", "none") and (explicit or "type" in sets):
        table.problem("port", f'required for a port-0 VIP (type = "{spec.kind}")')
    return spec


def _implicit(spec: CheckSpec, port: int | None, protocol: str | None) -> CheckSpec:
    """No check type written at any level: a port-0 VIP has no port to connect to, and a UDP service does
    not answer a TCP connect; both are served unchecked rather than black-holed."""
    return replace(spec, kind="none") if port == 0 or protocol == "udp" else spec


def _vips(root: _Table, dataplane: Dataplane, check: CheckSpec, explicit: bool) -> tuple[Vip, ...]:
    tables = root.array("vip", (*_VIP, "healthcheck", "backend"))
    vips = [(table, _vip(table, check, explicit)) for table in tables]
    valid = [(table, vip) for table, vip in vips if vip is not None]
    _check_unique_vips(valid)
    if len(tables) > dataplane.max_vips:
        root.problem("vip", f"{len(tables)} VIPs are more than dataplane.max_vips ({dataplane.max_vips})")
    backends = sum(len(vip.backends) for _, vip in valid)
    if backends > dataplane.max_backends - 1:
        root.problem(
            "vip",
            f"{backends} backends are more than dataplane.max_backends - 1 "
            f"({dataplane.max_backends - 1}; slot 0 is reserved)",
        )
    return tuple(vip for _, vip in valid)


def _vip(table: _Table, check: CheckSpec, explicit: bool) -> Vip | None:
    values = table.values(_VIP, required=tuple(_VIP))
    check_table = table.table("healthcheck", tuple(_CHECK))
    port0 = values.get("port") == 0
    spec = _check(check_table, check, port0, explicit)
    if not explicit and "type" not in check_table.data:
        spec = _implicit(spec, values.get("port"), values.get("protocol"))
    backend_tables = table.array("backend", (*_BACKEND, "healthcheck"))
    backends = _backends(backend_tables, values.get("address"), spec, port0)
    return Vip(**values, backends=backends, healthcheck=spec) if len(values) == len(_VIP) else None


def _backends(tables: list[_Table], vip_address: IPAddress | None, check: CheckSpec,
              port0: bool) -> tuple[Backend, ...]:
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
            backends.append(Backend(**values, healthcheck=spec))
        seen.setdefault(address, table.path)
    return tuple(backends)


def _check_unique_vips(vips: list[tuple[_Table, Vip]]) -> None:
    """Two VIPs with the same address, port and protocol are a problem (port 0 next to port 80 is fine)."""
    seen: dict[tuple[IPAddress, int, str], str] = {}
    for table, vip in vips:
        key = (vip.address, vip.port, vip.protocol)
        if key in seen:
            table.problem("", f"duplicate of {seen[key]} ({vip.name})")
        seen.setdefault(key, table.path)
