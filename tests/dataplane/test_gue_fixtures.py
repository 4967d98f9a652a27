"""GUE encapsulation of bpf/balancer.c (issue 10, item 5) through BPF_PROG_TEST_RUN: one record per case, each
output checked byte by byte (outer IPv4 / IPv6 header, UDP ports, length and checksum, the inner packet).

The UDP source port and the outer source address are checked against a Python copy of the balancer's flow
hash: both come from it, so one flow always travels as one (address, port) pair and a backend's RSS spreads
flows.
"""

from __future__ import annotations

import copy
import ipaddress
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Packet, Raw

from edge_lb.dataplane import gue
from edge_lb.dataplane.simulate import Simulator

from .conftest import GW_MAC, OWN_MAC, make_config, needs_root
from .test_balancer_fixtures import (
    CLIENT4,
    ENCAP4,
    ENCAP6,
    Check,
    _jhash3,
    eth,
    frag_needed,
    ipv4_checksum,
    quote4,
    reasons,
    tcp4,
    tcp6,
    too_big_reply,
    untouched,
)

pytestmark = [pytest.mark.root, needs_root]

PORT = 6081  # not the default 6080: proves [dataplane] gue_port reaches the program
SEED = 0x5EED1B00  # FLOW_HASH_SEED (balancer_consts.h; checked against it in test_balancer_fixtures)
GUE4, GUE6, GUE4IN6, MIXED = "10.200.3.1", "fd00:200::7", "10.200.3.2", "10.200.3.3"
GUE4_BACKENDS = {"10.0.2.1", "10.0.2.2"}
GUE6_BACKENDS = {"fd00:2::1", "fd00:2::2"}

GUE_VIPS: list[dict[str, Any]] = [
    {"address": GUE4, "port": 80, "protocol": "tcp", "encap": "gue",
     "backend": [{"address": a} for a in sorted(GUE4_BACKENDS)]},
    {"address": GUE6, "port": 443, "protocol": "tcp", "encap": "gue",
     "backend": [{"address": a} for a in sorted(GUE6_BACKENDS)]},
    {"address": GUE4IN6, "port": 80, "protocol": "tcp", "encap": "gue",
     "backend": [{"address": "fd00:2::4"}]},
    # The VIP's default is IPIP; one backend overrides it.
    {"address": MIXED, "port": 80, "protocol": "tcp",
     "backend": [{"address": "10.0.3.1", "encap": "gue"}, {"address": "10.0.3.2"}]},
]


def gue_config(d: dict[str, Any]) -> None:
    d["dataplane"] = {**d["dataplane"], "max_vips": 16, "gue_port": PORT}
    d["vip"] = [*d["vip"], *copy.deepcopy(GUE_VIPS)]


@pytest.fixture(scope="module")
def gue_sim() -> Iterator[Simulator]:
    s = Simulator(make_config(gue_config))
    yield s
    s.close()


def _loaded(raw: bytes) -> list[int]:
    """32-bit words as balancer.c loads them from the packet (the CPU's byte order)."""
    return [int.from_bytes(raw[i:i + 4], sys.byteorder) for i in range(0, len(raw), 4)]


def flow_hash(src: str, dst: str, proto: int, sport: int, dport: int) -> int:
    """balancer.c's flow_hash of the client flow (client -> VIP)."""
    s, d = _loaded(ipaddress.ip_address(src).packed), _loaded(ipaddress.ip_address(dst).packed)
    ports = (int.from_bytes(sport.to_bytes(2, "big"), sys.byteorder) << 16
             | int.from_bytes(dport.to_bytes(2, "big"), sys.byteorder))
    if len(s) == 1:
        return _jhash3(s[0], d[0] ^ proto, ports, SEED)
    h = _jhash3(s[0], s[1], s[2], SEED)
    h = _jhash3(s[3], d[0], d[1], h)
    return _jhash3(d[2], d[3] ^ proto, ports, h)


