"""Desired data-plane state, computed purely from config (+ health later): no kernel, no I/O.

The data plane keys VIPs by (address, port, protocol) and numbers them (ring and counters); each
(VIP, backend address) pair gets a backend index. Numbers are allocated stably: an existing VIP or backend
keeps its number across reloads and restarts, because the connection table stores backend indexes.
"""

from __future__ import annotations

import functools
import ipaddress
import operator
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from edge_lb.config import Config, IPAddress, Vip, vip_name
from edge_lb.dataplane import maglev

PROTOCOLS = {"tcp": 6, "udp": 17}
# A VIP's ring: slot -> backend index (0 = none), as the rings map holds it. Rings built here are read-only:
# one array may be shared by the ring cache, the programmer's tables and readers.
Ring = npt.NDArray[np.uint32]


@dataclass(frozen=True, order=True)
class VipKey:
    """What the data plane matches: address, port (0 = every port) and IP protocol number."""

    address: IPAddress
    port: int
    proto: int
    # Computed once: every (VIP, backend) lookup hashes the VIP, and an address hashes through a hex string.
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((self.address, self.port, self.proto)))

    def __hash__(self) -> int:
        return self._hash

    def __reduce__(self) -> tuple[type[VipKey], tuple[IPAddress, int, int]]:
        return VipKey, (self.address, self.port, self.proto)  # copies hash anew: str hashes are per process

    @classmethod
    def of(cls, vip: Vip) -> VipKey:
        return cls(vip.address, vip.port, PROTOCOLS[vip.protocol])

    @property
    def name(self) -> str:
        protocol = next((n for n, p in PROTOCOLS.items() if p == self.proto), str(self.proto))
        return vip_name(self.address, self.port, protocol)


@dataclass(frozen=True)
class BackendSlot:
    """One (VIP, backend) pair as the backends map holds it."""

    vip_num: int
    address: IPAddress
    up: bool = True  # may carry existing flows (healthy or drained)
    gue: bool = False  # encap = "gue": in UDP to [dataplane] gue_port (BACKEND_F_GUE); else IP in IP


@dataclass(frozen=True)
class DesiredState:
    vips: Mapping[VipKey, int]  # VIP -> vip_num
    backends: Mapping[int, BackendSlot]  # index -> slot (index 0 is never used)
    rings: Mapping[int, Ring]  # vip_num -> ring of backend indexes (0 = none), read-only
    vip_addrs: Mapping[tuple[IPAddress, int], int] = field(default_factory=dict)  # (addr, 0) -> count | flags
    port0_vips: int = 0
    vip_flags: Mapping[VipKey, int] = field(default_factory=dict)  # VIP -> VIP_F_* (absent: 0)


# The VIP address prefilter of bpf/balancer_consts.h; these two and filter_bucket's formula (maybe_vip in
# bpf/balancer.c) are checked against the C by tests/unit/test_layout.py.
VIP_FILTER_BITS = 65536
VIP_FILTER_MULT = 0x9E3779B1
VIP_F_HASH_SOURCE = 1 << 0  # vips value flag: [[vip]] hash = "source" (balancer_consts.h)
VIP_F_NO_CONNTRACK = 1 << 1  # vips value flag: [[vip]] conntrack = false (balancer_consts.h)
# The default flood guard lets a CPU insert its share of the connection table once per this many seconds.
FLOW_TURNOVER_S = 30
VIP_ADDR_NO_ECHO = 1 << 31  # vip_addrs value flag: ICMP echo to the address not answered (balancer_consts.h)


def filter_bucket(address: IPAddress) -> int:
    """The prefilter bucket of an address, as bpf/balancer.c's maybe_vip computes it: the xor of the four
    32-bit words of the 16-byte address as the CPU loads them, times VIP_FILTER_MULT, top 16 bits."""
    raw = address.packed.ljust(16, b"\0")
    words = (int.from_bytes(raw[i:i + 4], sys.byteorder) for i in (0, 4, 8, 12))
    folded = functools.reduce(operator.xor, words)
    return ((folded * VIP_FILTER_MULT) & 0xFFFFFFFF) >> 16


def filter_words(addresses: Iterable[IPAddress]) -> dict[int, int]:
    """The prefilter's non-zero words (word index -> bits) with a bit set for each address."""
    words: dict[int, int] = {}
    for address in addresses:
        bucket = filter_bucket(address)
        words[bucket >> 5] = words.get(bucket >> 5, 0) | 1 << (bucket & 31)
    return words


