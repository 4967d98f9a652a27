"""bpf/balancer.c through BPF_PROG_TEST_RUN: records {description, input frame, verdict, checks}."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

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

from edge_lb.dataplane.desired import filter_bucket
from edge_lb.dataplane.simulate import Simulator

from .conftest import GW_MAC, OWN_MAC, needs_root

pytestmark = [pytest.mark.root, needs_root]

CLIENT4, CLIENT6 = "192.0.2.10", "2001:db8::10"
V4_TCP = {"10.0.0.1", "10.0.0.2", "10.0.0.3"}
V6_TCP = {"fd00:1::1", "fd00:1::2"}
ENCAP4 = ipaddress.ip_network("172.16.0.0/16")
ENCAP6 = ipaddress.ip_network("fd00:e1b::/64")


def eth(**kw: object) -> Ether:
    return Ether(src="02:00:00:00:00:99", dst=OWN_MAC, **kw)


def tcp4(dst: str = "10.200.1.1", dport: int = 80, sport: int = 40000, flags: str = "S",
         **ip: object) -> Packet:
    return eth() / IP(src=CLIENT4, dst=dst, **ip) / TCP(sport=sport, dport=dport, flags=flags)


def udp4(dst: str = "10.200.1.1", dport: int = 53, sport: int = 40000) -> Packet:
    return eth() / IP(src=CLIENT4, dst=dst) / UDP(sport=sport, dport=dport) / b"query"


def tcp6(dst: str = "fd00:200::1", dport: int = 443, sport: int = 40000, flags: str = "S", **ip: object
         ) -> Packet:
    return eth() / IPv6(src=CLIENT6, dst=dst, **ip) / TCP(sport=sport, dport=dport, flags=flags)


def udp6(dst: str = "fd00:200::2", dport: int = 5000) -> Packet:
    return eth() / IPv6(src=CLIENT6, dst=dst) / UDP(sport=40000, dport=dport) / b"data"


def ipv4_checksum(header: bytes) -> int:
    total = sum(int.from_bytes(header[i:i + 2], "big") for i in range(0, len(header), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


Check = Callable[[Ether, Packet], None]


def ipip_to(backends: set[str]) -> Check:
    """IPIP to one of `backends`, inner packet byte-identical, outer header as the rules say."""
    def check(out: Ether, inp: Packet) -> None:
        assert out.dst == GW_MAC and out.src == OWN_MAC and out.type == 0x0800
        outer = out[IP]
        assert outer.proto == 4 and outer.ttl == 64 and outer.frag == 0
        assert outer.flags == (inp[IP].flags & 0x2)  # DF copied, never MF
        if not inp[IP].flags & 0x2:  # fragmentable on the way: the outer ID must be set (RFC 6864)
            assert outer.id != 0
        assert outer.dst in backends
        assert ipaddress.ip_address(outer.src) in ENCAP4
        assert ipv4_checksum(bytes(outer)[:20]) == 0  # the header sums to 0xffff with a right checksum
        assert outer.tos == inp[IP].tos
        assert bytes(outer.payload) == bytes(inp[IP])
        assert outer.len == 20 + len(inp[IP])
    return check


def ip6_to(backends: set[str], nh: int) -> Check:
    """IP6IP6 (nh 41) or 4in6 (nh 4) to one of `backends`, inner byte-identical."""
    def check(out: Ether, inp: Packet) -> None:
        assert out.dst == GW_MAC and out.src == OWN_MAC and out.type == 0x86DD
        outer = out[IPv6]
        assert outer.nh == nh and outer.hlim == 64 and outer.dst in backends
        assert ipaddress.ip_address(outer.src) in ENCAP6
        inner = inp[IPv6] if IPv6 in inp else inp[IP]
        assert outer.plen == len(inner)
        assert bytes(outer.payload) == bytes(inner)
        want_tc = inp[IPv6].tc if IPv6 in inp else inp[IP].tos
        assert outer.tc == want_tc
    return check


def padded_ipip(out: Ether, inp: Packet) -> None:
    """The outer length wraps the inner packet (its length field), the trailing bytes ride along."""
    outer = IP(bytes(out)[14:])
    assert outer.proto == 4 and outer.len == 20 + inp[IP].len
    assert bytes(out)[14 + 20:] == bytes(inp)[14:], "inner packet and its padding byte-identical"


def ip6_via_ext(backends: set[str]) -> Check:
    """IP6IP6 of a packet with extension headers before its TCP header: inner byte-identical."""
    def check(out: Ether, inp: Packet) -> None:
        outer = out[IPv6]
        assert outer.nh == 41 and outer.dst in backends and outer.plen == len(inp[IPv6])
        assert bytes(outer.payload) == bytes(inp[IPv6])
    return check


def ones_sum(data: bytes) -> int:
    data += b"\0" * (len(data) % 2)
    total = sum(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def too_big_reply(mtu: int) -> Check:
    """The client is told, byte by byte: Ethernet back to the sender, from the VIP, ICMP frag-needed (IPv4) or
    packet-too-big (IPv6) with `mtu`, checksums right, quoting the first 548 / 1232 bytes of its packet."""
    def check(out: Ether, inp: Packet) -> None:
        raw, sent = bytes(out), bytes(inp)
        assert raw[:6] == sent[6:12] and raw[6:12] == sent[:6], "Ethernet addresses swapped"
        if IPv6 in inp:
            assert raw[12:14] == b"\x86\xdd" and len(raw) == 14 + 40 + 8 + 1232
            ip6, icmp = raw[14:54], raw[54:]
            assert ip6[0] >> 4 == 6 and ip6[4:6] == (8 + 1232).to_bytes(2, "big") and ip6[6] == 58
            assert ip6[7] == 64 and ip6[8:24] == sent[38:54] and ip6[24:40] == sent[22:38]
            assert icmp[0] == 2 and icmp[1] == 0 and int.from_bytes(icmp[4:8], "big") == mtu
            pseudo = ip6[8:40] + (8 + 1232).to_bytes(4, "big") + (58).to_bytes(4, "big")
            assert ones_sum(pseudo + icmp) == 0xFFFF, "ICMPv6 checksum"
            assert icmp[8:] == sent[14:14 + 1232]
        else:
            assert raw[12:14] == b"\x08\x00" and len(raw) == 14 + 20 + 8 + 548
            ip, icmp = raw[14:34], raw[34:]
            assert ip[0] == 0x45 and ip[2:4] == (576).to_bytes(2, "big") and ip[9] == 1 and ip[8] == 64
            assert ip[6:8] == b"\0\0" and ip[4:6] != b"\0\0", "no DF, an ID"
            assert ip[12:16] == sent[30:34] and ip[16:20] == sent[26:30], "from the VIP to the client"
            assert ones_sum(ip) == 0xFFFF, "IPv4 header checksum"
            assert icmp[0] == 3 and icmp[1] == 4 and icmp[4:6] == b"\0\0"
            assert int.from_bytes(icmp[6:8], "big") == mtu
            assert ones_sum(icmp) == 0xFFFF, "ICMP checksum"
            assert icmp[8:] == sent[14:14 + 548]
    return check


def echo_reply(out: Ether, inp: Packet) -> None:
    """The request, byte by byte, turned around: Ethernet and IP addresses swapped, TTL / hop limit 64, echo
    reply type, every checksum right (scapy recomputes them for the expected frame)."""
    raw, sent = bytes(out), bytes(inp)
    assert len(raw) == len(sent) and raw[:6] == sent[6:12] and raw[6:12] == sent[:6]
    assert raw[12:14] == sent[12:14]
    want = inp.copy()
    if IPv6 in inp:
        assert raw[14:21] == sent[14:21] and raw[21] == 64, "version, class, label, length, next header kept"
        assert raw[22:38] == sent[38:54] and raw[38:54] == sent[22:38], "addresses swapped"
        assert raw[54:56] == bytes([129, 0]) and raw[58:] == sent[58:], "echo reply, id, seq and data kept"
        pseudo = raw[22:54] + len(raw[54:]).to_bytes(4, "big") + (58).to_bytes(4, "big")
        assert ones_sum(pseudo + raw[54:]) == 0xFFFF, "ICMPv6 checksum"
    else:
        want[IP].src, want[IP].dst, want[IP].ttl, want[IP].chksum = inp[IP].dst, inp[IP].src, 64, None
        want[ICMP].type, want[ICMP].chksum = 0, None
        want.src, want.dst = inp.dst, inp.src
        assert raw == bytes(want)


def untouched(out: Ether, inp: Packet) -> None:
    assert bytes(out) == bytes(inp)


def prefilter_twin(vip: str) -> str:
    """An address that is no VIP but shares the VIP's prefilter bucket (a false positive of the filter)."""
    want = filter_bucket(ipaddress.ip_address(vip))
    base = int(ipaddress.IPv4Address("10.201.0.0"))
    return next(str(ipaddress.IPv4Address(base + n)) for n in range(1 << 20)
                if filter_bucket(ipaddress.IPv4Address(base + n)) == want)


