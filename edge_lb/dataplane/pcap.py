"""Minimal classic-pcap reader and writer (Ethernet only): simulate needs frames, not dissection."""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

from edge_lb.errors import PcapError

LINKTYPE_ETHERNET = 1
_MAGICS = {b"\xd4\xc3\xb2\xa1": "<", b"\xa1\xb2\xc3\xd4": ">",  # microsecond
           b"\x4d\x3c\xb2\xa1": "<", b"\xa1\xb2\x3c\x4d": ">"}  # nanosecond


def read_frames(path: str | Path) -> Iterator[bytes]:
    """Yield every frame of a classic pcap file. Raises PcapError naming the file and offset."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise PcapError(f"{path}: {exc.strerror}") from exc
    if len(data) < 24 or data[:4] not in _MAGICS:
        raise PcapError(f"{path}: not a pcap file (pcapng is not supported; convert with editcap -F pcap)")
    order = _MAGICS[data[:4]]
    linktype = struct.unpack(order + "I", data[20:24])[0]
    if linktype != LINKTYPE_ETHERNET:
        raise PcapError(f"{path}: link type {linktype}, want Ethernet (1)")
    off = 24
    while off < len(data):
        if off + 16 > len(data):
            raise PcapError(f"{path}: truncated record header at byte {off}")
        incl = struct.unpack(order + "I", data[off + 8:off + 12])[0]
        if off + 16 + incl > len(data):
            raise PcapError(f"{path}: truncated frame at byte {off}")
        yield data[off + 16:off + 16 + incl]
        off += 16 + incl


def write_frames(path: str | Path, frames: Iterable[bytes]) -> None:
    out = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, LINKTYPE_ETHERNET)]
    for i, frame in enumerate(frames):
        out.append(struct.pack("<IIII", i, 0, len(frame), len(frame)))
        out.append(frame)
    try:
        Path(path).write_bytes(b"".join(out))
    except OSError as exc:
        raise PcapError(f"{path}: {exc.strerror}") from exc
