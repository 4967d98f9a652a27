"""Fuzz bpf/checkencap.c (the tunnel checks' tc egress encapsulator) through BPF_PROG_TEST_RUN, beside the
balancer whose pinned maps it reads: seeded check-like packets, mutations of them (cut, bytes flipped, lengths
that lie, the version nibble, the EtherType) and random frames, each with an skb mark that is no check mark,
a check mark naming no written backend, or one naming each written backend. Compared with a model written
here from its documented contract (checkencap.c's header, README "Health checks through the tunnel"):

- no check mark: TC_ACT_OK and the same bytes;
- a check mark whose index names no written backend (0, a free slot, past the map): dropped (TC_ACT_SHOT),
  never sent, and counted CHECK_DROP_NO_BACKEND;
- a check mark on a frame that is not IPv4 / IPv6 as its EtherType says (or whose IP header is cut short):
  dropped and counted CHECK_DROP_NOT_IP;
- else wrapped toward that backend as the balancer wraps a client packet of the same flow: the same MACs,
  an outer IPv4 header (IHL 5, TOS and DF copied, an ID that is not 0 without DF, TTL 64, protocol 4 / 41 /
  17, checksum right) or IPv6 header (traffic class copied, flow label = the flow hash, hop limit 64), the
  outer source = the encap prefix | the flow hash (a Python copy of balancer.c's), the backend's address, a
  GUE UDP header for a GUE backend, every length = the frame's bytes after Ethernet, which follow unchanged.
  A cut-short packet is wrapped as it is: the outer header still describes exactly the bytes it carries.

EDGE_LB_FUZZ_SEED and EDGE_LB_FUZZ_FRAMES override the seed and the number of frames."""

from __future__ import annotations

import ipaddress
import os
import random
import struct
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Packet, Raw

from edge_lb.dataplane import gue
from edge_lb.dataplane.checkencap import MARK_INDEX_BITS
from edge_lb.dataplane.desired import BackendSlot
from edge_lb.dataplane.testrun import run_tc
from edge_lb.errors import DataplaneError

from .conftest import make_config, needs_root
from .test_checkencap import NODE4, NODE6, TC_ACT_OK, TC_ACT_SHOT, Pair
from .test_gue_fixtures import flow_hash, outer_source

pytestmark = [pytest.mark.root, needs_root]

SEED = int(os.environ.get("EDGE_LB_FUZZ_SEED", "12"))
FRAMES = int(os.environ.get("EDGE_LB_FUZZ_FRAMES", "8000"))
INDEX_MASK = (1 << MARK_INDEX_BITS) - 1
VIPS4 = ["10.200.1.1", "10.200.1.2", "10.200.1.3"]
VIPS6 = ["fd00:200::1", "fd00:200::2"]


class Bad(AssertionError):
    """What the program sent is not the frame wrapped as it must be."""


def need(cond: bool, why: str) -> None:
    if not cond:
        raise Bad(why)


# --- the model ----------------------------------------------------------------------------------------------

def is_ip(frame: bytes) -> bool:
    """An IP packet as its EtherType says, with a whole fixed header (all the program reads to wrap it)."""
    if frame[12:14] == b"\x08\x00":
        return len(frame) >= 34 and frame[14] >> 4 == 4
    return frame[12:14] == b"\x86\xdd" and len(frame) >= 54 and frame[14] >> 4 == 6


def flow(frame: bytes) -> tuple[str, str, int, int, int, int, bool]:
    """(source, destination, protocol, source port, destination port, TOS / traffic class, DF) of the check's
    own packet: ports (TCP and UDP only) right after the header the IHL / the fixed IPv6 header ends."""
    ip = frame[14:]
    if ip[0] >> 4 == 4:
        src, dst, proto, tos = ip[12:16], ip[16:20], ip[9], ip[1]
        at, df = (ip[0] & 0xF) * 4, bool(ip[6] & 0x40)
    else:
        src, dst, proto, tos = ip[8:24], ip[24:40], ip[6], (ip[0] & 0xF) << 4 | ip[1] >> 4
        at, df = 40, False
    sport = dport = 0
    if proto in (6, 17) and at + 4 <= len(ip):
        sport, dport = struct.unpack("!HH", ip[at:at + 4])
    return (str(ipaddress.ip_address(src)), str(ipaddress.ip_address(dst)), proto, sport, dport, tos, df)


