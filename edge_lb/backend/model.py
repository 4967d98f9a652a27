"""The backend command's data: what is wanted, the facts gathered from the host, what is judged, what changes.

Plain frozen dataclasses, no I/O: `judge.py` and `plan.py` work on these alone, and `system.py` (the kernel)
or `fake.py` (an in-memory host for the table tests) provide the facts and apply the changes.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from edge_lb.dataplane import gue

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
Mode = Literal["xdp", "ipip"]

DECAP_PROGRAM = "xdp_decap"  # the kernel's name of bpf/decap.c's function (edge_lb.dataplane.decap.PROGRAM)
# The most the LB adds: GUE over IPv6, 48 (IPIP 20, GUE over IPv4 28, IP6IP6 and 4in6 40).
DEFAULT_OVERHEAD = gue.overhead(6, gue=True)
# The kernel modules each outer family needs in ipip mode, and the devices setup makes with them: one
# "external" (collect-metadata) device per family takes every tunnelled packet no other tunnel claims.
MODULES = {4: "ipip", 6: "ip6_tunnel"}
TUNNELS = {4: ("elb-ipip0", "ipip"), 6: ("elb-ip6tnl0", "ip6tnl")}
TCP_IP_HEADERS = {4: 40, 6: 60}  # IP + TCP headers without options: MSS = MTU - this


@dataclass(frozen=True, kw_only=True)
class Wanted:
    """What `edge-lb backend setup/check` was asked for."""

    vips: tuple[IPAddress, ...]
    interface: str  # where the encapsulated packets arrive
    mode: Mode | None = None  # None: ipip when the kernel has the modules, else xdp
    gue_port: int = gue.DEFAULT_PORT  # the LB's [dataplane] gue_port: decap.c takes GUE on it
    overhead: int = DEFAULT_OVERHEAD  # bytes of encapsulation the LB adds (MSS lowered by this)

    def advmss(self, mtu: int, family: int) -> int:
        """The largest MSS a reply from a VIP of `family` may advertise: the client's full-size segment plus
        the encapsulation must fit the interface's MTU."""
        return mtu - self.overhead - TCP_IP_HEADERS[family]


@dataclass(frozen=True, kw_only=True)
class RouteKey:
    """One FIB entry, as the kernel identifies it for a replace: family, table, destination, metric."""

    family: int  # 4 or 6
    table: int
    dst: str  # "0.0.0.0/0", "::/0", "10.0.0.0/8"
    priority: int | None

    def __str__(self) -> str:
        dst = "default" if self.dst in ("0.0.0.0/0", "::/0") else self.dst
        table = "" if self.table == 254 else f" table {self.table}"
        metric = f" metric {self.priority}" if self.priority else ""
        return f"{dst}{table}{metric}"


@dataclass(frozen=True, kw_only=True)
class RouteFact:
    """The route the kernel takes for a reply from a VIP to a client, and the MSS it advertises on it."""

    key: RouteKey
    description: str  # "default via 10.77.10.1 dev eth0"
    advmss: int | None  # the route's advmss metric, None when unset
    mtu: int  # the route's mtu metric, or its device's MTU: what the kernel derives an unset advmss from

    @property
    def effective_advmss(self) -> int:
        return self.advmss if self.advmss is not None else self.mtu - TCP_IP_HEADERS[self.key.family]


@dataclass(frozen=True, kw_only=True)
class Facts:
    """What the host looks like, gathered once per command."""

    interface: str
    mtu: int  # of the interface
    families: frozenset[int]  # outer families the interface has (global) addresses of: 4, 6
    lo: frozenset[IPInterface]  # addresses on lo, with their prefix lengths
    on_interface: frozenset[IPAddress]  # addresses on the interface itself
    sysctls: Mapping[str, int | None]  # "net.ipv4.conf.all.rp_filter" -> value, None when absent
    xdp: tuple[int, str] | None  # (id, name) of the interface's XDP program
    decap_addresses: frozenset[IPAddress] | None = None  # what an attached xdp_decap decapsulates for
    modules: frozenset[str]  # kernel modules available (loaded, built in, or installed) among MODULES
    tunnels: Mapping[str, tuple[str, bool]]  # device name -> (kind, up), for ipip and ip6tnl devices
    reply_routes: Mapping[IPAddress, RouteFact | None]  # per VIP; None: no route for its replies


