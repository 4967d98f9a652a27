"""bpf/checkencap.c through BPF_PROG_TEST_RUN, beside the balancer whose pinned maps it reads: a tunnel
check's marked packet leaves wrapped toward the backend of its mark exactly as the balancer wraps a client's
packet of the same flow to that backend (the whole outer IP header equal, byte for byte); unmarked packets
and other marks leave untouched; a mark naming no backend is dropped and counted."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Packet

from edge_lb.config import Config
from edge_lb.dataplane.checkencap import CheckEncap, mark_of
from edge_lb.dataplane.desired import VipKey
from edge_lb.dataplane.loader import Dataplane, remove_pins
from edge_lb.dataplane.node import NodeMaps, link_for
from edge_lb.dataplane.testrun import run_tc, run_xdp

from .conftest import OWN_MAC, make_config, needs_root

pytestmark = [pytest.mark.root, needs_root]

TC_ACT_OK, TC_ACT_SHOT, XDP_TX = 0, 2, 3
NODE4, NODE6 = "192.0.2.2", "2001:db8::2"  # the LB node's own addresses: a check's source


class Pair:
    """The balancer and the encapsulator over one pinned instance (the encapsulator opens its pins)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.dp = Dataplane.load(config.dataplane, pin=True)
        self.maps = NodeMaps(self.dp.io, config, link_for(config.node, read_kernel=False), adopt=False)
        self.maps.apply(config)
        self.encap = CheckEncap.load(config.dataplane)

    def mark(self, vip: str, port: int, proto: int, backend: str) -> int:
        key = VipKey(ipaddress.ip_address(vip), port, proto)
        index = self.maps.backend_index(key, ipaddress.ip_address(backend))
        assert index is not None
        return mark_of(self.config.dataplane.check_mark_base, index)

    def close(self) -> None:
        self.encap.close()
        self.dp.close()
        remove_pins(self.config.dataplane.instance)


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    def gue_backends(data: dict[str, Any]) -> None:  # one GUE backend in an IPv4 and in an IPv6 VIP
        data["vip"][0]["backend"][2]["encap"] = "gue"
        data["vip"][3]["backend"][1]["encap"] = "gue"

    config = make_config(gue_backends)
    config = replace(config, dataplane=replace(config.dataplane, instance=f"tcheck{os.getpid()}"))
    p = Pair(config)
    yield p
    p.close()


def eth(**kw: object) -> Ether:
    return Ether(src="02:00:00:00:00:01", dst="00:00:de:ad:be:af", **kw)


def syn4(dst: str = "10.200.1.1", dport: int = 80, sport: int = 41000) -> Packet:
    return eth() / IP(src=NODE4, dst=dst, flags="DF", tos=0x10) / TCP(sport=sport, dport=dport, flags="S")


def syn6(dst: str = "fd00:200::1", dport: int = 443, sport: int = 41000) -> Packet:
    return eth() / IPv6(src=NODE6, dst=dst, tc=0x20) / TCP(sport=sport, dport=dport, flags="S")


def client_view(frame: Packet) -> bytes:
    """The same flow as a client's packet arriving at the LB (to its MAC): what the balancer would send."""
    return bytes(Ether(src="02:00:00:00:00:99", dst=OWN_MAC) / frame.payload)


def balancer_backend(out: bytes) -> str:
    outer = Ether(out).payload
    return str(outer.dst)


@pytest.mark.parametrize(("frame", "vip", "port", "ethertype", "outer"), [
    (syn4(), "10.200.1.1", 80, 0x0800, "IPIP"),
    (syn6(), "fd00:200::1", 443, 0x86DD, "IP6IP6"),
    (syn4("10.200.1.3"), "10.200.1.3", 80, 0x86DD, "4in6"),
])
def test_a_marked_check_is_wrapped_as_the_balancer_wraps_the_same_flow(pair: Pair, frame: Packet, vip: str,
                                                                      port: int, ethertype: int,
                                                                      outer: str) -> None:
    verdict, client_out = run_xdp(pair.dp.prog_fd, client_view(frame))
    assert verdict == XDP_TX
    backend = balancer_backend(client_out)  # the backend the ring gave this flow
    before = pair.encap.stats()
    verdict, out = run_tc(pair.encap.prog_fd, bytes(frame), pair.mark(vip, port, 6, backend))
    assert verdict == TC_ACT_OK, outer
    assert out[12:14] == ethertype.to_bytes(2, "big"), f"{outer}: the EtherType of the outer header"
    assert out[:12] == bytes(frame)[:12], "the MACs the kernel resolved are kept"
    assert out[14:] == client_out[14:], f"{outer}: outer header and inner packet equal to the balancer's"
    family = "CHECK_ENCAP_V4" if ethertype == 0x0800 else "CHECK_ENCAP_V6"
    assert pair.encap.stats()[family] == before[family] + 1


