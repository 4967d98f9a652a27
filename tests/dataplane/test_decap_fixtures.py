"""bpf/decap.c through BPF_PROG_TEST_RUN: one record per case (description, input, verdict, expected)."""

from __future__ import annotations

import ctypes
import ipaddress
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from scapy.layers.inet import IP, TCP, UDP, IPOption_Router_Alert
from scapy.layers.inet6 import IPv6, IPv6ExtHdrHopByHop
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Packet, Raw

from edge_lb.dataplane import bpfsys, decap
from edge_lb.dataplane.testrun import run_xdp

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="loading BPF programs needs root"),
]

XDP_PASS = 2
OUR4, OTHER4 = "10.0.0.2", "10.0.0.99"
OUR6, OTHER6 = "fd00::2", "fd00::99"
LB4, LB6 = "10.0.0.1", "fd00::1"
SRC_MAC, DST_MAC = "02:00:00:00:00:01", "02:00:00:00:00:02"


def eth() -> Ether:
    return Ether(src=SRC_MAC, dst=DST_MAC)


def inner4(tos: int = 0) -> Packet:
    return IP(src="192.0.2.10", dst="10.200.1.1", tos=tos) / TCP(sport=40000, dport=80, flags="S")


def inner6(tc: int = 0) -> Packet:
    return IPv6(src="2001:db8::10", dst="fd00:200::1", tc=tc) / TCP(sport=40000, dport=80, flags="S")


def ipip(dst: str = OUR4, inner: Packet | None = None, **outer: Any) -> bytes:
    return bytes(eth() / IP(src=LB4, dst=dst, proto=4, **outer) / (inner or inner4()))


def ip6(dst: str = OUR6, inner: Packet | None = None, **outer: Any) -> bytes:
    inner = inner if inner is not None else inner6()
    nh = 41 if isinstance(inner, IPv6) else 4
    return bytes(eth() / IPv6(src=LB6, dst=dst, nh=nh, **outer) / inner)


GUE_PORT = 6080  # the default of decap.load (and of [dataplane] gue_port)


def gue(dst: str = OUR4, inner: Packet | None = None, udp: dict[str, Any] | None = None,
        **outer: Any) -> bytes:
    """GUE as the balancer sends it: outer IPv4 (or IPv6 for an IPv6 `dst`), UDP to GUE_PORT with checksum 0,
    the inner packet."""
    inner = inner if inner is not None else inner4()
    ip: Packet = IPv6(src=LB6, dst=dst, **outer) if ":" in dst else IP(src=LB4, dst=dst, **outer)
    return bytes(eth() / ip / UDP(**{"sport": 50000, "dport": GUE_PORT, "chksum": 0, **(udp or {})}) / inner)


def decapped(inner: Packet) -> bytes:
    """What the program must leave: the same Ethernet addresses, the inner packet, the inner ethertype."""
    return bytes(eth() / inner)


@dataclass(frozen=True)
class Case:
    description: str
    frame: bytes
    verdict: int = XDP_PASS
    expected: bytes | None = None  # None: the frame must come out untouched