@dataclass(frozen=True, kw_only=True)
class Item:
    """One line of `edge-lb backend check`."""

    name: str  # "vip", "decap", "rp_filter", "arp_ignore", "arp_announce", "mss"
    ok: bool
    detail: str


# -- changes: each says what it does and how to undo it ------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class AddAddress:
    cidr: str  # "10.0.0.1/32" on lo
    op: Literal["address"] = "address"

    def __str__(self) -> str:
        return f"add {self.cidr} to lo"


@dataclass(frozen=True, kw_only=True)
class RemoveAddress:
    cidr: str
    op: Literal["remove_address"] = "remove_address"

    def __str__(self) -> str:
        return f"remove {self.cidr} from lo"


@dataclass(frozen=True, kw_only=True)
class SetSysctl:
    key: str
    value: int
    previous: int | None = None  # None: nothing to restore (a device setup made and teardown deletes)
    op: Literal["sysctl"] = "sysctl"

    def __str__(self) -> str:
        was = f" (was {self.previous})" if self.previous is not None else ""
        return f"{self.key} = {self.value}{was}"


@dataclass(frozen=True, kw_only=True)
class AttachDecap:
    interface: str
    gue_port: int = gue.DEFAULT_PORT
    op: Literal["decap"] = "decap"

    def __str__(self) -> str:
        return f"attach {DECAP_PROGRAM} (bpf/decap.c; GUE on UDP {self.gue_port}) to {self.interface}"


@dataclass(frozen=True, kw_only=True)
class DetachDecap:
    interface: str
    op: Literal["detach_decap"] = "detach_decap"

    def __str__(self) -> str:
        return f"detach {DECAP_PROGRAM} from {self.interface}"


@dataclass(frozen=True, kw_only=True)
class AddTunnel:
    name: str
    kind: str  # "ipip" or "ip6tnl", external (collect metadata), up
    op: Literal["tunnel"] = "tunnel"

    def __str__(self) -> str:
        return f"create {self.kind} device {self.name} (external) and set it up"


@dataclass(frozen=True, kw_only=True)
class DeleteLink:
    name: str
    op: Literal["delete_link"] = "delete_link"

    def __str__(self) -> str:
        return f"delete device {self.name}"


@dataclass(frozen=True, kw_only=True)
class SetAdvmss:
    route: RouteKey
    value: int | None  # None: no advmss metric (the kernel derives it from the MTU)
    previous: int | None = None
    op: Literal["advmss"] = "advmss"

    def __str__(self) -> str:
        def text(v: int | None) -> str:
            return "unset" if v is None else str(v)
        return f"advmss {text(self.value)} on route {self.route} (was {text(self.previous)})"


Change = (AddAddress | RemoveAddress | SetSysctl | AttachDecap | DetachDecap | AddTunnel | DeleteLink
          | SetAdvmss)


def undo(change: Change) -> Change | None:
    """What teardown applies to take `change` back; None when nothing needs restoring."""
    match change:
        case AddAddress(cidr=cidr):
            return RemoveAddress(cidr=cidr)
        case SetSysctl(key=key, value=value, previous=previous) if previous is not None:
            return SetSysctl(key=key, value=previous, previous=value)
        case AttachDecap(interface=interface):
            return DetachDecap(interface=interface)
        case AddTunnel(name=name):
            return DeleteLink(name=name)
        case SetAdvmss(route=route, value=value, previous=previous):
            return SetAdvmss(route=route, value=previous, previous=value)
    return None


@dataclass(frozen=True, kw_only=True)
class Plan:
    """setup's answer: the changes to make, in order, and notes for the operator (not failures)."""

    changes: tuple[Change, ...]
    notes: tuple[str, ...] = field(default=())
