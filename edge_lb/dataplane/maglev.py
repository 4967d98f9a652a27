"""Weighted Maglev consistent hashing, pure and deterministic (no kernel, stdlib only).

A table maps each of `ring_size` slots to one member's key. It depends only on the set of (key, weight)
pairs and the ring size: never on input order, the process (PYTHONHASHSEED) or the machine, so every LB node
with the same config builds the same table, and a flow that ECMP moves to another node keeps its backend.

    Permutation of a member: d = blake2b(key, digest_size=16, person=b"edge-lb-maglev")
                             offset = le64(d[0:8]) % M,  skip = le64(d[8:16]) % (M - 1) + 1
                             slot j of its preference list = (offset + j * skip) % M
    Canonical order:         members sorted by key bytes.
    Rounds:                  in round r, each member (in canonical order) whose weight w satisfies
                             floor((r + 1) * w / wmax) > floor(r * w / wmax) takes one turn: it claims
                             the next still-free slot of its preference list. Weight 0 takes no turn.
                             Rounds repeat until every slot is claimed.

The fill runs in C (`_maglevfill.c`, built with the package by setup.py) when that extension imports: the
fill is a sequential probe loop that numpy cannot vectorise exactly, ~20 ms in Python, ~1-2 ms in C. The
pure-Python fill below is the specification, the tests' reference, and the fallback (with one warning).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import logging
import math
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

DEFAULT_RING_SIZE = 65537
_PERSON = b"edge-lb-maglev"
Owners = list[int]  # slot -> index of the owning member in canonical order
_C_WEIGHT_MAX = 2**63 - 1  # the C fill's bound (config weights are 0..1000); above it, the Python fill
_WHY_PYTHON = ""
try:
    from edge_lb.dataplane import _maglevfill
except ImportError as exc:  # not built (no compiler at install time, or a source tree never installed)
    _maglevfill = None  # type: ignore[assignment]
    _WHY_PYTHON = f"{exc}"
_warned = False


@dataclass(frozen=True)
class Member:
    """One backend as Maglev sees it: `key` is its packed address (`ip.packed`), `weight` 0 means drained."""

    key: bytes
    weight: int


def is_prime(n: int) -> bool:
    """True when n is prime (trial division: meant for ring sizes, up to a few million)."""
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    return all(n % d for d in range(3, math.isqrt(n) + 1, 2))


# Cached: a node rebuilds tables of the same backends again and again (health flips, reloads), and hashing
# 1,000 keys (~0.7 ms) would otherwise cost a third of a C-filled table. 16,384 keys: ~2.5 MB at most.
@functools.lru_cache(maxsize=16384)
def permutation(key: bytes, ring_size: int) -> tuple[int, int]:
    """The (offset, skip) of a key's preference list in a ring of `ring_size` slots."""
    digest = hashlib.blake2b(key, digest_size=16, person=_PERSON).digest()
    offset = int.from_bytes(digest[:8], "little") % ring_size
    skip = int.from_bytes(digest[8:], "little") % (ring_size - 1) + 1
    return offset, skip


def build_table(members: Iterable[Member], ring_size: int = DEFAULT_RING_SIZE) -> list[bytes | None]:
    """Slot -> member key for every slot; every slot is None only when no member has a weight above 0."""
    keys, owners = owner_table(members, ring_size)
    if not keys:
        return [None] * ring_size
    return list(map(keys.__getitem__, owners))


def owner_table(members: Iterable[Member],
                ring_size: int = DEFAULT_RING_SIZE) -> tuple[list[bytes], array[int]]:
    """The table as (keys, owners): `keys` are the members with a weight above 0 in canonical order, and
    owners[slot] is an index into them (array('i'), so numpy can view it without a copy). With no such
    member `keys` is empty and every slot is -1."""
    if not is_prime(ring_size):
        raise ValueError(f"Maglev ring size must be prime, got {ring_size}")
    ordered = _canonical(members)
    active = [member for member in ordered if member.weight > 0]
    if not active:
        return [], array("i", [-1]) * ring_size
    starts, skips = zip(*(permutation(member.key, ring_size) for member in active), strict=True)
    return [member.key for member in active], fill(starts, skips, [m.weight for m in active], ring_size)


def compiled() -> bool:
    """True when the C fill is the one in use."""
    return _maglevfill is not None


def fill(starts: Sequence[int], skips: Sequence[int], weights: Sequence[int], ring_size: int) -> array[int]:
    """Owners of every slot for members (in canonical order) with these permutations and weights above 0."""
    if _maglevfill is not None and max(weights) <= _C_WEIGHT_MAX:
        owners = array("i", [-1]) * ring_size
        _maglevfill.fill(owners, starts, skips, weights)
        return owners
    _warn_python()
    return python_fill(starts, skips, weights, ring_size)


