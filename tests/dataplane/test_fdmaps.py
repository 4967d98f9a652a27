"""The fd-level map interface and the program pins (edge_lb.dataplane.fdmaps, .pinned) against
the real compiled program: every ctypes layout equals clang's (bcc's table.Key / table.Leaf), and a load with
pins leaves the program pinned under the digest that adoption looks for; ring slots go in and come out as
arrays."""

from __future__ import annotations

import ctypes
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_lb import paths
from edge_lb.dataplane import bpfsys, fdmaps, pinned
from edge_lb.dataplane.desired import frozen
from edge_lb.dataplane.loader import BPF_DIR, MAP_NAMES, Dataplane, remove_pins

from .conftest import make_config

pytestmark = pytest.mark.root


def _layout(ctype: Any) -> list[tuple[str, int, int]] | int:
    """(field, offset, size) of a struct, or the size of a scalar."""
    if not hasattr(ctype, "_fields_"):
        return ctypes.sizeof(ctype)
    return [(name, getattr(ctype, name).offset, getattr(ctype, name).size) for name, *_ in ctype._fields_]


@pytest.fixture(scope="module")
def loaded() -> Iterator[Dataplane]:
    dp = Dataplane.load(make_config().dataplane, pin=False)
    yield dp
    dp.close()


def test_every_mirrored_layout_is_clangs(loaded: Dataplane) -> None:
    dp = loaded
    for name, (key, value) in fdmaps.LAYOUTS.items():
        table = dp.bpf[name.encode()]
        assert _layout(key) == _layout(table.Key), f"{name} key"
        leaf = table.Leaf._type_ if issubclass(table.Leaf, ctypes.Array) else table.Leaf  # per CPU
        assert _layout(value) == _layout(leaf), f"{name} value"
        info = bpfsys.map_info(table.map_fd)
        assert (info.key_size, info.value_size) == (ctypes.sizeof(key), ctypes.sizeof(value)), name
    # every map the program uses is named for adoption
    used = bpfsys.prog_ids(dp.prog_fd)[1]
    assert {bpfsys.map_info(dp.bpf[n.encode()].map_fd).id for n in MAP_NAMES} == used


def test_the_rings_map_is_mapped_into_memory(loaded: Dataplane) -> None:
    """balancer_maps.h creates rings with BPF_F_MMAPABLE: FdMapIO writes and reads it as memory, and what it
    stores there is what the kernel's own lookup returns."""
    io = loaded.io
    assert io.rings is not None
    slot = 3 * io.ring_size + 17
    io.rings.values[slot] = 0xDEADBEEF
    try:
        assert bpfsys.array_lookup_range(io.fds["rings"], slot - 1, 3) == [0, 0xDEADBEEF, 0]
    finally:
        io.rings.values[slot] = 0


@pytest.fixture(params=["mapped", "batch"])
def ring_io(request: pytest.FixtureRequest, loaded: Dataplane) -> Iterator[fdmaps.FdMapIO]:
    """The loaded program's maps through FdMapIO: stores into the mapped rings map, or (a rings map pinned by
    an older build, not mmapable) BPF_MAP_UPDATE_BATCH and BPF_MAP_LOOKUP_BATCH."""
    io = fdmaps.FdMapIO(loaded.io.fds, loaded.io.ring_size)
    if request.param == "batch":
        io.close()
    yield io
    io.close()


@pytest.mark.parametrize(("case", "slots"), [
    ("nothing", []),
    ("the first and last slot", [0, -1]),
    ("scattered, out of order", [65536, 7, 30000, 1]),
    ("every slot", list(range(65537))),
])
def test_ring_slots_are_written_and_read_as_arrays(ring_io: fdmaps.FdMapIO, case: str,
                                                   slots: list[int]) -> None:
    """FdMapIO writes (slot, value) arrays under the VIP's base (the last VIP number: the end of the rings
    map) and reads a ring back as an array; the ring before it is untouched."""
    io = ring_io
    size, last = io.ring_size, make_config().dataplane.max_vips - 1
    index = np.arange(size, dtype=np.intp)[slots] if slots else np.zeros(0, dtype=np.intp)
    values = frozen(np.arange(1, len(index) + 1, dtype=np.uint32) * 3)  # read-only, as rings are
    neighbour = io.read_ring(last - 1)
    io.write_ring_slots(last, index, values)
    try:
        want = np.zeros(size, dtype=np.uint32)
        want[index] = values
        got = io.read_ring(last)
        assert got.dtype == np.uint32 and got.tolist() == want.tolist(), case
        kernel = bpfsys.array_lookup_range(io.fds["rings"], last * size, size)
        assert kernel == want.tolist(), "the kernel's lookup reads what was written"
        assert np.array_equal(io.read_ring(last - 1), neighbour), "only this VIP's slots"
    finally:
        io.write_ring_slots(last, np.arange(size, dtype=np.intp), np.zeros(size, dtype=np.uint32))