@dataclass(frozen=True)
class Case:
    description: str
    frame: Packet | bytes
    verdict: str
    check: Check | None = None
    counter: str | None = None  # reason_stats entry that must grow
    extra: dict[str, object] = field(default_factory=dict)


VIP4, VIP6 = "10.200.1.1", "fd00:200::1"
ROUTER4, ROUTER6 = "198.51.100.1", "2001:db8:ffff::1"


def quote4(src: str = VIP4, sport: int = 80, dport: int = 41000, **ip: object) -> Packet:
    """What a router quotes of the backend's reply (VIP -> client)."""
    return IP(src=src, dst=CLIENT4, **ip) / TCP(sport=sport, dport=dport, flags="SA")


def frag_needed(quote: Packet | bytes, dst: str = VIP4, **ip: object) -> Packet:
    return eth() / IP(src=ROUTER4, dst=dst, **ip) / ICMP(type=3, code=4, nexthopmtu=1400) / Raw(bytes(quote))


def quote6(src: str = VIP6, sport: int = 443, dport: int = 41000) -> Packet:
    return IPv6(src=src, dst=CLIENT6) / TCP(sport=sport, dport=dport, flags="SA")


def too_big6(quote: Packet | bytes, dst: str = VIP6) -> Packet:
    return eth() / IPv6(src=ROUTER6, dst=dst) / ICMPv6PacketTooBig(mtu=1280) / Raw(bytes(quote))


def with_bytes(frame: Packet, at: int, value: bytes) -> bytes:
    raw = bytearray(bytes(frame))
    raw[at:at + len(value)] = value
    return bytes(raw)


