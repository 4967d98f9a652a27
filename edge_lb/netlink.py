"""What the kernel knows about interfaces, routes and neighbours, read with pyroute2 (netlink). The only
module that opens pyroute2's IPRoute or AsyncIPRoute.

    interface_mac / interface_mtu / interface_addresses(ifname)   a link's MAC, MTU and configured addresses
    link_state(ifname)                                           administratively up, and its operstate
    gateway_address / gateway_mac(ifname)                        the default gateway through a link
    source_address(dst)                                          the kernel's source address towards dst
    xdp_prog_id(ifname)                                          the XDP program attached to a link
    NetlinkEvents                                                link, neighbour and route events, async

The sync functions block (pyroute2's IPRoute runs its own event loop): from async code, run them in a thread.
"""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator
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
    with _ipr() as ipr:
        xdp = _link(ipr, ifname).get_attr("IFLA_XDP")
        prog = xdp.get_attr("IFLA_XDP_PROG_ID") if xdp is not None else None
        return int(prog) if prog else None


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
