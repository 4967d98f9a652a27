"""The [bgp] table and each VIP's [vip.bgp] route attributes.

    [bgp]
    local_as = 65001
    router_id = "10.200.1.2"        # optional: the first IPv4 peer's local address
    drain_time = 2.0                # seconds between withdrawing everything and stopping, on shutdown
    disable_file = "/var/lib/edge-lb/default.disabled"   # optional; its existence withdraws every VIP
    heartbeat_timeout = 2.0         # seconds without the supervisor's heartbeat (a hung supervisor) before
                                    #   ExaBGP's bridge withdraws every route; below every peer's hold_time
      [[bgp.peer]]
      address = "10.200.1.1"
      as = 65000
      hold_time = 3
      local_address = "10.200.1.2"  # optional: the kernel's source address towards the peer
      md5_password = "secret"       # optional TCP MD5 (RFC 2385), or md5_password_file = "/etc/edge-lb/k"

    [vip.bgp]                       # per VIP: what its route carries (VIPs on one address must agree)
    med = 10
    communities = ["65000:100"]
    large_communities = ["65000:1:2"]   # "GLOBAL:DATA1:DATA2", each 0..4294967295
    as_path_prepend = 2             # our AS twice more (or a list of ASNs sent after ours: [65001, 65001])
    down = "med"                    # when health would withdraw it: "withdraw" (default) or announce with
    down_med = 1000                 #   this worse MED (primary/backup sites); disable, detach and shutdown
                                    #   still withdraw
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any

from edge_lb.configtools import Invalid, Table, address, choice, file_path, integer, number, string
from healthchecks.base import IPAddress

_COMMUNITY = re.compile(r"(\d{1,5}):(\d{1,5})")
_LARGE_COMMUNITY = re.compile(r"(\d{1,10}):(\d{1,10}):(\d{1,10})")
_ASN = integer(1, 4294967295)
_U32 = 4294967295
MAX_PREPEND = 16  # ASNs; longer paths are dropped by many routers' maxas-limit
MD5_MAX = 80  # bytes: TCP_MD5SIG_MAXKEYLEN


@dataclass(frozen=True, kw_only=True)
class RouteAttrs:
    """What a VIP's route carries besides its prefix."""

    next_hop: str = "self"  # "self" or an IP address
    med: int | None = None
    communities: tuple[str, ...] = ()  # "ASN:VALUE", each part 0..65535
    large_communities: tuple[str, ...] = ()  # "GLOBAL:DATA1:DATA2", each part 0..4294967295
    as_path_prepend: int | tuple[int, ...] = 0  # our AS this many more times, or these ASNs after ours
    down: str = "withdraw"  # health would withdraw it: "withdraw", or "med": announce with down_med
    down_med: int | None = None  # required with down = "med"; worse (greater) than med

    def as_path(self, local_as: int) -> tuple[int, ...]:
        """The AS path to send, starting with ours (an eBGP peer checks the first AS); () for the default."""
        if isinstance(self.as_path_prepend, tuple):
            return (local_as, *self.as_path_prepend)
        return (local_as,) * (self.as_path_prepend + 1) if self.as_path_prepend else ()


@dataclass(frozen=True, kw_only=True)
class Peer:
    address: IPAddress
    asn: int  # the peer's AS ("as" in the file)
    hold_time: int = 3  # seconds; 3 is the smallest ExaBGP and BIRD accept
    local_address: IPAddress | None = None  # None: the kernel's source address towards the peer
    md5_password: str | None = field(default=None, repr=False)  # TCP MD5 key (or md5_password_file's)


@dataclass(frozen=True, kw_only=True)
class Bgp:
    local_as: int
    peers: tuple[Peer, ...]
    router_id: ipaddress.IPv4Address | None = None  # None: the first IPv4 local address
    drain_time: float = 2.0  # seconds between withdrawing everything and stopping, on shutdown
    disable_file: str | None = None  # None: /var/lib/edge-lb/<instance>.disabled
    heartbeat_timeout: float = 2.0  # seconds; edge_lb.bgp.exabgp_bridge withdraws everything past it


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


def _large_communities(value: Any) -> tuple[str, ...]:
    items = value if isinstance(value, list) else None
    if items is None or not all(isinstance(c, str) for c in items):
        raise Invalid('must be a list of "GLOBAL:DATA1:DATA2" strings, like ["65000:1:2"]')
    for community in items:
        match = _LARGE_COMMUNITY.fullmatch(community)
        if not match or any(int(part) > _U32 for part in match.groups()):
            raise Invalid(f'{community!r} is not "GLOBAL:DATA1:DATA2" with each part 0..4294967295')
    return tuple(":".join(str(int(p)) for p in c.split(":")) for c in items)


