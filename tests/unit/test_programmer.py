"""The reconciler against the in-memory map twin: each change yields exactly the expected writes."""

from __future__ import annotations

import copy
import ipaddress
import pickle
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from edge_lb.config import Config, parse_config
from edge_lb.dataplane import maglev
from edge_lb.dataplane.desired import (
    VIP_FILTER_BITS,
    Allocator,
    VipKey,
    filter_bucket,
    filter_words,
    ring_for,
)
from edge_lb.dataplane.mapio import FakeMapIO
from edge_lb.dataplane.node import Link, NodeMaps
from edge_lb.dataplane.programmer import ring_changes

RING = 1009
LINK = Link("02:00:00:00:00:01", "02:00:00:00:00:02", 1500)
BASE: dict[str, Any] = {
    "node": {"interface": "eth0"},
    "dataplane": {"ring_size": RING, "max_vips": 4, "max_backends": 32},
    "vip": [{"address": "10.200.1.1", "port": 80, "protocol": "tcp",
             "backend": [{"address": f"10.0.0.{i}"} for i in (1, 2, 3)]}],
}


def cfg(mutate: Any = None) -> Config:
    data = copy.deepcopy(BASE)
    if mutate:
        mutate(data)
    return parse_config(data)


def with_backends(*last_octets: int, weights: dict[int, int] | None = None) -> Config:
    weights = weights or {}
    return cfg(lambda d: d["vip"][0].update(
        backend=[{"address": f"10.0.0.{i}", "weight": weights.get(i, 1)} for i in last_octets]))


def expected_ring(octets: dict[int, int]) -> list[bytes | None]:
    members = [maglev.Member(ipaddress.ip_address(f"10.0.0.{i}").packed, w) for i, w in octets.items()]
    return maglev.build_table(members, RING)


@pytest.fixture
def node() -> tuple[FakeMapIO, NodeMaps]:
    io = FakeMapIO(ring_size=RING)
    maps = NodeMaps(io, cfg(), LINK, adopt=False)
    maps.apply(cfg())
    return io, maps


def test_first_apply_writes_whole_ring_in_one_batch(node: tuple[FakeMapIO, NodeMaps]) -> None:
    io, _ = node
    assert io.ring_batches == [(0, RING)]
    assert set(io.backends) == {1, 2, 3} and len(io.vips) == 1
    assert io.ctl is not None and io.ctl.mtu == 1500


def test_same_config_twice_writes_nothing(node: tuple[FakeMapIO, NodeMaps]) -> None:
    io, maps = node
    report = maps.apply(cfg())
    assert not report.changed and io.ring_batches == [(0, RING)]


@pytest.mark.parametrize(("change", "octets"), [
    ("remove one", {1: 1, 2: 1}),
    ("add one", {1: 1, 2: 1, 3: 1, 4: 1}),
    ("drain one", {1: 1, 2: 1, 3: 0}),
    ("reweight one", {1: 1, 2: 2, 3: 1}),
])
def test_change_writes_exactly_the_slot_diff(node: tuple[FakeMapIO, NodeMaps], change: str,
                                             octets: dict[int, int]) -> None:
    io, maps = node
    old = expected_ring({1: 1, 2: 1, 3: 1})
    new = expected_ring(octets)
    report = maps.apply(with_backends(*octets, weights=octets))
    assert report.ring_slots == {0: len(maglev.diff(old, new))}, change
    assert io.ring_batches[-1] == (0, len(maglev.diff(old, new)))
    index_of = {s.address.packed: i for i, s in io.backends.items()}
    assert [index_of.get(k, 0) if k else 0 for k in new] == io.rings[0].tolist()


def test_removed_backend_entry_is_cleared_and_numbers_are_stable(node: tuple[FakeMapIO, NodeMaps]) -> None:
    io, maps = node
    before = dict(io.backends)
    maps.apply(with_backends(1, 2))
    assert set(io.backends) == {1, 2} and io.backends[1] == before[1] and io.backends[2] == before[2]
    maps.apply(with_backends(1, 2, 5))
    assert io.backends[3].address == ipaddress.ip_address("10.0.0.5")  # lowest free index reused