def python_fill(starts: Sequence[int], skips: Sequence[int], weights: Sequence[int],
                ring_size: int) -> array[int]:
    """The same fill in pure Python: the reference the C one is tested against, and its fallback."""
    return array("i", _populate(list(starts), skips, _rounds(list(weights), ring_size), ring_size))


def _warn_python() -> None:
    global _warned
    if _maglevfill is None and not _warned:
        _warned = True
        logging.getLogger("edge_lb").warning(
            "Maglev runs in pure Python (~20 ms per 65,537-slot table instead of ~1-2 ms): the compiled fill "
            "edge_lb.dataplane._maglevfill did not import (%s); reinstall with a C compiler and python3-dev "
            "(scripts/setup.sh)", _WHY_PYTHON)


def diff(old: Sequence[bytes | None], new: Sequence[bytes | None]) -> list[tuple[int, bytes | None]]:
    """The slots whose member changed from `old` to `new`, as (slot, new key), in ascending slot order."""
    if len(old) != len(new):
        raise ValueError(f"cannot diff tables of {len(old)} and {len(new)} slots")
    return [(slot, key) for slot, (was, key) in enumerate(zip(old, new, strict=True)) if was != key]


def _canonical(members: Iterable[Member]) -> list[Member]:
    """Members sorted by key; a duplicate key or a negative weight raises ValueError."""
    ordered = sorted(members, key=lambda member: member.key)
    for before, after in itertools.pairwise(ordered):
        if before.key == after.key:
            raise ValueError(f"duplicate Maglev member key {after.key.hex()}")
    for member in ordered:
        if member.weight < 0:
            raise ValueError(f"negative weight {member.weight} for Maglev member {member.key.hex()}")
    return ordered


def _rounds(weights: list[int], ring_size: int) -> Iterable[list[int]]:
    """Who takes a turn in each round, in canonical order: enough rounds to fill `ring_size` slots."""
    if min(weights) == max(weights):
        return itertools.cycle([list(range(len(weights)))])
    wmax = max(weights)
    # Turns in the first R rounds >= R * sum(w) / wmax - n, so this many rounds always fill the ring.
    needed = (ring_size + len(weights)) * wmax // sum(weights) + 1
    count = min(wmax, needed)
    schedule: list[list[int]] = [[] for _ in range(count)]
    for index, weight in enumerate(weights):
        for turn in range(1, count * weight // wmax + 1):  # the k-th turn falls in round ceil(k*wmax/w) - 1
            schedule[(turn * wmax + weight - 1) // weight - 1].append(index)
    return itertools.cycle(schedule) if count == wmax else schedule


def _populate(positions: list[int], skips: Sequence[int], rounds: Iterable[list[int]], size: int) -> Owners:
    """Classic Maglev fill: each turn claims the member's next free slot. Returns slot -> member index."""
    owners = [-1] * size
    turns = itertools.chain.from_iterable(rounds)
    left = size
    tail = math.isqrt(size)  # a probe and a tail key evaluation cost about the same: balance size/F against F
    for index in turns:
        slot = positions[index]
        skip = skips[index]
        while owners[slot] >= 0:
            slot = (slot + skip) % size
        owners[slot] = index
        positions[index] = (slot + skip) % size
        left -= 1
        if left == tail:
            break
    _fill_tail(owners, positions, skips, turns, left)
    return owners


def _fill_tail(
    owners: Owners, positions: list[int], skips: Sequence[int], turns: Iterator[int], left: int
) -> None:
    """The same turns for the last few free slots, found by arithmetic instead of probing.

    Probing costs about size/free steps per turn, so near the end it is cheaper to take, over the free slots,
    the one a member's preference list reaches first: the slot x minimising (x - position) * skip^-1 mod size.
    Same result as probing, exactly.
    """
    size = len(owners)
    free: list[int] = []
    for _ in range(left):
        free.append(owners.index(-1, free[-1] + 1 if free else 0))
    inverses: dict[int, int] = {}
    for index in turns:
        if not free:
            return
        start = positions[index]
        inverse = inverses.get(index) or inverses.setdefault(index, pow(skips[index], -1, size))
        slot = _first_reached(free, start, inverse, size)
        free.remove(slot)
        owners[slot] = index
        positions[index] = (slot + skips[index]) % size
    raise AssertionError("Maglev schedule ran out of turns before the ring was full")


def _first_reached(free: list[int], start: int, inverse: int, size: int) -> int:
    """The free slot that a preference list at `start` (with skip = inverse^-1) reaches first."""
    steps = [(slot - start) * inverse % size for slot in free]
    return free[steps.index(min(steps))]
