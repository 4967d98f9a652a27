"""Load, adopt, attach and write the XDP balancer. The only module that imports bcc.

Every other program (decap.c, the lab's xdp_pass.c, bench's references) is compiled, loaded and attached
through load_xdp / attach_xdp / detach_xdp here. bcc raises bare Exception; every such error is translated
here into DataplaneError naming what was being done.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_lb import paths
from edge_lb.assets import asset_dir
from edge_lb.config import Dataplane as DataplaneSettings
from edge_lb.config import IPAddress
from edge_lb.dataplane import bpfsys
from edge_lb.dataplane.counters import reason_names_in
from edge_lb.dataplane.desired import VIP_FILTER_BITS, BackendSlot, VipKey, encap_masks_v4, encap_masks_v6
from edge_lb.dataplane.mapio import Ctl
from edge_lb.errors import DataplaneError

BPF_DIR = asset_dir("bpf")
# Mirrors of C constants, each checked against its header by tests/unit/test_layout.py.
FAMILY_TAG = {4: 4, 6: 6}  # LB_FAMILY_V4 / LB_FAMILY_V6 in bpf/balancer_consts.h
BACKEND_F_IPV6 = 1 << 0  # bpf/balancer_consts.h
BACKEND_F_UP = 1 << 1  # bpf/balancer_consts.h
BACKEND_F_GUE = 1 << 2  # bpf/balancer_consts.h
XDP_FLAGS = {"generic": 1 << 1, "native": 1 << 2}  # XDP_FLAGS_SKB_MODE / _DRV_MODE, linux/if_link.h


def _import_bcc() -> Any:
    try:
        import bcc
    except ImportError as exc:
        raise DataplaneError("bcc is missing: install Debian's python3-bpfcc and use a venv made with "
                             "--system-site-packages (scripts/setup.sh does both)") from exc
    return bcc


def load_xdp(source: Path, func: str, cflags: Sequence[str] = ()) -> tuple[Any, Any]:
    """Compile `source` with bcc and load its XDP function `func` (nothing attached): (BPF object, function).

    `cflags` must hold validated values only (they reach the compiler's command line)."""
    bcc = _import_bcc()
    try:
        bpf = bcc.BPF(src_file=str(source).encode(), cflags=list(cflags))
    except Exception as exc:  # bare Exception; the compiler's own message went to stderr
        raise DataplaneError(f"compiling {source} failed: {exc}") from exc
    try:
        fn = bpf.load_func(func.encode(), bcc.BPF.XDP)
    except Exception as exc:
        bpf.cleanup()
        raise DataplaneError(f"loading {func} of {source}: the kernel refused it: {exc}") from exc
    return bpf, fn


def xdp_flags(mode: str) -> int:
    """The attach flags of an XDP mode ("native" or "generic")."""
    if mode not in XDP_FLAGS:
        raise DataplaneError(f"XDP mode must be one of {sorted(XDP_FLAGS)}, got {mode!r}")
    return XDP_FLAGS[mode]


def attach_xdp(ifname: str, fn: Any, mode: str = "native") -> None:
    """Attach a loaded XDP function to ifname, atomically replacing whatever program is attached there."""
    flags = xdp_flags(mode)
    bcc = _import_bcc()
    try:
        bcc.BPF.attach_xdp(ifname.encode(), fn, flags)
    except Exception as exc:
        raise DataplaneError(f"attach XDP ({mode}) to {ifname}: {exc}") from exc


def detach_xdp(ifname: str, mode: str = "native") -> None:
    """Remove the XDP program of ifname in `mode`. No program attached is not an error."""
    flags = xdp_flags(mode)
    bcc = _import_bcc()
    try:
        bcc.BPF.remove_xdp(ifname.encode(), flags)
    except Exception as exc:
        raise DataplaneError(f"detach XDP ({mode}) from {ifname}: {exc}") from exc


def renew_short_counters(pins: Path, reasons: int) -> None:
    """reason_stats is sized by enum lb_stat, which grows with new reasons. bcc adopts a pinned map whatever
    its size, so a pin made by an older program would keep the new reasons from ever being counted (their
    lookups fail): such a pin is removed, and the load makes it again at the new size. It holds only counters;
    the old program, still attached until the new one replaces it, keeps its own reference."""
    path = pins / "reason_stats"
    if path.exists() and bpfsys.pinned_map_max_entries(path) < reasons:
        path.unlink()


def renew_ctl(pins: Path) -> None:
    """The ctl map holds only node settings, which every apply writes in full before the program is attached,
    and nothing reads back: its pin is always made anew, so struct lb_ctl may grow (a program built for a
    longer value than a pinned ctl's is refused by the verifier). The old program keeps its own reference."""
    (pins / "ctl").unlink(missing_ok=True)


@dataclass(frozen=True)
class MapSizes:
    """max_entries of every map, derived from config; also what a pinned map must have to be adopted."""

    ring_size: int
    max_vips: int
    max_backends: int
    conn_table_size: int
    icmp_too_big_rate: int = 0  # not a size: a compile-time setting (-D) beside them; 0 = no ICMP too-big
    gue_port: int = 6080  # not a size either: the GUE destination port (-D GUE_PORT)

    @classmethod
    def of(cls, s: DataplaneSettings) -> MapSizes:
        return cls(s.ring_size, s.max_vips, s.max_backends, s.conn_table_size, s.icmp_too_big_rate,
                   s.gue_port)

    def max_entries(self) -> dict[str, int]:
        return {"vips": self.max_vips, "vip_addrs": self.max_vips, "vip_filter": VIP_FILTER_BITS // 32,
                "rings": self.ring_size * self.max_vips,
                "backends": self.max_backends, "conn_table": self.conn_table_size, "ctl": 1,
                "vip_stats": self.max_vips, "backend_stats": self.max_backends, "reason_stats": -1,
                "icmp_rate": 1, "flow_rate": 1}

    def cflags(self) -> list[str]:
        return [f"-DRING_SIZE={int(self.ring_size)}", f"-DMAX_VIPS={int(self.max_vips)}",
                f"-DMAX_BACKENDS={int(self.max_backends)}", f"-DCONN_TABLE_SIZE={int(self.conn_table_size)}",
                f"-DICMP_TOO_BIG_RATE={int(self.icmp_too_big_rate)}", f"-DGUE_PORT={int(self.gue_port)}",
                f"-I{BPF_DIR}"]


def check_pinned(pins: Path, sizes: MapSizes) -> None:
    """Refuse to adopt pinned maps made for other sizes (the program would be built for the wrong layout)."""
    for name, want in sizes.max_entries().items():
        path = pins / name
        if want < 0 or not path.exists():
            continue
        have = bpfsys.pinned_map_max_entries(path)
        if have != want:
            raise DataplaneError(
                f"pinned map {path} has {have} entries but this config needs {want}; the maps were made with "
                f"other [dataplane] sizes. Restore those sizes, or stop the supervisor, run "
                f"`edge-lb unload -c FILE` (detaches and unpins: drops the connection table) and start again")


class Dataplane:
    """The compiled balancer: program fd, maps, attach/detach."""

    def __init__(self, bpf: Any, prog: Any, sizes: MapSizes, pins: Path | None) -> None:
        self.bpf = bpf
        self.prog = prog
        self.sizes = sizes
        self.pins = pins
        self.io = BccMapIO(bpf, sizes.ring_size)

    @classmethod
    def load(cls, settings: DataplaneSettings, pin: bool) -> Dataplane:
        """Compile and load. With pin=True, maps live under /sys/fs/bpf/edge_lb/<instance> and are adopted."""
        _import_bcc()  # before touching bpffs: a missing bcc is the clearer error
        sizes = MapSizes.of(settings)
        cflags = sizes.cflags()
        pins = paths.pins(settings.instance) if pin else None
        if pins is not None:
            _ensure_bpffs_dir(pins)
            check_pinned(pins, sizes)
            renew_short_counters(pins, len(reason_names_in(BPF_DIR / "balancer_consts.h")))
            renew_ctl(pins)
            cflags.append(f'-DPIN_DIR="{pins}"')
        bpf, prog = load_xdp(BPF_DIR / "balancer.c", "balancer", cflags)
        return cls(bpf, prog, sizes, pins)

    @property
    def prog_fd(self) -> int:
        return int(self.prog.fd)

    def attach(self, ifname: str, mode: str = "native") -> None:
        """Attach to ifname, atomically replacing whatever program (ours or older) is attached there."""
        attach_xdp(ifname, self.prog, mode)

    @staticmethod
    def detach(ifname: str, mode: str = "native") -> None:
        detach_xdp(ifname, mode)

    def close(self) -> None:
        """Close our fds. Pinned maps and an attached program stay in the kernel."""
        self.bpf.cleanup()


def remove_pins(instance: str) -> list[Path]:
    """Unpin every map of an instance (uninstall). Returns what was removed."""
    pins = paths.pins(instance)
    removed = [p for p in sorted(pins.glob("*")) if p.is_file() or not p.is_dir()]
    for p in removed:
        p.unlink()
    if pins.exists():
        pins.rmdir()
    if paths.PIN_ROOT.exists() and not any(paths.PIN_ROOT.iterdir()):
        paths.PIN_ROOT.rmdir()  # the last instance leaves no trace in bpffs
    return removed


def _ensure_bpffs_dir(path: Path) -> None:
    if not bpfsys.is_bpffs(Path("/sys/fs/bpf")):
        raise DataplaneError("/sys/fs/bpf is not a bpffs mount: `mount -t bpf bpf /sys/fs/bpf`")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataplaneError(f"create pin directory {path}: {exc}") from exc


def _addr_words(address: IPAddress) -> bytes:
    return address.packed.ljust(16, b"\0")


def _port_be(port: int) -> int:
    return socket.htons(port)


class BccMapIO:
    """MapIO over bcc tables. Layouts come from bcc's Key/Leaf types (clang's own layout)."""

    def __init__(self, bpf: Any, ring_size: int) -> None:
        self.t = {name: bpf[name.encode()] for name in
                  ("vips", "vip_addrs", "vip_filter", "rings", "backends", "ctl", "vip_stats",
                   "backend_stats", "reason_stats", "conn_table")}
        self.ring_size = ring_size

    # -- conversions -------------------------------------------------------------------------------------
    def _vip_key(self, key: VipKey) -> Any:
        k = self.t["vips"].Key()
        ctypes.memmove(k.addr, _addr_words(key.address), 16)
        k.port, k.proto, k.family = _port_be(key.port), key.proto, FAMILY_TAG[key.address.version]
        return k

    @staticmethod
    def _address(words: Any, family: int) -> IPAddress:
        raw = bytes(words)
        return ipaddress.IPv4Address(raw[:4]) if family == 4 else ipaddress.IPv6Address(raw)

    # -- reads ---------------------------------------------------------------------------------------------
    def read_vips(self) -> dict[VipKey, int]:
        return {VipKey(self._address(k.addr, k.family), socket.ntohs(k.port), k.proto): v.vip_num
                for k, v in self.t["vips"].items()}

    def read_vip_flags(self) -> dict[VipKey, int]:
        return {VipKey(self._address(k.addr, k.family), socket.ntohs(k.port), k.proto): int(v.flags)
                for k, v in self.t["vips"].items() if v.flags}

    def read_backends(self) -> dict[int, BackendSlot]:
        out: dict[int, BackendSlot] = {}
        for k, v in self.t["backends"].items_lookup_batch():
            if v.flags == 0 and not any(v.addr):  # cleared slot (a down IPv4 backend also has flags 0)
                continue
            fam = 6 if v.flags & BACKEND_F_IPV6 else 4
            out[int(k)] = BackendSlot(v.vip_num, self._address(v.addr, fam), bool(v.flags & BACKEND_F_UP),
                                      bool(v.flags & BACKEND_F_GUE))
        return out

    def read_vip_addrs(self) -> dict[IPAddress, int]:
        return {self._address(k.addr, k.family): int(v.value) for k, v in self.t["vip_addrs"].items()}

    def read_ring(self, vip_num: int) -> tuple[int, ...]:
        return tuple(bpfsys.array_lookup_range(self.t["rings"].map_fd, vip_num * self.ring_size,
                                               self.ring_size))

    def read_filter(self) -> dict[int, int]:
        words = bpfsys.array_lookup_range(self.t["vip_filter"].map_fd, 0, VIP_FILTER_BITS // 32)
        return {w: bits for w, bits in enumerate(words) if bits}

    # -- writes --------------------------------------------------------------------------------------------
    def write_filter(self, words: Mapping[int, int]) -> None:
        if not words:
            return
        t = self.t["vip_filter"]
        keys = (t.Key * len(words))(*words)
        values = (t.Leaf * len(words))(*words.values())
        try:
            t.items_update_batch(keys, values)
        except Exception as exc:
            raise DataplaneError(f"write {len(words)} words of the VIP prefilter: {exc}") from exc

    def write_ctl(self, ctl: Ctl) -> None:
        t = self.t["ctl"]
        leaf = t.Leaf()
        ctypes.memmove(leaf.own_mac, ctl.own_mac, 6)
        ctypes.memmove(leaf.gw_mac, ctl.gw_mac, 6)
        leaf.mtu, leaf.port0_vips = ctl.mtu, ctl.port0_vips
        p4, m4 = encap_masks_v4(ctl.encap_v4)
        p6, m6 = encap_masks_v6(ctl.encap_v6)
        leaf.encap_v4_prefix = int.from_bytes(p4, "little")
        leaf.encap_v4_hostmask = int.from_bytes(m4, "little")
        ctypes.memmove(leaf.encap_v6_prefix, p6, 16)
        leaf.encap_v6_hostmask = int.from_bytes(m6, "little")
        leaf.new_flow_rate = ctl.new_flow_rate
        self._set(t, t.Key(0), leaf, "ctl")

    def put_vips(self, vips: Mapping[VipKey, int], flags: Mapping[VipKey, int]) -> None:
        t = self.t["vips"]
        for key, num in vips.items():
            self._set(t, self._vip_key(key), t.Leaf(vip_num=num, flags=flags.get(key, 0)), f"vip {key}")

    def delete_vips(self, keys: Iterable[VipKey]) -> None:
        for key in keys:
            self._delete(self.t["vips"], self._vip_key(key))

    def put_vip_addrs(self, addrs: Mapping[IPAddress, int]) -> None:
        t = self.t["vip_addrs"]
        for addr, count in addrs.items():
            self._set(t, self._vip_key(VipKey(addr, 0, 0)), t.Leaf(count), f"vip address {addr}")

    def delete_vip_addrs(self, addrs: Iterable[IPAddress]) -> None:
        for addr in addrs:
            self._delete(self.t["vip_addrs"], self._vip_key(VipKey(addr, 0, 0)))

    def put_backends(self, backends: Mapping[int, BackendSlot]) -> None:
        t = self.t["backends"]
        for idx, slot in backends.items():
            leaf = t.Leaf()
            ctypes.memmove(leaf.addr, _addr_words(slot.address), 16)
            leaf.flags = ((BACKEND_F_IPV6 if slot.address.version == 6 else 0)
                          | (BACKEND_F_UP if slot.up else 0) | (BACKEND_F_GUE if slot.gue else 0))
            leaf.vip_num = slot.vip_num
            self._set(t, t.Key(idx), leaf, f"backend {idx} ({slot.address})")

    def clear_backends(self, indexes: Iterable[int]) -> None:
        t = self.t["backends"]
        for idx in indexes:
            self._set(t, t.Key(idx), t.Leaf(), f"backend {idx}")

    def write_ring_slots(self, vip_num: int, changes: Sequence[tuple[int, int]]) -> None:
        if not changes:
            return
        t = self.t["rings"]
        keys = (t.Key * len(changes))(*(vip_num * self.ring_size + s for s, _ in changes))
        values = (t.Leaf * len(changes))(*(i for _, i in changes))
        try:
            t.items_update_batch(keys, values)
        except Exception as exc:
            raise DataplaneError(f"write {len(changes)} ring slots of VIP #{vip_num}: {exc}") from exc

    # -- counters ------------------------------------------------------------------------------------------
    def read_counters(self, name: str) -> dict[int, tuple[int, int]]:
        """Per-CPU counters summed: index -> (packets, bytes), non-zero entries only."""
        out: dict[int, tuple[int, int]] = {}
        for k, per_cpu in self.t[name].items():
            pk = sum(c.packets for c in per_cpu)
            by = sum(c.bytes for c in per_cpu)
            if pk or by:
                out[int(k.value)] = (pk, by)
        return out

    def zero_counters(self, name: str, indexes: Iterable[int]) -> None:
        t = self.t[name]
        for i in indexes:
            try:
                t.clearitem(t.Key(i))
            except Exception as exc:
                raise DataplaneError(f"zero {name}[{i}]: {exc}") from exc

    @staticmethod
    def _set(t: Any, key: Any, leaf: Any, what: str) -> None:
        try:
            t[key] = leaf
        except Exception as exc:
            raise DataplaneError(f"write {what}: {exc}") from exc

    @staticmethod
    def _delete(t: Any, key: Any) -> None:
        try:
            del t[key]
        except KeyError:
            pass
        except Exception as exc:
            if getattr(exc, "errno", None) != errno.ENOENT:
                raise DataplaneError(f"delete map entry: {exc}") from exc


__all__ = ["BccMapIO", "Dataplane", "MapSizes", "attach_xdp", "check_pinned", "detach_xdp", "load_xdp",
           "remove_pins", "xdp_flags"]