def test_removed_vip_is_deleted_and_its_ring_zeroed(node: tuple[FakeMapIO, NodeMaps]) -> None:
    io, maps = node
    maps.apply(cfg(lambda d: d.update(vip=[])))
    assert io.vips == {} and io.vip_addrs == {} and io.backends == {}
    assert set(io.rings[0]) == {0}


def u32(*values: int) -> np.ndarray[Any, np.dtype[np.uint32]]:
    return np.array(values, dtype=np.uint32)


@pytest.mark.parametrize(("case", "old", "new", "slots", "values"), [
    ("same ring", (1, 2, 3), (1, 2, 3), [], []),
    ("one slot", (1, 2, 3), (1, 4, 3), [1], [4]),
    ("first and last", (1, 2, 3), (5, 2, 0), [0, 2], [5, 0]),
    ("every slot, to empty", (1, 2, 3), (0, 0, 0), [0, 1, 2], [0, 0, 0]),
    ("from empty", (0, 0, 0), (7, 0, 7), [0, 2], [7, 7]),
    ("large indexes", (0, 1 << 31), (0xFFFFFFFF, 1 << 31), [0], [0xFFFFFFFF]),
])
def test_ring_changes_lists_only_differences(case: str, old: tuple[int, ...], new: tuple[int, ...],
                                             slots: list[int], values: list[int]) -> None:
    got_slots, got_values = ring_changes(u32(*old), u32(*new))
    assert (got_slots.tolist(), got_values.tolist()) == (slots, values), case
    assert got_values.dtype == np.uint32, "the map's value type, written from the buffer as it is"


def test_ring_changes_refuses_rings_of_different_sizes() -> None:
    with pytest.raises(ValueError, match="rings of 2 and 3 slots"):
        ring_changes(u32(1, 2), u32(1, 2, 3))


@pytest.mark.parametrize(("case", "slots", "values", "ring"), [
    ("nothing", [], [], [0, 0, 0, 0, 0]),
    ("scattered", [4, 0, 2], [9, 8, 7], [8, 0, 7, 0, 9]),
    ("every slot", [0, 1, 2, 3, 4], [1, 2, 3, 4, 5], [1, 2, 3, 4, 5]),
])
def test_fake_maps_write_ring_slots_from_the_arrays(case: str, slots: list[int], values: list[int],
                                                     ring: list[int]) -> None:
    io = FakeMapIO(ring_size=5)
    io.write_ring_slots(3, np.array(slots, dtype=np.intp), u32(*values))
    assert io.read_ring(3).tolist() == ring, case
    assert io.ring_batches == [(3, len(slots))]
    io.read_ring(3)[:] = 6
    assert io.read_ring(3).tolist() == ring, "read_ring hands out a copy, never the map itself"
    assert io.read_ring(2).tolist() == [0] * 5, "a ring never written holds zeros"


def test_rings_are_read_only_and_shared(node: tuple[FakeMapIO, NodeMaps]) -> None:
    """The ring cache, the programmer's tables and readers share one array: nobody can write into it."""
    _, maps = node
    vip = VipKey.of(cfg().vips[0])
    ring = maps.ring(vip)
    assert ring.dtype == np.uint32 and ring.size == RING
    with pytest.raises(ValueError, match="read-only"):
        ring[0] = 3
    assert maps.ring(vip) is ring and maps.programmer.rings[0] is ring
    assert maps.apply(cfg()).ring_slots == {}, "the same cached ring: nothing compared, nothing written"
    assert maps.ring(vip) is ring
    assert maps.slot_counts(vip) == {i: ring.tolist().count(i) for i in (1, 2, 3)}


