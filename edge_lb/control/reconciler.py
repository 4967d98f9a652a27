"""Keeps the maps equal to config + health: health events and reloads in, one batched map write out.

    checks (HealthMonitor) --flip--> dirty --> NodeMaps.apply(config, health) --> changed slots only

Pure decisions live elsewhere (rise/fall in healthchecks.machine, rings in state/maglev); this class wires
them to the map writer and says in the log what it did.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from edge_lb import events
from edge_lb.config import Config, IPAddress
from edge_lb.control import overrides
from edge_lb.dataplane.desired import VipKey
from edge_lb.dataplane.node import NodeMaps
from edge_lb.dataplane.programmer import ApplyReport
from healthchecks.base import Checker, Target
from healthchecks.machine import ADOPTED, NEW, Health
from healthchecks.monitor import CheckKey, HealthMonitor
from healthchecks.spec import CheckSpec

Pair = tuple[VipKey, IPAddress]
_RETRY = 1.0  # seconds before a failed map write is tried again


@dataclass(frozen=True)
class BackendView:
    """One (VIP, backend) as status shows it."""

    address: IPAddress
    weight: int
    state: str  # "up", "down", "drained" (weight 0, keeps its flows), "unchecked" (type none)
    reason: str
    checked_at: float | None
    index: int | None  # backend slot in the data plane
    latency: float | None = None  # seconds the last check took


async def _nothing() -> None:
    return None


def check_keys(config: Config) -> dict[Pair, CheckKey | None]:
    """Which prober decides each (VIP, backend); None: not checked (type "none"), always healthy."""
    keys: dict[Pair, CheckKey | None] = {}
    for vip in config.vips:
        for b in vip.backends:
            spec = b.healthcheck
            target = Target(b.address, spec.port or vip.port)
            keys[(VipKey.of(vip), b.address)] = CheckKey(target, spec) if spec.checked else None
    return keys


def initial_health(keys: Mapping[Pair, CheckKey | None], known: Mapping[Pair, Health],
                   adopted_up: Mapping[Pair, bool]) -> dict[CheckKey, Health]:
    """Where each new prober starts: the pair's health under its previous check (a changed check does not
    take a backend down), else up if the running data plane has it up (a restart keeps flows), else down."""
    start: dict[CheckKey, Health] = {}
    for pair, key in keys.items():
        if key is None or key in start:
            continue
        if pair in known:
            start[key] = Health(up=known[pair].up, reason=known[pair].reason)
        else:
            start[key] = ADOPTED if adopted_up.get(pair) else NEW
    return start


class Reconciler:
    def __init__(self, maps: NodeMaps, config: Config, make_checker: Callable[[CheckSpec], Checker], *,
                 concurrency: int = 1000, overrides_file: Path | None = None) -> None:
        self.maps = maps
        self.base = config  # as the file says
        self.overrides_file = overrides_file
        self.overrides = overrides.prune(config, overrides.load(overrides_file))
        self.config = overrides.apply(config, self.overrides)  # what runs: the file + runtime weights
        self.keys: dict[Pair, CheckKey | None] = {}
        self.monitor = HealthMonitor(make_checker, self._changed, concurrency=concurrency)
        self.dirty = asyncio.Event()
        self.applies = 0
        self._ring_counts: dict[int, tuple[int, Counter[int]]] = {}
        self.notify: Callable[[], None] = lambda: None  # BGP re-evaluates after every flip and apply
        self.before_apply: Callable[[], Awaitable[None]] = _nothing
        self.observe: Callable[[float, int], None] = lambda seconds, slots: None  # metrics: ring rebuilds

    # -- health
    def health_of(self, pair: Pair) -> Health:
        key = self.keys.get(pair)
        if key is None:
            return Health(up=True, reason="not checked (type none)")
        seen = self.monitor.observation(key)
        return seen.health if seen else NEW

    def health(self) -> dict[Pair, bool]:
        return {pair: self.health_of(pair).up for pair in self.keys}

    def serving(self) -> dict[Pair, bool]:
        """Up now and already in the maps: a backend whose rise was seen but not yet written is not serving
        (BGP announces on this, so a route never leads to a ring that is still empty)."""
        return {pair: up and self._written_up(pair) for pair, up in self.health().items()}

    def _written_up(self, pair: Pair) -> bool:
        """The maps' own word: the backend's slot as last written carries the UP flag."""
        index = self.backend_index(pair)
        slot = None if index is None else self.maps.programmer.backends.get(index)
        return slot is not None and slot.up

    def _changed(self, key: CheckKey, old: Health, new: Health) -> None:
        for (vip, address), k in self.keys.items():
            if k == key:
                events.emit("health", vip=vip.name, backend=address, check=key.spec.kind,
                            to="up" if new.up else "down", reason=new.reason)
        self.dirty.set()

    # -- lifecycle
    async def start(self, adopted_up: Mapping[Pair, bool]) -> ApplyReport:
        """First apply: adopted backends keep serving, new ones wait for their checks."""
        self.keys = check_keys(self.config)
        self.monitor.start(initial_health(self.keys, {}, adopted_up))
        return self.apply("startup")

    async def reload(self, config: Config) -> ApplyReport:
        """Apply a validated config as a diff: unchanged backends keep their probers and health; a changed
        check starts from the backend's current health. New probers start before the swap and old ones stop
        after the apply, so no apply ever sees a backend without a prober (it would count as down)."""
        weights = overrides.prune(config, self.overrides)
        effective = overrides.apply(config, weights)
        keys = check_keys(effective)
        self.monitor.start(initial_health(keys, {p: self.health_of(p) for p in self.keys}, {}))
        previous = (self.base, self.config, self.keys, self.overrides)
        self.base, self.config, self.keys, self.overrides = config, effective, keys, weights
        try:
            report = self.apply("reload")
        except Exception:
            self.base, self.config, self.keys, self.overrides = previous
            self._rollback()
            await self.monitor.prune({k for k in self.keys.values() if k is not None})
            raise
        await self.monitor.prune({k for k in keys.values() if k is not None})
        overrides.save(self.overrides_file, self.overrides)  # without the backends the config dropped
        return report

    def weighted(self, vip_name: str, address: str, weight: int | None) -> tuple[Config, overrides.Overrides]:
        """The running config and runtime weights once this weight is set (None: the config's again).
        Changes nothing. KeyError when the VIP or backend is not in the running config."""
        vip = next((v for v in self.base.vips if v.name == vip_name), None)
        if vip is None:
            raise KeyError(f"no VIP {vip_name}")
        if not any(str(b.address) == address for b in vip.backends):
            raise KeyError(f"no backend {address} in VIP {vip_name}")
        wanted = dict(self.overrides)
        if weight is None:
            wanted.pop((vip_name, address), None)
        else:
            wanted[(vip_name, address)] = weight
        return overrides.apply(self.base, wanted), wanted

    def set_weight(self, vip_name: str, address: str, weight: int | None) -> ApplyReport:
        """A runtime weight (None: the config's again), applied at once and kept across restarts.
        KeyError when the VIP or backend is not in the running config."""
        config, wanted = self.weighted(vip_name, address, weight)
        previous = (self.config, dict(self.overrides))
        overrides.save(self.overrides_file, wanted)  # first: a weight that is live is also on disk
        self.overrides = wanted
        self.config = config
        try:
            report = self.apply("api")
        except Exception:
            self.config, self.overrides = previous
            overrides.save(self.overrides_file, self.overrides)
            self._rollback()
            raise
        events.emit("weight", vip=vip_name, backend=address, weight=weight, source="api",
                    result="config weight again" if weight is None else "set")
        return report

    def _rollback(self) -> None:
        """The maps refused part of a reload: write the running config again over whatever was written."""
        try:
            self.apply("rollback")
        except Exception as exc:
            events.emit("apply_failed", logging.ERROR, trigger="rollback", error=exc, retry_in=f"{_RETRY:g}s")
            self.dirty.set()

    async def run(self) -> None:
        """Until cancelled: each burst of health flips becomes one apply."""
        while True:
            await self.dirty.wait()
            self.dirty.clear()
            await self.before_apply()  # BGP withdraws what is no longer servable before the slow rewrite
            try:
                self.apply("health")
            except Exception as exc:
                events.emit("apply_failed", logging.ERROR, error=exc, retry_in=f"{_RETRY:g}s")
                await asyncio.sleep(_RETRY)
                self.dirty.set()

    async def stop(self) -> None:
        await self.monitor.stop()

    # -- maps
    def apply(self, trigger: str) -> ApplyReport:
        began = time.monotonic()
        health = self.health()
        report = self.maps.apply(self.config, health)
        self.applies += 1
        if report.ring_slots:
            self.observe(time.monotonic() - began, sum(report.ring_slots.values()))
        self.notify()
        names = {num: key for key, num in self.maps.programmer.vips.items()}
        for num, slots in report.ring_slots.items():
            vip = names.get(num)
            up = sum(1 for (v, _), ok in health.items() if v == vip and ok)
            total = sum(1 for v, _ in self.keys if v == vip)
            events.emit("ring", vip=vip.name if vip else f"#{num} (removed)", slots_changed=slots,
                        ring_size=self.maps.programmer.ring_size, healthy=f"{up}/{total}", trigger=trigger)
        return report

    def ring_counts(self, vip: VipKey) -> Counter[int]:
        """Backend index -> ring slots it holds, from what was last written; counted once per apply."""
        vip_num = self.maps.programmer.vips.get(vip)
        if vip_num is None:
            return Counter()
        cached = self._ring_counts.get(vip_num)
        if cached is None or cached[0] != self.applies:
            cached = (self.applies, Counter(self.maps.programmer.rings.get(vip_num, ())))
            self._ring_counts[vip_num] = cached
        return cached[1]

    def backend_index(self, pair: Pair) -> int | None:
        vip_num = self.maps.programmer.vips.get(pair[0])
        return None if vip_num is None else self.maps.alloc.backend_idx.get((vip_num, pair[1]))

    def view(self, vip: VipKey, address: IPAddress, weight: int) -> BackendView:
        health = self.health_of((vip, address))
        key = self.keys.get((vip, address))
        seen = self.monitor.observation(key) if key else None
        state = ("down" if not health.up else "drained" if weight == 0 else "unchecked" if key is None
                 else "up")
        return BackendView(address, weight, state, health.reason, seen.checked_at if seen else None,
                           self.backend_index((vip, address)), seen.latency if seen else None)
