"""The small interface between the reconciler and the BPF maps, and its in-memory twin for tests.

The real implementation is edge_lb.dataplane.fdmaps.FdMapIO (over map fds with bpf(2); the same for a program
bcc has just compiled and one adopted from its pins without bcc).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt

from edge_lb.config import IPAddress
from edge_lb.dataplane.desired import BackendSlot, Ring, VipKey


@dataclass(frozen=True)
class Ctl:
    """Node-wide settings (the ctl map's single entry)."""

    own_mac: bytes
    gw_mac: bytes
    mtu: int
    port0_vips: int
    encap_v4: ipaddress.IPv4Network
    encap_v6: ipaddress.IPv6Network
    new_flow_rate: int  # connection-table inserts per CPU per second (the flood guard)


class MapIO(Protocol):
    def read_vips(self) -> dict[VipKey, int]: ...
    def read_vip_flags(self) -> dict[VipKey, int]:
        """The vips map's VIP_F_* flags of every VIP that has any."""
    def read_backends(self) -> dict[int, BackendSlot]: ...
    def read_vip_addrs(self) -> dict[IPAddress, int]: ...
    def read_ring(self, vip_num: int) -> Ring:
        """One VIP's ring as the map holds it: a new array of ring_size backend indexes."""
    def read_filter(self) -> dict[int, int]:
        """The VIP prefilter's non-zero words: word index -> bits."""
    def write_filter(self, words: Mapping[int, int]) -> None:
        """Set these prefilter words (0 clears one) in one batch."""
    def write_ctl(self, ctl: Ctl) -> None: ...
    def put_vips(self, vips: Mapping[VipKey, int], flags: Mapping[VipKey, int]) -> None:
        """Write these VIPs' values: vip_num, and their flags (absent: 0)."""
    def delete_vips(self, keys: Iterable[VipKey]) -> None: ...
    def put_vip_addrs(self, addrs: Mapping[IPAddress, int]) -> None: ...
    def delete_vip_addrs(self, addrs: Iterable[IPAddress]) -> None: ...
    def put_backends(self, backends: Mapping[int, BackendSlot]) -> None: ...
    def clear_backends(self, indexes: Iterable[int]) -> None: ...
    def write_ring_slots(self, vip_num: int, slots: npt.NDArray[np.intp], values: Ring) -> None:
        """Write values[i] into slots[i] of one VIP's ring in a single batch."""
    def read_counters(self, name: str) -> dict[int, tuple[int, int]]:
        """A per-CPU counter map ("vip_stats", "backend_stats") summed: index -> (packets, bytes)."""
    def zero_counters(self, name: str, indexes: Iterable[int]) -> None:
        """Zero the counters of numbers about to be reused, so a new VIP or backend starts from 0."""


@dataclass
class FakeMapIO:
    """In-memory MapIO: records every batch so tests can assert exactly what would be written."""

    ring_size: int
    ctl: Ctl | None = None
    vips: dict[VipKey, int] = field(default_factory=dict)
    vip_flags: dict[VipKey, int] = field(default_factory=dict)
    vip_addrs: dict[IPAddress, int] = field(default_factory=dict)
    filter: dict[int, int] = field(default_factory=dict)  # the VIP prefilter's words
    filter_batches: list[dict[int, int]] = field(default_factory=list)
    backends: dict[int, BackendSlot] = field(default_factory=dict)
    rings: dict[int, Ring] = field(default_factory=dict)
    ring_batches: list[tuple[int, int]] = field(default_factory=list)  # (vip_num, slots in batch)
    counters: dict[str, dict[int, tuple[int, int]]] = field(default_factory=dict)

    def read_vips(self) -> dict[VipKey, int]:
        return dict(self.vips)

    def read_vip_flags(self) -> dict[VipKey, int]:
        return {k: f for k, f in self.vip_flags.items() if f}

    def read_backends(self) -> dict[int, BackendSlot]:
        return dict(self.backends)

    def read_vip_addrs(self) -> dict[IPAddress, int]:
        return dict(self.vip_addrs)

    def read_ring(self, vip_num: int) -> Ring:
        ring = self.rings.get(vip_num)
        return np.zeros(self.ring_size, dtype=np.uint32) if ring is None else ring.copy()

    def read_filter(self) -> dict[int, int]:
        return {w: bits for w, bits in self.filter.items() if bits}

    def write_filter(self, words: Mapping[int, int]) -> None:
        self.filter.update(words)
        self.filter = {w: bits for w, bits in self.filter.items() if bits}
        self.filter_batches.append(dict(words))

    def write_ctl(self, ctl: Ctl) -> None:
        self.ctl = ctl

    def put_vips(self, vips: Mapping[VipKey, int], flags: Mapping[VipKey, int]) -> None:
        self.vips.update(vips)
        self.vip_flags.update({k: flags.get(k, 0) for k in vips})

    def delete_vips(self, keys: Iterable[VipKey]) -> None:
        for k in keys:
            self.vips.pop(k, None)
            self.vip_flags.pop(k, None)

    def put_vip_addrs(self, addrs: Mapping[IPAddress, int]) -> None:
        self.vip_addrs.update(addrs)

    def delete_vip_addrs(self, addrs: Iterable[IPAddress]) -> None:
        for a in addrs:
            self.vip_addrs.pop(a, None)

    def put_backends(self, backends: Mapping[int, BackendSlot]) -> None:
        self.backends.update(backends)

    def clear_backends(self, indexes: Iterable[int]) -> None:
        for i in indexes:
            self.backends.pop(i, None)

    def write_ring_slots(self, vip_num: int, slots: npt.NDArray[np.intp], values: Ring) -> None:
        if vip_num not in self.rings:
            self.rings[vip_num] = np.zeros(self.ring_size, dtype=np.uint32)
        self.rings[vip_num][slots] = values
        self.ring_batches.append((vip_num, len(slots)))

    def read_counters(self, name: str) -> dict[int, tuple[int, int]]:
        return dict(self.counters.get(name, {}))

    def zero_counters(self, name: str, indexes: Iterable[int]) -> None:
        for i in indexes:
            self.counters.get(name, {}).pop(i, None)