def test_a_vip_with_no_backend_up_has_an_all_zero_ring() -> None:
    vip = with_backends(1, 2).vips[0]
    indexes = {b.address: n for n, b in enumerate(vip.backends, start=5)}
    ring = ring_for(vip, indexes, RING, {a: False for a in indexes})
    assert ring.dtype == np.uint32 and ring.tolist() == [0] * RING
    assert set(ring_for(vip, indexes, RING).tolist()) == {5, 6}, "owner indexes mapped to these backends"


def test_the_allocator_hands_out_the_lowest_free_number() -> None:
    """Whatever changed its tables in between: its own numbers, retain() freeing some, the maps adopted."""
    ip = ipaddress.ip_address
    alloc = Allocator(max_vips=4, max_backends=8)
    assert [alloc.backend(0, ip(f"10.0.0.{i}")) for i in (1, 2, 3, 4)] == [1, 2, 3, 4]
    assert alloc.backend(0, ip("10.0.0.2")) == 2, "a pair keeps its number"
    alloc.retain([], [(0, ip("10.0.0.1")), (0, ip("10.0.0.4"))])  # frees 2 and 3
    assert [alloc.backend(1, ip(f"10.0.0.{i}")) for i in (5, 6, 7)] == [2, 3, 5]
    alloc.backend_idx.update({(2, ip("10.0.0.8")): 6})  # as adopting the maps does
    assert alloc.backend(2, ip("10.0.0.9")) == 7
    with pytest.raises(ValueError, match="no free number below 8"):
        alloc.backend(2, ip("10.0.0.10"))
    assert [alloc.vip_num(VipKey(ip(f"10.200.0.{i}"), 80, 6)) for i in (1, 2)] == [0, 1]


@pytest.mark.parametrize("copy_of", [copy.copy, copy.deepcopy, lambda k: pickle.loads(pickle.dumps(k)),
                                     lambda k: replace(k, port=k.port)])
def test_a_vip_key_hashes_once_and_its_copies_hash_alike(copy_of: Any) -> None:
    key = VipKey(ipaddress.ip_address("fd00:200::1"), 443, 6)
    other = copy_of(key)
    assert other == key and hash(other) == hash(key) == hash((key.address, 443, 6))
    assert {key: 1}[other] == 1 and repr(other) == repr(key)
    assert replace(key, port=80) != key and hash(replace(key, port=80)) == hash((key.address, 80, 6))


def test_swap_at_capacity_fits() -> None:
    """max_backends=4 leaves 3 usable indexes: replacing one backend must reuse the freed index."""
    def small(d: dict[str, Any]) -> None:
        d["dataplane"]["max_backends"] = 4
    io = FakeMapIO(ring_size=RING)
    maps = NodeMaps(io, cfg(small), LINK, adopt=False)
    maps.apply(cfg(small))
    maps.apply(cfg(lambda d: (small(d), d["vip"][0].update(
        backend=[{"address": a} for a in ("10.0.0.1", "10.0.0.2", "10.0.0.9")]))))
    assert {str(s.address) for s in io.backends.values()} == {"10.0.0.1", "10.0.0.2", "10.0.0.9"}


class FailingIO(FakeMapIO):
    fail = False

    def delete_vips(self, keys: Any) -> None:
        if self.fail:
            raise RuntimeError("map write failed")
        super().delete_vips(keys)


def test_failed_apply_keeps_numbering() -> None:
    two = cfg(lambda d: d["vip"].append({"address": "10.200.1.9", "port": 80, "protocol": "tcp",
                                         "backend": [{"address": "10.0.0.7"}]}))
    io = FailingIO(ring_size=RING)
    maps = NodeMaps(io, two, LINK, adopt=False)
    maps.apply(two)
    before = (dict(maps.alloc.vip_nums), dict(maps.alloc.backend_idx))
    io.fail = True
    with pytest.raises(RuntimeError):
        maps.apply(cfg())  # removes the second VIP; the delete fails
    assert (maps.alloc.vip_nums, maps.alloc.backend_idx) == before
    io.fail = False
    assert not maps.apply(two).vips_added  # re-applying the running config renumbers nothing


