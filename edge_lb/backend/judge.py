"""What is wrong with a backend, judged from its facts alone (pure): one Item per line of `backend check`.

The kernel's rules this follows:
- A VIP must be a local address (on `lo`, as a /32 or /128: a shorter prefix makes its whole subnet local)
  and on no interface that faces the LB's network, or the backend answers ARP / ND for it there.
- IPv4 ARP: `arp_ignore` and `arp_announce` take the larger of `all` and the interface's value.
  arp_ignore >= 1: answer only for addresses on the interface the request came in on (the VIP is on lo);
  arp_announce = 2: never use the VIP as the source of its own ARP requests.
- rp_filter takes the larger of `all` and the device the packet arrives on (the interface with XDP decap, the
  tunnel device with ipip): 1 (strict) drops an inner packet whose client is not routed back through that
  device; 0 (off) and 2 (loose) keep it.
- A SYN-ACK advertises the advmss of the route its reply takes (VIP -> client; not the VIP's local route);
  unset, the kernel uses that route's MTU - 40 (IPv6: - 60). The client's full-size segment + the LB's
  encapsulation must fit the interface's MTU: advmss <= MTU - overhead - 40 (IPv6: 60).
"""

from __future__ import annotations

from collections.abc import Iterable

from edge_lb.backend.model import (
    DECAP_PROGRAM,
    TUNNELS,
    Facts,
    IPAddress,
    Item,
    RouteFact,
    RouteKey,
    Wanted,
)


def conf(device: str, name: str) -> str:
    """The /proc/sys path (relative) of an IPv4 per-device setting: net/ipv4/conf/eth0/rp_filter."""
    return f"net/ipv4/conf/{device}/{name}"


def effective(facts: Facts, device: str, name: str) -> int:
    """The value the kernel applies on `device`: the larger of `all` and the device's own."""
    return max(facts.sysctls.get(conf("all", name)) or 0, facts.sysctls.get(conf(device, name)) or 0)


def inner_devices(facts: Facts) -> list[str]:
    """Where a decapsulated packet arrives: the interface (XDP decap), and the tunnel devices that are up
    (ipip)."""
    tunnels = [name for name, (_, up) in facts.tunnels.items()
               if up and facts.sysctls.get(conf(name, "rp_filter")) is not None]
    return [facts.interface, *sorted(tunnels)]


def items(facts: Facts, wanted: Wanted) -> list[Item]:
    """Every check line, in a fixed order: VIPs, decap, rp_filter, ARP (IPv4 VIPs only), MSS."""
    out = [vip_item(facts, vip) for vip in wanted.vips]
    out.append(decap_item(facts))
    out.append(rp_filter_item(facts))
    if any(vip.version == 4 for vip in wanted.vips):
        out += arp_items(facts)
    out += mss_items(facts, wanted)
    return out


def vip_item(facts: Facts, vip: IPAddress) -> Item:
    full = vip.max_prefixlen
    on_lo = [a for a in facts.lo if a.ip == vip]
    if vip in facts.on_interface:
        return Item(name="vip", ok=False, detail=f"{vip} is on {facts.interface}: the backend answers "
                    f"{'ARP' if vip.version == 4 else 'neighbour discovery'} for it there (take it off "
                    f"{facts.interface}; it belongs on lo)")
    if not on_lo:
        return Item(name="vip", ok=False, detail=f"{vip} is not on lo: packets to it are not for this host")
    if all(a.network.prefixlen != full for a in on_lo):
        return Item(name="vip", ok=False, detail=f"{vip} is on lo as /{on_lo[0].network.prefixlen}, want "
                    f"/{full} (a shorter prefix makes its whole subnet local)")
    return Item(name="vip", ok=True, detail=f"{vip}/{full} on lo")


def decap_ok(facts: Facts) -> bool:
    return (_xdp_decap(facts) and not uncovered(facts)) or not missing_tunnels(facts)


def _xdp_decap(facts: Facts) -> bool:
    return facts.xdp is not None and facts.xdp[1] == DECAP_PROGRAM


def uncovered(facts: Facts) -> list[IPAddress]:
    """The interface's addresses (not link-local: the LB sends to no such address) an attached xdp_decap
    does not decapsulate for: added after it was attached (attach again to take them)."""
    if facts.decap_addresses is None:
        return []
    return sorted((a for a in facts.on_interface if not a.is_link_local and a not in facts.decap_addresses),
                  key=lambda a: (a.version, a))


