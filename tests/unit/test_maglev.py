"""Weighted Maglev: balance, weights, determinism, minimal disruption, and equality with a plain reference."""

from __future__ import annotations

import collections
import hashlib
import ipaddress
import os
import pathlib
import random
import subprocess
import sys
import textwrap

import pytest

from edge_lb.dataplane import maglev
from edge_lb.dataplane.maglev import Member, build_table, diff

_ROOT = pathlib.Path(__file__).resolve().parents[2]
SMALL = 1009  # a prime ring size that keeps the reference implementation fast


def key(n: int) -> bytes:
    return ipaddress.IPv4Address(0x0A000000 + n).packed  # 10.0.0.n


def members(count: int, weight: int = 1) -> list[Member]:
    return [Member(key(n), weight) for n in range(1, count + 1)]


def shares(table: list[bytes | None]) -> collections.Counter[bytes | None]:
    return collections.Counter(table)


def reference(group: list[Member], ring_size: int) -> list[bytes | None]:
    """The algorithm as the module docstring states it: plain probing, round by round, no shortcuts."""
    ordered = sorted((m for m in group if m.weight > 0), key=lambda m: m.key)
    if not ordered:
        return [None] * ring_size
    wmax = max(m.weight for m in ordered)
    perms = [maglev.permutation(m.key, ring_size) for m in ordered]
    nexts = [offset for offset, _ in perms]
    table: list[bytes | None] = [None] * ring_size
    filled, round_ = 0, 0
    while filled < ring_size:
        for index, member in enumerate(ordered):
            if (round_ + 1) * member.weight // wmax == round_ * member.weight // wmax or filled == ring_size:
                continue
            slot, skip = nexts[index], perms[index][1]
            while table[slot] is not None:
                slot = (slot + skip) % ring_size
            table[slot] = member.key
            nexts[index] = (slot + skip) % ring_size
            filled += 1
        round_ += 1
    return table


@pytest.mark.parametrize("count", [3, 7, 10, 100])
def test_equal_members_share_evenly(count: int) -> None:
    counts = shares(build_table(members(count)))
    assert set(counts) == {m.key for m in members(count)}
    fair = 65537 / count
    for got in counts.values():
        assert abs(got - fair) / fair <= 0.02


@pytest.mark.parametrize(
    ("weights", "tolerance"),
    [([1, 2], 0.03), ([2, 1, 1, 1], 0.03), ([1, 2, 1, 2, 1, 2, 1, 2, 1, 2], 0.03), ([3, 1, 0], 0.03)],
)
def test_slots_follow_weights(weights: list[int], tolerance: float) -> None:
    group = [Member(key(n), w) for n, w in enumerate(weights, start=1)]
    counts = shares(build_table(group))
    total = sum(weights)
    for member in group:
        want = 65537 * member.weight / total
        if member.weight == 0:
            assert counts[member.key] == 0
        else:
            assert abs(counts[member.key] - want) / want <= tolerance, (member, counts[member.key], want)


def test_weight_two_gets_twice_weight_one() -> None:
    heavy, light = Member(key(1), 2), Member(key(2), 1)
    counts = shares(build_table([heavy, light]))
    assert abs(counts[heavy.key] / counts[light.key] - 2) <= 0.03 * 2


def test_drained_member_gets_nothing() -> None:
    group = [*members(4), Member(key(99), 0)]
    assert key(99) not in build_table(group)


@pytest.mark.parametrize(
    ("group", "ring_size"),
    [
        (members(1), SMALL),
        (members(3), SMALL),
        (members(10), SMALL),
        (members(2000), SMALL),  # more members than slots: some get none
        ([Member(key(n), n % 4) for n in range(1, 30)], SMALL),
        ([Member(key(n), (n * 37) % 1000 + 1) for n in range(1, 60)], SMALL),
        ([Member(key(1), 1000), Member(key(2), 1), Member(key(3), 7)], SMALL),
        (members(5), 65537),
        (members(1000), 65537),
        ([Member(key(n), 1 + n % 3) for n in range(1, 12)], 65537),
    ],
)
def test_matches_plain_reference(group: list[Member], ring_size: int) -> None:
    assert build_table(group, ring_size) == reference(group, ring_size)


def test_input_order_does_not_matter() -> None:
    group = [Member(key(n), 1 + n % 3) for n in range(1, 21)]
    shuffled = group[:]
    random.Random(7).shuffle(shuffled)
    assert build_table(shuffled) == build_table(group)
    assert build_table(iter(shuffled)) == build_table(group)