def outer_source(net: ipaddress.IPv4Network | ipaddress.IPv6Network, h: int) -> str:
    """prefix | (hash & host mask) over the last 32 bits, as the program ORs the loaded words."""
    raw = bytearray(net.network_address.packed)
    mask = _loaded(net.hostmask.packed[-4:])[0]
    last = _loaded(bytes(raw[-4:]))[0] | (h & mask)
    raw[-4:] = last.to_bytes(4, sys.byteorder)
    return str(ipaddress.ip_address(bytes(raw)))


def gue_to(backends: set[str], flow: tuple[str, str, int, int, int] | None = None) -> Check:
    """GUE to one of `backends`: the outer header as IPIP's but protocol UDP, then UDP (source port from the
    flow hash, destination PORT, length, checksum 0), then the inner packet and its padding byte-identical.
    `flow`: the client flow whose hash counts (default: the input's own)."""
    def check(out: Ether, inp: Packet) -> None:
        raw, sent = bytes(out), bytes(inp)
        inner = inp[IPv6] if IPv6 in inp and inp.type == 0x86DD else inp[IP]
        inner_len = inner.plen + 40 if isinstance(inner, IPv6) else inner.len  # its own length, not padding
        l4 = inner.payload
        h = flow_hash(*(flow or (inner.src, inner.dst, inner.nh if IPv6 in inp else inner.proto,
                                 l4.sport, l4.dport)))
        assert raw[:6] == bytes.fromhex(GW_MAC.replace(":", "")) and raw[6:12] == bytes.fromhex(
            OWN_MAC.replace(":", ""))
        tos = inner.tc if isinstance(inner, IPv6) else inner.tos
        if raw[12:14] == b"\x08\x00":
            ip, udp = raw[14:34], raw[34:42]
            assert ip[0] == 0x45 and ip[1] == tos and int.from_bytes(ip[2:4], "big") == 20 + 8 + inner_len
            assert ip[8] == 64 and ip[9] == 17, "TTL 64, protocol UDP"
            assert ip[6] & 0x40 == (sent[14 + 6] & 0x40 if isinstance(inner, IP) else 0), "DF copied"
            assert ip[6] & 0x3F == 0 and ip[7] == 0, "not a fragment"
            assert ipv4_checksum(ip) == 0, "outer IPv4 header checksum"
            src, dst = str(ipaddress.IPv4Address(ip[12:16])), str(ipaddress.IPv4Address(ip[16:20]))
            assert src == outer_source(ENCAP4, h) and dst in backends
            payload = raw[42:]
        else:
            assert raw[12:14] == b"\x86\xdd"
            ip, udp = raw[14:54], raw[54:62]
            assert ip[0] >> 4 == 6 and ((ip[0] & 0xF) << 4 | ip[1] >> 4) == tos
            assert int.from_bytes(ip[4:6], "big") == 8 + inner_len and ip[6] == 17 and ip[7] == 64
            src, dst = str(ipaddress.IPv6Address(ip[8:24])), str(ipaddress.IPv6Address(ip[24:40]))
            assert src == outer_source(ENCAP6, h) and dst in backends
            payload = raw[62:]
        assert udp == gue.udp_header(h, inner_len, PORT), "UDP ports, length, checksum 0"
        assert 49152 <= int.from_bytes(udp[:2], "big") <= 65535
        assert payload == sent[14:], "inner packet (and any padding) byte-identical"
    return check


def flow_label(out: Ether, inp: Packet) -> None:
    """The outer IPv6 flow label carries the flow hash as for IP6IP6 (and the traffic class's low nibble)."""
    raw = bytes(out)
    inner = inp[IPv6]
    h = flow_hash(inner.src, inner.dst, inner.nh, inner[TCP].sport, inner[TCP].dport)
    assert int.from_bytes(raw[15:18], "big") & 0xFFFFF == h & 0xFFFFF


@dataclass(frozen=True)
class Case:
    description: str
    frame: Packet
    verdict: str
    check: Check
    counter: str | None = None


def gue_and(*checks: Check) -> Check:
    def check(out: Ether, inp: Packet) -> None:
        for each in checks:
            each(out, inp)
    return check