def _prepend(value: Any) -> int | tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_PREPEND:
        return value
    if (isinstance(value, list) and 1 <= len(value) <= MAX_PREPEND
            and all(isinstance(a, int) and not isinstance(a, bool) and 1 <= a <= _U32 for a in value)):
        return tuple(value)
    raise Invalid(f"must be a count 0..{MAX_PREPEND} (our AS repeated) or a list of 1..{MAX_PREPEND} "
                  "ASNs (each 1..4294967295)")


def _md5(value: Any) -> str:
    text = string(value)
    if not 1 <= len(text.encode()) <= MD5_MAX or not text.isascii() or not text.isprintable():
        raise Invalid(f"must be 1..{MD5_MAX} printable ASCII characters (the kernel's TCP MD5 key limit)")
    return text


def _md5_file(value: Any) -> str:
    path = file_path(value)
    try:
        with open(path, encoding="ascii") as f:
            return _md5(f.read().rstrip("\n"))
    except (OSError, UnicodeDecodeError) as exc:
        raise Invalid(f"cannot read the TCP MD5 key from {path}: {getattr(exc, 'strerror', None) or exc}") \
            from None
    except Invalid as exc:
        raise Invalid(f"{path}: the key {exc}") from None


BGP = {"local_as": _ASN, "router_id": _router_id, "drain_time": number(0, 60),  # below systemd's stop timeout
       "disable_file": file_path, "heartbeat_timeout": number(1.0, 60)}  # >= 4 beats (every 0.25 s)
PEER = {"address": address, "as": _ASN, "hold_time": integer(3, 65535), "local_address": address,
        "md5_password": _md5, "md5_password_file": _md5_file}
ROUTE = {"next_hop": _next_hop, "med": integer(0, _U32), "communities": _communities,
         "large_communities": _large_communities, "as_path_prepend": _prepend,
         "down": choice("withdraw", "med"), "down_med": integer(0, _U32)}


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
    _heartbeat_below_hold(table, values.get("heartbeat_timeout", 2.0), peers)
    if "local_as" not in values:
        return None
    return Bgp(**values, peers=peers)


def _heartbeat_below_hold(table: Table, timeout: float, peers: tuple[Peer, ...]) -> None:
    """A hung supervisor must lose its routes no later than a dead node loses its sessions."""
    hold = min((p.hold_time for p in peers), default=None)
    if hold is not None and timeout >= hold:
        table.problem("heartbeat_timeout", f"{timeout:g} s must be below the smallest [[bgp.peer]] hold_time "
                                           f"({hold} s): a hung supervisor would keep its routes longer than "
                                           "a dead node")


def check_families(bgp: Bgp, vips: list[tuple[Table, IPAddress, RouteAttrs]]) -> None:
    """A VIP's route needs a session of its family, and a next hop of its family; a prepend needs eBGP."""
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
        ibgp = [str(p.address) for p in bgp.peers if p.asn == bgp.local_as]
        if route.as_path_prepend and ibgp:
            table.problem("bgp.as_path_prepend", f"needs eBGP peers: peer {ibgp[0]} is iBGP (as = local_as) "
                                                 "and would drop a path holding its own AS")


def _peer(table: Table) -> Peer | None:
    values = table.values(PEER, required=("address", "as"))
    local = values.get("local_address")
    peer = values.get("address")
    if local is not None and peer is not None and local.version != peer.version:
        table.problem("local_address", f"IPv{local.version} address for an IPv{peer.version} peer")
        return None
    if "md5_password" in values and "md5_password_file" in values:
        table.problem("md5_password_file", "give md5_password or md5_password_file, not both")
        return None
    if "md5_password_file" in values:
        values["md5_password"] = values.pop("md5_password_file")
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
    table = vip_table.table("bgp", tuple(ROUTE))
    values = table.values(ROUTE)
    down, down_med, med = values.get("down"), values.get("down_med"), values.get("med") or 0
    if down == "med" and down_med is None and "down_med" not in table.data:
        table.problem("down_med", 'required with down = "med": the worse MED to announce while down')
    if down_med is not None and down != "med":
        table.problem("down_med", 'only used with down = "med"')
    if down == "med" and down_med is not None and down_med <= med:
        table.problem("down_med", f"must be worse (greater) than med ({med}): routers prefer the lower MED")
    return RouteAttrs(**values)