def test_a_pinned_load_pins_the_program_under_its_digest_and_adoption_checks_it() -> None:
    instance = f"t{uuid.uuid4().hex[:10]}"
    cfg = make_config(lambda d: d["dataplane"].update(instance=instance))
    dp = Dataplane.load(cfg.dataplane, pin=True)
    try:
        pins = paths.pins(instance)
        assert [p.name for p in pins.glob("prog_*")] == [f"prog_{dp.digest}"]
        # Not attached anywhere: it is not adopted, and the reason says so.
        got = Dataplane.adopt(cfg.dataplane, "lo", "native")
        assert isinstance(got, str) and "not the program attached to lo" in got, got
        # Another build (other flags) has another digest: no pinned program of that build.
        other = make_config(lambda d: d["dataplane"].update(instance=instance, icmp_too_big_rate=7))
        got = Dataplane.adopt(other.dataplane, "lo", "native")
        assert isinstance(got, str) and "another build" in got, got
    finally:
        dp.close()
        remove_pins(instance)
    assert not paths.pins(instance).exists()


def test_a_rings_pin_of_an_older_build_is_made_again_mmapable() -> None:
    """A rings map pinned by a build before BPF_F_MMAPABLE (bcc would adopt it as it is) is made again by the
    load, so FdMapIO maps it; the other pins are adopted as they are."""
    instance = f"t{uuid.uuid4().hex[:10]}"
    cfg = make_config(lambda d: d["dataplane"].update(instance=instance))
    pins = paths.pins(instance)
    pins.mkdir(parents=True)
    try:
        entries = cfg.dataplane.ring_size * cfg.dataplane.max_vips
        subprocess.run(["bpftool", "map", "create", str(pins / "rings"), "type", "array", "key", "4",
                        "value", "4", "entries", str(entries), "name", "rings"], check=True, timeout=30)
        old = bpfsys.pinned_map_info(pins / "rings")
        assert not old.map_flags & fdmaps.BPF_F_MMAPABLE
        dp = Dataplane.load(cfg.dataplane, pin=True)
        try:
            new = bpfsys.pinned_map_info(pins / "rings")
            assert new.id != old.id and new.map_flags & fdmaps.BPF_F_MMAPABLE
            assert dp.io.rings is not None, "written as memory"
            again = Dataplane.load(cfg.dataplane, pin=True)
            again.close()
            assert bpfsys.pinned_map_info(pins / "rings").id == new.id, "an mmapable pin is kept"
        finally:
            dp.close()
    finally:
        remove_pins(instance)
    assert not pins.exists()


def test_the_digest_covers_every_included_header_and_the_flags(tmp_path: Path) -> None:
    names = {p.name for p in pinned.sources(BPF_DIR / "balancer.c")}
    assert {"balancer.c", "balancer_structs.h", "balancer_maps.h", "balancer_consts.h"} <= names
    for name in names:
        (tmp_path / name).write_bytes((BPF_DIR / name).read_bytes())
    main = tmp_path / "balancer.c"
    before = pinned.program_digest(main, ["-DRING_SIZE=13"])
    assert pinned.program_digest(main, ["-DRING_SIZE=17"]) != before
    maps = tmp_path / "balancer_maps.h"
    maps.write_text(maps.read_text().replace("MAX_VIPS, 0);", "MAX_VIPS, 1);", 1))
    assert pinned.program_digest(main, ["-DRING_SIZE=13"]) != before