def missing_tunnels(facts: Facts) -> list[int]:
    """Outer families of the interface with no tunnel device up to take their packets."""
    return [family for family in sorted(facts.families)
            if not any(kind == TUNNELS[family][1] and up for kind, up in facts.tunnels.values())]


def decap_item(facts: Facts) -> Item:
    if _xdp_decap(facts) and (lacking := uncovered(facts)) and missing_tunnels(facts):
        return Item(name="decap", ok=False,
                    detail=f"{DECAP_PROGRAM} on {facts.interface} does not decapsulate for {_names(lacking)} "
                    "(added since it was attached?): packets to it are dropped")
    if _xdp_decap(facts) and not uncovered(facts):
        assert facts.xdp is not None
        return Item(name="decap", ok=True,
                    detail=f"{DECAP_PROGRAM} (XDP, id {facts.xdp[0]}) on {facts.interface}")
    missing = missing_tunnels(facts)
    if not missing:
        up = ", ".join(sorted(name for name, (_, is_up) in facts.tunnels.items() if is_up))
        return Item(name="decap", ok=True, detail=f"tunnel devices up: {up}")
    xdp = (f"{facts.interface} runs XDP program {facts.xdp[1]!r} (id {facts.xdp[0]}), not {DECAP_PROGRAM}"
           if facts.xdp is not None else f"no XDP program on {facts.interface}")
    kinds = " or ".join(TUNNELS[f][1] for f in missing)
    return Item(name="decap", ok=False, detail=f"no decapsulation: {xdp}, and no {kinds} device up "
                "(encapsulated packets are dropped)")


def rp_filter_item(facts: Facts) -> Item:
    strict = [device for device in inner_devices(facts) if effective(facts, device, "rp_filter") == 1]
    if strict:
        values = ", ".join(f"{d} {facts.sysctls.get(conf(d, 'rp_filter'))}" for d in ["all", *strict])
        return Item(name="rp_filter", ok=False, detail=f"rp_filter strict on {', '.join(strict)} ({values}): "
                    "an inner packet whose client is not routed back that way is dropped; want 0 or 2")
    shown = ", ".join(f"{d} {effective(facts, d, 'rp_filter')}" for d in inner_devices(facts))
    return Item(name="rp_filter", ok=True, detail=f"rp_filter not strict ({shown})")


def arp_items(facts: Facts) -> list[Item]:
    out = []
    for name, least, why in (("arp_ignore", 1, "ARP would answer for the VIPs on lo"),
                             ("arp_announce", 2, "ARP requests may carry a VIP as their source")):
        value = effective(facts, facts.interface, name)
        parts = f"all {facts.sysctls.get(conf('all', name))}, {facts.interface} " \
                f"{facts.sysctls.get(conf(facts.interface, name))}"
        if value < least:
            out.append(Item(name=name, ok=False,
                            detail=f"{name} {value} on {facts.interface} ({parts}): {why}; want {least}"))
        else:
            out.append(Item(name=name, ok=True, detail=f"{name} {value} on {facts.interface}"))
    return out


def reply_groups(facts: Facts, wanted: Wanted) -> dict[RouteKey, tuple[RouteFact, int, list[IPAddress]]]:
    """Each route VIP replies take -> (its facts, the largest advmss allowed on it, the VIPs using it)."""
    groups: dict[RouteKey, tuple[RouteFact, int, list[IPAddress]]] = {}
    for vip in wanted.vips:
        route = facts.reply_routes.get(vip)
        if route is None:
            continue
        limit = wanted.advmss(facts.mtu, vip.version)
        _, previous, vips = groups.get(route.key, (route, limit, []))
        groups[route.key] = (route, min(previous, limit), [*vips, vip])
    return groups


def mss_items(facts: Facts, wanted: Wanted) -> list[Item]:
    out = [Item(name="mss", ok=False, detail=f"no route for replies from {vip}: its clients are unreachable")
           for vip in wanted.vips if facts.reply_routes.get(vip) is None]
    for route, limit, vips in reply_groups(facts, wanted).values():
        have = (f"advmss {route.advmss}" if route.advmss is not None
                else f"advmss unset, so {route.effective_advmss} from MTU {route.mtu}")
        text = (f"replies from {_names(vips)} take '{route.description}': {have}; want <= {limit} "
                f"(MTU {facts.mtu} - {wanted.overhead} encapsulation - IP/TCP headers)")
        ok = route.effective_advmss <= limit
        out.append(Item(name="mss", ok=ok, detail=text if ok else f"MSS not clamped: {text}"))
    return out


def _names(vips: Iterable[IPAddress]) -> str:
    return ", ".join(str(v) for v in vips)
