"""Restart without compiling: the balancer program is pinned beside its maps under a name that carries the
digest of what built it, and a restarted supervisor adopts it by fd when the digest is still the same.

    digest = sha256 of: the C sources the program is built from (balancer.c and every local header it
             includes, recursively: the map definitions and layouts are in them), the compile flags (sizes,
             the pin directory, ICMP_TOO_BIG_RATE: all derived from [dataplane]) and the kernel release
    pin    = <pins>/prog_<digest>   (bpffs names may not hold a dot)

Adopting needs no bcc (no LLVM: a restart answers in well under a second and ~150 MB less RSS): the program
is opened from its pin, and each pinned map is accepted only when it is one of the maps that very program
uses (by map id), so maps of another layout or another program are never adopted. It is also required to be
the program attached to the interface in the configured mode; otherwise (or when anything differs) the
loader compiles and replaces it as before.
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from edge_lb import netlink
from edge_lb.dataplane import bpfsys
from edge_lb.errors import DataplaneError

PROG_PREFIX = "prog_"
_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.M)
_DIGEST_VERSION = b"edge-lb program digest 1\n"  # bumped if what goes into the digest changes


def sources(main: Path) -> list[Path]:
    """`main` and every header it includes with "..." (found beside it), recursively, each once, sorted."""
    seen: dict[Path, None] = {}
    todo = [main]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen[path] = None
        for name in _INCLUDE.findall(path.read_text(encoding="utf-8")):
            header = path.parent / name
            if not header.exists():
                raise DataplaneError(f"{path}: includes {name!r}, which is not in {path.parent}")
            todo.append(header)
    return sorted(seen)


def program_digest(main: Path, cflags: Sequence[str]) -> str:
    """The hex sha256 that names a build of `main` with `cflags` on this kernel."""
    h = hashlib.sha256(_DIGEST_VERSION)
    for path in sources(main):
        h.update(f"{path.name}\0{path.stat().st_size}\0".encode())
        h.update(path.read_bytes())
    h.update("\0".join(cflags).encode() + b"\0")
    h.update(platform.release().encode())
    return h.hexdigest()


def prog_pin(pins: Path, digest: str) -> Path:
    return pins / f"{PROG_PREFIX}{digest}"


def pin_program(fd: int, pins: Path, digest: str) -> None:
    """Pin the program of `fd` under its digest; other programs' pins go (the maps stay)."""
    path = prog_pin(pins, digest)
    path.unlink(missing_ok=True)
    bpfsys.obj_pin(fd, path)
    for old in pins.glob(f"{PROG_PREFIX}*"):
        if old != path:
            old.unlink(missing_ok=True)


@dataclass
class Adopted:
    """The pinned program and its maps, opened by fd (close() closes them; the kernel objects stay)."""

    prog_fd: int
    prog_id: int
    map_fds: dict[str, int]

    def close(self) -> None:
        for fd in (self.prog_fd, *self.map_fds.values()):
            os.close(fd)
        self.map_fds = {}


def adopt(pins: Path, digest: str, maps: Iterable[str], interface: str, mode: str) -> Adopted | str:
    """The pinned program of `digest` with its pinned `maps`, or why it cannot be adopted."""
    path = prog_pin(pins, digest)
    if not path.exists():
        others = sorted(p.name for p in pins.glob(f"{PROG_PREFIX}*")) if pins.exists() else []
        return f"the pinned program is another build ({others[0][:21]}...)" if others else "no pinned program"
    attached, attached_mode = netlink.xdp_attached(interface)
    adopted = Adopted(bpfsys.obj_get(path), 0, {})
    try:
        why = _check(adopted, pins, maps, (attached, attached_mode, interface, mode))
    except DataplaneError as exc:
        why = str(exc)
    if why is not None:
        adopted.close()
        return why
    return adopted


def _check(adopted: Adopted, pins: Path, maps: Iterable[str],
           where: tuple[int | None, str | None, str, str]) -> str | None:
    """Opens the maps into `adopted`; why not to adopt it, or None."""
    attached, attached_mode, interface, mode = where
    adopted.prog_id, map_ids = bpfsys.prog_ids(adopted.prog_fd)
    if attached != adopted.prog_id or attached_mode != mode:
        return (f"it is not the program attached to {interface} in {mode} mode (attached: "
                f"{attached or 'none'}{f' {attached_mode}' if attached_mode else ''})")
    for name in maps:
        adopted.map_fds[name] = bpfsys.obj_get(pins / name)
        if bpfsys.map_info(adopted.map_fds[name]).id not in map_ids:
            return f"the pinned map {name} is not one that program uses"
    return None
