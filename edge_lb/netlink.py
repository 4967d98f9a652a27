"""What the kernel knows about an interface and its gateway, read with pyroute2 (netlink)."""

from __future__ import annotations

import ipaddress
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