def test_adopt_reads_vip_addresses() -> None:
    io = FakeMapIO(ring_size=RING)
    two = cfg(lambda d: d["vip"].append({"address": "10.200.1.9", "port": 80, "protocol": "tcp",
                                         "backend": []}))
    NodeMaps(io, two, LINK, adopt=False).apply(two)
    NodeMaps(io, cfg(), LINK, adopt=True).apply(cfg())  # a restart with one VIP address fewer
    assert set(map(str, io.vip_addrs)) == {"10.200.1.1"}


def test_a_reused_backend_index_and_vip_number_start_counting_from_zero(
        node: tuple[FakeMapIO, NodeMaps]) -> None:
    io, maps = node
    index = maps.alloc.backend_idx[(0, ipaddress.ip_address("10.0.0.2"))]
    io.counters = {"backend_stats": {index: (50, 5000), 1: (7, 700)}, "vip_stats": {0: (57, 5700)}}
    maps.apply(with_backends(1, 3))
    maps.apply(with_backends(1, 3, 4))  # 10.0.0.4 takes the freed index
    assert maps.alloc.backend_idx[(0, ipaddress.ip_address("10.0.0.4"))] == index
    assert index not in io.counters["backend_stats"], "the new backend does not inherit the old one's traffic"
    assert io.counters["backend_stats"][1] == (7, 700), "a kept backend keeps its counters"
    maps.apply(cfg(lambda d: d.update(vip=[])))
    maps.apply(cfg(lambda d: d["vip"][0].update(port=443)))  # another VIP takes number 0
    assert 0 not in io.counters["vip_stats"]


def test_numbers_freed_and_taken_in_one_apply_start_counting_from_zero(
        node: tuple[FakeMapIO, NodeMaps]) -> None:
    """One reload swaps a VIP and a backend for new ones: they take the freed numbers in the same apply."""
    io, maps = node
    index = maps.alloc.backend_idx[(0, ipaddress.ip_address("10.0.0.3"))]
    io.counters = {"backend_stats": {index: (50, 5000), 1: (7, 700)}, "vip_stats": {0: (57, 5700)}}
    maps.apply(with_backends(1, 2, 4))  # 10.0.0.4 replaces 10.0.0.3 in one reload
    assert maps.alloc.backend_idx[(0, ipaddress.ip_address("10.0.0.4"))] == index
    assert index not in io.counters["backend_stats"]
    assert io.counters["backend_stats"][1] == (7, 700)
    maps.apply(cfg(lambda d: d["vip"][0].update(port=443)))  # the old VIP removed in the same apply
    assert maps.programmer.vips[VipKey(ipaddress.ip_address("10.200.1.1"), 443, 6)] == 0
    assert 0 not in io.counters["vip_stats"]


def test_a_number_new_to_us_is_diffed_against_the_map_not_zeros() -> None:
    """A crash between a VIP's delete and its ring's zeroing leaves a ring under a free number: the VIP
    that gets the number next must overwrite every slot that differs, not only those that differ from 0."""
    io = FakeMapIO(ring_size=RING)
    io.rings[0] = np.full(RING, 7, dtype=np.uint32)  # left behind; no VIP entry names number 0
    maps = NodeMaps(io, cfg(), LINK, adopt=True)
    vip = cfg().vips[0]
    waiting = {(VipKey.of(vip), b.address): False for b in vip.backends}
    maps.apply(cfg(), waiting)  # its backends still wait for their checks: an empty ring
    assert set(io.rings[0]) == {0}
    maps.apply(cfg())
    assert set(io.rings[0]) == {1, 2, 3}


