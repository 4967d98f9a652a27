"""What the kernel knows about an interface and its gateway, read with pyroute2 (netlink)."""

from __future__ import annotations

import ipaddress
from typing import Any

from edge_lb.errors import NetlinkError


def _ipr() -> Any:
    from pyroute2 import IPRoute

    return IPRoute()


def _link(ipr: Any, ifname: str) -> Any:
    idx = ipr.link_lookup(ifname=ifname)
    if not idx:
        raise NetlinkError(f"interface {ifname!r} not found in this network namespace")
    return ipr.get_links(idx[0])[0]


def interface_mac(ifname: str) -> str:
    with _ipr() as ipr:
        return str(_link(ipr, ifname).get_attr("IFLA_ADDRESS"))


def interface_mtu(ifname: str) -> int:
    with _ipr() as ipr:
        return int(_link(ipr, ifname).get_attr("IFLA_MTU"))


def gateway_mac(ifname: str) -> str:
    """MAC of the default gateway reached through ifname (IPv4 first, then IPv6), from the neighbour table."""
    with _ipr() as ipr:
        oif = ipr.link_lookup(ifname=ifname)
        if not oif:
            raise NetlinkError(f"interface {ifname!r} not found in this network namespace")
        for family in (2, 10):
            for route in ipr.get_default_routes(family=family):
                gw = route.get_attr("RTA_GATEWAY")
                if gw and route.get_attr("RTA_OIF") == oif[0]:
                    return _neighbour_mac(ipr, oif[0], gw, ifname)
    raise NetlinkError(f"no default route through {ifname}: set node.gateway_mac")


def _neighbour_mac(ipr: Any, oif: int, gw: str, ifname: str) -> str:
    family = 2 if ipaddress.ip_address(gw).version == 4 else 10
    for n in ipr.get_neighbours(family=family, ifindex=oif):
        if n.get_attr("NDA_DST") == gw and n.get_attr("NDA_LLADDR"):
            return str(n.get_attr("NDA_LLADDR"))
    raise NetlinkError(f"gateway {gw} on {ifname} has no neighbour entry yet (ping it) "
                       "or set node.gateway_mac")