def dstopts_chain(n: int) -> Packet:
    """n destination-options headers (8 bytes each) before TCP to the IPv6 VIP."""
    pkt: Packet = IPv6(src=CLIENT6, dst=VIP6)
    for _ in range(n):
        pkt = pkt / IPv6ExtHdrDestOpt()
    return eth() / pkt / TCP(sport=40010, dport=443, flags="S")


CASES = [
    Case("IPv4 TCP SYN to a VIP: IPIP to a backend", tcp4(), "XDP_TX", ipip_to(V4_TCP), "STAT_TX"),
    Case("IPv4 TCP ACK of an unknown flow: ring choice", tcp4(flags="A", sport=40001), "XDP_TX",
         ipip_to(V4_TCP), "STAT_CT_MISS"),
    Case("IPv4 UDP to a VIP", udp4(), "XDP_TX", ipip_to({"10.0.0.1", "10.0.0.2"})),
    Case("IPv4 TCP to a VIP address, other port: pass", tcp4(dport=81), "XDP_PASS", untouched,
         "STAT_PASS_NOT_VIP"),
    Case("IPv4 UDP to a TCP-only VIP port: pass", udp4(dport=80), "XDP_PASS", untouched),
    Case("IPv4 TCP to a non-VIP address: pass", tcp4(dst="10.9.9.9"), "XDP_PASS", untouched),
    Case("IPv4 TCP to a non-VIP in a VIP's prefilter bucket: pass (the VIP map decides)",
         tcp4(dst=prefilter_twin("10.200.1.1")), "XDP_PASS", untouched, "STAT_PASS_NOT_VIP"),
    Case("port-0 VIP takes any TCP port", tcp4(dst="10.200.1.2", dport=6000), "XDP_TX",
         ipip_to({"10.0.0.4"})),
    Case("port-0 TCP VIP does not take UDP", udp4(dst="10.200.1.2", dport=6000), "XDP_PASS", untouched),
    Case("IPv6 TCP to a VIP: IP6IP6", tcp6(), "XDP_TX", ip6_to(V6_TCP, 41)),
    Case("IPv6 UDP to a port-0 VIP: IP6IP6", udp6(), "XDP_TX", ip6_to({"fd00:1::3"}, 41)),
    Case("IPv6 TCP, wrong port: pass", tcp6(dport=80), "XDP_PASS", untouched),
    Case("IPv4 VIP with an IPv6 backend: 4in6", tcp4(dst="10.200.1.3"), "XDP_TX", ip6_to({"fd00:1::4"}, 4)),
    Case("DF copied to the outer IPv4 header", tcp4(sport=40006, flags="A") / Raw(b"x"), "XDP_TX",
         ipip_to(V4_TCP), extra={"df": True}),
    Case("DSCP copied to the outer IPv4 header", tcp4(tos=0xB8, sport=40002), "XDP_TX", ipip_to(V4_TCP)),
    Case("traffic class copied to the outer IPv6 header", tcp6(tc=0x68, sport=40002), "XDP_TX",
         ip6_to(V6_TCP, 41)),
    Case("DSCP copied into 4in6", tcp4(dst="10.200.1.3", tos=0x28), "XDP_TX", ip6_to({"fd00:1::4"}, 4)),
    Case("ARP: pass", eth() / ARP(pdst="10.200.1.1"), "XDP_PASS", untouched, "STAT_PASS_NOT_IP"),
    Case("LLDP ethertype: pass", Ether(dst="01:80:c2:00:00:0e", type=0x88CC) / Raw(b"\x02\x07" + b"x" * 40),
         "XDP_PASS", untouched, "STAT_PASS_NOT_IP"),
    Case("already IPIP-encapsulated, to a VIP address: pass",
         eth() / IP(src=CLIENT4, dst="10.200.1.1", proto=4)
         / IP(src="1.1.1.1", dst="2.2.2.2") / TCP(), "XDP_PASS", untouched, "STAT_PASS_OTHER"),
    Case("already IP6IP6-encapsulated: pass", eth() / IPv6(src=CLIENT6, dst="fd00:9::1", nh=41)
         / IPv6(src="2001:db8::1", dst="2001:db8::2") / TCP(), "XDP_PASS", untouched),
    Case("truncated IPv4 header: pass", eth() / IP(src=CLIENT4, dst="10.200.1.1") / TCP(),
         "XDP_PASS", untouched, "STAT_PASS_MALFORMED", {"truncate": 14 + 12}),
    Case("IPv4 length field beyond the frame, to a VIP: pass untouched (the kernel drops it)",
         tcp4(flags="A", len=200), "XDP_PASS", untouched, "STAT_PASS_MALFORMED"),
    Case("IPv4 length field shorter than a header: pass", tcp4(flags="A", len=12), "XDP_PASS", untouched,
         "STAT_PASS_MALFORMED"),
    Case("IPv6 payload length beyond the frame, to a VIP: pass", tcp6(flags="A", plen=300), "XDP_PASS",
         untouched, "STAT_PASS_MALFORMED"),
    # The prefilter comes first (surely_not_vip): to an address no VIP has, nothing else is read.
    Case("IPv4 length field beyond the frame, to no VIP: pass, counted not_vip (prefilter first)",
         tcp4(dst="10.9.9.9", flags="A", len=200), "XDP_PASS", untouched, "STAT_PASS_NOT_VIP"),
    Case("IPv6 payload length beyond the frame, to no VIP: pass, counted not_vip (prefilter first)",
         tcp6(dst="fd00:9::1", flags="A", plen=300), "XDP_PASS", untouched, "STAT_PASS_NOT_VIP"),
    Case("IPv4 with options to no VIP: pass, counted not_vip (prefilter first)",
         eth() / IP(src=CLIENT4, dst="10.9.9.9", options=[IPOption_Router_Alert()]) / TCP(), "XDP_PASS",
         untouched, "STAT_PASS_NOT_VIP"),
    Case("IPv4 with Ethernet padding: sent, the outer length covers the inner packet only",
         tcp4(flags="A", sport=40007, len=40) / Raw(b"\0" * 6), "XDP_TX", padded_ipip, "STAT_TX"),
    Case("IPv4 whose trailing bytes make the frame too big once encapsulated: drop",
         tcp4(flags="A", sport=40008, len=40) / Raw(b"x" * 1441), "XDP_DROP", None, "STAT_DROP_TOO_BIG"),
    Case("truncated TCP header to a VIP: pass", tcp4(), "XDP_PASS", untouched, None,
         {"truncate": 14 + 20 + 6}),
    Case("IPv4 first fragment to a VIP: drop",
         eth() / IP(src=CLIENT4, dst="10.200.1.1", flags="MF") / TCP(dport=80), "XDP_DROP", None,
         "STAT_DROP_FRAGMENT"),
    Case("IPv4 later fragment to a VIP: drop", eth() / IP(src=CLIENT4, dst="10.200.1.1", frag=10, proto=6)
         / Raw(b"x" * 40), "XDP_DROP", None, "STAT_DROP_FRAGMENT"),
    Case("IPv4 fragment to a non-VIP: pass", eth() / IP(src=CLIENT4, dst="10.9.9.9", flags="MF") / TCP(),
         "XDP_PASS", untouched),
    Case("IPv4 with options to a VIP: drop", eth() / IP(src=CLIENT4, dst="10.200.1.1",
         options=[IPOption_Router_Alert()]) / TCP(dport=80), "XDP_DROP", None, "STAT_DROP_IP_OPTIONS"),
    Case("IPv4 with options to a non-VIP: pass", eth() / IP(src=CLIENT4, dst="10.9.9.9",
         options=[IPOption_Router_Alert()]) / TCP(dport=80), "XDP_PASS", untouched),
    Case("IPv6 fragment to a VIP: drop",
         eth() / IPv6(src=CLIENT6, dst="fd00:200::1") / IPv6ExtHdrFragment(m=1)
         / TCP(dport=443), "XDP_DROP", None, "STAT_DROP_FRAGMENT"),
    Case("IPv6 fragment to a non-VIP: pass",
         eth() / IPv6(src=CLIENT6, dst="fd00:9::1") / IPv6ExtHdrFragment(m=1)
         / TCP(dport=443), "XDP_PASS", untouched),
    Case("ICMP echo to a VIP address: answered", eth() / IP(src=CLIENT4, dst="10.200.1.1") / ICMP(id=7, seq=3)
         / b"ping", "XDP_TX", echo_reply, "STAT_TX_ICMP_ECHO_REPLY"),
    Case("ICMP echo to a VIP address with DF and TTL 3: answered, TTL 64",
         eth() / IP(src=CLIENT4, dst="10.200.1.2", ttl=3, flags="DF") / ICMP() / (b"x" * 56), "XDP_TX",
         echo_reply, "STAT_TX_ICMP_ECHO_REPLY"),
    Case("ICMP echo to a VIP address from a multicast source: pass",
         eth() / IP(src="224.0.0.1", dst="10.200.1.1") / ICMP(), "XDP_PASS", untouched, "STAT_PASS_OTHER"),
    Case("ICMP echo to a non-VIP address: pass", eth() / IP(src=CLIENT4, dst="10.9.9.9") / ICMP(),
         "XDP_PASS", untouched, "STAT_PASS_NOT_VIP"),
    Case("ICMP echo reply to a VIP address: pass", eth() / IP(src=CLIENT4, dst="10.200.1.1") / ICMP(type=0),
         "XDP_PASS", untouched, "STAT_PASS_OTHER"),
    Case("ICMPv6 echo to a VIP address: answered",
         eth() / IPv6(src=CLIENT6, dst="fd00:200::1") / ICMPv6EchoRequest(id=9, seq=1, data=b"ping6"),
         "XDP_TX", echo_reply, "STAT_TX_ICMP_ECHO_REPLY"),
    Case("ICMPv6 echo to a VIP address behind a destination-options header: pass",
         eth() / IPv6(src=CLIENT6, dst="fd00:200::1") / IPv6ExtHdrDestOpt() / ICMPv6EchoRequest(),
         "XDP_PASS", untouched, "STAT_PASS_OTHER"),
    Case("ICMPv6 echo to a non-VIP address: pass",
         eth() / IPv6(src=CLIENT6, dst="fd00:9::1") / ICMPv6EchoRequest(), "XDP_PASS", untouched,
         "STAT_PASS_NOT_VIP"),
    Case("IPv4 VIP with no healthy backend: drop", tcp4(dst="10.200.1.4"), "XDP_DROP", None,
         "STAT_DROP_NO_BACKEND"),
    Case("IPv4 packet too big once encapsulated: ICMP frag-needed to the client, MTU 1480",
         tcp4(flags="A", sport=40003) / Raw(b"x" * 1441), "XDP_TX", too_big_reply(1480),
         "STAT_TX_TOO_BIG_REPLY"),
    Case("IPv4 packet too big once encapsulated, DF set: ICMP frag-needed, and counted too big",
         tcp4(flags="A", sport=40003) / Raw(b"x" * 1441), "XDP_TX", too_big_reply(1480), "STAT_DROP_TOO_BIG",
         {"df": True}),
    Case("IPv4 packet exactly at the MTU once encapsulated: sent",
         tcp4(flags="A", sport=40004) / Raw(b"x" * 1440),
         "XDP_TX", ipip_to(V4_TCP)),
    Case("IPv6 packet too big for IP6IP6: ICMPv6 packet-too-big to the client, MTU 1460",
         tcp6(flags="A", sport=40005) / Raw(b"x" * 1401), "XDP_TX", too_big_reply(1460),
         "STAT_TX_TOO_BIG_REPLY"),
    Case("4in6 packet too big (40-byte overhead): ICMP frag-needed, MTU 1460",
         tcp4(dst="10.200.1.3", flags="A") / Raw(b"x" * 1421), "XDP_TX", too_big_reply(1460),
         "STAT_TX_TOO_BIG_REPLY"),
    Case("UDP too big once encapsulated: ICMP frag-needed", udp4() / Raw(b"x" * 1460), "XDP_TX",
         too_big_reply(1480), "STAT_TX_TOO_BIG_REPLY"),
    Case("ICMP frag-needed about a VIP flow, itself too big to encapsulate: drop, no ICMP about an ICMP",
         frag_needed(bytes(quote4()) + b"x" * 1450), "XDP_DROP", None, "STAT_DROP_TOO_BIG"),
    # --- issue 10, item 1: strict parsing ------------------------------------------------------------
    Case("ICMP frag-needed to a non-VIP address quoting a VIP flow: pass untouched",
         frag_needed(quote4(), dst="10.9.9.9"), "XDP_PASS", untouched, "STAT_PASS_NOT_VIP"),
    Case("ICMP frag-needed to a VIP's prefilter twin quoting a VIP flow: pass untouched",
         frag_needed(quote4(), dst=prefilter_twin(VIP4)), "XDP_PASS", untouched, "STAT_PASS_NOT_VIP"),
    Case("ICMP frag-needed to VIP A quoting VIP B's flow: drop", frag_needed(quote4(src="10.200.1.2")),
         "XDP_DROP", None, "STAT_DROP_ICMP_QUOTE_MISMATCH"),
    Case("ICMP frag-needed about a VIP flow: to its backend", frag_needed(quote4()), "XDP_TX",
         ipip_to(V4_TCP), "STAT_TX_ICMP_TOO_BIG"),
    Case("ICMP frag-needed quoting a non-first fragment: drop",
         frag_needed(IP(src=VIP4, dst=CLIENT4, frag=100, proto=6) / Raw(b"\x00\x50\xa0\x28" + b"x" * 4)),
         "XDP_DROP", None, "STAT_DROP_ICMP_QUOTE_FRAGMENT"),
    Case("ICMP frag-needed quoting a first fragment (MF, offset 0): to the flow's backend",
         frag_needed(quote4(flags="MF")), "XDP_TX", ipip_to(V4_TCP), "STAT_TX_ICMP_TOO_BIG"),
    Case("ICMP frag-needed whose quote stops inside the ports: drop",
         frag_needed(bytes(quote4())[:22]), "XDP_DROP", None, "STAT_DROP_ICMP_QUOTE_TRUNCATED"),
    Case("ICMP frag-needed whose quote lies beyond the outer total length: drop",
         frag_needed(quote4(), len=20 + 8 + 24), "XDP_DROP", None, "STAT_DROP_ICMP_QUOTE_TRUNCATED"),
    Case("ICMP frag-needed quoting IP version 5: drop", frag_needed(quote4(version=5)), "XDP_DROP", None,
         "STAT_DROP_ICMP_QUOTE_VERSION"),
    Case("ICMP frag-needed quoting an IPv6 header: drop", frag_needed(quote6()), "XDP_DROP", None,
         "STAT_DROP_ICMP_QUOTE_VERSION"),
    Case("ICMP frag-needed whose quote claims total length 20: drop", frag_needed(quote4(len=20)), "XDP_DROP",
         None, "STAT_DROP_ICMP_QUOTE_LENGTH"),
    Case("ICMP frag-needed whose quote claims IHL 4: drop",
         frag_needed(with_bytes(quote4(), 0, b"\x44")), "XDP_DROP", None, "STAT_DROP_ICMP_QUOTE_LENGTH"),
    Case("ICMP frag-needed quoting IPv4 options: drop",
         frag_needed(IP(src=VIP4, dst=CLIENT4, options=[IPOption_Router_Alert()]) / TCP(sport=80)),
         "XDP_DROP", None, "STAT_DROP_IP_OPTIONS"),
    Case("ICMP port unreachable to a VIP address: pass (not ours)",
         eth() / IP(src=ROUTER4, dst=VIP4) / ICMP(type=3, code=3) / quote4(), "XDP_PASS", untouched,
         "STAT_PASS_OTHER"),
    Case("ICMPv6 packet-too-big to a non-VIP address quoting a VIP flow: pass untouched",
         too_big6(quote6(), dst="fd00:9::1"), "XDP_PASS", untouched, "STAT_PASS_NOT_VIP"),
    Case("ICMPv6 packet-too-big to VIP A quoting VIP B's flow: drop", too_big6(quote6(src="fd00:200::2")),
         "XDP_DROP", None, "STAT_DROP_ICMP_QUOTE_MISMATCH"),
    Case("ICMPv6 packet-too-big about a VIP flow: to its backend", too_big6(quote6()), "XDP_TX",
         ip6_to(V6_TCP, 41), "STAT_TX_ICMP_TOO_BIG"),
    Case("ICMPv6 packet-too-big quoting a non-first fragment: drop",
         too_big6(IPv6(src=VIP6, dst=CLIENT6) / IPv6ExtHdrFragment(offset=10, nh=6) / Raw(b"x" * 8)),
         "XDP_DROP", None, "STAT_DROP_ICMP_QUOTE_FRAGMENT"),
    Case("ICMPv6 packet-too-big quoting a first fragment: ports after the fragment header, to the backend",
         too_big6(IPv6(src=VIP6, dst=CLIENT6) / IPv6ExtHdrFragment(offset=0, m=1, nh=6)
                  / TCP(sport=443, dport=41000, flags="SA")), "XDP_TX", ip6_to(V6_TCP, 41),
         "STAT_TX_ICMP_TOO_BIG"),
    Case("ICMPv6 packet-too-big whose quote stops inside the IPv6 header: drop",
         too_big6(bytes(quote6())[:30]), "XDP_DROP", None, "STAT_DROP_ICMP_QUOTE_TRUNCATED"),
    Case("ICMPv6 packet-too-big quoting IP version 4: drop", too_big6(with_bytes(quote6(), 0, b"\x40")),
         "XDP_DROP", None, "STAT_DROP_ICMP_QUOTE_VERSION"),
    Case("ICMPv6 packet-too-big whose quote claims payload length 0: drop",
         too_big6(with_bytes(quote6(), 4, b"\x00\x00")), "XDP_DROP", None, "STAT_DROP_ICMP_QUOTE_LENGTH"),
    Case("IPv4 EtherType with an IPv6 header, to a VIP: pass",
         eth(type=0x0800) / IPv6(src=CLIENT6, dst=VIP6) / TCP(dport=443), "XDP_PASS", untouched,
         "STAT_PASS_MALFORMED"),
    Case("IPv4 header with version 6 to a VIP: pass", tcp4(version=6), "XDP_PASS", untouched,
         "STAT_PASS_MALFORMED"),
    Case("IPv6 header with version 4 to a VIP: pass", with_bytes(tcp6(), 14, b"\x40"), "XDP_PASS", untouched,
         "STAT_PASS_MALFORMED"),
    Case("IPv4 SYN with total length 20, its TCP header in trailing bytes: pass", tcp4(len=20), "XDP_PASS",
         untouched, "STAT_PASS_MALFORMED"),
    Case("IPv4 SYN whose total length ends inside the TCP header: pass", tcp4(len=30), "XDP_PASS", untouched,
         "STAT_PASS_MALFORMED"),
    Case("IPv6 SYN with payload length 0, its TCP header in trailing bytes: pass", tcp6(plen=0), "XDP_PASS",
         untouched, "STAT_PASS_MALFORMED"),
    Case("IPv4 IHL 4 to a VIP: pass", with_bytes(tcp4(), 14, b"\x44"), "XDP_PASS", untouched,
         "STAT_PASS_MALFORMED"),
    Case("TCP data offset 4 to a VIP: pass", tcp4(sport=40011, flags="A") / Raw(b"x"), "XDP_PASS", untouched,
         "STAT_PASS_MALFORMED", {"tcp_doff": 4}),
    Case("TCP data offset beyond the datagram to a VIP: pass", tcp4(sport=40011, flags="A"), "XDP_PASS",
         untouched, "STAT_PASS_MALFORMED", {"tcp_doff": 15}),
    Case("UDP length beyond the datagram to a VIP: pass", eth() / IP(src=CLIENT4, dst=VIP4)
         / UDP(sport=40000, dport=53, len=200) / b"query", "XDP_PASS", untouched, "STAT_PASS_MALFORMED"),
    Case("UDP length below its header to a VIP: pass", eth() / IP(src=CLIENT4, dst=VIP4)
         / UDP(sport=40000, dport=53, len=4) / b"query", "XDP_PASS", untouched, "STAT_PASS_MALFORMED"),
    Case("IPv6 fragment header behind hop-by-hop to a VIP: drop",
         eth() / IPv6(src=CLIENT6, dst=VIP6) / IPv6ExtHdrHopByHop() / IPv6ExtHdrFragment(m=1)
         / TCP(dport=443), "XDP_DROP", None, "STAT_DROP_FRAGMENT"),
    Case("IPv6 fragment header behind routing to a VIP: drop",
         eth() / IPv6(src=CLIENT6, dst=VIP6) / IPv6ExtHdrRouting() / IPv6ExtHdrFragment(m=1) / TCP(dport=443),
         "XDP_DROP", None, "STAT_DROP_FRAGMENT"),
    Case("IPv6 fragment header behind destination options to a VIP: drop",
         eth() / IPv6(src=CLIENT6, dst=VIP6) / IPv6ExtHdrDestOpt() / IPv6ExtHdrFragment(offset=3)
         / Raw(b"x" * 16), "XDP_DROP", None, "STAT_DROP_FRAGMENT"),
    Case("IPv6 fragment header behind hop-by-hop to a non-VIP: pass untouched",
         eth() / IPv6(src=CLIENT6, dst="fd00:9::1") / IPv6ExtHdrHopByHop() / IPv6ExtHdrFragment(m=1)
         / TCP(dport=443), "XDP_PASS", untouched, "STAT_PASS_NOT_VIP"),
    Case("IPv6 TCP behind hop-by-hop, routing and destination options: ports from TCP, IP6IP6",
         eth() / IPv6(src=CLIENT6, dst=VIP6) / IPv6ExtHdrHopByHop() / IPv6ExtHdrRouting()
         / IPv6ExtHdrDestOpt() / TCP(sport=40012, dport=443, flags="S"),
         "XDP_TX", ip6_via_ext(V6_TCP), "STAT_TX"),
    Case("IPv6 TCP to another port behind a destination-options header: pass (the real port decides)",
         eth() / IPv6(src=CLIENT6, dst=VIP6) / IPv6ExtHdrDestOpt() / TCP(sport=40012, dport=80),
         "XDP_PASS", untouched, "STAT_PASS_NOT_VIP"),
    Case("IPv6 with 6 destination-options headers before TCP: balanced", dstopts_chain(6), "XDP_TX",
         ip6_via_ext(V6_TCP), "STAT_TX"),
    Case("IPv6 with 7 extension headers to a VIP: pass (not walked further)", dstopts_chain(7), "XDP_PASS",
         untouched, "STAT_PASS_OTHER"),
    Case("IPv6 extension header beyond the payload length, to a VIP: pass",
         eth() / IPv6(src=CLIENT6, dst=VIP6, plen=4) / IPv6ExtHdrDestOpt() / TCP(dport=443), "XDP_PASS",
         untouched, "STAT_PASS_MALFORMED"),
    Case("IPv4 without DF: the outer ID is not 0", tcp4(sport=40013, flags="A") / Raw(b"x"), "XDP_TX",
         ipip_to(V4_TCP), "STAT_TX"),
]