def test_a_ring_batch_that_failed_half_way_is_rewritten_by_the_next_apply() -> None:
    """A batch update may apply part of its slots before it fails: the rollback must not trust its cache."""

    class HalfWrites(FakeMapIO):
        fail_next = False
        reads = 0

        def read_ring(self, vip_num: int) -> Any:
            self.reads += 1
            return super().read_ring(vip_num)

        def write_ring_slots(self, vip_num: int, slots: Any, values: Any) -> None:
            if self.fail_next:
                self.fail_next = False
                half = len(slots) // 2
                super().write_ring_slots(vip_num, slots[:half], values[:half])
                raise OSError("E2BIG half-way")
            super().write_ring_slots(vip_num, slots, values)

    io = HalfWrites(ring_size=RING)
    maps = NodeMaps(io, cfg(), LINK, adopt=False)
    maps.apply(cfg())
    before = io.rings[0].copy()
    io.fail_next = True
    with pytest.raises(OSError):
        maps.apply(with_backends(1, 2))
    half_done = io.rings[0].copy()
    assert not np.array_equal(half_done, before), "the failed batch left part of the new ring behind"
    reads = io.reads
    report = maps.apply(cfg())  # the rollback
    assert io.reads == reads + 1, "the next apply reads the ring from the map"
    assert np.array_equal(io.rings[0], before)
    assert report.ring_slots == {0: int(np.count_nonzero(half_done != before))}, "exactly what the map lacked"


