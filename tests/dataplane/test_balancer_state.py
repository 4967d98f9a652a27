"""Stateful data-plane behaviour: the connection table across ring changes, drains, ICMP, adoption."""

from __future__ import annotations

import os
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from scapy.layers.inet import ICMP, IP, TCP
from scapy.layers.inet6 import ICMPv6PacketTooBig, IPv6
from scapy.layers.l2 import Ether

from edge_lb import paths
from edge_lb.dataplane.loader import Dataplane, remove_pins
from edge_lb.dataplane.node import NodeMaps, link_for
from edge_lb.dataplane.simulate import Simulator
from edge_lb.dataplane.testrun import run_xdp

from .conftest import make_config, needs_root
from .test_balancer_fixtures import CLIENT4, CLIENT6, eth, tcp4, tcp6

pytestmark = [pytest.mark.root, needs_root]


def backend_of(sim: Simulator, frame: bytes) -> str:
    verdict, out = sim.run(frame)
    assert verdict == "XDP_TX"
    pkt = Ether(out)
    return str(pkt[IPv6].dst if IPv6 in pkt and pkt.type == 0x86DD else pkt[IP].dst)


def vip80(backends: list[dict[str, Any]]) -> Any:
    def mutate(d: dict[str, Any]) -> None:
        d["vip"][0]["backend"] = backends
    return mutate


def flows(n: int, start: int = 41000) -> list[int]:
    return list(range(start, start + n))


def test_established_flow_survives_ring_change(fresh_sim: Simulator) -> None:
    sim = fresh_sim
    before = {p: backend_of(sim, bytes(tcp4(sport=p))) for p in flows(200)}
    # Adding two backends moves ring slots; established flows (ACKs) must stay where they were.
    sim.reprogram(make_config(vip80([{"address": f"10.0.0.{i}"} for i in (1, 2, 3, 5, 6)])))
    after_ack = {p: backend_of(sim, bytes(tcp4(sport=p, flags="A"))) for p in flows(200)}
    assert after_ack == before
    # New SYNs consult the new ring: some land on the new backends.
    new = {backend_of(sim, bytes(tcp4(sport=p))) for p in flows(200, 50000)}
    assert new & {"10.0.0.5", "10.0.0.6"}


def test_syn_always_consults_the_ring(fresh_sim: Simulator) -> None:
    sim = fresh_sim
    ports = flows(300)
    first = {p: backend_of(sim, bytes(tcp4(sport=p))) for p in ports}
    sim.reprogram(make_config(vip80([{"address": "10.0.0.1"}, {"address": "10.0.0.2"}])))
    moved = [p for p in ports if first[p] == "10.0.0.3"]
    assert moved, "some flows must have been on 10.0.0.3"
    for p in moved:  # the SYN (e.g. a retransmit after the change) is re-balanced, not pinned
        assert backend_of(sim, bytes(tcp4(sport=p))) in {"10.0.0.1", "10.0.0.2"}


def test_drained_backend_keeps_flows_gets_no_new_ones(fresh_sim: Simulator) -> None:
    sim = fresh_sim
    ports = flows(300)
    first = {p: backend_of(sim, bytes(tcp4(sport=p))) for p in ports}
    on_3 = [p for p in ports if first[p] == "10.0.0.3"]
    assert on_3
    sim.reprogram(make_config(vip80([{"address": "10.0.0.1"}, {"address": "10.0.0.2"},
                                      {"address": "10.0.0.3", "weight": 0}])))
    for p in on_3:
        assert backend_of(sim, bytes(tcp4(sport=p, flags="A"))) == "10.0.0.3"
    fresh = Counter(backend_of(sim, bytes(tcp4(sport=p))) for p in flows(300, 60000))
    assert fresh["10.0.0.3"] == 0 and sum(fresh.values()) == 300


def test_removed_backend_flows_are_rehashed(fresh_sim: Simulator) -> None:
    sim = fresh_sim
    ports = flows(300)
    first = {p: backend_of(sim, bytes(tcp4(sport=p))) for p in ports}
    sim.reprogram(make_config(vip80([{"address": "10.0.0.1"}, {"address": "10.0.0.2"}])))
    for p in ports:  # its connection-table entries are bypassed: ACKs go to healthy backends
        got = backend_of(sim, bytes(tcp4(sport=p, flags="A")))
        assert got in {"10.0.0.1", "10.0.0.2"}
        if first[p] != "10.0.0.3":
            assert got == first[p]