@dataclass
class _Used:
    """The numbers one of the allocator's tables holds, kept between allocations while that table (the same
    object) only grew through the allocator: otherwise rebuilt. Every number from the start below `low` is
    in use, so the lowest free one is found from there."""

    table: dict[Any, int]
    size: int
    numbers: set[int]
    low: int


@dataclass
class Allocator:
    """Stable numbering of VIPs and (VIP, backend) pairs; seeded from what the maps already hold. A new one
    gets the lowest free number."""

    max_vips: int
    max_backends: int
    vip_nums: dict[VipKey, int] = field(default_factory=dict)
    backend_idx: dict[tuple[int, IPAddress], int] = field(default_factory=dict)
    _used: dict[str, _Used] = field(default_factory=dict, repr=False, compare=False)

    def vip_num(self, key: VipKey) -> int:
        if key not in self.vip_nums:
            self.vip_nums[key] = self._lowest_free("vips", self.vip_nums, 0, self.max_vips)
        return self.vip_nums[key]

    def backend(self, vip_num: int, address: IPAddress) -> int:
        pair = (vip_num, address)
        index = self.backend_idx.get(pair)
        if index is None:
            index = self._lowest_free("backends", self.backend_idx, 1, self.max_backends)
            self.backend_idx[pair] = index
        return index

    def retain(self, vips: Iterable[VipKey], pairs: Iterable[tuple[int, IPAddress]]) -> None:
        """Forget numbers of VIPs and backends no longer wanted, so they can be reused."""
        keep_v, keep_b = set(vips), set(pairs)
        self.vip_nums = {k: n for k, n in self.vip_nums.items() if k in keep_v}
        self.backend_idx = {p: i for p, i in self.backend_idx.items() if p in keep_b}

    def _lowest_free(self, name: str, table: dict[Any, int], start: int, limit: int) -> int:
        """The number the caller adds to `table` next. Amortised O(1): a first apply numbers thousands."""
        used = self._used.get(name)
        if used is None or used.table is not table or used.size != len(table):
            used = self._used[name] = _Used(table, len(table), set(table.values()), start)
        number = used.low
        while number in used.numbers:
            number += 1
        if number >= limit:
            raise ValueError(f"no free number below {limit}")
        used.numbers.add(number)
        used.size += 1
        used.low = number + 1
        return number


_Array = TypeVar("_Array", bound=npt.NDArray[Any])
Owners = npt.NDArray[np.intp]  # slot -> index into a Maglev table's keys; -1: no member
TableCache = dict[tuple[object, ...], tuple[list[bytes], Owners]]  # (ring size, members) -> Maglev table


def frozen(array: _Array) -> _Array:
    """The array made read-only, so that sharing it (caches, the programmer's tables) cannot corrupt it."""
    array.flags.writeable = False
    return array


def ring_for(vip: Vip, indexes: Mapping[IPAddress, int], ring_size: int,
             healthy: Mapping[IPAddress, bool] | None = None,
             tables: TableCache | None = None) -> Ring:
    """The VIP's Maglev ring as backend indexes (read-only). Unhealthy backends get no slots; weight 0 gets
    none. `tables` shares Maglev builds between VIPs with the same members (a pool behind many VIPs)."""
    members = [maglev.Member(key=b.address.packed, weight=b.weight) for b in vip.backends
               if healthy is None or healthy.get(b.address, True)]
    keys, owners = _table(members, ring_size, {} if tables is None else tables)
    by_key = {b.address.packed: indexes[b.address] for b in vip.backends}
    # owner index -> backend index; the extra last entry is what owner -1 (an empty slot) picks: 0
    lut = np.array([by_key[k] for k in keys] + [0], dtype=np.uint32)
    return frozen(lut[owners])


def _table(members: list[maglev.Member], ring_size: int, tables: TableCache) -> tuple[list[bytes], Owners]:
    """The table depends only on the set of (key, weight) pairs (maglev.py), so equal sets share one."""
    key = (ring_size, *sorted((m.key, m.weight) for m in members))
    if key not in tables:
        keys, owners = maglev.owner_table(members, ring_size)
        # as intp once per table: numpy indexes with intp, and would convert the owners for every VIP
        tables[key] = (keys, frozen(np.asarray(owners, dtype=np.intp)))
    return tables[key]


RingCache = dict[tuple[object, ...], Ring]


