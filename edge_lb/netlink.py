"""What the kernel knows about interfaces, routes and neighbours, read with pyroute2 (netlink). The only
module that opens pyroute2's IPRoute or AsyncIPRoute.

    interface_mac / interface_mtu / interface_addresses(ifname)   a link's MAC, MTU and configured addresses
    link_state(ifname)                                           administratively up, and its operstate
    gateway_address / gateway_mac(ifname)                        the default gateway through a link
    source_address(dst)                                          the kernel's source address towards dst
    xdp_prog_id(ifname)                                          the XDP program attached to a link
    interface_networks / add_address / remove_address             addresses with their prefix lengths
    default_interface()                                          the device of the default route
    reply_route(dst, src) / set_route_advmss(...)                 the FIB entry a reply takes; its advmss
    tunnel_links / add_external_tunnel / delete_link              ipip and ip6tnl devices (backends)
    xdp_attached(ifname)                                         ... with its mode (native, generic)
    (netlink_tc.py: a tc egress BPF filter and fwmark policy routing, with this module's socket helpers)
    NetlinkEvents                                                link, neighbour and route events, async

The sync functions block (pyroute2's IPRoute runs its own event loop): from async code, run them in a thread.
"""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from edge_lb.errors import NetlinkError

# Neighbour (NUD_*) states, from include/uapi/linux/neighbour.h. An entry in one of USABLE_NUD_STATES holds a
# link-layer address the kernel itself would send to; INCOMPLETE (resolving) and FAILED (gave up) do not.
NUD_INCOMPLETE, NUD_REACHABLE, NUD_STALE, NUD_DELAY = 0x01, 0x02, 0x04, 0x08
NUD_PROBE, NUD_FAILED, NUD_NOARP, NUD_PERMANENT = 0x10, 0x20, 0x40, 0x80
USABLE_NUD_STATES = NUD_REACHABLE | NUD_STALE | NUD_DELAY | NUD_PROBE | NUD_PERMANENT
ZERO_MAC = "00:00:00:00:00:00"


def _ipr() -> Any:
    from pyroute2 import IPRoute

    return IPRoute()


def _index(ipr: Any, ifname: str) -> int:
    idx = ipr.link_lookup(ifname=ifname)
    if not idx:
        raise NetlinkError(f"interface {ifname!r} not found in this network namespace")
    return int(idx[0])


def _link(ipr: Any, ifname: str) -> Any:
    return ipr.get_links(_index(ipr, ifname))[0]


def interface_mac(ifname: str) -> str:
    with _ipr() as ipr:
        return str(_link(ipr, ifname).get_attr("IFLA_ADDRESS"))


def interface_mtu(ifname: str) -> int:
    with _ipr() as ipr:
        return int(_link(ipr, ifname).get_attr("IFLA_MTU"))


def link_state(ifname: str) -> tuple[bool, str, int]:
    """(administratively up, the kernel's operstate: "UP", "DOWN", "LOWERLAYERDOWN", "UNKNOWN", ..., MTU):
    one read for everything the link watcher follows."""
    with _ipr() as ipr:
        link = _link(ipr, ifname)
        return (bool(link["flags"] & 1), str(link.get_attr("IFLA_OPERSTATE")),  # flags 1: IFF_UP
                int(link.get_attr("IFLA_MTU")))


