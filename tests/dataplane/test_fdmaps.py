"""The fd-level map interface and the program pins (edge_lb.dataplane.fdmaps, .pinned) against
the real compiled program: every ctypes layout equals clang's (bcc's table.Key / table.Leaf), and a load with
pins leaves the program pinned under the digest that adoption looks for."""

from __future__ import annotations

import ctypes
import uuid
from pathlib import Path
from typing import Any

import pytest

from edge_lb import paths
from edge_lb.dataplane import bpfsys, fdmaps, pinned
from edge_lb.dataplane.loader import BPF_DIR, MAP_NAMES, Dataplane, remove_pins

from .conftest import make_config

pytestmark = pytest.mark.root


def _layout(ctype: Any) -> list[tuple[str, int, int]] | int:
    """(field, offset, size) of a struct, or the size of a scalar."""
    if not hasattr(ctype, "_fields_"):
        return ctypes.sizeof(ctype)
    return [(name, getattr(ctype, name).offset, getattr(ctype, name).size) for name, *_ in ctype._fields_]


def test_every_mirrored_layout_is_clangs() -> None:
    dp = Dataplane.load(make_config().dataplane, pin=False)
    try:
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
    finally:
        dp.close()


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
