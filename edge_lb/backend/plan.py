"""What `edge-lb backend setup` changes, decided from the facts alone (pure). Only what is wrong is changed,
so a second run plans nothing. What setup will not do on its own (take an address off an interface, replace
someone else's XDP program, make tunnel devices without their kernel modules) is a BackendError that says
what to do instead."""

from __future__ import annotations

import os

from edge_lb.backend import judge
from edge_lb.backend.judge import conf, effective
from edge_lb.backend.model import (
    DECAP_PROGRAM,
    MODULES,
    TUNNELS,
    AddAddress,
    AddTunnel,
    AttachDecap,
    Change,
    Facts,
    Mode,
    Plan,
    SetAdvmss,
    SetSysctl,
    Wanted,
)
from edge_lb.errors import BackendError


def resolve_mode(facts: Facts, wanted: Wanted) -> Mode:
    """The asked mode; else ipip when the kernel has every module the interface's families need, else xdp."""
    if wanted.mode is not None:
        return wanted.mode
    return "ipip" if not missing_modules(facts) else "xdp"


def missing_modules(facts: Facts) -> list[str]:
    return [MODULES[f] for f in sorted(facts.families) if MODULES[f] not in facts.modules]


def plan(facts: Facts, wanted: Wanted) -> Plan:
    """The changes that make the backend serve `wanted`, in the order to apply them."""
    refuse(facts, wanted)
    mode = resolve_mode(facts, wanted)
    changes: list[Change] = [AddAddress(cidr=f"{vip}/{vip.max_prefixlen}")
                             for vip in wanted.vips if not any(a.ip == vip for a in facts.lo)]
    if any(vip.version == 4 for vip in wanted.vips):
        changes += raise_to(facts, "arp_ignore", 1, ["all", facts.interface])
        changes += raise_to(facts, "arp_announce", 2, ["all", facts.interface])
    changes += loosen_rp_filter(facts, ["all", *judge.inner_devices(facts)])
    changes += decap_changes(facts, mode, wanted.gue_port)
    changes += mss_changes(facts, wanted)
    notes = [] if wanted.mode is not None or judge.decap_ok(facts) else [_mode_note(facts, mode)]
    return Plan(changes=tuple(changes), notes=tuple(notes))


def refuse(facts: Facts, wanted: Wanted) -> None:
    """BackendError for what setup must not fix by itself."""
    for vip in wanted.vips:
        if vip in facts.on_interface:
            raise BackendError(f"{vip} is on {facts.interface}: the backend answers ARP/ND for it there. "
                               f"Take it off {facts.interface} first (setup puts it on lo)")
        short = [a for a in facts.lo if a.ip == vip and a.network.prefixlen != vip.max_prefixlen]
        if short and not any(a.ip == vip and a.network.prefixlen == vip.max_prefixlen for a in facts.lo):
            raise BackendError(f"{vip} is on lo as {short[0]}: a shorter prefix than /{vip.max_prefixlen} "
                               "makes its whole subnet local. Remove it first")
        if facts.reply_routes.get(vip) is None:
            raise BackendError(f"no route for replies from {vip} (no default route?): its clients would be "
                               "unreachable. Add the route first")
    if wanted.mode == "ipip" and (missing := missing_modules(facts)):
        raise BackendError(
            f"--mode ipip needs the kernel module(s) {', '.join(missing)}, which kernel {os.uname().release} "
            f"does not have (not loaded, not built in, not under /lib/modules). Use --mode xdp: bpf/decap.c "
            "decapsulates in XDP instead")
    if resolve_mode(facts, wanted) == "xdp" and facts.xdp is not None and facts.xdp[1] != DECAP_PROGRAM \
            and not judge.decap_ok(facts):
        raise BackendError(f"{facts.interface} runs another XDP program, {facts.xdp[1]!r} (id "
                           f"{facts.xdp[0]}): not replacing it with {DECAP_PROGRAM}. Detach it, or use "
                           "--mode ipip")


def raise_to(facts: Facts, name: str, least: int, devices: list[str]) -> list[Change]:
    """`name` raised to `least` on each device below it, when the effective value is below it."""
    if effective(facts, facts.interface, name) >= least:
        return []
    return [SetSysctl(key=conf(d, name), value=least, previous=facts.sysctls.get(conf(d, name)))
            for d in devices if (facts.sysctls.get(conf(d, name)) or 0) < least]


def loosen_rp_filter(facts: Facts, devices: list[str]) -> list[Change]:
    """Every 1 (strict) among `devices` becomes 2 (loose): the effective value is the larger of `all` and the
    device's, so both must leave 1."""
    return [SetSysctl(key=conf(d, "rp_filter"), value=2, previous=1)
            for d in dict.fromkeys(devices) if facts.sysctls.get(conf(d, "rp_filter")) == 1]


def decap_changes(facts: Facts, mode: Mode, gue_port: int) -> list[Change]:
    if judge.decap_ok(facts):
        return []
    if mode == "xdp":
        return [AttachDecap(interface=facts.interface, gue_port=gue_port)]
    changes: list[Change] = []
    for family in judge.missing_tunnels(facts):
        name, kind = TUNNELS[family]
        if name in facts.tunnels:
            raise BackendError(f"device {name} exists but is down or not of kind {kind}: set it up or "
                               "delete it")
        # A new device takes conf/default's rp_filter: made loose here, and deleted again by teardown.
        changes += [AddTunnel(name=name, kind=kind),
                    SetSysctl(key=conf(name, "rp_filter"), value=2, previous=None)]
    return changes


def mss_changes(facts: Facts, wanted: Wanted) -> list[Change]:
    return [SetAdvmss(route=key, value=limit, previous=route.advmss)
            for key, (route, limit, _) in judge.reply_groups(facts, wanted).items()
            if route.effective_advmss > limit]


def _mode_note(facts: Facts, mode: Mode) -> str:
    if mode == "xdp":
        missing = ", ".join(missing_modules(facts))
        return f"mode xdp: this kernel has no {missing} module, so bpf/decap.c decapsulates in XDP"
    return "mode ipip: the kernel's ipip/ip6tnl devices decapsulate (--mode xdp for bpf/decap.c)"