CASES = [
    Case("IPv4 SYN to a GUE VIP: IPv4/UDP/IPv4", tcp4(dst=GUE4), "XDP_TX", gue_to(GUE4_BACKENDS), "STAT_TX"),
    Case("IPv4 data with DF and DSCP to a GUE VIP: both copied outward",
         eth() / IP(src=CLIENT4, dst=GUE4, tos=0xB8, flags="DF") / TCP(sport=40100, dport=80, flags="A")
         / Raw(b"x" * 100), "XDP_TX", gue_to(GUE4_BACKENDS), "STAT_TX"),
    Case("IPv4 with Ethernet padding to a GUE VIP: lengths cover the inner packet, padding rides along",
         tcp4(dst=GUE4, sport=40101, flags="A", len=40) / Raw(b"\0" * 6), "XDP_TX", gue_to(GUE4_BACKENDS)),
    Case("IPv6 SYN to a GUE VIP: IPv6/UDP/IPv6", tcp6(dst=GUE6), "XDP_TX",
         gue_and(gue_to(GUE6_BACKENDS), flow_label), "STAT_TX"),
    Case("IPv6 with traffic class to a GUE VIP: class and flow label in the outer header",
         tcp6(dst=GUE6, sport=40102, tc=0x68), "XDP_TX", gue_and(gue_to(GUE6_BACKENDS), flow_label)),
    Case("IPv4 VIP with an IPv6 GUE backend: IPv6/UDP/IPv4", tcp4(dst=GUE4IN6), "XDP_TX",
         gue_to({"fd00:2::4"})),
    Case("UDP to a GUE VIP's port is still only TCP's: pass", eth() / IP(src=CLIENT4, dst=GUE4)
         / UDP(sport=40000, dport=80), "XDP_PASS", untouched, "STAT_PASS_NOT_VIP"),
    Case("ICMP frag-needed about a GUE VIP's flow: to its backend in GUE, the client flow's port",
         frag_needed(quote4(src=GUE4, sport=80, dport=41000), dst=GUE4), "XDP_TX",
         gue_to(GUE4_BACKENDS, (CLIENT4, GUE4, 6, 41000, 80)), "STAT_TX_ICMP_TOO_BIG"),
    # The MTU check counts the UDP header: 1500 - 28 (IPv4 + UDP), 1500 - 48 (IPv6 + UDP).
    Case("IPv4 packet of 1472 bytes to a GUE VIP: exactly the MTU once in GUE, sent",
         tcp4(dst=GUE4, sport=40103, flags="A") / Raw(b"x" * 1432), "XDP_TX", gue_to(GUE4_BACKENDS)),
    Case("IPv4 packet of 1473 bytes to a GUE VIP: ICMP frag-needed, next-hop MTU 1472",
         tcp4(dst=GUE4, sport=40104, flags="A") / Raw(b"x" * 1433), "XDP_TX", too_big_reply(1472),
         "STAT_TX_TOO_BIG_REPLY"),
    Case("IPv6 packet of 1452 bytes to a GUE VIP: sent",
         tcp6(dst=GUE6, sport=40105, flags="A") / Raw(b"x" * 1392), "XDP_TX", gue_to(GUE6_BACKENDS)),
    Case("IPv6 packet of 1453 bytes to a GUE VIP: ICMPv6 packet-too-big, MTU 1452",
         tcp6(dst=GUE6, sport=40106, flags="A") / Raw(b"x" * 1393), "XDP_TX", too_big_reply(1452),
         "STAT_TX_TOO_BIG_REPLY"),
    Case("IPv4 packet of 1453 bytes to a 4in6 GUE VIP: ICMP frag-needed, MTU 1452",
         tcp4(dst=GUE4IN6, sport=40107, flags="A") / Raw(b"x" * 1413), "XDP_TX", too_big_reply(1452),
         "STAT_TX_TOO_BIG_REPLY"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.description for c in CASES])
def test_gue_fixture(gue_sim: Simulator, case: Case) -> None:
    frame = bytes(case.frame)
    before = reasons(gue_sim)
    verdict, out = gue_sim.run(frame)
    assert verdict == case.verdict
    case.check(Ether(out), Ether(frame))
    if case.counter is not None:
        assert reasons(gue_sim).get(case.counter, 0) == before.get(case.counter, 0) + 1


