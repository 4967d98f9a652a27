"""Fuzz bpf/balancer.c through the Simulator API: seeded valid, mutated and random frames, and three
properties checked on every one of them by a parser written here, independently of the program's:

- a frame to no VIP address is XDP_PASS and byte-identical;
- whatever is sent (XDP_TX) is Ethernet to the gateway + an outer IPv4/IPv6 header that is right (+ a right
  UDP header for a GUE VIP: the test runs once with IPIP VIPs, once with some of them in GUE) + a
  well-formed inner packet (strict: the program's own rules, re-derived here) byte-identical to the input's IP
  packet, all lengths consistent; or an ICMP too-big back to the sender of a packet that was too big (from the
  VIP, checksums right, quoting the packet);
- the kernel never refuses a frame, and the verdict is PASS, TX or DROP.

EDGE_LB_FUZZ_SEED and EDGE_LB_FUZZ_FRAMES override the seed and the count (default: a few seconds)."""

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
from scapy.layers.inet6 import (
    ICMPv6EchoRequest,
    ICMPv6PacketTooBig,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Packet, Raw

from edge_lb.dataplane.simulate import Simulator

from .conftest import BASE, GW_MAC, OWN_MAC, make_config, needs_root

pytestmark = [pytest.mark.root, needs_root]

SEED = int(os.environ.get("EDGE_LB_FUZZ_SEED", "10"))
FRAMES = int(os.environ.get("EDGE_LB_FUZZ_FRAMES", "20000"))
MTU = int(BASE["node"]["mtu"])
MAX_FRAME = 3000  # below BPF_PROG_TEST_RUN's one-piece limit (3,520 bytes with 4 KiB pages)



def a16(text: str) -> bytes:
    """An address as the program keys it: 16 bytes, an IPv4 address first and zeros after."""
    return ipaddress.ip_address(text).packed.ljust(16, b"\0")


VIP_ADDRS = {a16(v["address"]) for v in BASE["vip"]}
# (address, port, protocol); port 0 = every port
SERVICES = {(a16(v["address"]), int(v["port"]), {"tcp": 6, "udp": 17}[v["protocol"]]) for v in BASE["vip"]}
BACKENDS = {a16(b["address"]) for v in BASE["vip"] for b in v["backend"]}
NON_VIP4 = ["10.9.9.9", "10.200.1.5", "192.0.2.1", "10.200.1.254"]
NON_VIP6 = ["fd00:9::1", "fd00:200::3", "2001:db8::99"]
VIP4 = [v["address"] for v in BASE["vip"] if ":" not in v["address"]]
VIP6 = [v["address"] for v in BASE["vip"] if ":" in v["address"]]
EXT_HDRS = 6  # LB_MAX_EXT_HDRS
GUE_ADDRS = {a16(a) for a in ("10.200.1.1", "fd00:200::1", "10.200.1.3")}  # the GUE run: IPv4, IPv6, 4in6
GUE_PORT = 6080


class Bad(AssertionError):
    """The frame the program sent is not well-formed."""


def need(cond: bool, why: str) -> None:
    if not cond:
        raise Bad(why)


# --- the independent checker ------------------------------------------------------------------------------

def is_service(addr: bytes, port: int, proto: int) -> bool:
    return (addr, port, proto) in SERVICES or (addr, 0, proto) in SERVICES


def check_l4(data: bytes, proto: int) -> tuple[int, int]:
    """(sport, dport) of a well-formed TCP/UDP header filling `data` (the datagram's L4 bytes)."""
    if proto == 6:
        need(len(data) >= 20, "TCP header cut")
        doff = data[12] >> 4
        need(doff >= 5 and doff * 4 <= len(data), f"TCP data offset {doff} with {len(data)} bytes")
    else:
        need(len(data) >= 8, "UDP header cut")
        ulen = struct.unpack("!H", data[4:6])[0]
        need(8 <= ulen <= len(data), f"UDP length {ulen} with {len(data)} bytes")
    sport, dport = struct.unpack("!HH", data[:4])
    return sport, dport


def walk_v6(pkt: bytes, length: int, quote: bool) -> tuple[int, int]:
    """(upper-layer protocol, its offset) of the IPv6 packet `pkt` whose first `length` bytes count."""
    proto, off = pkt[6], 40
    for _ in range(EXT_HDRS):
        if proto not in (0, 43, 44, 60):
            return proto, off
        need(off + 8 <= length, "extension header cut")
        if proto == 44:
            need(quote, "fragment header sent")
            need(struct.unpack("!H", pkt[off + 2:off + 4])[0] & 0xFFF8 == 0, "quote of a non-first fragment")
            proto, off = pkt[off], off + 8
        else:
            proto, off = pkt[off], off + (pkt[off + 1] + 1) * 8
    need(proto not in (0, 43, 44, 60), "more extension headers than walked")
    return proto, off


def check_quote(quote: bytes, version: int, icmp_dst: bytes) -> None:
    """The quoted packet (VIP -> client) of an ICMP too-big that may be steered."""
    need(len(quote) >= 1 and quote[0] >> 4 == version, "quote of the other version")
    if version == 4:
        need(len(quote) >= 28, "quote cut")
        need(quote[0] & 0xF == 5, "quote with IHL != 5")
        need(struct.unpack("!H", quote[2:4])[0] >= 28, "quote length lies")
        need(struct.unpack("!H", quote[6:8])[0] & 0x1FFF == 0, "quote of a non-first fragment")
        need(quote[9] in (6, 17), "quote of another protocol")
        need(quote[12:16] == icmp_dst[:4], "quote from another address than the ICMP is to")
        need(is_service(icmp_dst, struct.unpack("!H", quote[20:22])[0], quote[9]), "quote of no VIP")
    else:
        need(len(quote) >= 48, "quote cut")
        proto, off = walk_v6(quote, len(quote), quote=True)
        need(proto in (6, 17), "quote of another protocol")
        need(off + 8 <= len(quote), "quote cut after its extension headers")
        need(struct.unpack("!H", quote[4:6])[0] + 40 >= off + 8, "quote length lies")
        need(quote[8:24] == icmp_dst, "quote from another address than the ICMP is to")
        need(is_service(quote[8:24], struct.unpack("!H", quote[off:off + 2])[0], proto), "quote of no VIP")


def check_inner(inner: bytes, version: int) -> int:
    """A well-formed IP packet (plus any trailing bytes) a VIP would accept; returns its IP length."""
    need(len(inner) >= 1 and inner[0] >> 4 == version, "inner version is not what the outer header says")
    if version == 4:
        need(len(inner) >= 20 and inner[0] & 0xF == 5, "inner IPv4 header cut or with options")
        length = struct.unpack("!H", inner[2:4])[0]
        need(20 <= length <= len(inner), f"inner total length {length} with {len(inner)} bytes")
        need(struct.unpack("!H", inner[6:8])[0] & 0x3FFF == 0, "inner fragment sent")
        proto, off, dst = inner[9], 20, inner[16:20] + bytes(12)
    else:
        need(len(inner) >= 40, "inner IPv6 header cut")
        length = struct.unpack("!H", inner[4:6])[0] + 40
        need(length <= len(inner), f"inner payload length {length - 40} with {len(inner)} bytes")
        dst = inner[24:40]
        proto, off = walk_v6(inner, length, quote=False)
    need(dst in VIP_ADDRS, "sent a packet to no VIP address")
    l4 = inner[off:length]
    need(off <= length, "inner headers beyond the datagram")
    if proto in (6, 17):
        _sport, dport = check_l4(l4, proto)
        need(is_service(dst, dport, proto), "sent a packet to no VIP service")
    elif proto == 1:
        need(len(l4) >= 8 and l4[0] == 3 and l4[1] == 4, "sent an ICMP that is not frag-needed")
        check_quote(l4[8:], 4, dst)
    elif proto == 58:
        need(len(l4) >= 8 and l4[0] == 2, "sent an ICMPv6 that is not packet-too-big")
        check_quote(l4[8:], 6, dst)
    else:
        raise Bad(f"sent protocol {proto}")
    return length


def ipv4_checksum_ok(header: bytes) -> bool:
    total = sum(struct.unpack(f"!{len(header) // 2}H", header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total == 0xFFFF


def check_gue_udp(udp: bytes, length: int) -> None:
    """GUE's UDP header (bpf/gue.h): an ephemeral source port, GUE_PORT, the inner length + 8, checksum 0."""
    sport, dport, ulen, check = struct.unpack("!HHHH", udp)
    need(sport >= 49152 and dport == GUE_PORT, f"GUE ports {sport} -> {dport}")
    need(ulen == 8 + length and check == 0, f"GUE UDP length {ulen} for {length}, checksum {check:#x}")


def outer_protos(gue: bool) -> tuple[int, ...]:
    return (17,) if gue else (4, 41)


def check_sent(out: bytes, frame: bytes, gue: bool = False) -> None:
    """`gue`: the frame is to a GUE VIP, so a UDP header must follow the outer one."""
    need(out[:6] == bytes.fromhex(GW_MAC.replace(":", "")), "Ethernet destination is not the gateway")
    need(out[6:12] == bytes.fromhex(OWN_MAC.replace(":", "")), "Ethernet source is not ours")
    ethertype = struct.unpack("!H", out[12:14])[0]
    hdr, udp = 20 if ethertype == 0x0800 else 40, 8 if gue else 0
    need(out[14 + hdr + udp:] == frame[14:], "inner packet not byte-identical")
    if ethertype == 0x0800:
        outer, inner = out[14:34], out[34 + udp:]
        need(outer[0] == 0x45 and ipv4_checksum_ok(outer), "outer IPv4 header or checksum wrong")
        frag = struct.unpack("!H", outer[6:8])[0]
        need(frag & 0xBFFF == 0, "outer MF or offset set")
        need(frag & 0x4000 or struct.unpack("!H", outer[4:6])[0] != 0, "outer ID 0 without DF")
        need(outer[8] == 64 and outer[9] in outer_protos(gue), "outer TTL or protocol wrong")
        need(outer[16:20] + bytes(12) in BACKENDS, "outer destination is no backend")
        version = 4 if (frame[12:14] == b"\x08\x00" if gue else outer[9] == 4) else 6
        length = check_inner(inner, version)
        need(struct.unpack("!H", outer[2:4])[0] == 20 + udp + length, "outer total length wrong")
        if version == 4:
            need(frag & 0x4000 == struct.unpack("!H", inner[6:8])[0] & 0x4000, "DF not copied")
    else:
        need(ethertype == 0x86DD, f"sent EtherType {ethertype:#x}")
        outer, inner = out[14:54], out[54 + udp:]
        need(outer[0] >> 4 == 6 and outer[6] in outer_protos(gue) and outer[7] == 64,
             "outer IPv6 header wrong")
        need(outer[24:40] in BACKENDS, "outer destination is no backend")
        length = check_inner(inner, 4 if (frame[12:14] == b"\x08\x00" if gue else outer[6] == 4) else 6)
        need(struct.unpack("!H", outer[4:6])[0] == udp + length, "outer payload length wrong")
    if gue:
        check_gue_udp(out[14 + hdr:14 + hdr + 8], length)
    need(len(out) - 14 <= MTU, "sent more than the MTU")


def check_reply(out: bytes, frame: bytes, gue: bool = False) -> None:
    """An ICMP too-big back to the client for a well-formed VIP packet too big once encapsulated."""
    need(out[:6] == frame[6:12] and out[6:12] == frame[:6], "reply not back to the sender")
    need(out[12:14] == frame[12:14], "reply of another IP version")
    if out[12:14] == b"\x08\x00":
        ip, icmp, quote_len = out[14:34], out[34:], 548
        need(ip[0] == 0x45 and ipv4_checksum_ok(ip) and ip[9] == 1, "reply IPv4 header wrong")
        need(ip[12:16] == frame[30:34] and ip[16:20] == frame[26:30], "reply not from the VIP to the client")
        need(icmp[:2] == b"\x03\x04" and ipv4_checksum_ok(icmp), "not a right frag-needed")
        mtu, version = int.from_bytes(icmp[6:8], "big"), 4
    else:
        ip, icmp, quote_len = out[14:54], out[54:], 1232
        need(ip[6] == 58 and ip[8:24] == frame[38:54] and ip[24:40] == frame[22:38],
             "reply IPv6 header wrong")
        pseudo = ip[8:40] + len(icmp).to_bytes(4, "big") + (58).to_bytes(4, "big")
        need(icmp[0] == 2 and ipv4_checksum_ok(pseudo + icmp), "not a right packet-too-big")
        mtu, version = int.from_bytes(icmp[4:8], "big"), 6
    need(len(icmp) == 8 + quote_len and icmp[8:] == frame[14:14 + quote_len], "quote is not the packet")
    need(mtu in ((MTU - 28, MTU - 48) if gue else (MTU - 20, MTU - 40)), f"MTU {mtu}")
    length = check_inner(frame[14:], version)
    need(length + MTU - mtu > MTU, "told too big, but it fits")


def check_echo(out: bytes, frame: bytes) -> None:
    """An echo request to a VIP address turned around in place."""
    need(len(out) == len(frame) and out[:6] == frame[6:12] and out[6:12] == frame[:6], "echo: Ethernet")
    if frame[12:14] == b"\x08\x00":
        need(frame[14] == 0x45 and frame[23] == 1 and frame[34:36] == b"\x08\x00", "echo of no echo request")
        need(frame[30:34] + bytes(12) in VIP_ADDRS and frame[26] < 224, "echo to no VIP or from multicast")
        length = struct.unpack("!H", frame[16:18])[0]
        need(frame[20:22] == b"\0\0" or frame[20:22] == b"\x40\0", "echo of a fragment")
        need(out[26:30] == frame[30:34] and out[30:34] == frame[26:30] and out[22] == 64, "echo: IPv4 header")
        need(ipv4_checksum_ok(out[14:34]) and out[34:36] == b"\0\0", "echo: IPv4 checksum or type")
        need(ipv4_checksum_ok(out[34:14 + length] + b"\0" * (length % 2)) or not ipv4_checksum_ok(
            frame[34:14 + length] + b"\0" * (length % 2)), "echo: ICMP checksum broken")
        need(out[36:] == frame[36:] or out[38:] == frame[38:], "echo: data changed")
    else:
        need(frame[20] == 58 and frame[54:56] == b"\x80\0" and out[54:56] == b"\x81\0", "echo: ICMPv6 type")
        need(frame[38:54] in VIP_ADDRS and frame[22] != 0xFF, "echo to no VIP or from multicast")
        need(out[22:38] == frame[38:54] and out[38:54] == frame[22:38] and out[21] == 64, "echo: IPv6 header")
        need(out[58:] == frame[58:], "echo: data changed")


def destination(frame: bytes) -> bytes | None:
    """The address the program would take as the destination, or None (not IP / too short)."""
    ethertype = struct.unpack("!H", frame[12:14])[0]
    if ethertype == 0x0800 and len(frame) >= 34:
        return frame[30:34] + bytes(12)
    if ethertype == 0x86DD and len(frame) >= 54:
        return frame[38:54]
    return None


# --- frames ------------------------------------------------------------------------------------------------

def eth(rng: random.Random) -> Ether:
    return Ether(src="02:00:00:00:00:99", dst=OWN_MAC)


def client4(rng: random.Random) -> str:
    return str(ipaddress.IPv4Address(rng.randrange(0xC0000200, 0xC00002FF)))


def client6(rng: random.Random) -> str:
    return str(ipaddress.IPv6Address((0x20010DB8 << 96) | rng.randrange(1 << 32)))


def l4(rng: random.Random, proto: str, dport: int) -> Packet:
    sport = rng.randrange(1024, 65536)
    payload = Raw(bytes(rng.randrange(256) for _ in range(rng.choice([0, 0, 1, 10, 100, 1400, 1460]))))
    if proto == "tcp":
        return TCP(sport=sport, dport=dport, flags=rng.choice(["S", "A", "PA", "SA", "R", "F"])) / payload
    return UDP(sport=sport, dport=dport) / payload


def valid(rng: random.Random) -> Packet:
    """A frame a client or a router could send: mostly to VIPs, some to others, some of each special kind."""
    kind = rng.randrange(12)
    port = rng.choice([80, 53, 443, 0, 6000, rng.randrange(65536)])
    proto = rng.choice(["tcp", "udp"])
    if kind <= 3:
        dst = rng.choice(VIP4 + NON_VIP4[:1])
        ip = IP(src=client4(rng), dst=dst, tos=rng.choice([0, 0xB8]), flags=rng.choice(["", "DF"]))
        return eth(rng) / ip / l4(rng, proto, port)
    if kind <= 5:
        dst = rng.choice(VIP6 + NON_VIP6[:1])
        exts: Packet | None = None
        for _ in range(rng.choice([0, 0, 1, 2, 3])):
            ext = rng.choice([IPv6ExtHdrHopByHop(), IPv6ExtHdrDestOpt(), IPv6ExtHdrRouting()])
            exts = ext if exts is None else exts / ext
        base = IPv6(src=client6(rng), dst=dst, tc=rng.choice([0, 0x68]))
        return eth(rng) / (base / exts if exts is not None else base) / l4(rng, proto, port)
    if kind == 6:  # ICMP frag-needed about a flow, to the VIP or elsewhere
        vip = rng.choice(VIP4)
        quote = IP(src=rng.choice([vip, vip, rng.choice(VIP4)]), dst=client4(rng)) / l4(rng, proto, port)
        return (eth(rng) / IP(src="198.51.100.1", dst=rng.choice([vip, vip, NON_VIP4[0]]))
                / ICMP(type=3, code=4, nexthopmtu=1400) / Raw(bytes(quote)[:rng.choice([28, 48, 576])]))
    if kind == 7:
        vip = rng.choice(VIP6)
        q6 = IPv6(src=rng.choice([vip, vip, rng.choice(VIP6)]), dst=client6(rng))
        if rng.random() < 0.3:
            q6 = q6 / IPv6ExtHdrFragment(offset=rng.choice([0, 0, 5]), m=1)
        quoted = bytes(q6 / l4(rng, proto, port))[:rng.choice([48, 64, 1232])]
        return (eth(rng) / IPv6(src="2001:db8:ffff::1", dst=rng.choice([vip, vip, NON_VIP6[0]]))
                / ICMPv6PacketTooBig(mtu=1280) / Raw(quoted))
    if kind == 8:  # fragments and options
        if rng.random() < 0.5:
            return eth(rng) / IP(src=client4(rng), dst=rng.choice(VIP4), flags="MF",
                                 frag=rng.choice([0, 10])) / l4(rng, proto, port)
        return eth(rng) / IP(src=client4(rng), dst=rng.choice(VIP4),
                             options=[IPOption_Router_Alert()]) / l4(rng, proto, port)
    if kind == 9:
        return (eth(rng) / IPv6(src=client6(rng), dst=rng.choice(VIP6)) / IPv6ExtHdrDestOpt()
                / IPv6ExtHdrFragment(m=1) / l4(rng, proto, port))
    if kind == 10:
        return eth(rng) / IP(src=client4(rng), dst=rng.choice(VIP4)) / ICMP() / b"ping"
    return rng.choice([eth(rng) / ARP(pdst=rng.choice(VIP4)),
                       eth(rng) / IPv6(src=client6(rng), dst=rng.choice(VIP6)) / ICMPv6EchoRequest()])


def mutate(rng: random.Random, frame: bytes) -> bytes:
    b = bytearray(frame)
    for _ in range(rng.randrange(1, 4)):
        op = rng.randrange(7)
        if op == 0:  # a few bytes anywhere after the MACs, mostly in the headers
            for _ in range(rng.randrange(1, 5)):
                at = rng.randrange(12, min(len(b), 14 + rng.choice([40, 80, 200, 2000])))
                b[at] = rng.randrange(256)
        elif op == 1:  # an IP length field
            at = 16 if b[12:14] == b"\x08\x00" else 18
            value = rng.choice([0, 8, 20, 28, 40, len(b) - 14, len(b) - 14 - rng.randrange(1, 30),
                                len(b) + rng.randrange(1, 30), rng.randrange(65536)])
            b[at:at + 2] = struct.pack("!H", max(0, min(value, 65535)))
        elif op == 2:  # cut
            del b[rng.randrange(14, len(b) + 1):]
        elif op == 3:  # trailing bytes
            b += bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
        elif op == 4:  # the version nibble
            if len(b) > 14:
                b[14] = (rng.choice([4, 6, 5, 0, 15]) << 4) | (b[14] & 0xF)
        elif op == 5:  # the EtherType
            b[12:14] = rng.choice([b"\x08\x00", b"\x86\xdd"])
        else:  # inside the first 100 bytes of L3: where the L4 and quote headers are
            if len(b) > 34:
                at = rng.randrange(34, min(len(b), 134))
                b[at] = rng.randrange(256)
    return bytes(b[:MAX_FRAME])


def random_frame(rng: random.Random) -> bytes:
    ethertype = rng.choice([b"\x08\x00", b"\x86\xdd"])
    body = bytearray(rng.randrange(256) for _ in range(rng.randrange(0, 200)))
    if rng.random() < 0.6 and len(body) >= 40:  # aim it at a VIP address
        if ethertype == b"\x08\x00":
            body[0] = 0x45
            body[16:20] = ipaddress.ip_address(rng.choice(VIP4)).packed
        else:
            body[0] = 0x60
            body[24:40] = ipaddress.ip_address(rng.choice(VIP6)).packed
    return bytes(12) + ethertype + bytes(body)


def frames(rng: random.Random, count: int) -> Iterator[bytes]:
    pool: list[bytes] = []
    for _ in range(count):
        pick = rng.random()
        if pick < 0.2 or not pool:
            frame = bytes(valid(rng))[:MAX_FRAME]
            pool.append(frame)
            if len(pool) > 400:
                pool.pop(rng.randrange(len(pool)))
        elif pick < 0.9:
            frame = mutate(rng, rng.choice(pool))
        else:
            frame = random_frame(rng)
        yield frame


# --- the test ----------------------------------------------------------------------------------------------

def gue_vips(data: dict[str, object]) -> None:
    for vip in data["vip"]:  # type: ignore[attr-defined]
        if a16(vip["address"]) in GUE_ADDRS:
            vip["encap"] = "gue"


@pytest.mark.parametrize("encap", ["ipip", "gue"])
def test_fuzz_frames_through_simulate(encap: str) -> None:
    rng = random.Random(SEED)
    gue_addrs = GUE_ADDRS if encap == "gue" else set()
    count = FRAMES if encap == "ipip" else FRAMES // 2
    sim = Simulator(make_config(gue_vips if encap == "gue" else None))
    seen: Counter[str] = Counter()
    started = time.monotonic()
    try:
        for index, frame in enumerate(frames(rng, count)):
            line = sim.result(index, frame)
            where = f"seed {SEED} frame {index}: {frame.hex()}"
            assert "error" not in line, f"{where}: {line['error']}"
            verdict = str(line["verdict"])
            assert verdict in ("XDP_PASS", "XDP_TX", "XDP_DROP"), where
            seen[verdict] += 1
            dst = destination(frame)
            if dst is None or dst not in VIP_ADDRS:
                assert verdict == "XDP_PASS", f"{where}: {verdict} for a frame to no VIP address"
            if verdict == "XDP_PASS":
                assert bytes.fromhex(str(line["frame"])) == frame, f"{where}: passed, but changed"
            elif verdict == "XDP_TX":
                out = bytes.fromhex(str(line["frame"]))
                try:
                    if out[:6] == frame[6:12] and len(out) == len(frame):
                        check_echo(out, frame)
                        seen["echo replies"] += 1
                    elif out[:6] == frame[6:12]:
                        check_reply(out, frame, dst in gue_addrs)
                        seen["too-big replies"] += 1
                    else:
                        check_sent(out, frame, dst in gue_addrs)
                        seen["sent in GUE" if dst in gue_addrs else "sent in IPIP"] += 1
                except Bad as exc:
                    raise AssertionError(f"{where}: sent {line['frame']}: {exc}") from None
    finally:
        sim.close()
    elapsed = time.monotonic() - started
    print(f"fuzz ({encap}): seed {SEED}, {count} frames in {elapsed:.1f} s: {dict(seen)}")
    # Each verdict is reached often: the frames exercise the program rather than bouncing off its first check.
    assert min(seen[v] for v in ("XDP_PASS", "XDP_TX", "XDP_DROP")) > count // 50, dict(seen)
    if encap == "gue":
        assert min(seen["sent in GUE"], seen["sent in IPIP"]) > count // 200, dict(seen)
