"""MapIO over the balancer's map fds with bpf(2) directly: the same for a program bcc has just compiled and
for one adopted from its pins without bcc (no compiler, no LLVM in the process).

The ctypes layouts below mirror bpf/balancer_structs.h; tests/dataplane/test_fdmaps.py checks every field's
name, offset and size against clang's own layout (bcc's table.Key / table.Leaf). Writes of many entries go
in one BPF_MAP_UPDATE_BATCH each; the rings map (BPF_F_MMAPABLE) is mapped and its slots written as stores.
"""

from __future__ import annotations

import ctypes
import ipaddress
import mmap
import socket
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_lb.config import IPAddress
from edge_lb.dataplane import bpfsys
from edge_lb.dataplane.desired import (
    VIP_FILTER_BITS,
    BackendSlot,
    Ring,
    VipKey,
    encap_masks_v4,
    encap_masks_v6,
)
from edge_lb.dataplane.mapio import Ctl
from edge_lb.errors import DataplaneError

FAMILY_TAG = {4: 4, 6: 6}  # LB_FAMILY_V4 / LB_FAMILY_V6 in bpf/balancer_consts.h
BACKEND_F_IPV6 = 1 << 0  # bpf/balancer_consts.h
BACKEND_F_UP = 1 << 1  # bpf/balancer_consts.h
BACKEND_F_GUE = 1 << 2  # bpf/balancer_consts.h
BPF_F_MMAPABLE = 1 << 10  # include/uapi/linux/bpf.h: an array map whose values user space may mmap
U32 = ctypes.c_uint32


class VipKeyC(ctypes.Structure):
    """struct vip_key: addresses in network order, the port too."""
    _fields_ = [("addr", U32 * 4), ("port", ctypes.c_uint16), ("proto", ctypes.c_uint8),
                ("family", ctypes.c_uint8)]


class VipMetaC(ctypes.Structure):
    """struct vip_meta."""
    _fields_ = [("vip_num", U32), ("flags", U32)]


class BackendC(ctypes.Structure):
    """struct backend."""
    _fields_ = [("addr", U32 * 4), ("flags", U32), ("vip_num", U32)]


class LbCtlC(ctypes.Structure):
    """struct lb_ctl."""
    _fields_ = [("own_mac", ctypes.c_uint8 * 6), ("gw_mac", ctypes.c_uint8 * 6), ("mtu", ctypes.c_uint16),
                ("port0_vips", ctypes.c_uint16), ("encap_v4_prefix", U32), ("encap_v4_hostmask", U32),
                ("encap_v6_prefix", U32 * 4), ("encap_v6_hostmask", U32), ("new_flow_rate", U32)]


class LbCounterC(ctypes.Structure):
    """struct lb_counter (per CPU)."""
    _fields_ = [("packets", ctypes.c_uint64), ("bytes", ctypes.c_uint64)]


# map name -> (key layout, value layout) for the maps FdMapIO reads or writes
LAYOUTS: dict[str, tuple[type[ctypes._CData], type[ctypes._CData]]] = {
    "vips": (VipKeyC, VipMetaC), "vip_addrs": (VipKeyC, U32), "vip_filter": (U32, U32), "rings": (U32, U32),
    "backends": (U32, BackendC), "ctl": (U32, LbCtlC), "vip_stats": (U32, LbCounterC),
    "backend_stats": (U32, LbCounterC), "reason_stats": (U32, LbCounterC)}


def vip_key(key: VipKey) -> VipKeyC:
    k = VipKeyC(port=socket.htons(key.port), proto=key.proto, family=FAMILY_TAG[key.address.version])
    ctypes.memmove(k.addr, key.address.packed.ljust(16, b"\0"), 16)
    return k


def address(words: ctypes.Array[U32], family: int) -> IPAddress:
    raw = bytes(words)
    return ipaddress.IPv4Address(raw[:4]) if family == 4 else ipaddress.IPv6Address(raw)


def _vip_of(k: VipKeyC) -> VipKey:
    return VipKey(address(k.addr, k.family), socket.ntohs(k.port), k.proto)


class MappedArray:
    """A u32 array map created with BPF_F_MMAPABLE, mapped into our memory: reading and writing its values are
    plain loads and stores (each aligned u32 store is atomic: the program reads a slot whole, old or new),
    instead of a syscall that copies every key and value in. The kernel lays values out every 8 bytes."""

    def __init__(self, fd: int, entries: int) -> None:
        self._map = mmap.mmap(fd, entries * 8)  # MAP_SHARED, read and write
        self.values: npt.NDArray[np.uint32] = np.frombuffer(self._map, dtype=np.uint32)[:2 * entries:2]

    def close(self) -> None:
        del self.values  # the view first: a mapping with views into it cannot be closed
        self._map.close()


