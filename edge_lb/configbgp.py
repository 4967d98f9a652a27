"""The [bgp] table and each VIP's [vip.bgp] route attributes.

    [bgp]
    local_as = 65001
    router_id = "10.200.1.2"        # optional: the first IPv4 peer's local address
    drain_time = 2.0                # seconds between withdrawing everything and stopping, on shutdown
    disable_file = "/var/lib/edge-lb/default.disabled"   # optional; its existence withdraws every VIP
      [[bgp.peer]]
      address = "10.200.1.1"
      as = 65000
      hold_time = 3
      local_address = "10.200.1.2"  # optional: the kernel's source address towards the peer
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any

from edge_lb.configtools import Invalid, Table, address, file_path, integer, number, string
from healthchecks.base import IPAddress

_COMMUNITY = re.compile(r"(\d{1,5}):(\d{1,5})")
_ASN = integer(1, 4294967295)


@dataclass(frozen=True, kw_only=True)
class RouteAttrs:
    """What a VIP's route carries besides its prefix."""

    next_hop: str = "self"  # "self" or an IP address
    med: int | None = None
    communities: tuple[str, ...] = ()  # "ASN:VALUE", each part 0..65535


@dataclass(frozen=True, kw_only=True)
class Peer:
    address: IPAddress
    asn: int  # the peer's AS ("as" in the file)
    hold_time: int = 3  # seconds; 3 is the smallest ExaBGP and BIRD accept
    local_address: IPAddress | None = None  # None: the kernel's source address towards the peer


@dataclass(frozen=True, kw_only=True)
class Bgp:
    local_as: int
    peers: tuple[Peer, ...]
    router_id: ipaddress.IPv4Address | None = None  # None: the first IPv4 local address
    drain_time: float = 2.0  # seconds between withdrawing everything and stopping, on shutdown
    disable_file: str | None = None  # None: /var/lib/edge-lb/<instance>.disabled


def _router_id(value: Any) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(string(value))
    except (Invalid, ValueError):
        raise Invalid("must be an IPv4 address (BGP identifiers are 32 bits)") from None


def _next_hop(value: Any) -> str:
    if value == "self":
        return "self"
    return str(address(value))


def _communities(value: Any) -> tuple[str, ...]:
    items = value if isinstance(value, list) else None
    if items is None or not all(isinstance(c, str) for c in items):
        raise Invalid('must be a list of "ASN:VALUE" strings, like ["65000:100"]')
    for community in items:
        match = _COMMUNITY.fullmatch(community)
        if not match or any(int(part) > 65535 for part in match.groups()):
            raise Invalid(f'{community!r} is not "ASN:VALUE" with both parts 0..65535')
    return tuple(items)


BGP = {"local_as": _ASN, "router_id": _router_id, "drain_time": number(0, 60),  # below systemd's stop timeout
       "disable_file": file_path}
PEER = {"address": address, "as": _ASN, "hold_time": integer(3, 65535), "local_address": address}
ROUTE = {"next_hop": _next_hop, "med": integer(0, 4294967295), "communities": _communities}


def parse_bgp(root: Table) -> Bgp | None:
    """The [bgp] table; None when it is absent (the node then announces nothing)."""
    if "bgp" not in root.data:
        return None
    table = root.table("bgp", (*BGP, "peer"))
    values = table.values(BGP, required=("local_as",))
    peers = tuple(p for p in (_peer(t) for t in table.array("peer", tuple(PEER))) if p is not None)
    if table.is_table and not table.data.get("peer"):
        table.problem("peer", "at least one [[bgp.peer]] is required")
    _unique_peers(table, peers)
    if "router_id" not in values and peers and all(p.address.version == 6 for p in peers):
        table.problem("router_id", "required when no peer is IPv4 (a BGP identifier is an IPv4 address)")
    if "local_as" not in values:
        return None
    return Bgp(**values, peers=peers)


def check_families(bgp: Bgp, vips: list[tuple[Table, IPAddress, RouteAttrs]]) -> None:
    """A VIP's route needs a session of its family, and a next hop of its family."""
    families = {p.address.version for p in bgp.peers}
    if not families:
        return  # the peers' own problems are reported already
    for table, vip_address, route in vips:
        if vip_address.version not in families:
            table.problem("address", f"an IPv{vip_address.version} VIP needs an IPv{vip_address.version} "
                                     "[[bgp.peer]] to be announced")
        if route.next_hop != "self" and ipaddress.ip_address(route.next_hop).version != vip_address.version:
            table.problem("bgp.next_hop", f"an IPv{vip_address.version} VIP needs an "
                                          f"IPv{vip_address.version} next hop")


def _peer(table: Table) -> Peer | None:
    values = table.values(PEER, required=("address", "as"))
    local = values.get("local_address")
    peer = values.get("address")
    if local is not None and peer is not None and local.version != peer.version:
        table.problem("local_address", f"IPv{local.version} address for an IPv{peer.version} peer")
        return None
    if "address" not in values or "as" not in values:
        return None
    values["asn"] = values.pop("as")
    return Peer(**values)


def _unique_peers(table: Table, peers: tuple[Peer, ...]) -> None:
    seen = set()
    for i, peer in enumerate(peers):
        if peer.address in seen:
            table.problem(f"peer[{i}].address", f"duplicate peer {peer.address}")
        seen.add(peer.address)


def parse_route(vip_table: Table) -> RouteAttrs:
    """[vip.bgp]: the attributes of the VIP's route."""
    return RouteAttrs(**vip_table.table("bgp", tuple(ROUTE)).values(ROUTE))
