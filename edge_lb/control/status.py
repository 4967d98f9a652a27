"""`edge-lb status`: the supervisor's view as a JSON document, and that document as a table."""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Mapping
from typing import Any

from edge_lb.bgp.policy import host_prefix
from edge_lb.control.document import BackendRow, ConnTableStatus, Served, VipRow
from edge_lb.control.nodestate import NodeState
from edge_lb.dataplane.counters import CounterSnapshot
from edge_lb.dataplane.desired import VipKey

Doc = Mapping[str, Any]  # a node document (document.NodeDocument) or its API view with the VIPs (the CLI's)


def document(state: NodeState, counters: CounterSnapshot) -> Served:
    """VIPs and backends with health, last reason, weight, ring share and traffic (one counter snapshot's)."""
    vip_counts = counters.vips
    backend_counts = counters.backends
    ring_size = state.maps.ring_size
    vips: list[VipRow] = []
    configured = {(v.name, b.address): b.weight for v in state.base.vips for b in v.backends}
    for vip in state.config.vips:
        key = VipKey.of(vip)
        num = state.maps.vip_number(key)
        counts = state.ring_counts(key)
        rows: list[BackendRow] = []
        for b in vip.backends:
            view = state.view(key, b.address, b.weight)
            slots = counts.get(view.index, 0) if view.index is not None else 0
            packets, nbytes = backend_counts.get(view.index, (0, 0)) if view.index is not None else (0, 0)
            rows.append({"address": str(b.address), "weight": b.weight, "state": view.state,
                         "config_weight": configured.get((vip.name, b.address), b.weight),
                         "reason": view.reason, "last_check": view.checked_at, "latency": view.latency,
                         "check": b.healthcheck.kind, "encap": b.encap,
                         "via": b.healthcheck.effective_via if b.healthcheck.checked else None,
                         "ring_slots": slots, "ring_share": slots / ring_size, "packets": packets,
                         "bytes": nbytes})
        packets, nbytes = vip_counts.get(num, (0, 0)) if num is not None else (0, 0)
        vips.append({"vip": vip.name, "address": str(vip.address), "port": vip.port, "protocol": vip.protocol,
                     "healthy": sum(1 for r in rows if r["state"] != "down"),
                     "in_ring": sum(1 for r in rows if r["ring_slots"]),
                     "backends": rows, "packets": packets, "bytes": nbytes})
    return {"vips": vips, "ring_size": ring_size}


def conntable(counters: CounterSnapshot, new_flow_rate: int) -> ConnTableStatus:
    """The connection table's counters (enum lb_stat) beside the flood guard's rate in effect."""
    reasons = counters.reason_packets()
    return {"new_flow_rate_limit": new_flow_rate, "hits": reasons.get("STAT_CT_HIT", 0),
            "misses": reasons.get("STAT_CT_MISS", 0),
            "flood_no_insert": reasons.get("STAT_CT_FLOOD_NO_INSERT", 0),
            "stateless": reasons.get("STAT_CT_STATELESS", 0)}


def _conntable(table: Doc | None) -> list[str]:
    if not table:
        return []
    return [f"connection table: {table['hits']} hits, {table['misses']} from the ring, "
            f"{table['flood_no_insert']} new flows not inserted (over {table['new_flow_rate_limit']} per CPU "
            f"per second), {table['stateless']} stateless"]


def _route(vip: Doc, bgp: Doc) -> str:
    """The VIP's /32 or /128: announced, or why not (bgp.withheld, worked out beside the announce policy)."""
    prefix = str(host_prefix(ipaddress.ip_address(vip["address"])))
    if prefix in bgp.get("announced", []):
        return f"{prefix} announced"
    why = bgp.get("withheld", {}).get(prefix, "BGP has not caught up yet (it retries every second)")
    return f"{prefix} NOT announced: {why}"


def _age(stamp: float | None, now: float) -> str:
    return "never" if stamp is None else f"{max(now - stamp, 0):.1f}s ago"


def _check_tunnel(tunnel: Doc | None) -> list[str]:
    """The tunnel checks' encapsulator, only when there is something to say."""
    if not tunnel:
        return []
    lines = []
    if not tunnel["ready"]:
        lines.append(f"tunnel checks WAIT: encapsulator not in place ({tunnel['failures']} failed attempts, "
                     "retrying)")
    if tunnel["restores"]:
        lines.append(f"tunnel checks' tc filter or fwmark rule removed from outside and restored "
                     f"{tunnel['restores']} times")
    lines += [f"VIP {vip} is a local address on this node: tunnel checks to it are answered locally; "
              'remove it or use via = "direct"' for vip in tunnel["local_vips"]]
    return lines


