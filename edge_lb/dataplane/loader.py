"""Load, adopt, attach and write the XDP balancer. The only module that imports bcc.

Every other program (decap.c, the lab's xdp_pass.c, bench's references) is compiled, loaded and attached
through load_xdp / attach_xdp / detach_xdp here. bcc raises bare Exception; every such error is translated
here into DataplaneError naming what was being done.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_lb import netlink, paths
from edge_lb.assets import asset_dir
from edge_lb.config import Dataplane as DataplaneSettings
from edge_lb.dataplane import bpfsys, pinned
from edge_lb.dataplane.counters import reason_names_in
from edge_lb.dataplane.desired import VIP_FILTER_BITS
from edge_lb.dataplane.fdmaps import (
    BACKEND_F_GUE,
    BACKEND_F_IPV6,
    BACKEND_F_UP,
    BPF_F_MMAPABLE,
    FAMILY_TAG,
    LAYOUTS,
    FdMapIO,
)
from edge_lb.errors import DataplaneError

BPF_DIR = asset_dir("bpf")
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
    return _load(source, func, cflags, "XDP")


def load_tc(source: Path, func: str, cflags: Sequence[str] = ()) -> tuple[Any, Any]:
    """As load_xdp, for a tc classifier (SCHED_CLS, direct action) function."""
    return _load(source, func, cflags, "SCHED_CLS")


def _load(source: Path, func: str, cflags: Sequence[str], prog_type: str) -> tuple[Any, Any]:
    bcc = _import_bcc()
    try:
        bpf = bcc.BPF(src_file=str(source).encode(), cflags=list(cflags))
    except Exception as exc:  # bare Exception; the compiler's own message went to stderr
        raise DataplaneError(f"compiling {source} failed: {exc}") from exc
    try:
        fn = bpf.load_func(func.encode(), getattr(bcc.BPF, prog_type))
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


def renew_unmapped_rings(pins: Path) -> None:
    """rings is made mmapable (balancer_maps.h: the control plane writes its slots as stores). bcc adopts a
    pinned map whatever its flags, so a pin made by an older build would keep the slow path of a syscall per
    batch: such a pin is removed, and the load makes it again. Nothing is lost: the first apply writes every
    ring before the program is attached (startup: load, change, attach), and the old program, attached
    until then, keeps its own reference to the old map."""
    path = pins / "rings"
    if path.exists() and not bpfsys.pinned_map_info(path).map_flags & BPF_F_MMAPABLE:
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


# every map of balancer.c (each pinned with pin=True; tests/dataplane/test_fdmaps.py checks the list)
MAP_NAMES = (*LAYOUTS, "conn_table", "icmp_rate", "flow_rate")


class Dataplane:
    """The balancer program and its maps by fd: compiled by bcc (load), or adopted from its pins without
    bcc when the pinned program is the same build and still attached (adopt)."""

    def __init__(self, prog_fd: int, map_fds: Mapping[str, int], sizes: MapSizes, pins: Path | None, *,
                 bpf: Any = None, fn: Any = None, adopted: pinned.Adopted | None = None,
                 digest: str = "") -> None:
        self._prog_fd = prog_fd
        self.sizes = sizes
        self.pins = pins
        self.bpf = bpf  # the bcc object and function when compiled here; None when adopted
        self._fn = fn
        self.adopted = adopted
        self.digest = digest
        self.io = FdMapIO({name: map_fds[name] for name in LAYOUTS}, sizes.ring_size)

    @property
    def origin(self) -> str:
        return "adopted" if self.adopted is not None else "compiled"

    @classmethod
    def load(cls, settings: DataplaneSettings, pin: bool) -> Dataplane:
        """Compile and load. With pin=True, maps live under /sys/fs/bpf/edge_lb/<instance> and are adopted,
        and the program is pinned beside them under its digest (for adopt after a restart)."""
        _import_bcc()  # before touching bpffs: a missing bcc is the clearer error
        sizes = MapSizes.of(settings)
        pins = paths.pins(settings.instance) if pin else None
        cflags = _cflags(sizes, pins)
        if pins is not None:
            _ensure_bpffs_dir(pins)
            check_pinned(pins, sizes)
            renew_short_counters(pins, len(reason_names_in(BPF_DIR / "balancer_consts.h")))
            renew_ctl(pins)
            renew_unmapped_rings(pins)
        bpf, prog = load_xdp(BPF_DIR / "balancer.c", "balancer", cflags)
        digest = pinned.program_digest(BPF_DIR / "balancer.c", cflags)
        if pins is not None:
            try:
                pinned.pin_program(int(prog.fd), pins, digest)
            except DataplaneError:
                bpf.cleanup()
                raise
        fds = {name: int(bpf[name.encode()].map_fd) for name in LAYOUTS}
        return cls(int(prog.fd), fds, sizes, pins, bpf=bpf, fn=prog, digest=digest)

    @classmethod
    def adopt(cls, settings: DataplaneSettings, interface: str, mode: str) -> Dataplane | str:
        """The pinned program and maps without compiling, when the program pinned under the digest of the
        build this config asks for is the one attached to `interface` in `mode`; else why not."""
        sizes = MapSizes.of(settings)
        pins = paths.pins(settings.instance)
        cflags = _cflags(sizes, pins)
        digest = pinned.program_digest(BPF_DIR / "balancer.c", cflags)
        got = pinned.adopt(pins, digest, MAP_NAMES, interface, mode)
        if isinstance(got, str):
            return got
        try:
            return cls(got.prog_fd, got.map_fds, sizes, pins, adopted=got, digest=digest)
        except DataplaneError:
            got.close()
            raise

    @property
    def prog_fd(self) -> int:
        return self._prog_fd

    def attach(self, ifname: str, mode: str = "native") -> None:
        """Attach to ifname, atomically replacing whatever program (ours or older) is attached there. An
        adopted program that is still the one attached is left as it is (no bcc needed)."""
        if self.adopted is not None and netlink.xdp_attached(ifname) == (self.adopted.prog_id, mode):
            return
        fn = self._fn or _import_bcc().BPF.Function(None, b"balancer", self._prog_fd)  # bcc only now
        attach_xdp(ifname, fn, mode)

    @staticmethod
    def detach(ifname: str, mode: str = "native") -> None:
        detach_xdp(ifname, mode)

    def close(self) -> None:
        """Close our fds. Pinned maps and an attached program stay in the kernel."""
        self.io.close()  # unmaps the rings map: a mapping would keep the map alive after its fds are closed
        if self.bpf is not None:
            self.bpf.cleanup()
        if self.adopted is not None:
            self.adopted.close()


def _cflags(sizes: MapSizes, pins: Path | None) -> list[str]:
    cflags = sizes.cflags()
    if pins is not None:
        cflags.append(f'-DPIN_DIR="{pins}"')
    return cflags


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


__all__ = ["BACKEND_F_GUE", "BACKEND_F_IPV6", "BACKEND_F_UP", "FAMILY_TAG", "Dataplane", "MapSizes",
           "attach_xdp", "check_pinned", "detach_xdp", "load_tc", "load_xdp", "remove_pins", "xdp_flags"]