def test_vips_with_the_same_pool_share_one_maglev_build(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pool behind many VIPs: one build per distinct member set, and each VIP's ring is still its own."""
    pool = [{"address": f"10.0.0.{i}"} for i in (1, 2, 3)]
    many = parse_config({**BASE, "dataplane": {**BASE["dataplane"], "max_vips": 8},
                         "vip": [{"address": f"10.200.1.{n}", "port": 80, "protocol": "tcp", "backend": pool}
                                 for n in range(1, 7)]})
    builds: list[int] = []
    real = maglev.owner_table
    monkeypatch.setattr(maglev, "owner_table", lambda members, size: builds.append(1) or real(members, size))
    io = FakeMapIO(ring_size=RING)
    maps = NodeMaps(io, many, LINK, adopt=False)
    maps.apply(many)
    assert len(builds) == 1
    for vip in many.vips:
        num = maps.programmer.vips[VipKey.of(vip)]
        indexes = {b.address: maps.alloc.backend_idx[(num, b.address)] for b in vip.backends}
        assert np.array_equal(io.rings[num], ring_for(vip, indexes, RING)), "each ring names its own backends"
    builds.clear()
    dead = ipaddress.ip_address("10.0.0.2")
    maps.apply(many, {(VipKey.of(v), dead): False for v in many.vips})
    assert len(builds) == 1, "a backend of the pool died: one more build serves all six VIPs"


def test_the_vip_prefilter_never_hides_a_vip() -> None:
    """Its bits go in before the VIPs they cover and come out after them; adopting reads them back."""
    ops: list[str] = []

    class Logged(FakeMapIO):
        def put_vips(self, vips: Any, flags: Any) -> None:
            ops.append("put_vips")
            super().put_vips(vips, flags)

        def delete_vips(self, keys: Any) -> None:
            ops.append("delete_vips")
            super().delete_vips(keys)

        def write_filter(self, words: Any) -> None:
            ops.append("filter+" if all(w & self.filter.get(i, 0) == self.filter.get(i, 0)
                                        for i, w in words.items()) else "filter-")
            super().write_filter(words)

    io = Logged(ring_size=RING)
    maps = NodeMaps(io, cfg(), LINK, adopt=False)
    maps.apply(cfg())
    assert ops == ["filter+", "put_vips"]
    assert io.filter == filter_words([ipaddress.ip_address("10.200.1.1")])
    moved = cfg(lambda d: d["vip"][0].update(address="10.200.9.9"))
    ops.clear()
    maps.apply(moved)
    assert ops == ["filter+", "put_vips", "delete_vips", "filter-"]
    assert io.filter == filter_words([ipaddress.ip_address("10.200.9.9")])
    ops.clear()
    NodeMaps(io, moved, LINK, adopt=True).apply(moved)
    assert ops == [], "a restarted supervisor adopts the prefilter as it is"


@pytest.mark.parametrize("address", ["10.200.1.1", "0.0.0.0", "255.255.255.255", "fd00:200::1", "::",
                                     "2001:db8::10"])
def test_prefilter_buckets_are_in_range_and_fold_the_whole_address(address: str) -> None:
    ip = ipaddress.ip_address(address)
    bucket = filter_bucket(ip)
    assert 0 <= bucket < VIP_FILTER_BITS
    assert filter_words([ip]) == {bucket >> 5: 1 << (bucket & 31)}
    if ip.version == 6 and int(ip):
        other = ipaddress.ip_address(int(ip) ^ (1 << 100))  # a bit in the second word
        assert filter_bucket(other) != bucket or other == ip


def test_a_prefilter_batch_that_failed_half_way_cannot_hide_a_vip_later() -> None:
    """After a failed filter write the programmer trusts the map again, so the next apply sets every bit."""

    class HalfFilter(FakeMapIO):
        fail_next = False

        def write_filter(self, words: Any) -> None:
            if self.fail_next:
                self.fail_next = False
                super().write_filter(dict(list(words.items())[: len(words) // 2]))
                raise OSError("E2BIG half-way")
            super().write_filter(words)

    io = HalfFilter(ring_size=RING)
    maps = NodeMaps(io, cfg(), LINK, adopt=False)
    extra = ["10.200.7.7", "10.200.8.8"]  # their bits sit in two different words
    three = cfg(lambda d: d["vip"].extend({**d["vip"][0], "address": a} for a in extra))
    maps.apply(three)
    io.fail_next = True  # a reload removing both: its final clearing write fails after one of two words
    with pytest.raises(OSError):
        maps.apply(cfg())
    maps.apply(three)  # the rollback puts both back
    want = filter_words(ipaddress.ip_address(a) for a in ["10.200.1.1", *extra])
    assert io.filter == want, "every VIP's bit is in the map again"


def test_hash_key_is_a_vip_value_rewrite(node: tuple[FakeMapIO, NodeMaps]) -> None:
    """[[vip]] hash = "source" sets VIP_F_HASH_SOURCE in the VIP's value: a reload rewrites that one entry
    (same number, no ring slot, no backend), and back; a restarted supervisor adopts the flag as it is."""
    from edge_lb.dataplane.desired import VIP_F_HASH_SOURCE

    io, maps = node
    key = VipKey(ipaddress.ip_address("10.200.1.1"), 80, 6)
    assert cfg().vips[0].hash == "flow" and io.vip_flags == {key: 0}
    source = cfg(lambda d: d["vip"][0].update(hash="source"))
    num = io.vips[key]
    report = maps.apply(source)
    assert (report.vips_rewritten, report.vips_added) == (1, 0)
    assert not report.ring_slots and not report.backends_written
    assert report.changed
    assert io.vips[key] == num and io.vip_flags == {key: VIP_F_HASH_SOURCE}
    assert not maps.apply(source).changed
    assert not NodeMaps(io, source, LINK, adopt=True).apply(source).changed, "adopted with its flag"
    report = maps.apply(cfg())
    assert report.vips_rewritten == 1 and io.vip_flags == {key: 0}


def test_encap_is_a_backend_entry_rewrite(node: tuple[FakeMapIO, NodeMaps]) -> None:
    """[[vip]] encap / [[vip.backend]] encap: carried as BackendSlot.gue (BACKEND_F_GUE) by the change path.
    A reload that switches it rewrites those backend entries only (same indexes, no ring slot, no VIP); a
    restarted supervisor adopts it as it is."""
    io, maps = node
    indexes = dict(io.backends)
    assert not any(s.gue for s in io.backends.values())
    gue = cfg(lambda d: d["vip"][0].update(encap="gue"))
    report = maps.apply(gue)
    assert report.backends_written == 3 and not report.ring_slots and not report.vips_added
    assert {i: s.gue for i, s in io.backends.items()} == {i: True for i in indexes}
    assert not maps.apply(gue).changed
    assert not NodeMaps(io, gue, LINK, adopt=True).apply(gue).changed, "adopted with its flag"

    def one_back(d: dict[str, Any]) -> None:
        d["vip"][0]["encap"] = "gue"
        d["vip"][0]["backend"][1]["encap"] = "ipip"

    report = maps.apply(cfg(one_back))
    assert report.backends_written == 1
    assert sorted(str(s.address) for s in io.backends.values() if not s.gue) == ["10.0.0.2"]


def test_conntrack_false_is_a_vip_flag_beside_the_hash(node: tuple[FakeMapIO, NodeMaps]) -> None:
    """[[vip]] conntrack = false sets VIP_F_NO_CONNTRACK in the VIP's value (with hash = "source" both bits),
    rewritten live by a reload like the hash key, and cleared again."""
    from edge_lb.dataplane.desired import VIP_F_HASH_SOURCE, VIP_F_NO_CONNTRACK

    io, maps = node
    key = VipKey(ipaddress.ip_address("10.200.1.1"), 80, 6)
    assert cfg().vips[0].conntrack and io.vip_flags == {key: 0}
    report = maps.apply(cfg(lambda d: d["vip"][0].update(conntrack=False)))
    assert report.vips_rewritten == 1 and not report.ring_slots
    assert io.vip_flags == {key: VIP_F_NO_CONNTRACK}
    maps.apply(cfg(lambda d: d["vip"][0].update(conntrack=False, hash="source")))
    assert io.vip_flags == {key: VIP_F_NO_CONNTRACK | VIP_F_HASH_SOURCE}
    assert maps.apply(cfg()).vips_rewritten == 1 and io.vip_flags == {key: 0}


def test_new_flow_rate_is_written_into_ctl_by_every_apply(node: tuple[FakeMapIO, NodeMaps]) -> None:
    """The flood guard's rate: by default a CPU's share of the connection table (conn_table_size / possible
    CPUs) per FLOW_TURNOVER_S seconds; [dataplane] new_flow_rate_limit overrides it, and an apply (a reload)
    writes it into ctl with the rest of the node settings."""
    from edge_lb.dataplane.bpfsys import possible_cpus
    from edge_lb.dataplane.desired import FLOW_TURNOVER_S, new_flow_rate

    io, maps = node
    size = cfg().dataplane.conn_table_size
    assert io.ctl is not None and io.ctl.new_flow_rate == size // (possible_cpus() * FLOW_TURNOVER_S)
    maps.apply(cfg(lambda d: d.setdefault("dataplane", {}).update(new_flow_rate_limit=777)))
    assert io.ctl.new_flow_rate == 777
    assert new_flow_rate(262144, None, 2) == 4369 and new_flow_rate(262144, None, 64) == 136
    assert new_flow_rate(1024, None, 64) == 1, "never 0: some flows always get an entry"


def test_readers_see_the_written_tables_change_only_when_the_apply_ends() -> None:
    """An apply runs in a worker thread while the event loop reads NodeMaps: a backend written UP must not
    show (BGP would announce on it) before the ring slots that go with it are written."""
    seen: list[tuple[bool, tuple[int, ...]]] = []

    class Watching(FakeMapIO):
        def write_ring_slots(self, vip_num: int, slots: Any, values: Any) -> None:
            up = maps.written_up(vip, ipaddress.ip_address("10.0.0.4"))
            seen.append((up, tuple(maps.ring(vip).tolist())))
            super().write_ring_slots(vip_num, slots, values)

    vip = VipKey.of(cfg().vips[0])
    io = Watching(ring_size=RING)
    maps = NodeMaps(io, cfg(), LINK, adopt=False)
    maps.apply(cfg())
    before = tuple(maps.ring(vip).tolist())
    maps.apply(with_backends(1, 2, 3, 4))
    assert seen[-1] == (False, before), "mid-apply, readers still see the tables as before it"
    assert maps.written_up(vip, ipaddress.ip_address("10.0.0.4")) and tuple(maps.ring(vip).tolist()) != before