def _local_faults(faults: Doc | None, now: float) -> list[str]:
    """Checks failing for reasons on this node (not counted against backends), and whether the node can
    judge its backends at all."""
    if not faults:
        return []
    lines = [] if faults["link"] in ("up", "unknown") else [f"link {faults['link']}"]
    if faults["cannot_judge"]:
        then = ("every VIP withdrawn from BGP" if faults["withdrawn"]
                else f"BGP withdraws once it lasts {faults['bound']:g}s")
        lines.append(f"LOCAL FAULT, this node cannot judge its backends: {faults['cannot_judge']} "
                     f"(since {_age(faults['since'], now)}): {then}; backends keep their states")
    elif faults["faulty"]:
        which = ", ".join(f"{cause} on {n}" for cause, n in sorted(faults["faulty"].items()))
        lines.append(f"local faults (not counted against backends): {which} of {faults['checks']} checks")
    return lines


def _api(sites: Doc | None) -> list[str]:
    """The API's connections per site, and how often a site was at its limit."""
    if not sites:
        return []
    each = sorted(sites.items())
    line = "API connections: " + ", ".join(f"{site} {s['open']} of {s['limit']}" for site, s in each)
    shed = [f"{site} {s['evicted']} idle closed, {s['refused']} refused" for site, s in each
            if s["evicted"] or s["refused"]]
    return [line + (f" (at the limit since start: {'; '.join(shed)})" if shed else "")]


def _hang(doc: Doc) -> list[str]:
    """The hang watchdog and ExaBGP's liveness, said only when one of them is not well."""
    lines = []
    dog = doc.get("watchdog")
    if dog and not dog["ok"]:
        lines.append(f"WATCHDOG: no progress ({dog['reason']}): systemd is not pinged")
    speaker = (doc.get("bgp") or {}).get("speaker")
    if speaker and speaker["state"] != "up":
        why = f": {speaker['reason']}" if speaker["reason"] else ""
        lines.append(f"BGP speaker (ExaBGP) {speaker['state'].upper()}{why} ({speaker['restarts']} restarts)")
    return lines


def notices(doc: Mapping[str, Any], now: float | None = None) -> list[str]:
    """What the node says of itself beyond its VIPs, problems first: `edge-lb status` prints these lines and
    GET /api/v1/node serves them (the dashboard shows them), so both say the same."""
    now = time.time() if now is None else now
    lines = []
    if doc.get("attached") is False:
        lines.append(f"XDP program NOT ATTACHED to {doc.get('interface', '?')} (detached or replaced from "
                     "outside): nothing is balanced; `edge-lb run` or `edge-lb load` attaches it")
    lines += _check_tunnel(doc.get("check_tunnel"))
    lines += _local_faults(doc.get("local_faults"), now)
    lines += _hang(doc)
    lines += _conntable(doc.get("conntable"))
    return lines


def render(doc: Doc, now: float | None = None) -> str:
    """A fixed-width table: one block per VIP, one row per backend."""
    now = time.time() if now is None else now
    if doc.get("phase") == "starting":
        return f"edge-lb (pid {doc.get('pid', '?')}) is starting: loading the data plane\n"
    head = f"edge-lb {doc.get('instance', '?')} on {doc.get('interface', '?')} (pid {doc.get('pid', '?')})"
    lines = [head, f"gateway {doc.get('gateway_mac', '?')}, uptime {doc.get('uptime', 0):.0f}s, "
             f"config {doc.get('config', '?')}", ""]
    program = doc.get("program")
    if program:
        lines[-1:-1] = [f"program {program['origin']} (digest {program['digest'][:16]}) in "
                        f"{program['seconds']:.2f}s"]
    lines[-1:-1] = _api(doc.get("api"))
    lines[-1:-1] = notices(doc, now)
    bgp = doc.get("bgp")
    if bgp:
        peers = ", ".join(f"{peer} {state}" for peer, state in sorted(bgp["peers"].items())) or "none"
        lines += [f"BGP peers: {peers}",
                  f"announced (sent to ExaBGP): {', '.join(bgp['announced']) or 'nothing'}"
                  + ("  (DISABLED for maintenance: " + bgp["disable_file"] + ")" if bgp["disabled"] else ""),
                  ""]
    for vip in doc["vips"]:
        lines.append(f"VIP {vip['vip']}  {vip['healthy']}/{len(vip['backends'])} healthy, "
                     f"{vip.get('in_ring', 0)} in the ring  "
                     f"{vip['packets']} packets  {vip['bytes']} bytes")
        if bgp:
            lines.append(f"  route {_route(vip, bgp)}")
        lines.append(f"  {'BACKEND':<26} {'STATE':<9} {'WEIGHT':>6} {'RING':>7} {'PACKETS':>10} "
                     f"{'BYTES':>12}  {'CHECKED':<11} {'VIA':<6} REASON")
        for b in vip["backends"]:
            checked = _age(b["last_check"], now)
            address = b["address"] + (" (gue)" if b.get("encap") == "gue" else "")  # ipip: the usual, unsaid
            lines.append(f"  {address:<26} {b['state']:<9} {b['weight']:>6} {b['ring_share']:>7.1%} "
                         f"{b['packets']:>10} {b['bytes']:>12}  {checked:<11} {b.get('via') or '-':<6} "
                         f"{b['reason']}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
