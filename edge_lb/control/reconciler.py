"""The one change path: every change to what the data plane serves goes through `Reconciler.change`.

    trigger (health flip, reload, weight/drain, gateway MAC, startup)
      -> NodeState.candidate: base config + runtime weights, pruned, built once
      -> Routes.withdraw_first(candidate): BGP withdraws what the candidate will not serve
      -> start the candidate's new probers, make it the running one
      -> NodeMaps.apply: changed ring slots only, one batch per VIP
      -> the runtime weights, when they changed: written beside the file before anything else (a weight that
         cannot be kept refuses the change before a route or a map is touched), renamed in after the write
      -> Routes.changed(): BGP announces what now serves
    any failure -> the previous candidate is written back (one rollback path) and the error is raised

Health flips arrive in bursts: `run()` turns each burst into one change. Pure decisions live elsewhere
(rise/fall in healthchecks.machine, rings in dataplane.desired and dataplane.maglev).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

from edge_lb import events
from edge_lb.config import Config, IPAddress
from edge_lb.control import overrides
from edge_lb.control.nodestate import Candidate, NodeState
from edge_lb.dataplane.desired import VipKey
from edge_lb.dataplane.programmer import ApplyReport

_RETRY = 1.0  # seconds before a failed map write is tried again


class Routes(Protocol):
    """What the change path asks of BGP (bgp.controller.BgpController; NoRoutes when there is no [bgp])."""

    async def withdraw_first(self, candidate: Config) -> None:
        """Withdraw, before the maps change, every route `candidate` (with the health now) will not serve."""

    def changed(self) -> None:
        """The maps changed: announce what now serves."""


class NoRoutes:
    """No [bgp] table: nothing is announced, nothing to withdraw."""

    async def withdraw_first(self, candidate: Config) -> None:
        return None

    def changed(self) -> None:
        return None


def _ignore(seconds: float, slots: int) -> None:
    return None


class Reconciler:
    def __init__(self, state: NodeState, routes: Routes, *, weights_file: Path | None = None,
                 observe: Callable[[float, int], None] = _ignore) -> None:
        self.state = state
        self.maps = state.maps
        self.routes = routes
        self.weights_file = weights_file
        self.observe = observe  # metrics: seconds and slots of every ring rewrite
        self._lock = asyncio.Lock()  # one change at a time: a reload never interleaves with a drain

    async def change(self, trigger: str, *, base: Config | None = None,
                     weights: Mapping[tuple[str, str], int] | None = None) -> ApplyReport:
        """Apply a new base config and/or runtime weights (neither: the running ones with the health and
        link now). Whole or not at all: on failure the previous state is written back and the error raised."""
        async with self._lock:
            return await self._change(trigger, self.state.candidate(base, weights))

    async def set_weight(self, vip: str, backend: str, weight: int | None) -> ApplyReport:
        """One runtime weight (0 = drain, None = the config's again). KeyError: unknown VIP/backend."""
        async with self._lock:
            return await self._change("weight", self.state.running.with_weight(vip, backend, weight))

    async def _change(self, trigger: str, candidate: Candidate) -> ApplyReport:
        # New weights are written beside the file first: one that cannot be kept (read-only state dir)
        # refuses the change before any route or map is touched.
        weights = (overrides.prepare(self.weights_file, candidate.weights)
                   if candidate.weights != self.state.weights else overrides.Pending(None, None))
        try:
            await self.routes.withdraw_first(candidate.config)
            self.state.start_checks(candidate)  # a check no checker can run raises here, before the commit
            try:
                # Written before it is committed: until then BGP's loop judges by the running candidate,
                # so nothing the write adds is announced while the write (off the loop) is under way.
                report = await self._write(trigger, candidate)
            except Exception:
                await self._rollback(self.state.running)
                raise
            previous = self.state.commit(candidate)
            self.state.written()
            try:
                weights.commit()
            except Exception:
                self.state.commit(previous)
                await self._rollback(previous)
                raise
        finally:
            # changed() first: the pending candidate is cleared even if pruning fails or is cancelled
            self.routes.changed()  # also after a failure: what the withdraw-first took is announced again
            weights.discard()  # nothing left once committed
            await self.state.prune_checks()
        return report

    async def _rollback(self, previous: Candidate) -> None:
        """Write the running candidate again over whatever was written; if that fails, the loop retries."""
        try:
            await self._write("rollback", previous)
            self.state.written()
        except Exception as exc:
            events.emit("apply_failed", logging.ERROR, trigger="rollback", error=exc, retry_in=f"{_RETRY:g}s")
            self.state.poke("rollback")

    async def run(self) -> None:
        """Until cancelled: each burst of health flips (or a link change, or a failed write) is one change."""
        while True:
            await self.state.dirty.wait()
            trigger = self.state.take_triggers()
            try:
                await self.change(trigger)
            except Exception as exc:
                events.emit("apply_failed", logging.ERROR, trigger=trigger, error=exc,
                            retry_in=f"{_RETRY:g}s")
                await asyncio.sleep(_RETRY)
                self.state.poke(trigger)

    # -- maps
    async def _write(self, trigger: str, candidate: Candidate) -> ApplyReport:
        """The maps to `candidate` with the health now, in a worker thread: Maglev and the slot diffs of many
        VIPs take hundreds of ms of CPU, which on the loop would stall checks, BGP and the API. The change
        lock keeps writes one at a time; readers see the maps' tables as they were before it or after it
        (dataplane/programmer.py publishes them at the end)."""
        began = time.monotonic()
        health = self.state.health(candidate)
        report = await asyncio.to_thread(self.maps.apply, candidate.config, health, self.state.link)
        if report.ring_slots:
            self.observe(time.monotonic() - began, sum(report.ring_slots.values()))
        self._log_rings(report, health, trigger)
        return report

    def _log_rings(self, report: ApplyReport, health: Mapping[tuple[VipKey, IPAddress], bool],
                   trigger: str) -> None:
        names = self.maps.vip_names()
        for num, slots in report.ring_slots.items():
            vip = names.get(num)
            up = sum(1 for (v, _), ok in health.items() if v == vip and ok)
            total = sum(1 for v, _ in health if v == vip)
            events.emit("ring", vip=vip.name if vip else f"#{num} (removed)", slots_changed=slots,
                        ring_size=self.maps.ring_size, healthy=f"{up}/{total}", trigger=trigger)