def _cached_ring(vip: Vip, indexes: list[int], healthy: list[bool], ring_size: int, cache: RingCache,
                 used: RingCache, tables: TableCache) -> Ring:
    """Reuse the ring when nothing that shapes it has changed: building and comparing one costs more than
    this. `indexes` and `healthy` are per backend of vip.backends. The key holds addresses as ints (with their
    version): an address object hashes through a hex string, and a 500-VIP apply hashed them 88,000 times."""
    key = (ring_size, *((b.address.version, int(b.address), b.weight, up, index)
                        for b, up, index in zip(vip.backends, healthy, indexes, strict=True)))
    ring = cache.get(key)
    if ring is None:
        ring = used.get(key)
    if ring is None:
        addresses = [b.address for b in vip.backends]
        ring = ring_for(vip, dict(zip(addresses, indexes, strict=True)), ring_size,
                        dict(zip(addresses, healthy, strict=True)), tables)
    used[key] = ring
    return ring


def desired_state(config: Config, alloc: Allocator,
                  health: Mapping[tuple[VipKey, IPAddress], bool] | None = None,
                  ring_cache: RingCache | None = None) -> DesiredState:
    """Config (+ health) -> what the maps should hold. Health defaults to every backend up. A ring_cache
    keeps the rings built here for the next call (and only those)."""
    health = health or {}
    cache = ring_cache if ring_cache is not None else {}
    used: RingCache = {}
    tables: TableCache = {}  # for this call only: the tables are large, the rings are what is kept
    vips: dict[VipKey, int] = {}
    backends: dict[int, BackendSlot] = {}
    rings: dict[int, Ring] = {}
    vip_addrs: dict[tuple[IPAddress, int], int] = {}
    wanted = [VipKey.of(v) for v in config.vips]
    # Free what the config no longer wants first, so a swap at capacity fits.
    alloc.retain(wanted, [(alloc.vip_nums[k], b.address) for k, v in zip(wanted, config.vips, strict=True)
                          if k in alloc.vip_nums for b in v.backends])
    for vip in config.vips:
        key = VipKey.of(vip)
        num = vips[key] = alloc.vip_num(key)
        indexes = [alloc.backend(num, b.address) for b in vip.backends]
        healthy = [health.get((key, b.address), True) for b in vip.backends]
        for b, index, up in zip(vip.backends, indexes, healthy, strict=True):
            backends[index] = BackendSlot(num, b.address, up=up, gue=b.encap == "gue")
        rings[num] = _cached_ring(vip, indexes, healthy, config.dataplane.ring_size, cache, used, tables)
        vip_addrs[(key.address, 0)] = vip_addrs.get((key.address, 0), 0) + 1
    for vip in config.vips:
        if not vip.icmp_echo:
            vip_addrs[(VipKey.of(vip).address, 0)] |= VIP_ADDR_NO_ECHO
    vip_flags = {VipKey.of(v): vip_flags_of(v) for v in config.vips if vip_flags_of(v)}
    port0 = sum(1 for k in vips if k.port == 0)
    cache.clear()
    cache.update(used)
    return DesiredState(vips=vips, backends=backends, rings=rings, vip_addrs=vip_addrs, port0_vips=port0,
                        vip_flags=vip_flags)


def vip_flags_of(vip: Vip) -> int:
    """The VIP_F_* flags of a VIP's vips value."""
    return ((VIP_F_HASH_SOURCE if vip.hash == "source" else 0)
            | (0 if vip.conntrack else VIP_F_NO_CONNTRACK))


def new_flow_rate(conn_table_size: int, limit: int | None, cpus: int) -> int:
    """Connection-table inserts per CPU per second: `limit` when set, else the rate at which a CPU's share of
    the table (the LRU lists are per CPU: conn_table_size / cpus entries each) turns over in FLOW_TURNOVER_S.
    A table of S entries holds only the flows of the last S / r seconds when r arrive a second: inserting
    faster only evicts live flows. At this rate a flood on every CPU takes FLOW_TURNOVER_S to turn the table
    over, so a flow that sends a packet that often keeps its entry, and its backend across ring changes."""
    return limit if limit is not None else max(1, conn_table_size // (cpus * FLOW_TURNOVER_S))


def encap_masks_v4(net: ipaddress.IPv4Network) -> tuple[bytes, bytes]:
    """(prefix, host mask) as 4 network-order bytes each: outer source = prefix | (flow hash & mask)."""
    return net.network_address.packed, net.hostmask.packed


def encap_masks_v6(net: ipaddress.IPv6Network) -> tuple[bytes, bytes]:
    """(16-byte prefix, 4-byte host mask of the last word): the data plane varies the last 32 bits only."""
    return net.network_address.packed, net.hostmask.packed[12:]
