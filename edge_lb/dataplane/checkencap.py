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
compiler (ensure()); otherwise it compiles and replaces it.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

from edge_lb import netlink_tc, paths
from edge_lb.config import Dataplane as DataplaneSettings
from edge_lb.dataplane import loader
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


def filter_name(settings: DataplaneSettings) -> str:
    """The tc filter's name for the build of `settings`: checkencap_<16 hex digits of its digest>."""
    return f"{PROGRAM}_{program_digest(SOURCE, cflags(settings))[:16]}"


class Ensured(NamedTuple):
    origin: str  # "adopted": the filter attached was this build; "compiled": (re)attached now
    gateways: list[str]  # the policy route goes through these
    rules_added: int  # fwmark rules that were missing (or wrong) and were put in place


def ensure(settings: DataplaneSettings, ifname: str) -> Ensured:
    """The encapsulator of `settings` on ifname's egress and the policy route out of it: "adopted" when that
    build is the filter attached there (no compiler), else "compiled" and attached in its place. Blocking
    (pyroute2, bcc): run it in a thread. Idempotent: control/checktunnel.py re-runs it to restore them."""
    name = filter_name(settings)
    try:
        adopted = netlink_tc.tc_egress_name(ifname, FILTER_PRIO) == name
        if not adopted:
            encap = CheckEncap.load(settings)
            try:
                netlink_tc.attach_tc_egress(ifname, encap.prog_fd, name, FILTER_PRIO)
            finally:
                encap.close()  # the filter keeps the program
        base = settings.check_mark_base
        gateways, added = netlink_tc.mark_routes(ifname, base, MARK_MASK, table_of(base), rule_priority(base))
    except NetlinkError as exc:
        raise DataplaneError(f"check encapsulator on {ifname}: {exc}") from exc
    return Ensured("adopted" if adopted else "compiled", gateways, added)


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