def ones(data: bytes) -> int:
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def check_wrapped(out: bytes, frame: bytes, slot: BackendSlot, settings: Any) -> None:
    inner, v4_inner = frame[14:], frame[12:14] == b"\x08\x00"
    src, dst, proto, sport, dport, tos, df = flow(frame)
    h = flow_hash(src, dst, proto, sport, dport)
    udp = 8 if slot.gue else 0
    next_proto = 17 if slot.gue else (4 if v4_inner else 41)
    need(out[:12] == frame[:12], "the MACs changed")
    if slot.address.version == 4:
        need(out[12:14] == b"\x08\x00", "outer EtherType")
        o = out[14:34]
        length, ident, frag = struct.unpack("!HHH", o[2:8])
        need(o[0] == 0x45 and o[1] == tos and length == 20 + udp + len(inner), "outer IHL, TOS or length")
        need(frag == (0x4000 if df else 0) and (df or ident != 0), f"outer DF / ID {frag:#x} {ident}")
        need(o[8] == 64 and o[9] == next_proto and ones(o) == 0xFFFF, "outer TTL, protocol or checksum")
        need(o[12:16] == ipaddress.ip_address(outer_source(settings.encap_src_v4, h)).packed, "outer source")
        need(o[16:20] == slot.address.packed, "outer destination is not the backend")
    else:
        need(out[12:14] == b"\x86\xdd", "outer EtherType")
        o = out[14:54]
        need(o[0] >> 4 == 6 and ((o[0] & 0xF) << 4 | o[1] >> 4) == tos, "outer version or traffic class")
        need(int.from_bytes(o[1:4], "big") & 0xFFFFF == h & 0xFFFFF, "outer flow label is not the flow hash")
        need(struct.unpack("!H", o[4:6])[0] == udp + len(inner), "outer payload length")
        need(o[6] == next_proto and o[7] == 64, "outer next header or hop limit")
        need(o[8:24] == ipaddress.ip_address(outer_source(settings.encap_src_v6, h)).packed, "outer source")
        need(o[24:40] == slot.address.packed, "outer destination is not the backend")
    at = 14 + len(o)
    if slot.gue:
        need(out[at:at + 8] == gue.udp_header(h, len(inner), settings.gue_port), "GUE UDP header")
    need(out[at + udp:] == inner, "the packet inside is not the frame's")


# --- frames -------------------------------------------------------------------------------------------------

def eth() -> Ether:
    return Ether(src="02:00:00:00:00:01", dst="00:00:de:ad:be:af")


def check_packet(rng: random.Random) -> Packet:
    """What a tunnel check's socket sends: a TCP handshake or request, a DNS query, a ping."""
    payload = Raw(rng.choice([b"", b"GET /healthz HTTP/1.1\r\nHost: v\r\n\r\n", bytes(rng.randrange(256)
                                                                                     for _ in range(300))]))
    l4 = rng.choice([TCP(sport=rng.randrange(32768, 61000), dport=rng.choice([80, 443, 8080]),
                         flags=rng.choice(["S", "A", "PA"])) / payload,
                     UDP(sport=rng.randrange(32768, 61000), dport=53) / payload, ICMP() / payload])
    if rng.random() < 0.55:
        tos = rng.choice([0, 0x10, 0xB8])
        ip = IP(src=NODE4, dst=rng.choice(VIPS4), flags=rng.choice(["", "DF"]), tos=tos)
        return eth() / ip / l4
    ip6 = IPv6(src=NODE6, dst=rng.choice(VIPS6), tc=rng.choice([0, 0x20, 0xB8]), fl=rng.randrange(1 << 20))
    return eth() / (ip6 / IPv6ExtHdrDestOpt() if rng.random() < 0.1 else ip6) / l4


def mutate(rng: random.Random, frame: bytes) -> bytes:
    b = bytearray(frame)
    for _ in range(rng.randrange(1, 4)):
        op = rng.randrange(6)
        if op == 0:
            del b[rng.randrange(14, len(b) + 1):]
        elif op == 1:  # header bytes, the ports among them
            for _ in range(rng.randrange(1, 4)):
                b[rng.randrange(12, min(len(b), 14 + 40 + 8))] = rng.randrange(256)
        elif op == 2 and len(b) >= 20:  # the IPv4 total length or the IPv6 payload length lies
            at = 16 if b[12:14] == b"\x08\x00" else 18
            b[at:at + 2] = struct.pack("!H", rng.choice([0, 20, 40, len(b), rng.randrange(65536)]))
        elif op == 3:
            b += bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40)))
        elif op == 4 and len(b) > 14:
            b[14] = (rng.choice([4, 6, 5, 0]) << 4) | rng.choice([b[14] & 0xF, 0, 4, 15])
        else:
            b[12:14] = rng.choice([b"\x08\x00", b"\x86\xdd", b"\x08\x06"])
    return bytes(b)