def test_icmp_frag_needed_goes_to_the_flows_backend(fresh_sim: Simulator) -> None:
    sim = fresh_sim
    for port in flows(20):
        chosen = backend_of(sim, bytes(tcp4(sport=port)))
        # A router on the return path quotes the backend's reply (VIP -> client) in ICMP frag-needed.
        quoted = IP(src="10.200.1.1", dst=CLIENT4) / TCP(sport=80, dport=port, flags="SA")
        icmp = (eth() / IP(src="198.51.100.1", dst="10.200.1.1")
                / ICMP(type=3, code=4, nexthopmtu=1400) / quoted)
        assert backend_of(sim, bytes(icmp)) == chosen


def test_icmpv6_packet_too_big_goes_to_the_flows_backend(fresh_sim: Simulator) -> None:
    sim = fresh_sim
    for port in flows(20):
        chosen = backend_of(sim, bytes(tcp6(sport=port)))
        quoted = IPv6(src="fd00:200::1", dst=CLIENT6) / TCP(sport=443, dport=port, flags="SA")
        ptb = eth() / IPv6(src="2001:db8:ffff::1", dst="fd00:200::1") / ICMPv6PacketTooBig(mtu=1280) / quoted
        assert backend_of(sim, bytes(ptb)) == chosen


def test_two_nodes_choose_alike(sim: Simulator) -> None:
    """Every node with the same config picks the same backend, whatever order the config lists them in."""
    def reverse(d: dict[str, Any]) -> None:
        d["vip"][0]["backend"].reverse()
    other = Simulator(make_config(reverse))
    try:
        for p in flows(200, 30000):
            assert backend_of(other, bytes(tcp4(sport=p))) == backend_of(sim, bytes(tcp4(sport=p)))
    finally:
        other.close()


def test_outer_source_varies_with_the_flow(sim: Simulator) -> None:
    sources = {Ether(sim.run(bytes(tcp4(sport=p)))[1])[IP].src for p in flows(64, 20000)}
    assert len(sources) > 48  # RSS on the backend spreads by outer source


def test_per_vip_and_backend_counters(fresh_sim: Simulator) -> None:
    sim = fresh_sim
    frame = bytes(tcp4(sport=45000))
    for _ in range(5):
        sim.run(frame)
    vips = sim.dp.io.read_counters("vip_stats")
    backends = sim.dp.io.read_counters("backend_stats")
    ip_len = len(tcp4()[IP])
    assert (5, 5 * ip_len) in vips.values()
    assert (5, 5 * ip_len) in backends.values()
    sim.dp.io.zero_counters("backend_stats", list(backends))
    sim.dp.io.zero_counters("vip_stats", list(vips))
    assert sim.dp.io.read_counters("backend_stats") == {} and sim.dp.io.read_counters("vip_stats") == {}


def test_reload_adopts_pinned_maps() -> None:
    """A second load with the same instance name adopts the maps: the connection table survives."""
    instance = f"t{uuid.uuid4().hex[:10]}"

    def named(d: dict[str, Any]) -> None:
        d["dataplane"]["instance"] = instance

    cfg = make_config(named)
    link = link_for(cfg.node, read_kernel=False)
    first = Dataplane.load(cfg.dataplane, pin=True)
    try:
        NodeMaps(first.io, cfg, link, adopt=True).apply(cfg)
        assert (paths.pins(instance) / "conn_table").exists()
        ports = flows(100)
        chosen = {}
        for p in ports:
            _verdict, out = run_xdp(first.prog_fd, bytes(tcp4(sport=p)))
            chosen[p] = Ether(out)[IP].dst
        first.close()
        # The "restarted" node comes up with a changed config (one backend more): ring slots move,
        # but established flows continue from the adopted connection table.
        cfg2 = make_config(lambda d: (named(d), vip80([{"address": f"10.0.0.{i}"} for i in (1, 2, 3, 7)])(d)))
        second = Dataplane.load(cfg2.dataplane, pin=True)
        try:
            report = NodeMaps(second.io, cfg2, link, adopt=True).apply(cfg2)
            assert 0 < sum(report.ring_slots.values()) < cfg2.dataplane.ring_size  # a diff, not a rewrite
            for p in ports:
                _verdict, out = run_xdp(second.prog_fd, bytes(tcp4(sport=p, flags="A")))
                assert Ether(out)[IP].dst == chosen[p]
        finally:
            second.close()
    finally:
        remove_pins(instance)
    assert not paths.pins(instance).exists()


