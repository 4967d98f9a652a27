"""BPF_PROG_TEST_RUN of an XDP (or tc) program, always with repeat=1: a program that encapsulates would
re-read its own output on repetitions 2..N, so per-packet cost is measured by looping over single runs."""

from __future__ import annotations

import ctypes
import functools
from collections import Counter
from collections.abc import Iterable

from edge_lb.dataplane.bpfsys import BPF_PROG_TEST_RUN, sys_bpf
from edge_lb.errors import DataplaneError

ETH_HLEN = 14
PROBE_ETHERTYPE = b"\x88\xb5"  # IEEE 802 local experimental: no program here parses it


class _TestAttr(ctypes.Structure):
    # The `test` member of union bpf_attr (include/uapi/linux/bpf.h).
    _fields_ = [
        ("prog_fd", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("data_in", ctypes.c_uint64),
        ("data_out", ctypes.c_uint64),
        ("repeat", ctypes.c_uint32),
        ("duration", ctypes.c_uint32),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_uint64),
        ("ctx_out", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
    ]


class _XdpMd(ctypes.Structure):
    # struct xdp_md (include/uapi/linux/bpf.h): offsets from the start of the test frame's buffer.
    _fields_ = [("data", ctypes.c_uint32), ("data_end", ctypes.c_uint32), ("data_meta", ctypes.c_uint32),
                ("ingress_ifindex", ctypes.c_uint32), ("rx_queue_index", ctypes.c_uint32),
                ("egress_ifindex", ctypes.c_uint32)]


class _SkbMark(ctypes.Structure):
    # The start of struct __sk_buff (include/uapi/linux/bpf.h) up to mark: the kernel takes a shorter context
    # and requires len and pkt_type to be zero.
    _fields_ = [("len", ctypes.c_uint32), ("pkt_type", ctypes.c_uint32), ("mark", ctypes.c_uint32)]


def run_tc(prog_fd: int, frame: bytes, mark: int = 0, out_size: int = 4096) -> tuple[int, bytes]:
    """Run one frame (with skb->mark = mark) through a tc program once; return (verdict, output frame)."""
    data_in = ctypes.create_string_buffer(frame, len(frame))
    data_out = ctypes.create_string_buffer(out_size)
    ctx_in = _SkbMark(mark=mark)
    attr = _TestAttr(prog_fd=prog_fd, data_size_in=len(frame), data_size_out=out_size,
                     data_in=ctypes.addressof(data_in), data_out=ctypes.addressof(data_out), repeat=1,
                     ctx_size_in=ctypes.sizeof(ctx_in), ctx_in=ctypes.addressof(ctx_in))
    sys_bpf(BPF_PROG_TEST_RUN, attr, f"BPF_PROG_TEST_RUN on tc prog fd {prog_fd}")
    return attr.retval, data_out.raw[: attr.data_size_out]


def run_xdp(prog_fd: int, frame: bytes, out_size: int = 4096) -> tuple[int, bytes]:
    """Run one frame through an XDP program once; return (verdict, output frame)."""
    verdict, out, _ = run_xdp_timed(prog_fd, frame, out_size)
    return verdict, out


def run_xdp_timed(prog_fd: int, frame: bytes, out_size: int = 4096) -> tuple[int, bytes, int]:
    """As run_xdp, plus the kernel-measured duration of this one run in ns."""
    data_in = ctypes.create_string_buffer(frame, len(frame))
    data_out = ctypes.create_string_buffer(out_size)
    attr = _TestAttr(prog_fd=prog_fd, data_size_in=len(frame), data_size_out=out_size,
                     data_in=ctypes.addressof(data_in), data_out=ctypes.addressof(data_out), repeat=1)
    sys_bpf(BPF_PROG_TEST_RUN, attr, f"BPF_PROG_TEST_RUN on prog fd {prog_fd}")
    return attr.retval, data_out.raw[: attr.data_size_out], attr.duration


def run_variants(prog_fd: int, frame: bytes, offset: int, variants: Iterable[bytes]) -> Counter[int]:
    """Run `frame` once per variant, the variant's bytes written at `offset` first (a field that makes each
    run its own flow, e.g. the client's address and port), repeat=1 each; return the verdicts counted. One
    buffer and one attribute block for every run: ~1.3 us a run, so a million new flows take seconds."""
    buf = bytearray(frame)
    data_in = (ctypes.c_char * len(buf)).from_buffer(buf)
    data_out = ctypes.create_string_buffer(len(frame) + 256)
    attr = _TestAttr(prog_fd=prog_fd, data_size_in=len(buf), data_in=ctypes.addressof(data_in),
                     data_out=ctypes.addressof(data_out), repeat=1)
    verdicts: Counter[int] = Counter()
    what = f"BPF_PROG_TEST_RUN on prog fd {prog_fd}"
    for variant in variants:
        buf[offset:offset + len(variant)] = variant
        attr.data_size_out = len(data_out)  # the kernel rewrites it with the output's size
        sys_bpf(BPF_PROG_TEST_RUN, attr, what)
        verdicts[attr.retval] += 1
    return verdicts


def linear_bytes(prog_fd: int, frame: bytes) -> int:
    """Run `frame` once and return how many of its bytes the program could read directly (data..data_end).

    The kernel gives the program at most one page minus its headroom and tailroom in one piece; the rest of a
    longer frame goes into fragments (xdp multi-buffer) that only frags-aware helpers can read."""
    data_in = ctypes.create_string_buffer(frame, len(frame))
    data_out = ctypes.create_string_buffer(len(frame) + 256)
    ctx_in = _XdpMd(data=0, data_end=len(frame))
    ctx_out = _XdpMd()
    attr = _TestAttr(prog_fd=prog_fd, data_size_in=len(frame), data_size_out=len(frame) + 256,
                     data_in=ctypes.addressof(data_in), data_out=ctypes.addressof(data_out), repeat=1,
                     ctx_size_in=ctypes.sizeof(ctx_in), ctx_in=ctypes.addressof(ctx_in),
                     ctx_size_out=ctypes.sizeof(ctx_out), ctx_out=ctypes.addressof(ctx_out))
    sys_bpf(BPF_PROG_TEST_RUN, attr, f"BPF_PROG_TEST_RUN on prog fd {prog_fd}")
    return int(ctx_out.data_end - ctx_out.data)


@functools.cache
def max_linear_frame(prog_fd: int) -> int:
    """The longest frame this kernel's BPF_PROG_TEST_RUN hands to an XDP program in one piece (about 3.5 KB
    with 4 KiB pages), found by running frames of an EtherType no program parses (bisection, ~16 runs)."""
    lo, hi = ETH_HLEN, 65535  # lo is known whole; find the largest whole length
    while lo < hi:
        mid = (lo + hi + 1) // 2
        frame = bytes(12) + PROBE_ETHERTYPE + bytes(mid - ETH_HLEN)
        try:
            whole = linear_bytes(prog_fd, frame) >= mid
        except DataplaneError:  # refused outright (more fragments than the kernel takes)
            whole = False
        if whole:
            lo = mid
        else:
            hi = mid - 1
    return lo
