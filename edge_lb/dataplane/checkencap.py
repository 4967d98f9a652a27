"""The tunnel health checks' encapsulator on the LB node: bpf/checkencap.c as a tc egress filter on the node's
interface, and the policy route that sends the checks' marked packets out of that interface.

A tunnel check opens its socket with SO_MARK = mark_base | the backend's index in the balancer's backends
map and connects to the VIP. The rule `fwmark mark_base/MARK_MASK lookup table_of(mark_base)` routes such
packets through the interface's default gateway whatever the main table says of the VIP; on the way out,
checkencap.c wraps each one toward the backend of its index exactly as the balancer wraps a client packet
(it reads the balancer's own backends and ctl maps from their pins). The backend decapsulates, its service
answers from the VIP on its lo, and the reply comes straight back (DSR) to the node's own address (the
source the kernel gave the check's socket for that route): the balancer passes it (it is to no VIP), and its
reverse path, the VIP, is routed out of the same interface, so rp_filter accepts it.

Like the XDP program, the filter stays attached when the supervisor exits (it only acts on marked packets);
`edge-lb unload` removes it and the policy route. Its name carries the digest of its build (sources, flags,
kernel: dataplane/pinned.py), so a restarted supervisor whose build is the one attached adopts it without the
compiler (ensure()); otherwise it compiles and replaces it. A compiled build is also pinned under that name
beside the balancer's maps, so when the filter is removed from outside the keeper puts the same program back
from its pin in milliseconds, without the compiler ("pinned"), as long as the maps it uses are still the
balancer's pinned ones.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Any, NamedTuple

from edge_lb import netlink_tc, paths
from edge_lb.config import Dataplane as DataplaneSettings
from edge_lb.dataplane import bpfsys, loader
from edge_lb.dataplane.loader import BPF_DIR, MapSizes
from edge_lb.dataplane.pinned import program_digest
from edge_lb.errors import DataplaneError, NetlinkError

SOURCE = BPF_DIR / "checkencap.c"  # its constants: bpf/checkencap_consts.h
PROGRAM = "checkencap"
MARK_INDEX_BITS = 20  # CHECK_MARK_INDEX_BITS in bpf/checkencap_consts.h (tests/unit/test_layout.py checks it)
MARK_MASK = 0xFFFFFFFF ^ ((1 << MARK_INDEX_BITS) - 1)  # the bits of a check mark that equal the base
FILTER_PRIO = 0xC4EC  # the egress filter's priority on the interface: replaced in place by a restart


def mark_of(base: int, index: int) -> int:
    """The socket mark of a tunnel check to the backend of this index in the backends map."""
    if not 0 < index < 1 << MARK_INDEX_BITS:
        raise ValueError(f"backend index {index} does not fit a check mark")
    return base | index


def table_of(base: int) -> int:
    """The policy routing table of a mark base: above the kernel's reserved 253-255, one per base."""
    return 0x10000 + (base >> MARK_INDEX_BITS)


def rule_priority(base: int) -> int:
    """Its rule's priority: after the local table (0), before main (32766)."""
    return 20000 + (base >> MARK_INDEX_BITS)


def stat_names() -> tuple[str, ...]:
    """enum check_stat's names in index order (CHECK_STAT_MAX excluded), read from the header."""
    text = (BPF_DIR / "checkencap_consts.h").read_text(encoding="utf-8")
    body = re.search(r"enum check_stat\s*\{(.*?)\};", text, re.S)
    if body is None:
        raise DataplaneError("enum check_stat not found in checkencap_consts.h")
    names = re.findall(r"^\s*(CHECK_[A-Z0-9_]+)", body.group(1), re.M)
    return tuple(n for n in names if n != "CHECK_STAT_MAX")


def cflags(settings: DataplaneSettings) -> list[str]:
    pins = paths.pins(settings.instance)
    return [*MapSizes.of(settings).cflags(), f"-DCHECK_MARK_BASE={int(settings.check_mark_base)}u",
            f'-DPIN_DIR="{pins}"']


@functools.lru_cache(maxsize=8)
def filter_name(settings: DataplaneSettings) -> str:
    """The tc filter's name for the build of `settings`: checkencap_<16 hex digits of its digest>. Hashed
    once per settings: the keeper asks every second, and a running supervisor keeps the build it started
    with (sources changed on disk under it are the next start's)."""
    return f"{PROGRAM}_{program_digest(SOURCE, cflags(settings))[:16]}"


