"""An in-memory host behind the System interface: the backend command's table tests run setup, check and
teardown against it, with no kernel. It starts as a fresh Linux host with IPv4 and IPv6 default routes on
eth0 (MTU 1500), kernel-default sysctls, no VIP, no decapsulation, and no tunnel modules."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from edge_lb.backend.judge import conf
from edge_lb.backend.model import (
    DECAP_PROGRAM,
    AddAddress,
    AddTunnel,
    AttachDecap,
    Change,
    DeleteLink,
    DetachDecap,
    Facts,
    IPInterface,
    RemoveAddress,
    RouteFact,
    RouteKey,
    SetAdvmss,
    SetSysctl,
    Wanted,
)
from edge_lb.errors import BackendError

V4_DEFAULT = RouteKey(family=4, table=254, dst="0.0.0.0/0", priority=None)
V6_DEFAULT = RouteKey(family=6, table=254, dst="::/0", priority=1024)


def _sysctls(*devices: str) -> dict[str, int | None]:
    return {conf(d, n): 0 for d in ("all", *devices) for n in ("rp_filter", "arp_ignore", "arp_announce")}


@dataclass
class FakeSystem:
    interface: str = "eth0"
    mtu: int = 1500
    families: set[int] = field(default_factory=lambda: {4, 6})
    lo: set[IPInterface] = field(default_factory=set)
    on_interface: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = field(
        default_factory=lambda: {ipaddress.ip_address("10.0.0.2"), ipaddress.ip_address("fd00::2")})
    sysctls: dict[str, int | None] = field(default_factory=lambda: _sysctls("eth0"))
    xdp: tuple[int, str] | None = None
    decap_addresses: set[ipaddress.IPv4Address | ipaddress.IPv6Address] | None = None
    modules: set[str] = field(default_factory=set)
    tunnels: dict[str, tuple[str, bool]] = field(default_factory=dict)
    advmss: dict[RouteKey, int | None] = field(default_factory=lambda: {V4_DEFAULT: None, V6_DEFAULT: None})
    applied: list[Change] = field(default_factory=list)
    fail_on: str | None = None  # a change whose text contains this raises BackendError

    def default_interface(self) -> str:
        return self.interface

    def gather(self, wanted: Wanted) -> Facts:
        if wanted.interface != self.interface:
            raise BackendError(f"--interface {wanted.interface}: not found")
        return Facts(interface=self.interface, mtu=self.mtu, families=frozenset(self.families),
                     lo=frozenset(self.lo), on_interface=frozenset(self.on_interface),
                     sysctls=dict(self.sysctls),
                     xdp=self.xdp, decap_addresses=None if self.decap_addresses is None
                     else frozenset(self.decap_addresses), modules=frozenset(self.modules),
                     tunnels=dict(self.tunnels),
                     reply_routes={vip: self._route(vip.version) for vip in wanted.vips})

    def _route(self, family: int) -> RouteFact | None:
        key = V4_DEFAULT if family == 4 else V6_DEFAULT
        if key not in self.advmss:
            return None
        return RouteFact(key=key, description=f"default via gw{family} dev {self.interface}",
                         advmss=self.advmss[key], mtu=self.mtu)

    def apply(self, change: Change) -> None:
        if self.fail_on is not None and self.fail_on in str(change):
            raise BackendError(f"{change}: refused by the fake kernel")
        self.applied.append(change)
        match change:
            case AddAddress(cidr=cidr):
                self.lo.add(ipaddress.ip_interface(cidr))
            case RemoveAddress(cidr=cidr):
                self.lo.discard(ipaddress.ip_interface(cidr))
            case SetSysctl(key=key, value=value):
                self.sysctls[key] = value
            case AttachDecap():
                self.xdp = (7, DECAP_PROGRAM)
                self.decap_addresses = set(self.on_interface)
            case DetachDecap():
                self.xdp, self.decap_addresses = None, None
            case AddTunnel(name=name, kind=kind):
                self.tunnels[name] = (kind, True)
                self.sysctls.update(_sysctls(name))
            case DeleteLink(name=name):
                self.tunnels.pop(name, None)
                for n in ("rp_filter", "arp_ignore", "arp_announce"):
                    self.sysctls.pop(conf(name, n), None)
            case SetAdvmss(route=route, value=value):
                self.advmss[route] = value

    def snapshot(self) -> tuple[object, ...]:
        """Everything setup may change, for comparing a host before and after."""
        return (set(self.lo), dict(self.sysctls), self.xdp, dict(self.tunnels), dict(self.advmss))