def cases() -> list[Case]:
    ipip_full = ipip()
    return [
        Case("IPIP to our address: inner IPv4 passed up", ipip_full, expected=decapped(inner4())),
        Case("IPIP to another address: untouched", ipip(OTHER4)),
        Case("IP6IP6 to our address: inner IPv6 passed up", ip6(), expected=decapped(inner6())),
        Case("4in6 to our address: inner IPv4 passed up", ip6(inner=inner4()), expected=decapped(inner4())),
        Case("IP6IP6 to another address: untouched", ip6(OTHER6)),
        Case("plain TCP to our address: untouched", bytes(eth() / IP(src=LB4, dst=OUR4) / TCP(dport=80))),
        Case("plain TCP over IPv6: untouched", bytes(eth() / IPv6(src=LB6, dst=OUR6) / TCP(dport=80))),
        Case("ARP: untouched", bytes(eth() / ARP(psrc=LB4, pdst=OUR4))),
        Case("Ethernet header only: untouched", bytes(eth())[:14]),
        Case("IPIP cut inside the outer header: untouched", ipip_full[: 14 + 12]),
        Case("IPIP cut inside the inner header: untouched", ipip_full[: 14 + 20 + 10]),
        Case("IPIP shorter than its tot_len: untouched", ipip_full[:-4]),
        Case("IP6IP6 shorter than its payload_len: untouched", ip6()[:-4]),
        Case("IP6IP6 cut inside the inner header: untouched", ip6()[: 14 + 40 + 20]),
        Case(
            "IPIP whose outer IPv4 header has options: untouched",
            ipip(options=[IPOption_Router_Alert()]),
        ),
        Case("IPIP outer fragment (MF): untouched", ipip(flags="MF")),
        Case("IPIP outer fragment (offset): untouched", ipip(frag=10)),
        Case("IPIP whose inner header is not IPv4: untouched", ipip(inner=inner6())),
        Case(
            "IPv6 outer with a hop-by-hop header: untouched",
            bytes(eth() / IPv6(src=LB6, dst=OUR6) / IPv6ExtHdrHopByHop(nh=41) / inner6()),
        ),
        # RFC 6040: CE on the outer header survives decapsulation when the inner packet is ECN-capable.
        Case(
            "IPIP, outer CE, inner ECT(0): inner becomes CE with a correct checksum",
            ipip(tos=0x03, inner=inner4(tos=0x02)),
            expected=decapped(inner4(tos=0x03)),
        ),
        Case(
            "IPIP, outer CE, inner DSCP + ECT(1): inner becomes CE, DSCP kept",
            ipip(tos=0xB8 | 0x03, inner=inner4(tos=0xB8 | 0x01)),
            expected=decapped(inner4(tos=0xB8 | 0x03)),
        ),
        Case(
            "IPIP, outer CE, inner not ECN-capable: inner unchanged",
            ipip(tos=0x03, inner=inner4(tos=0x00)),
            expected=decapped(inner4(tos=0x00)),
        ),
        Case(
            "IP6IP6, outer CE, inner ECT(0): inner becomes CE",
            ip6(tc=0x03, inner=inner6(tc=0x28 | 0x02)),
            expected=decapped(inner6(tc=0x28 | 0x03)),
        ),
        Case(
            "4in6, outer CE, inner ECT(0): inner becomes CE",
            ip6(tc=0x03, inner=inner4(tos=0x02)),
            expected=decapped(inner4(tos=0x03)),
        ),
        # GUE (variant 1: the inner packet right behind UDP to GUE_PORT), over IPv4 and IPv6.
        Case("GUE/IPv4 to our address, inner IPv4: passed up", gue(), expected=decapped(inner4())),
        Case("GUE/IPv4, inner IPv6: passed up", gue(inner=inner6()), expected=decapped(inner6())),
        Case("GUE/IPv6 to our address, inner IPv6 (UDP checksum 0): passed up", gue(OUR6, inner6()),
             expected=decapped(inner6())),
        Case("GUE/IPv6, inner IPv4: passed up", gue(OUR6, inner4()), expected=decapped(inner4())),
        Case("GUE/IPv4 with a UDP checksum (another sender computed it): passed up, not verified",
             gue(udp={"chksum": None}), expected=decapped(inner4())),
        Case("GUE/IPv6, outer CE, inner ECT(0): inner becomes CE",
             gue(OUR6, inner6(tc=0x02), tc=0x03), expected=decapped(inner6(tc=0x03))),
        Case("GUE/IPv4, outer CE, inner ECT(0): inner becomes CE with a correct checksum",
             gue(inner=inner4(tos=0x02), tos=0x03), expected=decapped(inner4(tos=0x03))),
        Case("GUE/IPv4 to another address: untouched", gue(OTHER4)),
        Case("GUE/IPv6 to another address: untouched", gue(OTHER6, inner6())),
        Case("UDP to our address on another port: untouched", gue(udp={"dport": 53})),
        Case("UDP to our address from the GUE port, to another: untouched", gue(udp={"sport": GUE_PORT,
                                                                                       "dport": 6081})),
        Case("GUE whose UDP length is short of the datagram: untouched", gue(udp={"len": 8 + 20})),
        Case("GUE/IPv6 whose UDP length is longer than the datagram: untouched", gue(OUR6, inner6(),
                                                                                     udp={"len": 200})),
        Case("GUE variant 0 header (not what the balancer sends): untouched",
             bytes(eth() / IP(src=LB4, dst=OUR4) / UDP(sport=50000, dport=GUE_PORT, chksum=0)
                   / Raw(b"\x00\x00\x04\x00") / inner4())),
        Case("GUE with inner version 5: untouched", gue(inner=Raw(b"\x55" + bytes(39)))),
        Case("GUE with an inner IPv4 header cut short by the datagram: untouched",
             gue(inner=Raw(bytes(inner4())[:12]))),
        Case("GUE/IPv6 with an inner IPv6 header cut short: untouched", gue(OUR6, Raw(bytes(inner6())[:30]))),
        Case("GUE/IPv4 outer fragment (MF): untouched", gue(flags="MF")),
        Case("GUE/IPv4 shorter than its tot_len: untouched", gue()[:-4]),
        # Found by test_fuzz_decap.py: each of these was decapsulated before, so the stack got a packet the
        # tunnel did not carry (bytes past the outer datagram taken for its own) or one corrupted on the way.
        Case("IPIP whose outer header checksum is wrong: untouched",
             with_bytes(ipip(), 14 + 10, b"\x12\x34")),
        Case("IPIP whose inner packet runs past the outer datagram (into the frame's padding): untouched",
             longer_inner(ipip(), 14 + 20, 4)),
        Case("IPIP whose inner header checksum is wrong: untouched",
             with_bytes(ipip(), 14 + 20 + 10, b"\0\1")),
        Case("IPIP whose inner IHL is 4: untouched", ipip(inner=Raw(b"\x44" + bytes(inner4())[1:]))),
        Case("IPIP whose inner total length is shorter than its header: untouched",
             ipip(inner=IP(bytes(inner4())[:2] + b"\x00\x10" + bytes(inner4())[4:]))),
        Case("IP6IP6 whose inner packet runs past the outer payload: untouched",
             longer_inner(ip6(), 14 + 40, 6)),
        Case("4in6 whose inner packet runs past the outer payload: untouched",
             longer_inner(ip6(inner=inner4()), 14 + 40, 4)),
        Case("GUE/IPv6 whose inner packet runs past the UDP datagram: untouched",
             longer_inner(gue(OUR6, inner6()), 14 + 40 + 8, 6)),
        Case("IPIP whose inner IPv4 header has options (checksum right): passed up",
             ipip(inner=IP(src="192.0.2.10", dst="10.200.1.1", options=[IPOption_Router_Alert()]) / TCP()),
             expected=decapped(IP(src="192.0.2.10", dst="10.200.1.1", options=[IPOption_Router_Alert()])
                               / TCP())),
    ]