class Ensured(NamedTuple):
    origin: str  # "adopted": the filter attached was this build; "pinned": this build put back from its pin;
    #              "compiled": built and (re)attached now
    gateways: list[str]  # the policy route goes through these
    rules_added: int  # fwmark rules that were missing (or wrong) and were put in place


def ensure(settings: DataplaneSettings, ifname: str) -> Ensured:
    """The encapsulator of `settings` on ifname's egress and the policy route out of it: "adopted" when that
    build is the filter attached there (no compiler), else "compiled" and attached in its place. Blocking
    (pyroute2, bcc): run it in a thread. Idempotent: control/checktunnel.py re-runs it to restore them."""
    name = filter_name(settings)
    try:
        origin = "adopted"
        if netlink_tc.tc_egress_name(ifname, FILTER_PRIO) != name:
            origin = _attach(settings, ifname, name)
        base = settings.check_mark_base
        gateways, added = netlink_tc.mark_routes(ifname, base, MARK_MASK, table_of(base), rule_priority(base))
    except NetlinkError as exc:
        raise DataplaneError(f"check encapsulator on {ifname}: {exc}") from exc
    return Ensured(origin, gateways, added)


def _attach(settings: DataplaneSettings, ifname: str, name: str) -> str:
    """Attach this build: from its pin when that is usable ("pinned"), else compiled and pinned."""
    pins = paths.pins(settings.instance)
    fd = _pinned_fd(pins, name)
    if fd is not None:
        try:
            netlink_tc.attach_tc_egress(ifname, fd, name, FILTER_PRIO)
        finally:
            os.close(fd)
        return "pinned"
    encap = CheckEncap.load(settings)
    try:
        netlink_tc.attach_tc_egress(ifname, encap.prog_fd, name, FILTER_PRIO)
        _pin(encap.prog_fd, pins, name)
    finally:
        encap.close()  # the filter (and the pin) keep the program
    return "compiled"


_SHARED_MAPS = ("backends", "ctl")  # the balancer's maps checkencap.c reads


def _pinned_fd(pins: Path, name: str) -> int | None:
    """An fd of the pinned program `name` when the balancer's pinned maps are the ones it uses (a rebuilt
    balancer's are not: then it is compiled again), else None."""
    path = pins / name
    if not path.exists():
        return None
    fd = bpfsys.obj_get(path)
    try:
        _, used = bpfsys.prog_ids(fd)
        for map_name in _SHARED_MAPS:
            map_fd = bpfsys.obj_get(pins / map_name)
            try:
                if bpfsys.map_info(map_fd).id not in used:
                    raise LookupError(map_name)
            finally:
                os.close(map_fd)
    except (LookupError, DataplaneError):
        os.close(fd)
        return None
    return fd


def _pin(fd: int, pins: Path, name: str) -> None:
    """Pin the program as `name`; other builds' pins go."""
    for old in pins.glob(f"{PROGRAM}_*"):
        old.unlink(missing_ok=True)
    bpfsys.obj_pin(fd, pins / name)


class CheckEncap:
    """The loaded encapsulator (compiled against the balancer's pinned maps: load the balancer first)."""

    def __init__(self, bpf: Any, fn: Any, base: int) -> None:
        self.bpf = bpf
        self.fn = fn
        self.base = base

    @classmethod
    def load(cls, settings: DataplaneSettings) -> CheckEncap:
        pins = paths.pins(settings.instance)
        if not (pins / "backends").exists():
            raise DataplaneError(f"the check encapsulator needs the balancer's pinned maps in {pins}: "
                                 "load the balancer first")
        bpf, fn = loader.load_tc(SOURCE, PROGRAM, cflags(settings))
        return cls(bpf, fn, settings.check_mark_base)

    @property
    def prog_fd(self) -> int:
        return int(self.fn.fd)

    @staticmethod
    def detach(ifname: str, base: int) -> None:
        """Remove the filter and the policy route (uninstall)."""
        netlink_tc.detach_tc_egress(ifname, FILTER_PRIO)
        netlink_tc.remove_mark_routes(base, MARK_MASK, table_of(base), rule_priority(base))

    def stats(self) -> dict[str, int]:
        """Packets per enum check_stat reason, summed over CPUs."""
        table = self.bpf[b"check_stats"]
        names = stat_names()
        return {names[int(k.value)]: sum(int(v) for v in per_cpu) for k, per_cpu in table.items()
                if int(k.value) < len(names)}

    def close(self) -> None:
        """Release this process's descriptors (the attached filter stays)."""
        self.bpf.cleanup()