def reasons(sim: Simulator) -> dict[str, int]:
    from edge_lb.dataplane.counters import reason_names

    names = reason_names()
    return {names[i]: pk for i, (pk, _) in sim.dp.io.read_counters("reason_stats").items()}


def built(case: Case) -> bytes:
    assert isinstance(case.frame, Packet)
    pkt = case.frame.copy()
    if case.extra.get("df"):
        pkt[IP].flags = "DF"
    if "tcp_doff" in case.extra:
        pkt[TCP].dataofs = int(str(case.extra["tcp_doff"]))
    return bytes(pkt)


@pytest.mark.parametrize("case", CASES, ids=[c.description for c in CASES])
def test_fixture(sim: Simulator, case: Case) -> None:
    frame = case.frame if isinstance(case.frame, bytes) else built(case)
    if "truncate" in case.extra:
        frame = frame[: int(str(case.extra["truncate"]))]
    before = reasons(sim)
    verdict, out = sim.run(frame)
    assert verdict == case.verdict
    if case.check is not None:
        case.check(Ether(out), Ether(frame))
    if case.counter is not None:
        assert reasons(sim).get(case.counter, 0) == before.get(case.counter, 0) + 1


# [[vip]] hash: "source" picks the Maglev slot from the client address alone, "flow" (the default) from the
# whole flow. Each VIP pair below has the same backends; the ports of the "flow" rows are ones whose flows the
# ring splits (a seed that shows it), the "source" rows send the very same flows to a single backend.
HASH_VIPS: list[dict[str, object]] = [
    {"address": "10.200.2.1", "port": 80, "protocol": "tcp", "hash": "source",
     "backend": [{"address": f"10.0.1.{i}"} for i in (1, 2, 3)]},
    {"address": "10.200.2.2", "port": 80, "protocol": "tcp", "hash": "flow",
     "backend": [{"address": f"10.0.1.{i}"} for i in (1, 2, 3)]},
    {"address": "10.200.2.3", "port": 0, "protocol": "tcp", "hash": "source",
     "backend": [{"address": f"10.0.1.{i}"} for i in (1, 2, 3)]},
    {"address": "10.200.2.4", "port": 0, "protocol": "tcp",
     "backend": [{"address": f"10.0.1.{i}"} for i in (1, 2, 3)]},
    {"address": "fd00:200::5", "port": 443, "protocol": "tcp", "hash": "source",
     "backend": [{"address": f"fd00:1::{i}"} for i in (11, 12, 13)]},
    {"address": "fd00:200::6", "port": 443, "protocol": "tcp",
     "backend": [{"address": f"fd00:1::{i}"} for i in (11, 12, 13)]},
]


