"""The compiled Maglev fill (edge_lb/dataplane/_maglevfill.c): present, identical to the pure-Python fill
(the specification) on a table of cases, strict about its inputs; and the pure-Python fallback when absent."""

from __future__ import annotations

import importlib
import ipaddress
import pathlib
import random
import subprocess
import sys
import textwrap
from array import array
from collections.abc import Callable

import pytest

from edge_lb.dataplane import maglev
from edge_lb.dataplane.maglev import Member

_ROOT = pathlib.Path(__file__).resolve().parents[2]
RING_SIZES = [7, 13, 251, 4099, 65537, 131071]
COUNTS = [1, 2, 3, 10, 100, 1000]
BIG = 2**63 - 1  # the largest weight the C fill takes

WEIGHTS: dict[str, Callable[[int, random.Random], int]] = {
    "equal": lambda n, rng: 7,
    "1..3": lambda n, rng: 1 + n % 3,
    "zeros": lambda n, rng: n % 4,
    "config": lambda n, rng: rng.randint(0, 1000),  # what a config allows
    "one heavy": lambda n, rng: 2**62 if n == 0 else rng.randint(1, 3),
    "large": lambda n, rng: rng.choice([BIG, BIG - 1, 2**40 + n, 2**31 + 7 * n, 1]),
}


def key(n: int) -> bytes:
    return ipaddress.IPv4Address(0x0A000000 + n).packed


def columns(count: int, scheme: str, ring_size: int) -> tuple[list[int], list[int], list[int]]:
    """Starts, skips and weights of `count` members in canonical order (keys 10.0.x.y sort numerically)."""
    rng = random.Random(f"{count}/{scheme}/{ring_size}")
    perms = [maglev.permutation(key(n), ring_size) for n in range(count)]
    weights = [WEIGHTS[scheme](n, rng) for n in range(count)]
    if not any(weights):  # the fill needs one member with a turn (owner_table passes only those)
        weights[0] = 1
    return [p[0] for p in perms], [p[1] for p in perms], weights


_NOT_BUILT = ("the C Maglev fill is not built ({}): run `python setup.py build_ext --inplace` in this tree "
              "(scripts/setup.sh does it with pip install -e)")


def test_the_compiled_fill_is_importable() -> None:
    """CI must run the C fill, never fall back silently: scripts/setup.sh's `pip install -e` builds it."""
    try:
        module = importlib.import_module("edge_lb.dataplane._maglevfill")
    except ImportError as exc:
        pytest.fail(_NOT_BUILT.format(exc))
    assert maglev.compiled()
    assert module.fill is maglev._maglevfill.fill


@pytest.fixture
def c_fill() -> Callable[..., None]:
    if maglev._maglevfill is None:
        pytest.fail(_NOT_BUILT.format(maglev._WHY_PYTHON))
    return maglev._maglevfill.fill


@pytest.mark.parametrize("ring_size", RING_SIZES)
@pytest.mark.parametrize("scheme", list(WEIGHTS))
@pytest.mark.parametrize("count", COUNTS)
def test_c_fill_equals_python_fill(c_fill: Callable[..., None], count: int, scheme: str,
                                  ring_size: int) -> None:
    starts, skips, weights = columns(count, scheme, ring_size)
    want = maglev.python_fill(starts, skips, weights, ring_size)
    got = array("i", [-1]) * ring_size
    c_fill(got, starts, skips, weights)
    assert got == want
    assert min(got) >= 0 and all(weights[owner] > 0 for owner in set(got))


@pytest.mark.usefixtures("c_fill")
@pytest.mark.parametrize("ring_size", [13, 4099, 65537])
@pytest.mark.parametrize("scheme", ["equal", "zeros", "large"])
def test_owner_table_through_c_equals_python(scheme: str, ring_size: int) -> None:
    _, _, weights = columns(100, scheme, ring_size)
    group = [Member(key(n), w) for n, w in enumerate(weights)]
    keys, owners = maglev.owner_table(reversed(group), ring_size)
    assert keys == [m.key for m in group if m.weight > 0]
    active = [m for m in group if m.weight > 0]
    perms = [maglev.permutation(m.key, ring_size) for m in active]
    assert owners == maglev.python_fill([p[0] for p in perms], [p[1] for p in perms],
                                        [m.weight for m in active], ring_size)


def test_weights_beyond_the_c_bound_take_the_python_fill() -> None:
    group = [Member(key(1), 2**64), Member(key(2), 3), Member(key(3), 2**70)]
    perms = [maglev.permutation(m.key, 251) for m in group]
    keys, owners = maglev.owner_table(group, 251)
    assert keys == [m.key for m in group]
    assert owners == maglev.python_fill([p[0] for p in perms], [p[1] for p in perms],
                                        [m.weight for m in group], 251)