def mapped(fd: int, entries: int) -> MappedArray | None:
    """The array map mapped, or None when it was not created mmapable (pinned by an older build)."""
    if not bpfsys.map_info(fd).map_flags & BPF_F_MMAPABLE:
        return None
    try:
        return MappedArray(fd, entries)
    except OSError as exc:
        raise DataplaneError(f"mmap the rings map (fd {fd}, {entries} entries): {exc}") from exc


class FdMapIO:
    """MapIO over map fds (name -> fd). It owns none of them: whoever opened them closes them (and close()s
    this first: the rings map may be mapped into our memory)."""

    def __init__(self, fds: Mapping[str, int], ring_size: int) -> None:
        self.fds = dict(fds)
        self.ring_size = ring_size
        self.max_entries = {name: int(bpfsys.map_info(fd).max_entries) for name, fd in self.fds.items()}
        self._ncpu = bpfsys.possible_cpus()
        self.rings = mapped(self.fds["rings"], self.max_entries["rings"]) if "rings" in self.fds else None

    def close(self) -> None:
        if self.rings is not None:
            self.rings.close()
            self.rings = None

    # -- reads ---------------------------------------------------------------------------------------------
    def _hash_items(self, name: str, value_type: type[ctypes._CData]) -> list[tuple[VipKeyC, ctypes._CData]]:
        fd = self.fds[name]
        out: list[tuple[VipKeyC, ctypes._CData]] = []
        for key in bpfsys.fd_keys(fd, VipKeyC, self.max_entries[name] + 1):
            value = value_type()
            if bpfsys.map_lookup(fd, key, value, f"{name} entry"):  # gone meanwhile: skipped
                out.append((key, value))  # type: ignore[arg-type]
        return out

    def read_vips(self) -> dict[VipKey, int]:
        return {_vip_of(k): int(v.vip_num) for k, v in self._hash_items("vips", VipMetaC)}  # type: ignore[attr-defined]

    def read_vip_flags(self) -> dict[VipKey, int]:
        items = self._hash_items("vips", VipMetaC)
        return {_vip_of(k): int(v.flags) for k, v in items if v.flags}  # type: ignore[attr-defined]

    def read_backends(self) -> dict[int, BackendSlot]:
        size = ctypes.sizeof(BackendC)
        raw = bpfsys.array_values(self.fds["backends"], 0, self.max_entries["backends"], size)
        out: dict[int, BackendSlot] = {}
        for idx, v in enumerate((BackendC * (len(raw) // size)).from_buffer(raw)):
            if v.flags == 0 and not any(v.addr):  # cleared slot (a down IPv4 backend also has flags 0)
                continue
            fam = 6 if v.flags & BACKEND_F_IPV6 else 4
            out[idx] = BackendSlot(v.vip_num, address(v.addr, fam), bool(v.flags & BACKEND_F_UP),
                                   bool(v.flags & BACKEND_F_GUE))
        return out

    def read_vip_addrs(self) -> dict[IPAddress, int]:
        return {address(k.addr, k.family): int(v.value)  # type: ignore[attr-defined]
                for k, v in self._hash_items("vip_addrs", U32)}

    def read_ring(self, vip_num: int) -> Ring:
        base = vip_num * self.ring_size
        if self.rings is not None:
            return self.rings.values[base:base + self.ring_size].copy()
        raw = bpfsys.array_values(self.fds["rings"], base, self.ring_size, 4)
        if len(raw) != 4 * self.ring_size:
            raise DataplaneError(f"read the ring of VIP #{vip_num}: the rings map ends after "
                                 f"{len(raw) // 4} of its {self.ring_size} slots")
        return np.frombuffer(memoryview(raw), dtype=np.uint32).copy()

    def read_filter(self) -> dict[int, int]:
        words = bpfsys.array_lookup_range(self.fds["vip_filter"], 0, VIP_FILTER_BITS // 32)
        return {w: bits for w, bits in enumerate(words) if bits}

    def read_counters(self, name: str) -> dict[int, tuple[int, int]]:
        """Per-CPU counters summed: index -> (packets, bytes), non-zero entries only. One batch read."""
        per_cpu = self._ncpu
        raw = bpfsys.array_values(self.fds[name], 0, self.max_entries[name], 16 * per_cpu)
        words = (ctypes.c_uint64 * (len(raw) // 8)).from_buffer(raw)
        out: dict[int, tuple[int, int]] = {}
        step = 2 * per_cpu
        for idx in range(len(words) // step):
            cell = words[idx * step:(idx + 1) * step]
            packets, nbytes = sum(cell[0::2]), sum(cell[1::2])
            if packets or nbytes:
                out[idx] = (packets, nbytes)
        return out

    # -- writes --------------------------------------------------------------------------------------------
    def _batch(self, name: str, keys: Sequence[ctypes._CData], values: Sequence[ctypes._CData],
               what: str) -> None:
        if not keys:
            return
        key_t: Any = type(keys[0])
        value_t: Any = type(values[0])
        karr = (key_t * len(keys))(*keys)
        varr = (value_t * len(values))(*values)
        bpfsys.map_update_batch(self.fds[name], karr, varr, what)

    def write_filter(self, words: Mapping[int, int]) -> None:
        self._batch("vip_filter", [U32(w) for w in words], [U32(b) for b in words.values()],
                    f"{len(words)} words of the VIP prefilter")

    def write_ctl(self, ctl: Ctl) -> None:
        leaf = LbCtlC(mtu=ctl.mtu, port0_vips=ctl.port0_vips, new_flow_rate=ctl.new_flow_rate)
        ctypes.memmove(leaf.own_mac, ctl.own_mac, 6)
        ctypes.memmove(leaf.gw_mac, ctl.gw_mac, 6)
        p4, m4 = encap_masks_v4(ctl.encap_v4)
        p6, m6 = encap_masks_v6(ctl.encap_v6)
        leaf.encap_v4_prefix = int.from_bytes(p4, "little")
        leaf.encap_v4_hostmask = int.from_bytes(m4, "little")
        ctypes.memmove(leaf.encap_v6_prefix, p6, 16)
        leaf.encap_v6_hostmask = int.from_bytes(m6, "little")
        bpfsys.map_update(self.fds["ctl"], U32(0), leaf, "ctl")

    def put_vips(self, vips: Mapping[VipKey, int], flags: Mapping[VipKey, int]) -> None:
        self._batch("vips", [vip_key(k) for k in vips],
                    [VipMetaC(vip_num=n, flags=flags.get(k, 0)) for k, n in vips.items()],
                    f"{len(vips)} VIPs")

    def delete_vips(self, keys: Iterable[VipKey]) -> None:
        for key in keys:
            bpfsys.map_delete(self.fds["vips"], vip_key(key), f"VIP {key.name}")

    def put_vip_addrs(self, addrs: Mapping[IPAddress, int]) -> None:
        self._batch("vip_addrs", [vip_key(VipKey(a, 0, 0)) for a in addrs], [U32(c) for c in addrs.values()],
                    f"{len(addrs)} VIP addresses")

    def delete_vip_addrs(self, addrs: Iterable[IPAddress]) -> None:
        for addr in addrs:
            bpfsys.map_delete(self.fds["vip_addrs"], vip_key(VipKey(addr, 0, 0)), f"VIP address {addr}")

    def put_backends(self, backends: Mapping[int, BackendSlot]) -> None:
        values = []
        for slot in backends.values():
            leaf = BackendC(vip_num=slot.vip_num, flags=(BACKEND_F_IPV6 if slot.address.version == 6 else 0)
                            | (BACKEND_F_UP if slot.up else 0) | (BACKEND_F_GUE if slot.gue else 0))
            ctypes.memmove(leaf.addr, slot.address.packed.ljust(16, b"\0"), 16)
            values.append(leaf)
        self._batch("backends", [U32(i) for i in backends], values, f"{len(backends)} backends")

    def clear_backends(self, indexes: Iterable[int]) -> None:
        keys = [U32(i) for i in indexes]
        self._batch("backends", keys, [BackendC() for _ in keys], f"clear {len(keys)} backends")

    def write_ring_slots(self, vip_num: int, slots: npt.NDArray[np.intp], values: Ring) -> None:
        count = len(slots)
        if not count:
            return
        if self.rings is not None:  # stores into the map's memory: no syscall, no copy of keys
            self.rings.values[vip_num * self.ring_size:(vip_num + 1) * self.ring_size][slots] = values
            return
        # the map's keys and values as contiguous u32 arrays of our own, handed to the kernel as they are
        key_buf = (slots + vip_num * self.ring_size).astype(np.uint32)
        value_buf = np.array(values, dtype=np.uint32)
        keys, leaves = np.ctypeslib.as_ctypes(key_buf), np.ctypeslib.as_ctypes(value_buf)
        bpfsys.map_update_batch(self.fds["rings"], keys, leaves, f"{count} ring slots of VIP #{vip_num}")

    def zero_counters(self, name: str, indexes: Iterable[int]) -> None:
        keys = [U32(i) for i in indexes]
        if not keys:
            return
        cell = ctypes.sizeof(LbCounterC) * self._ncpu
        karr = (U32 * len(keys))(*keys)
        varr = (ctypes.c_char * (cell * len(keys)))()
        bpfsys.map_update_batch(self.fds[name], karr, varr, f"zero {len(keys)} of {name}")