@dataclass
class HashCase:
    description: str
    frames: list[Packet]
    same: bool  # True: every frame to one backend; False: not all to one


def _hash_vips(d: dict[str, object]) -> None:
    d["dataplane"] = {**d["dataplane"], "max_vips": 16}  # type: ignore[dict-item]
    d["vip"] = [*d["vip"], *HASH_VIPS]  # type: ignore[misc]


HASH_CASES = [
    HashCase("source, IPv4: one client, two source ports -> one backend",
             [tcp4(dst="10.200.2.1", sport=p) for p in (40000, 40003)], True),
    HashCase("flow, IPv4: the same two flows -> two backends",
             [tcp4(dst="10.200.2.2", sport=p) for p in (40000, 40003)], False),
    HashCase("source, IPv4: 64 source ports, SYN and ACK -> one backend",
             [tcp4(dst="10.200.2.1", sport=40000 + p, flags=f) for p in range(64) for f in ("S", "A")], True),
    HashCase("source, port-0 VIP: one client, other destination ports -> one backend (port excluded)",
             [tcp4(dst="10.200.2.3", dport=d, sport=40000) for d in (21, 80, 443, 6000, 30000)], True),
    HashCase("flow, port-0 VIP: the same flows -> not one backend (port included)",
             [tcp4(dst="10.200.2.4", dport=d, sport=40000) for d in (21, 80, 443, 6000, 30000)], False),
    HashCase("source, IPv6: one client, two source ports -> one backend",
             [tcp6(dst="fd00:200::5", sport=p) for p in (40000, 40001, 40002, 40003)], True),
    HashCase("flow, IPv6: the same flows -> not one backend",
             [tcp6(dst="fd00:200::6", sport=p) for p in (40000, 40001, 40002, 40003)], False),
]


