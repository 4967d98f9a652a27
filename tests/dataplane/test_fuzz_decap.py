"""Fuzz bpf/decap.c through BPF_PROG_TEST_RUN: every truncation and every header byte flipped of valid IPIP,
IP6IP6, 4in6 and GUE frames (to the host and to others), then seeded random mutations and random frames.
Each output is compared with a model written here from the program's documented contract (its header
comment, README), not from its C:

- decapsulated, exactly: a tunnel packet to one of the host's addresses whose outer header is well-formed
  (IPv4: version 4, IHL 5, header checksum right, not a fragment, total length inside the frame; IPv6:
  version 6, payload length inside the frame; IPIP / IP6IP6 / 4in6, or UDP to the GUE port whose length is
  the rest of the datagram) and whose inner packet is well-formed and lies inside the outer datagram
  (IPv4: IHL >= 5, header checksum right, total length between its header's and what the outer datagram
  carries; IPv6: its payload length inside it). The output is the Ethernet addresses, the inner EtherType
  and the frame's bytes from the inner header on, a CE mark of the outer header carried to an ECN-capable
  inner one (RFC 6040; the IPv4 checksum recomputed here from scratch);
- everything else is passed untouched (XDP_PASS, the same bytes): a malformed tunnel packet is the kernel's
  to judge, as without the program (it never drops);
- the kernel never refuses a frame and the verdict is always XDP_PASS.

EDGE_LB_FUZZ_SEED and EDGE_LB_FUZZ_FRAMES override the seed and the number of random frames."""

from __future__ import annotations

import ipaddress
import os
import random
import struct
import time
from collections import Counter
from collections.abc import Iterator

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_Router_Alert
from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment
from scapy.layers.l2 import Ether
from scapy.packet import Packet, Raw

from edge_lb.dataplane import decap
from edge_lb.dataplane.testrun import run_xdp

from .conftest import needs_root

pytestmark = [pytest.mark.root, needs_root]

SEED = int(os.environ.get("EDGE_LB_FUZZ_SEED", "11"))
FRAMES = int(os.environ.get("EDGE_LB_FUZZ_FRAMES", "15000"))
XDP_PASS = 2
GUE_PORT = 6080
OUR4, OUR6 = "10.0.0.2", "fd00::2"
OTHER4, OTHER6 = "10.0.0.99", "fd00::99"
LB4, LB6 = "10.0.0.1", "fd00::1"
OURS = {ipaddress.ip_address(OUR4).packed, ipaddress.ip_address(OUR6).packed}
MAX_FRAME = 3000


# --- the model ----------------------------------------------------------------------------------------------

def csum(data: bytes) -> int:
    """The Internet checksum's folded one's-complement sum of `data` (0xFFFF for a right header)."""
    data += b"\0" * (len(data) % 2)
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def inner_ok(carried: bytes, version: int) -> bool:
    """`carried`: the outer datagram's bytes after its headers. Is a well-formed IP packet of `version` at
    their start, inside them?"""
    if not carried or carried[0] >> 4 != version or version not in (4, 6):
        return False
    if version == 4:
        hlen = (carried[0] & 0xF) * 4
        if hlen < 20 or len(carried) < hlen:
            return False
        length = struct.unpack("!H", carried[2:4])[0]
        return hlen <= length <= len(carried) and csum(carried[:hlen]) == 0xFFFF
    return len(carried) >= 40 and 40 + struct.unpack("!H", carried[4:6])[0] <= len(carried)


def tunnel(ip: bytes, ethertype: bytes) -> tuple[int, int, int] | None:
    """(outer header bytes to strip, inner version, outer ECN) of a tunnel packet to us in `ip` (the frame's
    bytes after Ethernet), or None."""
    if ethertype == b"\x08\x00" and len(ip) >= 20 and ip[0] == 0x45:
        length, frag = struct.unpack("!H2xH", ip[2:8])
        if csum(ip[:20]) != 0xFFFF or frag & 0x3FFF or not 20 <= length <= len(ip) or ip[16:20] not in OURS:
            return None
        return _carried(ip[9], ip[20:length], 20, ip[1] & 3)
    if ethertype == b"\x86\xdd" and len(ip) >= 40 and ip[0] >> 4 == 6:
        length = 40 + struct.unpack("!H", ip[4:6])[0]
        if length > len(ip) or ip[24:40] not in OURS:
            return None
        return _carried(ip[6], ip[40:length], 40, (ip[1] >> 4) & 3)
    return None


def _carried(proto: int, carried: bytes, outer: int, ecn: int) -> tuple[int, int, int] | None:
    if proto in (4, 41):
        version = 4 if proto == 4 else 6
        return (outer, version, ecn) if inner_ok(carried, version) else None
    if proto != 17 or len(carried) < 9:
        return None
    dport, length = struct.unpack("!2xHH", carried[:6])
    version = carried[8] >> 4
    if dport != GUE_PORT or length != len(carried) or not inner_ok(carried[8:], version):
        return None
    return outer + 8, version, ecn


