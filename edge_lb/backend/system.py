"""The host behind the backend command: facts gathered from the kernel, changes applied to it.

    class System(Protocol): default_interface(), gather(wanted) -> Facts, apply(change)

LinuxSystem is the kernel (netlink through edge_lb.netlink, sysctls under /proc/sys, bpf/decap.c through
edge_lb.dataplane.decap); edge_lb.backend.fake.FakeSystem is an in-memory host for the table tests.
Everything here acts on the network namespace the process runs in.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from edge_lb import netlink
from edge_lb.backend.judge import conf
from edge_lb.backend.model import (
    DECAP_PROGRAM,
    MODULES,
    AddAddress,
    AddTunnel,
    AttachDecap,
    Change,
    DeleteLink,
    DetachDecap,
    Facts,
    IPAddress,
    RemoveAddress,
    RouteFact,
    RouteKey,
    SetAdvmss,
    SetSysctl,
    Wanted,
)
from edge_lb.errors import BackendError, DataplaneError, NetlinkError

PROC_SYS = Path("/proc/sys")
# Stand-ins for "any client" when asking which route a VIP's replies take (RFC 5737 / RFC 3849 documentation
# addresses: never a real client, so only a route that covers every client matches them).
PROBES = {4: "192.0.2.1", 6: "2001:db8::1"}
_SYSCTL_NAMES = ("rp_filter", "arp_ignore", "arp_announce")


class System(Protocol):
    def default_interface(self) -> str: ...

    def gather(self, wanted: Wanted) -> Facts: ...

    def apply(self, change: Change) -> None: ...


class LinuxSystem:
    def default_interface(self) -> str:
        return netlink.default_interface()

    def gather(self, wanted: Wanted) -> Facts:
        try:
            addresses = netlink.interface_networks(wanted.interface)
        except NetlinkError as exc:
            raise BackendError(f"--interface {wanted.interface}: {exc}") from exc
        tunnels = netlink.tunnel_links()
        return Facts(
            interface=wanted.interface,
            mtu=netlink.interface_mtu(wanted.interface),
            families=frozenset(a.version for a in addresses if not a.ip.is_link_local),
            lo=frozenset(netlink.interface_networks("lo")),
            on_interface=frozenset(a.ip for a in addresses),
            sysctls={conf(d, n): read_sysctl(conf(d, n))
                     for d in ("all", wanted.interface, *tunnels) for n in _SYSCTL_NAMES},
            xdp=(xdp := _xdp(wanted.interface)),
            decap_addresses=_decap_addresses(xdp),
            modules=frozenset(available_modules(MODULES.values())),
            tunnels=tunnels,
            reply_routes={vip: _reply_route(vip) for vip in wanted.vips},
        )

    def apply(self, change: Change) -> None:
        try:
            _apply(change)
        except (NetlinkError, DataplaneError, OSError) as exc:
            raise BackendError(f"{change}: {exc}") from exc


def _apply(change: Change) -> None:
    from edge_lb.dataplane import decap

    match change:
        case AddAddress(cidr=cidr):
            netlink.add_address("lo", cidr)
        case RemoveAddress(cidr=cidr):
            netlink.remove_address("lo", cidr)
        case SetSysctl(key=key, value=value):
            write_sysctl(key, value)
        case AttachDecap(interface=interface, gue_port=gue_port):
            decap.attach(interface, gue_port=gue_port)
        case DetachDecap(interface=interface):
            running = _xdp(interface)
            if running is not None and running[1] != DECAP_PROGRAM:
                raise BackendError(f"{interface} now runs {running[1]!r}, not {DECAP_PROGRAM}: left attached")
            decap.detach(interface)
        case AddTunnel(name=name, kind=kind):
            netlink.add_external_tunnel(name, kind)
        case DeleteLink(name=name):
            netlink.delete_link(name)
        case SetAdvmss(route=route, value=value):
            netlink.set_route_advmss(route.family, route.table, route.dst, route.priority, value)


def read_sysctl(key: str) -> int | None:
    """An integer setting under /proc/sys ("net/ipv4/conf/eth0/rp_filter"), None when it does not exist."""
    try:
        return int((PROC_SYS / key).read_text().split()[0])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, IndexError) as exc:
        raise BackendError(f"reading {PROC_SYS / key}: {exc}") from exc


def write_sysctl(key: str, value: int) -> None:
    (PROC_SYS / key).write_text(f"{value}\n")


def available_modules(names: Iterable[str], sys_module: Path = Path("/sys/module"),
                      lib_modules: Path | None = None) -> set[str]:
    """The modules among `names` this kernel has: loaded or built in (/sys/module), or installed for it
    (modules.dep / modules.builtin under /lib/modules/RELEASE)."""
    names = list(names)
    found = {n for n in names if (sys_module / n).exists()}
    base = lib_modules if lib_modules is not None else Path("/lib/modules", os.uname().release)
    for listing in ("modules.dep", "modules.builtin"):
        try:
            text = (base / listing).read_text()
        except OSError:
            continue
        found |= {n for n in names if re.search(rf"/{re.escape(n)}\.ko(\.\w+)?\b", text)}
    return found


def _xdp(interface: str) -> tuple[int, str] | None:
    from edge_lb.dataplane import bpfsys

    prog_id = netlink.xdp_prog_id(interface)
    if prog_id is None:
        return None
    try:
        return prog_id, bpfsys.prog_name(prog_id)
    except DataplaneError:
        return prog_id, "?"


def _decap_addresses(xdp: tuple[int, str] | None) -> frozenset[IPAddress] | None:
    from edge_lb.dataplane import decap

    if xdp is None or xdp[1] != DECAP_PROGRAM:
        return None
    try:
        return frozenset(decap.attached_addresses(xdp[0]))
    except DataplaneError:
        return None  # not readable (another build of it?): its addresses are not judged


def _reply_route(vip: IPAddress) -> RouteFact | None:
    try:
        route = netlink.reply_route(PROBES[vip.version], str(vip))
    except NetlinkError:
        return None
    gateway = f" via {route.gateway}" if route.gateway else ""
    net = ipaddress.ip_network(route.dst)
    dst = "default" if net.prefixlen == 0 else str(net)
    return RouteFact(
        key=RouteKey(family=route.family, table=route.table, dst=route.dst, priority=route.priority),
        description=f"{dst}{gateway} dev {route.device}" + (" (multipath)" if route.multipath else ""),
        advmss=route.metrics.get("advmss"),
        mtu=route.metrics.get("mtu", route.device_mtu))
