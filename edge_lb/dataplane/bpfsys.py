"""The few bpf(2) commands bcc 0.26 does not wrap: test runs, pinned-map info, ranged array reads."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import platform
from pathlib import Path
from typing import Any

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
    raw = array_values(map_fd, start, count, 4)
    return list((ctypes.c_uint32 * (len(raw) // 4)).from_buffer(raw))


def array_values(map_fd: int, start: int, count: int, value_size: int) -> ctypes.Array[ctypes.c_char]:
    """The values of indexes start..start+count-1 of an ARRAY (or per-CPU array: value_size then covers
    every CPU) in BPF_MAP_LOOKUP_BATCH calls, as one buffer; shorter when the map ends first."""
    keys = (ctypes.c_uint32 * count)()
    values = ctypes.create_string_buffer(count * value_size)
    # The batch token is the previous key: reading resumes at the key after it; no token = from index 0.
    token_in = ctypes.c_uint32(start - 1 if start else 0)
    token_out = ctypes.c_uint32(0)
    got = 0
    while got < count:
        attr = _BatchAttr(
            in_batch=ctypes.addressof(token_in) if (start or got) else 0,
            out_batch=ctypes.addressof(token_out),
            keys=ctypes.addressof(keys) + 4 * got, values=ctypes.addressof(values) + value_size * got,
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
    return values if got == count else (ctypes.c_char * (got * value_size)).from_buffer(values)


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


# -- the commands an adopted data plane needs without bcc: pins, program info, element and batch writes
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_OBJ_PIN = 6
BPF_MAP_UPDATE_BATCH = 26


def obj_get(path: Path) -> int:
    """An fd of the BPF object pinned at `path` (the caller closes it)."""
    raw = ctypes.create_string_buffer(os.fsencode(path))
    return sys_bpf(BPF_OBJ_GET, _ObjGetAttr(pathname=ctypes.addressof(raw)), f"open pinned {path}")


def obj_pin(fd: int, path: Path) -> None:
    """Pin the BPF object of `fd` at `path` (bpffs; the name must not contain a dot)."""
    raw = ctypes.create_string_buffer(os.fsencode(path))
    sys_bpf(BPF_OBJ_PIN, _ObjGetAttr(pathname=ctypes.addressof(raw), bpf_fd=fd), f"pin {path}")


class _ProgInfoHead(ctypes.Structure):
    # The leading fields of struct bpf_prog_info (include/uapi/linux/bpf.h) up to its name.
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("tag", ctypes.c_uint8 * 8),
                ("jited_prog_len", ctypes.c_uint32), ("xlated_prog_len", ctypes.c_uint32),
                ("jited_prog_insns", ctypes.c_uint64), ("xlated_prog_insns", ctypes.c_uint64),
                ("load_time", ctypes.c_uint64), ("created_by_uid", ctypes.c_uint32),
                ("nr_map_ids", ctypes.c_uint32), ("map_ids", ctypes.c_uint64), ("name", ctypes.c_char * 16)]


def prog_ids(fd: int, max_maps: int = 64) -> tuple[int, frozenset[int]]:
    """(program id, ids of the maps it uses) of the program behind `fd`."""
    ids = (ctypes.c_uint32 * max_maps)()
    info = _ProgInfoHead(nr_map_ids=max_maps, map_ids=ctypes.addressof(ids))
    sys_bpf(BPF_OBJ_GET_INFO_BY_FD, _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info),
                                              info=ctypes.addressof(info)), f"info of prog fd {fd}")
    return int(info.id), frozenset(ids[:min(int(info.nr_map_ids), max_maps)])


def map_info(fd: int) -> _MapInfo:
    info = _MapInfo()
    sys_bpf(BPF_OBJ_GET_INFO_BY_FD, _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info),
                                              info=ctypes.addressof(info)), f"info of map fd {fd}")
    return info


def map_update(fd: int, key: ctypes._CData, value: ctypes._CData, what: str) -> None:
    sys_bpf(BPF_MAP_UPDATE_ELEM, _ElemAttr(map_fd=fd, key=ctypes.addressof(key),
                                           value=ctypes.addressof(value)), f"write {what}")


def map_lookup(fd: int, key: ctypes._CData, value: ctypes._CData, what: str) -> bool:
    """Fill `value` with the entry of `key`; False when there is none."""
    try:
        sys_bpf(BPF_MAP_LOOKUP_ELEM, _ElemAttr(map_fd=fd, key=ctypes.addressof(key),
                                               value=ctypes.addressof(value)), f"read {what}")
    except DataplaneError as exc:
        if _errno(exc) == errno.ENOENT:
            return False
        raise
    return True


def map_delete(fd: int, key: ctypes._CData, what: str) -> None:
    """Delete the entry of `key`; none there is not an error."""
    try:
        sys_bpf(BPF_MAP_DELETE_ELEM, _ElemAttr(map_fd=fd, key=ctypes.addressof(key)), f"delete {what}")
    except DataplaneError as exc:
        if _errno(exc) != errno.ENOENT:
            raise


def fd_keys(fd: int, key_type: type[ctypes.Structure], limit: int) -> list[ctypes.Structure]:
    """Every key of a hash map (at most `limit`: a bound on a map changing under us)."""
    keys: list[ctypes.Structure] = []
    prev: ctypes.Structure | None = None
    while len(keys) < limit:
        nxt = key_type()
        attr = _ElemAttr(map_fd=fd, key=ctypes.addressof(prev) if prev is not None else 0,
                         value=ctypes.addressof(nxt))
        try:
            sys_bpf(BPF_MAP_GET_NEXT_KEY, attr, f"keys of map fd {fd}")
        except DataplaneError as exc:
            if _errno(exc) == errno.ENOENT:
                break
            raise
        keys.append(nxt)
        prev = nxt
    return keys


def map_update_batch(fd: int, keys: ctypes.Array[Any], values: ctypes.Array[Any], what: str) -> None:
    """Write len(keys) entries in one BPF_MAP_UPDATE_BATCH (the kernel loops over them)."""
    count = len(keys)
    done = 0
    key_size, value_size = ctypes.sizeof(keys) // count, ctypes.sizeof(values) // count
    while done < count:  # the kernel may stop early (a signal): resume after what it wrote
        attr = _BatchAttr(keys=ctypes.addressof(keys) + done * key_size,
                          values=ctypes.addressof(values) + done * value_size, count=count - done, map_fd=fd)
        sys_bpf(BPF_MAP_UPDATE_BATCH, attr, f"write {what}")
        if attr.count == 0:
            raise DataplaneError(f"write {what}: the kernel wrote nothing of {count - done} entries")
        done += attr.count


def _errno(exc: DataplaneError) -> int | None:
    return exc.__cause__.errno if isinstance(exc.__cause__, OSError) else None