@pytest.mark.parametrize(("make", "vip", "port", "backend"), [
    (syn4, "10.200.1.1", 80, "10.0.0.3"), (syn6, "fd00:200::1", 443, "fd00:1::2")])
def test_a_gue_backend_gets_its_checks_in_gue_as_the_balancer_sends_its_clients(
        pair: Pair, make: Callable[..., Packet], vip: str, port: int, backend: str) -> None:
    """encap = "gue" on this backend (BACKEND_F_GUE in its slot): the check follows it, UDP to gue_port."""
    for sport in range(41000, 41200):  # a flow the ring gives to the GUE backend
        frame = make(sport=sport)
        verdict, client_out = run_xdp(pair.dp.prog_fd, client_view(frame))
        if verdict == XDP_TX and balancer_backend(client_out) == backend:
            break
    else:
        pytest.fail(f"no flow of 200 went to {backend}")
    verdict, out = run_tc(pair.encap.prog_fd, bytes(frame), pair.mark(vip, port, 6, backend))
    assert verdict == TC_ACT_OK
    assert out[14:] == client_out[14:], "outer IP, UDP (source port from the flow hash) and inner packet"
    udp = Ether(out).payload.payload
    assert isinstance(udp, UDP) and udp.dport == pair.config.dataplane.gue_port and udp.chksum == 0


def test_every_backend_of_a_vip_gets_its_own_tunnel(pair: Pair) -> None:
    for backend in ("10.0.0.1", "10.0.0.2"):
        verdict, out = run_tc(pair.encap.prog_fd, bytes(syn4()), pair.mark("10.200.1.1", 80, 6, backend))
        assert verdict == TC_ACT_OK and str(Ether(out).payload.dst) == backend
        assert bytes(Ether(out).payload.payload) == bytes(syn4().payload), "the inner packet untouched"


@pytest.mark.parametrize("mark", [0, 0x4C4FFFFF, 0x4D500001, 0x0C500001])
def test_unmarked_and_foreign_marks_leave_untouched(pair: Pair, mark: int) -> None:
    frame = bytes(eth() / IP(src=NODE4, dst="10.200.1.1") / UDP(sport=1, dport=53) / b"q")
    assert run_tc(pair.encap.prog_fd, frame, mark) == (TC_ACT_OK, frame)


def test_a_mark_naming_no_backend_or_not_ip_is_dropped_and_counted(pair: Pair) -> None:
    base = pair.config.dataplane.check_mark_base
    before = pair.encap.stats()
    assert run_tc(pair.encap.prog_fd, bytes(syn4()), base | 60)[0] == TC_ACT_SHOT, "an unused index"
    assert run_tc(pair.encap.prog_fd, bytes(syn4()), base)[0] == TC_ACT_SHOT, "index 0 is never a backend"
    arp = bytes(eth() / ARP(psrc=NODE4, pdst="10.200.1.1"))
    assert run_tc(pair.encap.prog_fd, arp, pair.mark("10.200.1.1", 80, 6, "10.0.0.1"))[0] == TC_ACT_SHOT
    after = pair.encap.stats()
    assert after["CHECK_DROP_NO_BACKEND"] == before["CHECK_DROP_NO_BACKEND"] + 2
    assert after["CHECK_DROP_NOT_IP"] == before["CHECK_DROP_NOT_IP"] + 1


def test_a_check_without_df_gets_a_varying_outer_id(pair: Pair) -> None:
    frame = bytes(eth() / IP(src=NODE4, dst="10.200.1.1") / UDP(sport=1, dport=80) / b"q")
    mark = pair.mark("10.200.1.1", 80, 6, "10.0.0.1")
    ids = {Ether(run_tc(pair.encap.prog_fd, frame, mark)[1]).payload.id for _ in range(8)}
    assert 0 not in ids and len(ids) > 1