def with_bytes(frame: bytes, at: int, data: bytes) -> bytes:
    return frame[:at] + data + frame[at + len(data):]


def longer_inner(frame: bytes, at: int, version: int) -> bytes:
    """`frame` plus 6 bytes of padding, its inner packet (at `at`) saying it holds them (IPv4: with a right
    header checksum), the outer headers as they were."""
    inner = bytearray(frame[at:])
    if version == 4:
        inner[2:4] = (int.from_bytes(inner[2:4], "big") + 6).to_bytes(2, "big")
        inner[10:12] = b"\0\0"
        inner[10:12] = _ipv4_checksum(bytes(inner[:20]))
    else:
        inner[4:6] = (int.from_bytes(inner[4:6], "big") + 6).to_bytes(2, "big")
    return frame[:at] + bytes(inner) + b"\0" * 6


def _ipv4_checksum(header: bytes) -> bytes:
    total = sum(int.from_bytes(header[i:i + 2], "big") for i in range(0, len(header), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return (0xFFFF ^ total).to_bytes(2, "big")


@pytest.fixture(scope="module")
def program() -> Iterator[decap.DecapProgram]:
    addresses = [ipaddress.ip_address(OUR4), ipaddress.ip_address(OUR6)]
    loaded = decap.load_for_test(addresses)
    try:
        yield loaded
    finally:
        loaded.close()


@pytest.mark.parametrize("case", cases(), ids=lambda c: c.description)
def test_fixture(program: decap.DecapProgram, case: Case) -> None:
    verdict, out = run_xdp(program.prog_fd, case.frame)
    assert verdict == case.verdict
    expected = case.frame if case.expected is None else case.expected
    assert out.hex() == expected.hex()


def test_counters(program: decap.DecapProgram) -> None:
    before = decap.read_stats(program.bpf)
    run_xdp(program.prog_fd, ipip())
    run_xdp(program.prog_fd, ip6())
    run_xdp(program.prog_fd, ip6(inner=inner4()))
    run_xdp(program.prog_fd, ipip(OTHER4))
    after = decap.read_stats(program.bpf)
    delta = (after.decap_v4 - before.decap_v4, after.decap_v6 - before.decap_v6, after.passed - before.passed)
    assert delta == (1, 2, 1)
    run_xdp(program.prog_fd, gue())
    run_xdp(program.prog_fd, gue(OUR6, inner6()))
    run_xdp(program.prog_fd, gue(udp={"dport": 53}))
    last = decap.read_stats(program.bpf)
    assert (last.decap_v4 - after.decap_v4, last.decap_v6 - after.decap_v6, last.gue - after.gue,
            last.passed - after.passed) == (1, 1, 2, 1)


def test_another_gue_port_is_compiled_in() -> None:
    """--gue-port reaches the program: on 7000, GUE to 6080 is only UDP."""
    loaded = decap.load_for_test([ipaddress.ip_address(OUR4)], gue_port=7000)
    try:
        assert run_xdp(loaded.prog_fd, gue(udp={"dport": 7000}))[1] == decapped(inner4())
        assert run_xdp(loaded.prog_fd, gue())[1] == gue()
    finally:
        loaded.close()


def test_set_addresses_replaces_the_whole_set(program: decap.DecapProgram) -> None:
    try:
        decap.set_addresses(program.bpf, [ipaddress.ip_address(OTHER4)])
        assert run_xdp(program.prog_fd, ipip(OUR4))[1] == ipip(OUR4)
        assert run_xdp(program.prog_fd, ipip(OTHER4))[1] == decapped(inner4())
    finally:
        decap.set_addresses(program.bpf, [ipaddress.ip_address(OUR4), ipaddress.ip_address(OUR6)])


def test_same_bytes_different_family_is_not_ours(program: decap.DecapProgram) -> None:
    # 10.0.0.2 as the first 4 bytes of an IPv6 address must not match the IPv4 entry: the key has the family.
    v6_lookalike = str(ipaddress.IPv6Address(ipaddress.IPv4Address(OUR4).packed + bytes(12)))
    assert run_xdp(program.prog_fd, ip6(v6_lookalike))[1] == ip6(v6_lookalike)


def test_bad_max_addrs_is_rejected_before_compiling() -> None:
    from edge_lb.errors import DataplaneError

    with pytest.raises(DataplaneError, match="max_addrs"):
        decap.load(max_addrs=0)
    with pytest.raises(DataplaneError, match="gue_port"):
        decap.load(gue_port=65536)


def test_attached_addresses_reads_the_map_back_without_bcc(program: decap.DecapProgram) -> None:
    """`edge-lb backend check` reads an attached decapsulator's addresses by program id, through a ctypes
    mirror of struct decap_addr_key: it must be clang's layout, and give back what was written."""
    bcc_key = program.bpf["decap_addrs"].Key
    assert ctypes.sizeof(bcc_key) == ctypes.sizeof(decap.AddrKey)
    assert [(name, getattr(bcc_key, name).offset) for name, _ in bcc_key._fields_] == \
        [(name, getattr(decap.AddrKey, name).offset) for name, _ in decap.AddrKey._fields_]
    prog_id = bpfsys.prog_id(program.prog_fd)
    assert bpfsys.prog_name(prog_id) == decap.PROGRAM
    assert decap.attached_addresses(prog_id) == {ipaddress.ip_address(OUR4), ipaddress.ip_address(OUR6)}
