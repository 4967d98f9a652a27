"""The few bpf(2) commands bcc 0.26 does not wrap: test runs, pinned-map info, ranged array reads."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import platform
from pathlib import Path

from edge_lb.errors import DataplaneError

_SYS_BPF = {"x86_64": 321, "aarch64": 280}
BPF_MAP_GET_NEXT_KEY = 4
BPF_OBJ_GET = 7
BPF_PROG_GET_FD_BY_ID = 13
BPF_MAP_GET_FD_BY_ID = 14
BPF_PROG_TEST_RUN = 10
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_MAP_LOOKUP_BATCH = 24

_NR = _SYS_BPF.get(platform.machine())  # once: test runs call sys_bpf a million times
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def sys_bpf(cmd: int, attr: ctypes.Structure, what: str) -> int:
    """bpf(cmd, attr); raise DataplaneError naming `what` on failure."""
    nr = _NR
    if nr is None:
        raise DataplaneError(f"{what}: unsupported machine {platform.machine()}")
    rc = int(_libc.syscall(nr, cmd, ctypes.byref(attr), ctypes.sizeof(attr)))
    if rc < 0:
        err = ctypes.get_errno()
        raise DataplaneError(f"{what}: {os.strerror(err)}") from OSError(err, os.strerror(err))
    return rc


class _ObjGetAttr(ctypes.Structure):
    _fields_ = [("pathname", ctypes.c_uint64), ("bpf_fd", ctypes.c_uint32),
                ("file_flags", ctypes.c_uint32)]


class _InfoAttr(ctypes.Structure):
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32),
                ("info", ctypes.c_uint64)]


class _MapInfo(ctypes.Structure):
    # Leading fields of struct bpf_map_info; the kernel fills only what info_len covers.
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("key_size", ctypes.c_uint32),
                ("value_size", ctypes.c_uint32), ("max_entries", ctypes.c_uint32),
                ("map_flags", ctypes.c_uint32), ("name", ctypes.c_char * 16)]


class _BatchAttr(ctypes.Structure):
    _fields_ = [("in_batch", ctypes.c_uint64), ("out_batch", ctypes.c_uint64),
                ("keys", ctypes.c_uint64), ("values", ctypes.c_uint64), ("count", ctypes.c_uint32),
                ("map_fd", ctypes.c_uint32), ("elem_flags", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


def pinned_map_info(path: Path) -> _MapInfo:
    raw = os.fsencode(path)
    buf = ctypes.create_string_buffer(raw)
    fd = sys_bpf(BPF_OBJ_GET, _ObjGetAttr(pathname=ctypes.addressof(buf)), f"open pinned {path}")
    try:
        info = _MapInfo()
        attr = _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info))
        sys_bpf(BPF_OBJ_GET_INFO_BY_FD, attr, f"info of pinned {path}")
        return info
    finally:
        os.close(fd)


class _IdAttr(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint32), ("next_id", ctypes.c_uint32), ("open_flags", ctypes.c_uint32)]


class _ProgInfo(ctypes.Structure):
    # Leading fields of struct bpf_prog_info, up to its name.
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("tag", ctypes.c_ubyte * 8),
                ("jited_prog_len", ctypes.c_uint32), ("xlated_prog_len", ctypes.c_uint32),
                ("jited_prog_insns", ctypes.c_uint64), ("xlated_prog_insns", ctypes.c_uint64),
                ("load_time", ctypes.c_uint64), ("created_by_uid", ctypes.c_uint32),
                ("nr_map_ids", ctypes.c_uint32), ("map_ids", ctypes.c_uint64), ("name", ctypes.c_char * 16)]


class _NextKeyAttr(ctypes.Structure):
    _fields_ = [("map_fd", ctypes.c_uint32), ("key", ctypes.c_uint64), ("next_key", ctypes.c_uint64)]


def _info(fd: int, info: ctypes.Structure, what: str) -> None:
    attr = _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info))
    sys_bpf(BPF_OBJ_GET_INFO_BY_FD, attr, f"info of {what}")


def prog_id(prog_fd: int) -> int:
    """The id of the program behind a file descriptor."""
    info = _ProgInfo()
    _info(prog_fd, info, f"program fd {prog_fd}")
    return int(info.id)


def prog_name(prog_id: int) -> str:
    """The name of loaded program `prog_id` (its function's name, at most 15 characters)."""
    fd = sys_bpf(BPF_PROG_GET_FD_BY_ID, _IdAttr(id=prog_id), f"open program id {prog_id}")
    try:
        info = _ProgInfo()
        _info(fd, info, f"program id {prog_id}")
        return bytes(info.name).decode(errors="replace")
    finally:
        os.close(fd)


def prog_maps(prog_id: int) -> dict[str, int]:
    """The maps loaded program `prog_id` uses: name -> map id."""
    fd = sys_bpf(BPF_PROG_GET_FD_BY_ID, _IdAttr(id=prog_id), f"open program id {prog_id}")
    try:
        info = _ProgInfo()
        _info(fd, info, f"program id {prog_id}")
        ids = (ctypes.c_uint32 * info.nr_map_ids)()
        wanted = _ProgInfo(nr_map_ids=info.nr_map_ids, map_ids=ctypes.addressof(ids))
        _info(fd, wanted, f"program id {prog_id}")
    finally:
        os.close(fd)
    out = {}
    for map_id in ids:
        map_fd = sys_bpf(BPF_MAP_GET_FD_BY_ID, _IdAttr(id=map_id), f"open map id {map_id}")
        try:
            map_info = _MapInfo()
            _info(map_fd, map_info, f"map id {map_id}")
            out[bytes(map_info.name).decode(errors="replace")] = int(map_id)
        finally:
            os.close(map_fd)
    return out


def map_keys(map_id: int, key_size: int, limit: int = 1 << 16) -> list[bytes]:
    """Every key of map `map_id` (BPF_MAP_GET_NEXT_KEY from the start), at most `limit`."""
    fd = sys_bpf(BPF_MAP_GET_FD_BY_ID, _IdAttr(id=map_id), f"open map id {map_id}")
    keys: list[bytes] = []
    try:
        previous = None
        while len(keys) < limit:
            nxt = ctypes.create_string_buffer(key_size)
            attr = _NextKeyAttr(map_fd=fd, key=ctypes.addressof(previous) if previous is not None else 0,
                                next_key=ctypes.addressof(nxt))
            try:
                sys_bpf(BPF_MAP_GET_NEXT_KEY, attr, f"next key of map id {map_id}")
            except DataplaneError as exc:
                if isinstance(exc.__cause__, OSError) and exc.__cause__.errno == errno.ENOENT:
                    break  # the last key
                raise
            keys.append(nxt.raw)
            previous = nxt
    finally:
        os.close(fd)
    return keys


def pinned_map_max_entries(path: Path) -> int:
    return int(pinned_map_info(path).max_entries)


def is_bpffs(path: Path) -> bool:
    with open("/proc/self/mounts", encoding="utf-8") as f:
        return any(line.split()[1:3] == [str(path), "bpf"] for line in f if len(line.split()) > 2)


def array_lookup_range(map_fd: int, start: int, count: int) -> list[int]:
    """Read `count` u32 values of a u32 ARRAY map from index `start` with BPF_MAP_LOOKUP_BATCH."""
    keys = (ctypes.c_uint32 * count)()
    values = (ctypes.c_uint32 * count)()
    # The batch token is the previous key: reading resumes at the key after it; no token = from index 0.
    token_in = ctypes.c_uint32(start - 1 if start else 0)
    token_out = ctypes.c_uint32(0)
    got = 0
    while got < count:
        attr = _BatchAttr(
            in_batch=ctypes.addressof(token_in) if (start or got) else 0,
            out_batch=ctypes.addressof(token_out),
            keys=ctypes.addressof(keys) + 4 * got, values=ctypes.addressof(values) + 4 * got,
            count=count - got, map_fd=map_fd)
        try:
            sys_bpf(BPF_MAP_LOOKUP_BATCH, attr, f"batch read of map fd {map_fd}")
        except DataplaneError as exc:
            if not (isinstance(exc.__cause__, OSError) and exc.__cause__.errno == errno.ENOENT):
                raise
            got += attr.count
            break
        got += attr.count
        token_in.value = token_out.value
        if attr.count == 0:
            break
    return list(values[:got])


BPF_MAP_LOOKUP_ELEM = 1


class _ElemAttr(ctypes.Structure):
    _fields_ = [("map_fd", ctypes.c_uint32), ("_pad", ctypes.c_uint32), ("key", ctypes.c_uint64),
                ("value", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


def possible_cpus() -> int:
    """The kernel's possible CPUs: per-CPU maps hold one value each, and an LRU map with per-CPU lists gives
    each max_entries / this many entries."""
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    return max(int(part.split("-")[-1]) for part in text.split(",")) + 1


def pinned_counters(path: Path, count: int) -> list[tuple[int, int]]:
    """(packets, bytes) summed over CPUs for indexes 0..count-1 of a pinned per-CPU lb_counter array."""
    raw = ctypes.create_string_buffer(os.fsencode(path))
    fd = sys_bpf(BPF_OBJ_GET, _ObjGetAttr(pathname=ctypes.addressof(raw)), f"open pinned {path}")
    try:
        ncpu = possible_cpus()
        out = []
        for idx in range(count):
            key = ctypes.c_uint32(idx)
            vals = (ctypes.c_uint64 * (2 * ncpu))()
            sys_bpf(BPF_MAP_LOOKUP_ELEM, _ElemAttr(map_fd=fd, key=ctypes.addressof(key),
                                                   value=ctypes.addressof(vals)), f"read {path}[{idx}]")
            out.append((sum(vals[0::2]), sum(vals[1::2])))
        return out
    finally:
        os.close(fd)