@pytest.fixture(scope="module")
def hash_sim() -> Iterator[Simulator]:
    from .conftest import make_config

    s = Simulator(make_config(_hash_vips))
    yield s
    s.close()


def _backend(sim: Simulator, frame: Packet) -> str:
    verdict, out = sim.run(bytes(frame))
    assert verdict == "XDP_TX"
    pkt = Ether(out)
    return str(pkt[IPv6].dst if pkt.type == 0x86DD else pkt[IP].dst)


@pytest.mark.parametrize("case", HASH_CASES, ids=[c.description for c in HASH_CASES])
def test_hash_fixture(hash_sim: Simulator, case: HashCase) -> None:
    picked = [_backend(hash_sim, f) for f in case.frames]
    assert (len(set(picked)) == 1) == case.same, picked


def test_source_hash_spreads_clients(hash_sim: Simulator) -> None:
    """Source hashing is per client: 64 clients to the same VIP use every backend."""
    picked = {_backend(hash_sim, eth() / IP(src=f"198.51.100.{i}", dst="10.200.2.1") / TCP(sport=40000))
              for i in range(1, 65)}
    assert picked == {"10.0.1.1", "10.0.1.2", "10.0.1.3"}


def _jhash3(a: int, b: int, c: int, seed: int) -> int:
    """balancer.c's jhash3 (the kernel's jhash_3words)."""
    m = 0xFFFFFFFF

    def rol(w: int, s: int) -> int:
        return ((w << s) | (w >> (32 - s))) & m

    iv = (seed + 0xDEADBEEF + 12) & m
    a, b, c = (a + iv) & m, (b + iv) & m, (c + iv) & m
    for x, y, s in (("c", "b", 14), ("a", "c", 11), ("b", "a", 25), ("c", "b", 16), ("a", "c", 4),
                    ("b", "a", 14), ("c", "b", 24)):
        v = {"a": a, "b": b, "c": c}
        v[x] = ((v[x] ^ v[y]) - rol(v[y], s)) & m
        a, b, c = v["a"], v["b"], v["c"]
    return c