def expected(frame: bytes) -> bytes:
    """What the program must leave of `frame`."""
    found = tunnel(frame[14:], frame[12:14])
    if found is None:
        return frame
    strip, version, ecn = found
    inner = bytearray(frame[14 + strip:])
    if version == 4:
        if ecn == 3 and inner[1] & 3 in (1, 2):
            inner[1] |= 3
            hlen = (inner[0] & 0xF) * 4
            inner[10:12] = b"\0\0"
            inner[10:12] = struct.pack("!H", 0xFFFF ^ csum(bytes(inner[:hlen])))
        return frame[:12] + b"\x08\x00" + bytes(inner)
    if ecn == 3 and (inner[1] >> 4) & 3:
        inner[1] |= 0x30
    return frame[:12] + b"\x86\xdd" + bytes(inner)


# --- frames -------------------------------------------------------------------------------------------------

def eth() -> Ether:
    return Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")


def inner_packet(rng: random.Random, version: int) -> Packet:
    payload = Raw(bytes(rng.randrange(256) for _ in range(rng.choice([0, 0, 5, 100, 1300]))))
    l4 = rng.choice([TCP(sport=40000, dport=80, flags="S"), UDP(sport=5353, dport=53), ICMP()]) / payload
    ecn = rng.choice([0, 1, 2, 3])
    if version == 4:
        options = [IPOption_Router_Alert()] if rng.random() < 0.1 else []
        frag = rng.choice([{}, {}, {}, {"flags": "MF"}, {"frag": 100}])
        return IP(src="192.0.2.10", dst="10.200.1.1", tos=0xB8 | ecn, options=options, **frag) / l4
    ip6 = IPv6(src="2001:db8::10", dst="fd00:200::1", tc=0x28 | ecn)
    return ip6 / IPv6ExtHdrFragment(m=1) / l4 if rng.random() < 0.1 else ip6 / l4


def tunnelled(rng: random.Random, kind: str, dst: str, inner: Packet) -> Packet:
    """`kind`: ipip, ip6 (IP6IP6 or 4in6 after the inner version), gue4 or gue6 (the outer version)."""
    ecn = rng.choice([0, 0, 2, 3])
    if kind == "ipip":
        return eth() / IP(src=LB4, dst=dst, proto=4, tos=ecn, flags=rng.choice(["", "DF"])) / inner
    if kind == "ip6":
        nh = 41 if isinstance(inner, IPv6) else 4
        return eth() / IPv6(src=LB6, dst=dst, nh=nh, tc=ecn) / inner
    outer: Packet = IP(src=LB4, dst=dst, tos=ecn) if kind == "gue4" else IPv6(src=LB6, dst=dst, tc=ecn)
    udp = UDP(sport=rng.randrange(49152, 65536), dport=GUE_PORT, chksum=rng.choice([0, 0, None]))
    return eth() / outer / udp / inner


def valid(rng: random.Random) -> bytes:
    kind = rng.choice(["ipip", "ip6", "gue4", "gue6"])
    version = 4 if kind == "ipip" else rng.choice([4, 6])
    dst = {4: [OUR4, OUR4, OUR4, OTHER4], 6: [OUR6, OUR6, OUR6, OTHER6]}[4 if kind in ("ipip", "gue4") else 6]
    return bytes(tunnelled(rng, kind, rng.choice(dst), inner_packet(rng, version)))[:MAX_FRAME]


def templates() -> list[bytes]:
    """One short frame of each kind to the host: cut at every length, each header byte flipped."""
    rng = random.Random(SEED)
    out = []
    for kind, version in [("ipip", 4), ("ip6", 6), ("ip6", 4), ("gue4", 4), ("gue4", 6), ("gue6", 6),
                          ("gue6", 4)]:
        inner = (IP(src="192.0.2.10", dst="10.200.1.1", tos=2) if version == 4
                 else IPv6(src="2001:db8::10", dst="fd00:200::1", tc=2)) / TCP(dport=80) / Raw(b"x" * 8)
        dst = OUR4 if kind in ("ipip", "gue4") else OUR6
        out.append(bytes(tunnelled(rng, kind, dst, inner)))
    return out


def with_checksums(frame: bytes) -> bytes:
    """`frame` with its outer and inner IPv4 header checksums made right again (where it has such headers):
    so a changed field meets the program's other checks, not only its checksum check."""
    b = bytearray(frame)
    inner = None
    if b[12:14] == b"\x08\x00" and len(b) >= 34 and b[14] == 0x45:
        _set_checksum(b, 14, 20)
        inner = {4: 34, 17: 42}.get(b[23])
    elif b[12:14] == b"\x86\xdd" and len(b) >= 54:
        inner = {4: 54, 17: 62}.get(b[20])
    if inner is not None and len(b) > inner and b[inner] >> 4 == 4 and len(b) >= inner + (b[inner] & 0xF) * 4:
        _set_checksum(b, inner, (b[inner] & 0xF) * 4)
    return bytes(b)


def _set_checksum(b: bytearray, at: int, length: int) -> None:
    if length >= 20:
        b[at + 10:at + 12] = b"\0\0"
        b[at + 10:at + 12] = struct.pack("!H", 0xFFFF ^ csum(bytes(b[at:at + length])))