def test_conn_entry_never_reaches_another_vips_backend(fresh_sim: Simulator) -> None:
    """A removed backend's index, reused by another VIP's backend, must not catch the old flows."""
    sim = fresh_sim
    ports = flows(300)
    first = {p: backend_of(sim, bytes(tcp4(sport=p))) for p in ports}
    on_3 = [p for p in ports if first[p] == "10.0.0.3"]
    assert on_3
    sim.reprogram(make_config(vip80([{"address": "10.0.0.1"}, {"address": "10.0.0.2"}])))

    def db_gets_new_backend(d: dict[str, Any]) -> None:
        vip80([{"address": "10.0.0.1"}, {"address": "10.0.0.2"}])(d)
        d["vip"][2]["backend"].append({"address": "10.0.0.99"})  # takes the freed index
    sim.reprogram(make_config(db_gets_new_backend))
    for p in on_3:
        assert backend_of(sim, bytes(tcp4(sport=p, flags="A"))) in {"10.0.0.1", "10.0.0.2"}


def test_outer_ipv4_id_varies_when_df_is_clear(sim: Simulator) -> None:
    """RFC 6864: a fragmentable outer header needs an ID that varies; DF set (atomic) may keep 0."""
    frame = bytes(tcp4(sport=46000, flags="A") / b"x")  # scapy leaves DF clear
    ids = [Ether(sim.run(frame)[1])[IP].id for _ in range(64)]
    assert 0 not in ids and len(set(ids)) > 48
    df = tcp4(sport=46001, flags="A")
    df[IP].flags = "DF"
    out = Ether(sim.run(bytes(df))[1])[IP]
    assert out.flags == 2 and out.id == 0


def test_extension_headers_keep_the_flow(fresh_sim: Simulator) -> None:
    """The flow key comes from the real TCP header behind IPv6 extension headers: same backend as without."""
    from scapy.layers.inet6 import IPv6ExtHdrDestOpt, IPv6ExtHdrHopByHop

    sim = fresh_sim
    for port in flows(50, 47000):
        chosen = backend_of(sim, bytes(tcp6(sport=port)))
        ext = (eth() / IPv6(src=CLIENT6, dst="fd00:200::1") / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt()
               / TCP(sport=port, dport=443, flags="A"))
        assert backend_of(sim, bytes(ext)) == chosen


def test_too_big_replies_switched_off() -> None:
    """[dataplane] icmp_too_big_rate = 0: a too-big packet is dropped and counted, the client not told."""
    from scapy.packet import Raw

    sim = Simulator(make_config(lambda d: d["dataplane"].update(icmp_too_big_rate=0)))
    try:
        verdict, _ = sim.run(bytes(tcp4(flags="A", sport=48000) / Raw(b"x" * 1441)))
        assert verdict == "XDP_DROP"
    finally:
        sim.close()


def test_too_big_replies_are_rate_limited_per_cpu() -> None:
    """At most icmp_too_big_rate replies per CPU per second; the rest are dropped and counted."""
    from scapy.packet import Raw

    from edge_lb.dataplane.counters import reason_names

    sim = Simulator(make_config(lambda d: d["dataplane"].update(icmp_too_big_rate=3)))
    try:
        pinned_cpu = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {min(pinned_cpu)})  # one CPU: one rate-limit window
        try:
            big = [bytes(tcp4(flags="A", sport=48100 + i) / Raw(b"x" * 1441)) for i in range(8)]
            verdicts = [sim.run(frame)[0] for frame in big]
        finally:
            os.sched_setaffinity(0, pinned_cpu)
        assert verdicts == ["XDP_TX"] * 3 + ["XDP_DROP"] * 5
        names = reason_names()
        got = {names[i]: pk for i, (pk, _) in sim.dp.io.read_counters("reason_stats").items()}
        assert got["STAT_TX_TOO_BIG_REPLY"] == 3 and got["STAT_TOO_BIG_RATE_LIMITED"] == 5
        assert got["STAT_DROP_TOO_BIG"] == 8
    finally:
        sim.close()