def test_source_hash_is_the_client_address_with_the_fixed_seed(hash_sim: Simulator) -> None:
    """The slot is jhash of the client address alone seeded with FLOW_HASH_SEED (a constant of
    balancer_consts.h, no per-node value): any node with the same ring sends a client to the same backend,
    whatever its ports."""
    import re
    import sys
    from pathlib import Path

    from edge_lb.dataplane.loader import BPF_DIR

    from .conftest import make_config

    consts = (Path(BPF_DIR) / "balancer_consts.h").read_text()
    found = re.search(r"#define FLOW_HASH_SEED (0x[0-9a-f]+)u", consts)
    assert found is not None
    seed = int(found.group(1), 16)
    io = hash_sim.dp.io
    vips = {str(k.address): n for k, n in io.read_vips().items()}
    backends = {i: str(s.address) for i, s in io.read_backends().items()}
    ring_size = make_config(_hash_vips).dataplane.ring_size
    for client, vip, dport in (("198.51.100.7", "10.200.2.1", 80), ("2001:db8::77", "fd00:200::5", 443)):
        raw = ipaddress.ip_address(client).packed
        words = [int.from_bytes(raw[i:i + 4], sys.byteorder) for i in range(0, len(raw), 4)]
        if len(words) == 1:
            h = _jhash3(words[0], 0, 0, seed)
        else:
            h = _jhash3(words[3], 0, 0, _jhash3(words[0], words[1], words[2], seed))
        want = backends[io.read_ring(vips[vip])[h % ring_size]]
        ip = IPv6(src=client, dst=vip) if ":" in client else IP(src=client, dst=vip)
        for sport in (1024, 40000, 65535):
            assert _backend(hash_sim, eth() / ip / TCP(sport=sport, dport=dport)) == want