def systematic() -> Iterator[bytes]:
    for frame in templates():
        for length in range(14, len(frame)):
            yield frame[:length]
        for at in range(12, len(frame) - 8):  # every byte of the headers (not the payload's last 8)
            for flip in (0x01, 0x80, 0xFF):
                flipped = frame[:at] + bytes([frame[at] ^ flip]) + frame[at + 1:]
                yield flipped
                yield with_checksums(flipped)


def mutate(rng: random.Random, frame: bytes) -> bytes:
    b = bytearray(frame)
    for _ in range(rng.randrange(1, 4)):
        op = rng.randrange(6)
        if op == 0:  # a few bytes in the headers
            for _ in range(rng.randrange(1, 4)):
                b[rng.randrange(12, min(len(b), 14 + 40 + 8 + 60))] = rng.randrange(256)
        elif op == 1:  # a length field: outer, UDP or inner, IPv4 or IPv6 offsets
            at = rng.choice([16, 18, 34 + 4, 54 + 4, 36, 58, 42 + 2, 62 + 4, 14 + 20 + 8 + 2])
            if at + 2 <= len(b):
                value = rng.choice([0, 8, 20, 28, 40, len(b) - 14, len(b) - 34, len(b) - 54,
                                    len(b) - rng.randrange(1, 30), len(b) + rng.randrange(1, 30),
                                    rng.randrange(65536)])
                b[at:at + 2] = struct.pack("!H", max(0, min(value, 65535)))
        elif op == 2:
            del b[rng.randrange(14, len(b) + 1):]
        elif op == 3:  # trailing bytes past the datagram (Ethernet padding, garbage)
            b += bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
        elif op == 4:  # the outer or the inner version / IHL byte
            at = rng.choice([14, 34, 54, 42, 62])
            if at < len(b):
                b[at] = rng.choice([0x45, 0x46, 0x44, 0x4F, 0x60, 0x65, 0x50, 0x00])
        else:
            b[12:14] = rng.choice([b"\x08\x00", b"\x86\xdd"])
    return with_checksums(bytes(b[:MAX_FRAME])) if rng.random() < 0.6 else bytes(b[:MAX_FRAME])


def random_frame(rng: random.Random) -> bytes:
    ethertype = rng.choice([b"\x08\x00", b"\x86\xdd", b"\x08\x06"])
    body = bytearray(rng.randrange(256) for _ in range(rng.randrange(0, 200)))
    if len(body) >= 40 and rng.random() < 0.7:  # a tunnel header to us, the rest random
        if ethertype == b"\x08\x00":
            body[0], body[9], body[16:20] = 0x45, rng.choice([4, 17]), ipaddress.ip_address(OUR4).packed
            body[6:8] = b"\0\0"
            body[2:4] = struct.pack("!H", len(body))
            body[10:12] = b"\0\0"
            body[10:12] = struct.pack("!H", 0xFFFF ^ csum(bytes(body[:20])))
        else:
            body[0], body[6], body[24:40] = 0x60, rng.choice([4, 41, 17]), ipaddress.ip_address(OUR6).packed
            body[4:6] = struct.pack("!H", len(body) - 40)
    return bytes(12) + ethertype + bytes(body)


def frames(rng: random.Random, count: int) -> Iterator[tuple[str, bytes]]:
    for frame in systematic():
        yield "systematic", frame
    pool: list[bytes] = []
    for _ in range(count):
        pick = rng.random()
        if pick < 0.15 or not pool:
            frame = valid(rng)
            pool = [*pool[-300:], frame]
            yield "valid", frame
        elif pick < 0.9:
            yield "mutated", mutate(rng, rng.choice(pool))
        else:
            yield "random", random_frame(rng)


# --- the test -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def program() -> Iterator[decap.DecapProgram]:
    loaded = decap.load_for_test([ipaddress.ip_address(OUR4), ipaddress.ip_address(OUR6)], gue_port=GUE_PORT)
    try:
        yield loaded
    finally:
        loaded.close()


def test_fuzz_decap(program: decap.DecapProgram) -> None:
    rng = random.Random(SEED)
    seen: Counter[str] = Counter()
    started = time.monotonic()
    for index, (kind, frame) in enumerate(frames(rng, FRAMES)):
        verdict, out = run_xdp(program.prog_fd, frame)
        want = expected(frame)
        where = f"seed {SEED} frame {index} ({kind}): {frame.hex()}"
        assert verdict == XDP_PASS, f"{where}: verdict {verdict}"
        if out != want:
            what = "passed untouched" if want == frame else f"decapsulated to {want.hex()}"
            raise AssertionError(f"{where}: should be {what}, left {out.hex()}")
        seen[kind] += 1
        seen["decapsulated" if want != frame else "untouched"] += 1
    elapsed = time.monotonic() - started
    total = sum(seen[k] for k in ("systematic", "valid", "mutated", "random"))
    print(f"decap fuzz: seed {SEED}, {total} frames in {elapsed:.1f} s: {dict(seen)}")
    assert min(seen["decapsulated"], seen["untouched"]) > total // 20, dict(seen)