def test_ipip_vips_beside_gue_ones_stay_ipip(gue_sim: Simulator) -> None:
    """The base config's VIPs (no encap key) still go out in IPIP / IP6IP6 / 4in6."""
    for frame, family, proto in ((tcp4(), 0x0800, 4), (tcp6(), 0x86DD, 41),
                                 (tcp4(dst="10.200.1.3"), 0x86DD, 4)):
        verdict, out = gue_sim.run(bytes(frame))
        pkt = Ether(out)
        assert verdict == "XDP_TX" and pkt.type == family
        assert (pkt[IP].proto if family == 0x0800 else pkt[IPv6].nh) == proto


def test_a_backend_override_picks_its_own_encapsulation(gue_sim: Simulator) -> None:
    """[[vip]] encap is the default; [[vip.backend]] encap overrides it for that backend only."""
    seen: dict[str, set[int]] = {}
    for sport in range(42000, 42040):
        verdict, out = gue_sim.run(bytes(tcp4(dst=MIXED, sport=sport)))
        assert verdict == "XDP_TX"
        outer = Ether(out)[IP]
        seen.setdefault(str(outer.dst), set()).add(int(outer.proto))
    assert seen == {"10.0.3.1": {17}, "10.0.3.2": {4}}


def test_source_ports_spread_with_flows_and_stay_with_a_flow(gue_sim: Simulator) -> None:
    """One flow, one UDP source port (SYN and later packets); 64 flows use many ports (NIC RSS has something
    to spread)."""
    def port(frame: Packet) -> int:
        return int(Ether(gue_sim.run(bytes(frame))[1])[UDP].sport)

    ports = {port(tcp4(dst=GUE4, sport=s)) for s in range(43000, 43064)}
    assert len(ports) >= 60
    assert port(tcp4(dst=GUE4, sport=43000)) == port(tcp4(dst=GUE4, sport=43000, flags="A"))


def test_encap_follows_a_reload_and_established_flows_keep_their_backend() -> None:
    """encap is a backend-entry flag written by the change path: flipping a VIP from IPIP to GUE by reload
    moves no flow (the ring and the connection table are untouched) and changes how it travels at once."""
    def ipip_first(d: dict[str, Any]) -> None:
        gue_config(d)
        d["vip"][-4]["encap"] = "ipip"

    sim = Simulator(make_config(ipip_first))
    try:
        first = {s: Ether(sim.run(bytes(tcp4(dst=GUE4, sport=s)))[1])[IP] for s in range(44000, 44020)}
        assert {int(p.proto) for p in first.values()} == {4}
        report = sim.maps.apply(make_config(gue_config))
        assert report.backends_written == 2 and not report.ring_slots and not report.vips_added
        for s, before in first.items():
            out = Ether(sim.run(bytes(tcp4(dst=GUE4, sport=s, flags="A")))[1])[IP]
            assert out.proto == 17 and out.dst == before.dst
    finally:
        sim.close()


def test_decap_gives_back_the_clients_packet(gue_sim: Simulator) -> None:
    """The balancer's GUE output, run through decap.c on the chosen backend (same port), is the client's
    packet again, byte for byte, behind the balancer's Ethernet header: over IPv4 and IPv6, inner IPv4 and
    IPv6."""
    from edge_lb.dataplane import decap
    from edge_lb.dataplane.testrun import run_xdp

    backends = [ipaddress.ip_address(a) for a in (*GUE4_BACKENDS, *GUE6_BACKENDS, "fd00:2::4")]
    program = decap.load_for_test(backends, gue_port=PORT)
    try:
        for frame in (tcp4(dst=GUE4, sport=45000) / Raw(b"GET /"), tcp6(dst=GUE6, sport=45001),
                      tcp4(dst=GUE4IN6, sport=45002)):
            sent = bytes(frame)
            verdict, wire = gue_sim.run(sent)
            assert verdict == "XDP_TX"
            code, out = run_xdp(program.prog_fd, wire)
            assert code == 2  # XDP_PASS
            assert out[:12] == wire[:12] and out[12:] == sent[12:]
        assert decap.read_stats(program.bpf).gue == 3
    finally:
        program.close()
