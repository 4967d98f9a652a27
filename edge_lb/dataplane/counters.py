"""The data plane's counters: their names, read from the C enum in bpf/balancer_consts.h (the single source
of the indexes), and the one sampler of the per-CPU counter maps (CounterSampler -> CounterSnapshot) that
status, the API, the dashboard and /metrics all read."""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edge_lb import events
from edge_lb.assets import asset_dir

if TYPE_CHECKING:
    from edge_lb.dataplane.mapio import MapIO

CONSTS_H = asset_dir("bpf") / "balancer_consts.h"


@functools.cache
def reason_names() -> tuple[str, ...]:
    """Names of enum lb_stat in index order (STAT_MAX excluded)."""
    return reason_names_in(CONSTS_H)


def reason_names_in(consts_h: Path) -> tuple[str, ...]:
    """The same, from another copy of balancer_consts.h (the one a program is compiled from)."""
    text = consts_h.read_text(encoding="utf-8")
    body = re.search(r"enum lb_stat\s*\{(.*?)\};", text, re.S)
    if body is None:
        raise RuntimeError(f"enum lb_stat not found in {consts_h}")
    names: list[str] = []
    for line in body.group(1).splitlines():
        m = re.match(r"\s*(STAT_[A-Z0-9_]+)\s*(?:=\s*(\d+))?\s*,?", line)
        if m:
            if m.group(2) is not None and int(m.group(2)) != len(names):
                raise RuntimeError(f"{consts_h}: {m.group(1)} must stay in sequence")
            names.append(m.group(1))
    return tuple(n for n in names if n != "STAT_MAX")


Counts = Mapping[int, tuple[int, int]]  # index -> (packets, bytes), summed over CPUs


@dataclass(frozen=True)
class CounterSnapshot:
    """The per-CPU counter maps summed at one moment: `taken` is time.monotonic() when they were read (when
    the sampler was made, for the empty snapshot it starts from)."""

    vips: Counts
    backends: Counts
    reasons: Counts
    taken: float

    @classmethod
    def empty(cls, taken: float | None = None) -> CounterSnapshot:
        return cls({}, {}, {}, time.monotonic() if taken is None else taken)

    def age(self, now: float | None = None) -> float:
        """Seconds since the maps were read (it grows while refreshes fail)."""
        return max((time.monotonic() if now is None else now) - self.taken, 0.0)

    def reason_packets(self) -> dict[str, int]:
        """Packets per enum lb_stat name (STAT_TX...), every name present."""
        return {name: self.reasons.get(i, (0, 0))[0] for i, name in enumerate(reason_names())}


class CounterSampler:
    """The one reader of the counter maps: `run()` sums them every `interval` seconds into a CounterSnapshot,
    never per request. However often the API, the dashboard, `edge-lb status` or Prometheus ask, the maps are
    read once a second, and every reader sees the same snapshot and its age."""

    def __init__(self, io: MapIO, interval: float = 1.0) -> None:
        if not interval > 0:
            raise ValueError(f"counter interval must be positive, got {interval!r}")
        self.io = io
        self.interval = interval
        self.snapshot = CounterSnapshot.empty()

    def refresh(self) -> CounterSnapshot:
        """Read the three maps now; the snapshot is replaced only when all three were read."""
        self.snapshot = CounterSnapshot(self.io.read_counters("vip_stats"),
                                        self.io.read_counters("backend_stats"),
                                        self.io.read_counters("reason_stats"), time.monotonic())
        return self.snapshot

    async def run(self) -> None:
        """Refresh every `interval` seconds until cancelled; a failed read keeps the last snapshot (its age
        says how old it is) and the next tick tries again."""
        while True:
            await asyncio.sleep(self.interval)
            try:
                self.refresh()
            except Exception as exc:
                events.emit("counters", logging.WARNING, error=repr(exc))