def interface_addresses(ifname: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Every address configured on `ifname` in the current network namespace. NetlinkError if the interface
    is missing or the kernel cannot be asked."""
    try:
        with _ipr() as ipr:
            indexes = ipr.link_lookup(ifname=ifname)
            if not indexes:
                raise NetlinkError(f"interface {ifname!r}: not found")
            messages = ipr.get_addr(index=indexes[0])
    except NetlinkError:
        raise
    except Exception as exc:  # pyroute2's NetlinkError, OSError
        raise NetlinkError(f"interface {ifname!r}: reading addresses failed: {exc}") from exc
    addresses: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for msg in messages:
        # On point-to-point links IFA_ADDRESS is the peer; IFA_LOCAL is ours whenever present.
        text = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
        if text:
            addresses.append(ipaddress.ip_address(text))
    return addresses


def source_address(dst: str) -> str | None:
    """The kernel's preferred source address towards `dst` (`ip route get` -> RTA_PREFSRC), None if the route
    has none. NetlinkError if there is no route to `dst` or the kernel cannot be asked."""
    try:
        with _ipr() as ipr:
            routes = list(ipr.route("get", dst=dst))
    except Exception as exc:  # pyroute2's NetlinkError (no route), OSError
        raise NetlinkError(f"route to {dst}: {exc}") from exc
    for route in routes:
        if src := route.get_attr("RTA_PREFSRC"):
            return str(src)
    return None


def usable_neighbour(state: int, lladdr: str | None) -> bool:
    """Whether a neighbour entry's address can be used: a usable state and a real (non-zero) lladdr."""
    return bool(state & USABLE_NUD_STATES) and bool(lladdr) and lladdr != ZERO_MAC


def gateway_address(ifname: str) -> str:
    """Address of the default gateway reached through ifname (IPv4 first, then IPv6)."""
    with _ipr() as ipr:
        return _gateway(ipr, _index(ipr, ifname), ifname)


def gateway_mac(ifname: str) -> str:
    """MAC of the default gateway reached through ifname (IPv4 first, then IPv6), from the neighbour table."""
    with _ipr() as ipr:
        oif = _index(ipr, ifname)
        return _neighbour_mac(ipr, oif, _gateway(ipr, oif, ifname), ifname)


def _gateway(ipr: Any, oif: int, ifname: str) -> str:
    for family in (2, 10):
        for route in ipr.get_default_routes(family=family):
            gw = route.get_attr("RTA_GATEWAY")
            if gw and route.get_attr("RTA_OIF") == oif:
                return str(gw)
    raise NetlinkError(f"no default route through {ifname}: set node.gateway_mac")


def _neighbour_mac(ipr: Any, oif: int, gw: str, ifname: str) -> str:
    gw_ip = ipaddress.ip_address(gw)
    family = 2 if gw_ip.version == 4 else 10
    for n in ipr.get_neighbours(family=family, ifindex=oif):
        dst, lladdr = n.get_attr("NDA_DST"), n.get_attr("NDA_LLADDR")
        if dst and ipaddress.ip_address(dst) == gw_ip and usable_neighbour(n["state"], lladdr):
            return str(lladdr).lower()
    raise NetlinkError(f"gateway {gw} on {ifname} has no usable neighbour entry yet (ping it) "
                       "or set node.gateway_mac")


def xdp_prog_id(ifname: str) -> int | None:
    """The id of the XDP program attached to ifname (any mode), or None."""
    return xdp_attached(ifname)[0]


# XDP_ATTACHED_* (linux/if_link.h) as pyroute2 names them -> our mode names
XDP_ATTACHED_MODE = {"xdp": "native", "xdpgeneric": "generic", "xdpoffload": "offload", "xdpmulti": "multi"}


def xdp_attached(ifname: str) -> tuple[int | None, str | None]:
    """(id, mode) of the XDP program attached to ifname ("native", "generic", ...), or (None, None)."""
    with _ipr() as ipr:
        xdp = _link(ipr, ifname).get_attr("IFLA_XDP")
        prog = xdp.get_attr("IFLA_XDP_PROG_ID") if xdp is not None else None
        if not prog:
            return None, None
        return int(prog), XDP_ATTACHED_MODE.get(str(xdp.get_attr("IFLA_XDP_ATTACHED")))


def interface_networks(ifname: str) -> list[ipaddress.IPv4Interface | ipaddress.IPv6Interface]:
    """The addresses of `ifname` with their prefix lengths (10.0.0.1/32 on lo)."""
    try:
        with _ipr() as ipr:
            messages = ipr.get_addr(index=_index(ipr, ifname))
    except NetlinkError:
        raise
    except Exception as exc:
        raise NetlinkError(f"interface {ifname!r}: reading addresses failed: {exc}") from exc
    return [ipaddress.ip_interface(f"{m.get_attr('IFA_LOCAL') or m.get_attr('IFA_ADDRESS')}/{m['prefixlen']}")
            for m in messages]


def _address_op(op: str, ifname: str, cidr: str) -> None:
    iface = ipaddress.ip_interface(cidr)
    try:
        with _ipr() as ipr:
            ipr.addr(op, index=_index(ipr, ifname), address=str(iface.ip), prefixlen=iface.network.prefixlen)
    except NetlinkError:
        raise
    except Exception as exc:
        raise NetlinkError(f"{op} address {cidr} on {ifname}: {exc}") from exc


def add_address(ifname: str, cidr: str) -> None:
    _address_op("add", ifname, cidr)


def remove_address(ifname: str, cidr: str) -> None:
    """Remove an address; one that is not there is not an error."""
    if ipaddress.ip_interface(cidr) in interface_networks(ifname):
        _address_op("del", ifname, cidr)


def default_interface() -> str:
    """The device of the default route (IPv4 first, then IPv6)."""
    with _ipr() as ipr:
        for family in (2, 10):
            for route in ipr.get_default_routes(family=family):
                if oif := route.get_attr("RTA_OIF"):
                    return str(ipr.get_links(oif)[0].get_attr("IFLA_IFNAME"))
    raise NetlinkError("no default route: name the interface")


@dataclass(frozen=True, kw_only=True)
class Route:
    """One FIB entry: how the kernel names it (family, table, dst, priority) and what a reply needs of it."""

    family: int  # 4 or 6
    table: int
    dst: str  # "0.0.0.0/0"
    priority: int | None
    gateway: str | None
    device: str
    metrics: dict[str, int]  # "advmss", "mtu", ... as set on the route
    device_mtu: int
    multipath: bool


_RTM_F_FIB_MATCH = 0x2000  # linux/rtnetlink.h: answer with the FIB entry, not a cloned cache route


def reply_route(dst: str, src: str | None) -> Route:
    """The FIB entry the kernel takes from `src` to `dst` (`ip route get fibmatch DST from SRC`); without
    `src` when it is not (yet) a local address. NetlinkError when there is no route."""
    version = ipaddress.ip_address(dst).version
    try:
        with _ipr() as ipr:
            try:
                msg = ipr.route("get", dst=dst, src=src, flags=_RTM_F_FIB_MATCH)[0]
            except Exception:
                if src is None:
                    raise
                msg = ipr.route("get", dst=dst, flags=_RTM_F_FIB_MATCH)[0]
            oif = msg.get_attr("RTA_OIF")
            link = ipr.get_links(oif)[0] if oif else None
    except Exception as exc:
        raise NetlinkError(f"route to {dst} from {src}: {exc}") from exc
    metrics = msg.get_attr("RTA_METRICS")
    zero = "0.0.0.0" if version == 4 else "::"
    return Route(
        family=version, table=int(msg.get_attr("RTA_TABLE") or msg["table"]),
        dst=f"{msg.get_attr('RTA_DST') or zero}/{msg['dst_len']}", priority=msg.get_attr("RTA_PRIORITY"),
        gateway=msg.get_attr("RTA_GATEWAY"),
        device=str(link.get_attr("IFLA_IFNAME")) if link is not None else "?",
        metrics={k[5:].lower(): int(v) for k, v in (metrics["attrs"] if metrics else [])},
        device_mtu=int(link.get_attr("IFLA_MTU")) if link is not None else 1500,
        multipath=msg.get_attr("RTA_MULTIPATH") is not None)


def set_route_advmss(family: int, table: int, dst: str, priority: int | None, advmss: int | None) -> None:
    """Replace the FIB entry (family, table, dst, priority) by itself with advmss set (None: removed), every
    other attribute and metric kept."""
    net = ipaddress.ip_network(dst)
    what = f"route {dst} table {table}"
    try:
        with _ipr() as ipr:
            entries = [r for r in ipr.get_routes(family=2 if family == 4 else 10, table=table,
                                                 dst_len=net.prefixlen)
                       if (r.get_attr("RTA_DST") or str(net.network_address)) == str(net.network_address)
                       and r.get_attr("RTA_PRIORITY") == priority]
            if not entries:
                raise NetlinkError(f"{what}: not found")
            ipr.route("replace", **_route_args(entries[0], advmss, what))
    except NetlinkError:
        raise
    except Exception as exc:
        raise NetlinkError(f"{what}: setting advmss {advmss}: {exc}") from exc


def _route_args(entry: Any, advmss: int | None, what: str) -> dict[str, Any]:
    if entry.get_attr("RTA_MULTIPATH") is not None:
        raise NetlinkError(f"{what}: a multipath route; set its advmss by hand "
                           "(ip route change ... advmss N)")
    held = entry.get_attr("RTA_METRICS")
    metrics = {k[5:].lower(): int(v) for k, v in (held["attrs"] if held else [])}
    metrics.pop("advmss", None)
    if advmss is not None:
        metrics["advmss"] = advmss
    args: dict[str, Any] = {k: entry[k] for k in ("family", "dst_len", "table", "proto", "scope", "type")}
    for attr, key in (("RTA_DST", "dst"), ("RTA_GATEWAY", "gateway"), ("RTA_OIF", "oif"),
                      ("RTA_PRIORITY", "priority"), ("RTA_PREFSRC", "prefsrc"), ("RTA_TABLE", "table")):
        if (value := entry.get_attr(attr)) is not None:
            args[key] = value
    args["metrics"] = metrics
    return args


TUNNEL_KINDS = ("ipip", "ip6tnl")


def tunnel_links() -> dict[str, tuple[str, bool]]:
    """Every ipip and ip6tnl device: name -> (kind, administratively up)."""
    with _ipr() as ipr:
        out = {}
        for link in ipr.get_links():
            info = link.get_attr("IFLA_LINKINFO")
            kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
            if kind in TUNNEL_KINDS:
                out[str(link.get_attr("IFLA_IFNAME"))] = (str(kind), bool(link["flags"] & 1))
        return out


def add_external_tunnel(name: str, kind: str) -> None:
    """An ipip or ip6tnl device in external (collect-metadata) mode, up: it takes every IPIP (ip6tnl: IP6IP6
    and 4in6, mode any) packet to a local address that no other tunnel claims."""
    extra = ({"ipip_collect_metadata": True} if kind == "ipip"
             else {"ip6tnl_collect_metadata": True, "ip6tnl_proto": 0})
    try:
        with _ipr() as ipr:
            ipr.link("add", ifname=name, kind=kind, **extra)
            ipr.link("set", index=_index(ipr, name), state="up")
    except NetlinkError:
        raise
    except Exception as exc:
        raise NetlinkError(f"creating {kind} device {name}: {exc}") from exc


def delete_link(name: str) -> None:
    """Delete a device; one that is not there is not an error."""
    try:
        with _ipr() as ipr:
            if idx := ipr.link_lookup(ifname=name):
                ipr.link("del", index=idx[0])
    except Exception as exc:
        raise NetlinkError(f"deleting device {name}: {exc}") from exc
class NetlinkEvents:
    """Link, neighbour and IPv4/IPv6 route events, read in the caller's event loop (an AsyncIPRoute bound to
    those multicast groups; no thread).

        events = await NetlinkEvents.open("the gateway of eth0")   # NetlinkError if it cannot be opened
        async for msg in events.messages():   # pyroute2 messages: msg.get("event"), msg.get_attr(...)
            ...
        events.close()

    messages() raises whatever pyroute2 raises when events were lost (ENOBUFS) or the socket broke; pyroute2
    advises a new socket then: open another and close this one.
    """

    def __init__(self, sock: Any) -> None:
        self._sock = sock

    @classmethod
    async def open(cls, what: str) -> NetlinkEvents:
        """Subscribe to the link, neighbour and route groups; `what` names the follower in error messages."""
        from pyroute2 import AsyncIPRoute
        from pyroute2.netlink.rtnl import RTMGRP_IPV4_ROUTE, RTMGRP_IPV6_ROUTE, RTMGRP_LINK, RTMGRP_NEIGH

        try:
            sock = AsyncIPRoute()
        except Exception as exc:
            raise NetlinkError(f"opening a netlink socket to follow {what}: {exc}") from exc
        try:
            await sock.bind(groups=RTMGRP_LINK | RTMGRP_NEIGH | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE)
        except BaseException as exc:  # cancelled too: the socket is closed before it is dropped
            sock.close()
            if isinstance(exc, Exception):
                raise NetlinkError(f"subscribing to netlink events for {what}: {exc}") from exc
            raise
        return cls(sock)

    def messages(self) -> AsyncIterator[Any]:
        """The events as they arrive, forever (until an error or close())."""
        it: AsyncIterator[Any] = self._sock.get()
        return it

    def close(self) -> None:
        self._sock.close()