def test_adopted_counters_grow_with_the_enum(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A program with more reasons than the pinned reason_stats holds (an upgrade) gets a reason_stats of
    its size; bcc alone would adopt the short one and never count the new reasons. The conn table is kept."""
    import shutil

    from edge_lb.dataplane import bpfsys, loader

    instance = f"t{uuid.uuid4().hex[:10]}"
    cfg = make_config(lambda d: d["dataplane"].update(instance=instance))
    newer = tmp_path / "bpf"
    shutil.copytree(loader.BPF_DIR, newer)
    consts = newer / "balancer_consts.h"
    consts.write_text(consts.read_text().replace("  STAT_MAX\n", "  STAT_NEWER_REASON,\n  STAT_MAX\n"))
    try:
        first = Dataplane.load(cfg.dataplane, pin=True)
        stats = paths.pins(instance) / "reason_stats"
        short = bpfsys.pinned_map_max_entries(stats)
        conn = bpfsys.pinned_map_info(paths.pins(instance) / "conn_table").id
        first.close()
        monkeypatch.setattr(loader, "BPF_DIR", newer)
        second = Dataplane.load(cfg.dataplane, pin=True)
        try:
            assert bpfsys.pinned_map_max_entries(stats) == short + 1
            assert bpfsys.pinned_map_info(paths.pins(instance) / "conn_table").id == conn, "adopted, not made"
        finally:
            second.close()
    finally:
        remove_pins(instance)


def test_icmp_echo_switch_per_address(fresh_sim: Simulator) -> None:
    """icmp_echo = false on one VIP turns echo off for its whole address (both VIPs on 10.200.1.1), live, and
    leaves the other addresses answering; switching it on again answers again."""
    sim = fresh_sim
    ping = {a: bytes(eth() / IP(src=CLIENT4, dst=a) / ICMP()) for a in ("10.200.1.1", "10.200.1.2")}
    assert [sim.run(f)[0] for f in ping.values()] == ["XDP_TX", "XDP_TX"]
    sim.reprogram(make_config(lambda d: d["vip"][0].update(icmp_echo=False)))
    assert [sim.run(f)[0] for f in ping.values()] == ["XDP_PASS", "XDP_TX"]
    assert backend_of(sim, bytes(tcp4(sport=49000))) in {"10.0.0.1", "10.0.0.2", "10.0.0.3"}, "still balanced"
    sim.reprogram(make_config())
    assert [sim.run(f)[0] for f in ping.values()] == ["XDP_TX", "XDP_TX"]


def test_hash_key_flips_by_reload(fresh_sim: Simulator) -> None:
    """hash = "source" on 10.200.1.1:80 by a reload: new flows of one client all take one backend, while the
    flows it had (ACKs, in the connection table under their full flow) keep theirs; back to "flow", new flows
    spread again and the source-hashed ones stay."""
    sim = fresh_sim
    ports = flows(64)
    before = {p: backend_of(sim, bytes(tcp4(sport=p))) for p in ports}
    assert len(set(before.values())) == 3, "flow hashing spreads one client's flows"
    sim.reprogram(make_config(lambda d: d["vip"][0].update(hash="source")))
    assert {p: backend_of(sim, bytes(tcp4(sport=p, flags="A"))) for p in ports} == before, "established stay"
    fresh = {p: backend_of(sim, bytes(tcp4(sport=p))) for p in flows(64, 50000)}
    assert len(set(fresh.values())) == 1, "one client, one backend"
    # Weights change: established source-hashed flows keep their backend too (the table, not the hash).
    sim.reprogram(make_config(lambda d: d["vip"][0].update(
        hash="source", backend=[{"address": "10.0.0.1"}, {"address": "10.0.0.2"}, {"address": "10.0.0.3"},
                                {"address": "10.0.0.5", "weight": 5}])))
    assert {p: backend_of(sim, bytes(tcp4(sport=p, flags="A"))) for p in fresh} == fresh
    sim.reprogram(make_config())
    assert {p: backend_of(sim, bytes(tcp4(sport=p, flags="A"))) for p in fresh} == fresh
    assert len({backend_of(sim, bytes(tcp4(sport=p))) for p in flows(64, 60000)}) == 3, "spread again"
