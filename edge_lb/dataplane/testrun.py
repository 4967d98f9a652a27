"""BPF_PROG_TEST_RUN of an XDP program, always with repeat=1: a program that encapsulates would re-read its
own output on repetitions 2..N, so per-packet cost is measured by looping over single runs."""

from __future__ import annotations

import ctypes

from edge_lb.dataplane.bpfsys import BPF_PROG_TEST_RUN, sys_bpf


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