def frames(rng: random.Random, count: int) -> Iterator[tuple[str, bytes]]:
    pool: list[bytes] = []
    for _ in range(count):
        pick = rng.random()
        if pick < 0.3 or not pool:
            frame = bytes(check_packet(rng))
            pool = [*pool[-200:], frame]
            yield "valid", frame
        elif pick < 0.9:
            yield "mutated", mutate(rng, rng.choice(pool))
        elif pick < 0.95:
            yield "random", bytes(12) + rng.choice([b"\x08\x00", b"\x86\xdd"]) + bytes(
                rng.randrange(256) for _ in range(rng.randrange(0, 120)))
        else:
            yield "arp", bytes(eth() / ARP(psrc=NODE4, pdst=rng.choice(VIPS4)))


# --- the test -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    def gue_backends(data: dict[str, Any]) -> None:  # GUE backends in an IPv4, an IPv6 and a 4in6 VIP
        data["vip"][0]["backend"][2]["encap"] = "gue"
        data["vip"][3]["backend"][1]["encap"] = "gue"
        data["vip"][5]["backend"][0]["encap"] = "gue"

    config = make_config(gue_backends)
    config = replace(config, dataplane=replace(config.dataplane, instance=f"tfzck{os.getpid()}"))
    p = Pair(config)
    yield p
    p.close()


def pick_mark(rng: random.Random, base: int, written: list[int], free: list[int]) -> tuple[str, int]:
    """(what it is, the mark): no check mark, a check mark naming no written backend, or a written one."""
    pick = rng.random()
    if pick < 0.15:
        other_base = base ^ (1 << rng.randrange(MARK_INDEX_BITS, 32))
        mark = rng.choice([0, rng.randrange(1 << 32), other_base, (base - 1) & 0xFFFFFFFF,
                           base + (1 << MARK_INDEX_BITS) + rng.choice([0, 1])])
    elif pick < 0.3:
        past = rng.randrange(len(written) + len(free) + 1, INDEX_MASK + 1)  # past the backends map
        mark = base | rng.choice([0, *free, past])
    else:
        mark = base | rng.choice(written)
    if mark & ~INDEX_MASK != base:  # (a random mark may be a check mark: what it is, not how it was picked)
        return "unmarked", mark
    return ("backend" if mark & INDEX_MASK in written else "no backend"), mark


def test_fuzz_checkencap(pair: Pair) -> None:
    rng = random.Random(SEED)
    settings = pair.config.dataplane
    base = settings.check_mark_base
    slots = pair.dp.io.read_backends()
    written = sorted(slots)
    free = sorted(set(range(1, settings.max_backends)) - set(written))
    assert written and free, "the config leaves both written and free backend slots"
    seen: Counter[str] = Counter()
    before = pair.encap.stats()
    started = time.monotonic()
    for index, (kind, frame) in enumerate(frames(rng, FRAMES)):
        what, mark = pick_mark(rng, base, written, free)
        where = f"seed {SEED} frame {index} ({kind}, {what}, mark {mark:#x}): {frame.hex()}"
        if len(frame) < {b"\x08\x00": 34, b"\x86\xdd": 54}.get(frame[12:14], 14):
            # The kernel's test run takes no IP frame shorter than its fixed header (nor can the stack send
            # one): it refuses it before the program runs.
            with pytest.raises(DataplaneError, match="Invalid argument"):
                run_tc(pair.encap.prog_fd, frame, mark)
            seen["IP header cut: refused by the test run"] += 1
            continue
        verdict, out = run_tc(pair.encap.prog_fd, frame, mark)
        try:
            if what == "unmarked":
                need(verdict == TC_ACT_OK and out == frame, f"verdict {verdict}: not left untouched")
                seen["untouched"] += 1
            elif what == "no backend" or not is_ip(frame):
                need(verdict == TC_ACT_SHOT, f"verdict {verdict} ({out.hex()}): not dropped")
                seen["dropped: no backend" if what == "no backend" else "dropped: not IP"] += 1
            else:
                need(verdict == TC_ACT_OK, f"verdict {verdict}: not sent")
                check_wrapped(out, frame, slots[mark & INDEX_MASK], settings)
                seen["wrapped"] += 1
        except Bad as exc:
            raise AssertionError(f"{where}: {exc}; sent {out.hex()}") from None
    elapsed = time.monotonic() - started
    after = pair.encap.stats()
    counted = {name: after[name] - before[name] for name in after}
    print(f"checkencap fuzz: seed {SEED}, {FRAMES} frames in {elapsed:.1f} s: {dict(seen)}, {counted}")
    assert counted["CHECK_DROP_NO_BACKEND"] == seen["dropped: no backend"]
    assert counted["CHECK_DROP_NOT_IP"] == seen["dropped: not IP"]
    assert counted["CHECK_ENCAP_V4"] + counted["CHECK_ENCAP_V6"] == seen["wrapped"]
    assert min(seen.values()) > FRAMES // 100 and len(seen) == 5, dict(seen)
