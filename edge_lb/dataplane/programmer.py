"""Reconcile desired state into the maps through a MapIO. Idempotent: applying the same state twice
writes nothing the second time. Order keeps every packet valid: backends before the rings that name them,
rings before the VIPs that use them; removals in reverse."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from edge_lb.config import IPAddress
from edge_lb.dataplane.desired import Allocator, BackendSlot, DesiredState, Ring, VipKey, filter_words, frozen
from edge_lb.dataplane.mapio import MapIO


@dataclass
class ApplyReport:
    ring_slots: dict[int, int] = field(default_factory=dict)  # vip_num -> slots written
    vips_added: int = 0
    vips_removed: int = 0
    vips_rewritten: int = 0  # same number, other flags ([[vip]] hash)
    backends_written: int = 0
    backends_cleared: int = 0

    @property
    def changed(self) -> bool:
        return bool(self.ring_slots or self.vips_added or self.vips_removed or self.vips_rewritten
                    or self.backends_written
                    or self.backends_cleared)


def ring_changes(old: Ring, new: Ring) -> tuple[npt.NDArray[np.intp], Ring]:
    """Only the slots whose backend differs, as (slots, their new backend indexes): two arrays, compared in
    numpy (a ring has tens of thousands of slots; no Python object per slot)."""
    if old.shape != new.shape:
        raise ValueError(f"cannot diff rings of {old.size} and {new.size} slots")
    slots = np.flatnonzero(old != new)
    return slots, new[slots]


class Programmer:
    def __init__(self, io: MapIO, ring_size: int) -> None:
        self.io = io
        self.ring_size = ring_size
        self.vips: dict[VipKey, int] = {}
        self.vip_flags: dict[VipKey, int] = {}  # non-zero flags only
        self.backends: dict[int, BackendSlot] = {}
        self.rings: dict[int, Ring] = {}  # read-only arrays
        self.vip_addrs: dict[IPAddress, int] = {}
        self.filter: dict[int, int] = {}  # the VIP prefilter's non-zero words, as written

    def adopt(self, alloc: Allocator) -> None:
        """Read what the (pinned) maps hold, so numbering and ring diffs continue from it."""
        self.vips = self.io.read_vips()
        self.vip_flags = self.io.read_vip_flags()
        self.backends = self.io.read_backends()
        self.rings = {num: frozen(self.io.read_ring(num)) for num in self.vips.values()}
        self.vip_addrs = self.io.read_vip_addrs()
        self.filter = self.io.read_filter()
        alloc.vip_nums.update(self.vips)
        alloc.backend_idx.update({(s.vip_num, s.address): i for i, s in self.backends.items()})

    def apply(self, want: DesiredState) -> ApplyReport:
        """Write what differs from the last apply. The tables readers see (NodeMaps: vips, backends, rings)
        change all at once at the end, also after a failure (to what was written): the supervisor runs an
        apply in a worker thread while its event loop reads them, and BGP must not see a backend's UP flag
        written before the ring slots that go with it."""
        work = Programmer(self.io, self.ring_size)
        work._take(self, copy=True)
        try:
            return work._apply(want)
        finally:
            self._take(work, copy=False)

    _TABLES = ("vips", "vip_flags", "backends", "rings", "vip_addrs", "filter")

    def _take(self, other: Programmer, copy: bool) -> None:
        for name in self._TABLES:
            table = getattr(other, name)
            setattr(self, name, dict(table) if copy else table)

    def _apply(self, want: DesiredState) -> ApplyReport:
        report = ApplyReport()
        # A number that names another VIP than before (new, or freed and taken in this same apply) starts
        # counting from 0.
        reused = {n for k, n in want.vips.items() if self.vips.get(k) != n}
        if reused:
            self.io.zero_counters("vip_stats", reused)
        self._write_backends(want, report)
        for num, ring in want.rings.items():
            self._write_ring(num, ring, report)
        wanted = filter_words(a for a, _ in want.vip_addrs)
        # The prefilter must never hide a VIP: bits for new addresses before their VIPs, stale bits after.
        self._write_filter({w: self.filter.get(w, 0) | wanted.get(w, 0) for w in {*self.filter, *wanted}})
        self._write_vips(want, report)
        self._remove_stale(want, report)
        self._write_filter(wanted)
        return report

    def _write_filter(self, words: dict[int, int]) -> None:
        every = {*self.filter, *words}
        changed = {w: words.get(w, 0) for w in every if words.get(w, 0) != self.filter.get(w, 0)}
        if changed:
            try:
                self.io.write_filter(changed)
            except Exception:
                self.filter = self.io.read_filter()  # a batch may be partly written: trust the map, not us
                raise
            self.filter = {w: bits for w, bits in words.items() if bits}

    def _write_backends(self, want: DesiredState, report: ApplyReport) -> None:
        changed = {i: s for i, s in want.backends.items() if self.backends.get(i) != s}
        fresh = [i for i, s in changed.items()  # another backend than before under this index
                 if i not in self.backends or (self.backends[i].vip_num, self.backends[i].address)
                 != (s.vip_num, s.address)]
        if fresh:
            self.io.zero_counters("backend_stats", fresh)
        if changed:
            self.io.put_backends(changed)
            self.backends.update(changed)
            report.backends_written = len(changed)

    def _write_ring(self, num: int, ring: Ring, report: ApplyReport) -> None:
        old = self.rings.get(num)
        if old is ring:  # the same cached ring (desired.py): nothing to compare
            return
        if old is None:  # a number new to us: the map may hold a ring a crash left behind, not zeros
            old = self.io.read_ring(num)
        slots, values = ring_changes(old, ring)
        if slots.size:
            try:
                self.io.write_ring_slots(num, slots, values)
            except Exception:
                self.rings.pop(num, None)  # a batch may be partly written: the next apply reads the map
                raise
            report.ring_slots[num] = int(slots.size)
        self.rings[num] = ring

    def _write_vips(self, want: DesiredState, report: ApplyReport) -> None:
        new = {k: n for k, n in want.vips.items() if self.vips.get(k) != n}
        flagged = {k: n for k, n in want.vips.items()
                   if k not in new and self.vip_flags.get(k, 0) != want.vip_flags.get(k, 0)}
        if new or flagged:
            self.io.put_vips({**new, **flagged}, want.vip_flags)
            self.vips.update(new)
            self.vip_flags = {k: f for k, f in want.vip_flags.items() if f}
            report.vips_added = len(new)
            report.vips_rewritten = len(flagged)
        addrs = {a: c for (a, _), c in want.vip_addrs.items()}
        if addrs != self.vip_addrs:
            self.io.put_vip_addrs(addrs)
            self.io.delete_vip_addrs(a for a in self.vip_addrs if a not in addrs)
            self.vip_addrs = addrs

    def _remove_stale(self, want: DesiredState, report: ApplyReport) -> None:
        gone = [k for k in self.vips if k not in want.vips]
        if gone:
            self.io.delete_vips(gone)
            report.vips_removed = len(gone)
        for key in gone:
            self.vip_flags.pop(key, None)
            num = self.vips.pop(key)
            if num not in want.rings:  # the number was not reused by a new VIP in this apply
                self._write_ring(num, frozen(np.zeros(self.ring_size, dtype=np.uint32)), report)
                del self.rings[num]
        stale = [i for i in self.backends if i not in want.backends]
        if stale:
            # Clearing the entry drops BACKEND_F_UP: its connection-table entries are bypassed.
            self.io.clear_backends(stale)
            for i in stale:
                del self.backends[i]
            report.backends_cleared = len(stale)