def test_the_fill_writes_every_slot_whatever_the_buffer_held(c_fill: Callable[..., None]) -> None:
    starts, skips, weights = columns(10, "1..3", 251)
    owners = array("i", [12345]) * 251
    c_fill(owners, starts, skips, weights)
    assert owners == maglev.python_fill(starts, skips, weights, 251)


_I7 = array("i", [0]) * 7
_OK = ([1], [1], [1])


@pytest.mark.parametrize(
    ("owners", "starts", "skips", "weights", "error", "match"),
    [
        (b"\0" * 28, *_OK, TypeError, "owners must be a writable, contiguous array"),
        (memoryview(_I7).toreadonly(), *_OK, TypeError, "owners must be a writable"),
        (memoryview(array("i", [0]) * 14)[::2], *_OK, TypeError, "contiguous"),
        (array("d", [0]) * 7, *_OK, ValueError, "owners must hold C ints"),
        (array("q", [0]) * 7, *_OK, ValueError, "owners must hold C ints"),
        (array("i", [0]) * 8, *_OK, ValueError, "must be a prime below 2\\^31, got 8"),
        (array("i", [0]), *_OK, ValueError, "must be a prime below 2\\^31, got 1"),
        (array("i"), *_OK, ValueError, "got 0"),
        (_I7, [1, 2], [1], [1, 1], ValueError, "skips has 1 members, starts has 2"),
        (_I7, [1], [1], [1, 1], ValueError, "weights has 2 members, starts has 1"),
        (_I7, [], [], [], ValueError, "needs 1 to"),
        (_I7, [7], [1], [1], ValueError, "starts\\[0\\] = 7 is outside \\[0, 6\\]"),
        (_I7, [0, -1], [1, 1], [1, 1], ValueError, "starts\\[1\\] = -1 is outside"),
        (_I7, [0], [0], [1], ValueError, "skips\\[0\\] = 0 is outside \\[1, 6\\]"),
        (_I7, [0], [7], [1], ValueError, "skips\\[0\\] = 7 is outside"),
        (_I7, [0], [1], [-1], ValueError, "weights\\[0\\] = -1 is outside"),
        (_I7, [0], [1], [2**63], ValueError, "weights\\[0\\] = 9223372036854775808 is outside"),
        (_I7, [0, 1], [1, 2], [0, 0], ValueError, "no member has a weight above 0"),
        (_I7, [0], [1], ["1"], TypeError, "weights\\[0\\] must be an int, not str"),
        (_I7, [0.0], [1], [1], TypeError, "starts\\[0\\] must be an int, not float"),
        (_I7, 5, [1], [1], TypeError, "must be sequences"),
    ],
)
def test_bad_input_to_the_c_fill(c_fill: Callable[..., None], owners: object, starts: object, skips: object,
                                 weights: object, error: type[Exception], match: str) -> None:
    before = bytes(memoryview(_I7))
    with pytest.raises(error, match=match):
        c_fill(owners, starts, skips, weights)
    assert bytes(memoryview(_I7)) == before, "a refused call writes nothing"


_FALLBACK = textwrap.dedent(
    """
    import logging, sys
    sys.modules["edge_lb.dataplane._maglevfill"] = None  # import of it now raises ImportError
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    from edge_lb.dataplane import maglev
    from edge_lb.dataplane.maglev import Member
    group = [Member(bytes([10, 0, 0, n]), 1 + n % 3) for n in range(1, 40)]
    first = maglev.owner_table(group, 4099)
    assert not maglev.compiled()
    assert maglev.owner_table(group, 4099) == first
    print(list(first[1]) == list(maglev.python_fill(*zip(*(maglev.permutation(m.key, 4099) for m in group)),
                                                    [m.weight for m in group], 4099)))
    print(hash(tuple(first[1])))
    """
)


def test_without_the_extension_maglev_runs_in_python_and_says_so_once() -> None:
    run = subprocess.run([sys.executable, "-c", _FALLBACK], cwd=_ROOT, capture_output=True, text=True,
                         check=True, timeout=60)
    warnings = [line for line in run.stderr.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1, run.stderr
    assert "Maglev runs in pure Python" in warnings[0] and "_maglevfill" in warnings[0]
    same, digest = run.stdout.split()
    assert same == "True"
    group = [Member(bytes([10, 0, 0, n]), 1 + n % 3) for n in range(1, 40)]
    assert int(digest) == hash(tuple(maglev.owner_table(group, 4099)[1])), "C and Python give one table"