def table_digest(table: list[bytes | None]) -> str:
    return hashlib.sha256(b"".join((k or b"-").hex().encode() + b"," for k in table)).hexdigest()


_GROUP = [("10.0.0.1", 1), ("10.0.0.2", 2), ("fd00::7", 1), ("192.168.1.9", 3), ("10.0.0.3", 0)]
_CHILD = textwrap.dedent(
    f"""
    import ipaddress
    from edge_lb.dataplane.maglev import Member, build_table
    from tests.unit.test_maglev import table_digest
    group = [Member(ipaddress.ip_address(a).packed, w) for a, w in {_GROUP!r}]
    print(table_digest(build_table(group)))
    """
)
# Pinned: changing it changes every LB node's choices; it must be deliberate (and reach all nodes at once).
_DIGEST = "fd9486616d5ad229521fcb9e8853f91158d237ea7f0eaa905890f10b95b3fc02"


def test_same_table_in_fresh_processes() -> None:
    here = table_digest(build_table(Member(ipaddress.ip_address(a).packed, w) for a, w in _GROUP))
    digests = {here}
    for seed in ("0", "1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        run = subprocess.run(
            [sys.executable, "-c", _CHILD], env=env, cwd=_ROOT, capture_output=True, text=True, check=True
        )
        digests.add(run.stdout.strip())
    assert digests == {_DIGEST}


def moved(old: list[bytes | None], new: list[bytes | None], gone: set[bytes | None]) -> tuple[float, float]:
    """(share of all slots that changed, share of the unaffected members' slots that changed)."""
    changed = sum(a != b for a, b in zip(old, new, strict=True))
    kept = [(a, b) for a, b in zip(old, new, strict=True) if a not in gone and b not in gone]
    stable_slots = sum(1 for a in old if a not in gone)
    return changed / len(old), sum(a != b for a, b in kept) / stable_slots


def test_removing_a_member_moves_little() -> None:
    group = members(10)
    old = build_table(group)
    new = build_table(group[:4] + group[5:])
    total, survivors = moved(old, new, {group[4].key})
    print(f"\nremove 1 of 10: {total:.2%} of slots changed, {survivors:.2%} of survivors' slots moved")
    assert total <= 1 / 10 + 0.02
    assert survivors < 0.03


def test_adding_a_member_moves_little() -> None:
    group = members(11)
    old = build_table(group[:10])
    new = build_table(group)
    total, survivors = moved(old, new, {group[10].key})
    print(f"\nadd an 11th: {total:.2%} of slots changed, {survivors:.2%} of existing members' slots moved")
    assert total <= 1 / 11 + 0.02
    assert survivors < 0.03


def test_diff_returns_exactly_the_changed_slots() -> None:
    old = build_table(members(10))
    new = build_table(members(9))
    changes = diff(old, new)
    assert [slot for slot, _ in changes] == [s for s in range(len(old)) if old[s] != new[s]]
    assert all(new[slot] == k for slot, k in changes)
    patched = old[:]
    for slot, k in changes:
        patched[slot] = k
    assert patched == new
    assert diff(new, new) == []


def test_diff_of_different_sizes_is_an_error() -> None:
    with pytest.raises(ValueError, match="1009 and 65537"):
        diff([None] * 1009, [None] * 65537)


@pytest.mark.parametrize("ring_size", [0, 1, 1000, 65536, 1011])
def test_ring_size_must_be_prime(ring_size: int) -> None:
    with pytest.raises(ValueError, match="prime"):
        build_table(members(3), ring_size)


@pytest.mark.parametrize("group", [[], [Member(key(1), 0), Member(key(2), 0)]])
def test_nobody_to_serve_is_all_none(group: list[Member]) -> None:
    assert build_table(group, SMALL) == [None] * SMALL


def test_duplicate_keys_are_an_error() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        build_table([Member(key(1), 1), Member(key(1), 2)])


def test_negative_weight_is_an_error() -> None:
    with pytest.raises(ValueError, match="negative"):
        build_table([Member(key(1), -1)])


@pytest.mark.parametrize(
    ("n", "prime"),
    [
        (2, True),
        (3, True),
        (4, False),
        (1009, True),
        (65537, True),
        (65536, False),
        (1_000_003, True),
        (1, False),
        (0, False),
        (-7, False),
    ],
)
def test_is_prime(n: int, prime: bool) -> None:
    assert maglev.is_prime(n) is prime

