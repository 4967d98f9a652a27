"""GET /metrics: Prometheus families built from a snapshot of the node, refreshed on a timer.

Scrapes never touch the per-CPU maps: `run()` takes a snapshot (ops.status() and ops.counters()) every
`interval` seconds and a request renders the last one, so a scraper hammering /metrics costs the data plane
nothing. `edge_lb_snapshot_age_seconds` says how stale the numbers are (it grows if refreshes fail).

    edge_lb_vip_packets_total, edge_lb_vip_bytes_total                  {vip}
    edge_lb_backend_packets_total, edge_lb_backend_bytes_total          {vip, backend}
    edge_lb_backend_up (up/drained/unchecked = 1), edge_lb_backend_weight, edge_lb_backend_ring_share,
    edge_lb_backend_check_latency_seconds (when known)                  {vip, backend}
    edge_lb_backend_state (one-hot)                                     {vip, backend, state}
    edge_lb_packets_total (enum lb_stat without STAT_, lower case)      {reason}
    edge_lb_conntable_hits_total, edge_lb_conntable_misses_total
    edge_lb_bgp_peer_up {peer}, edge_lb_bgp_announced {prefix}
    edge_lb_node_disabled, edge_lb_dataplane_attached
    edge_lb_ring_rebuild_seconds (histogram), edge_lb_ring_rebuilds_total, edge_lb_ring_slots_written_total
    edge_lb_snapshot_age_seconds
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from edge_lb import events
from edge_lb.control.operations import Doc, Operations
from edge_lb.dataplane.counters import reason_names

STATES = ("up", "down", "drained", "unchecked")  # edge_lb.control.reconciler.BackendView.state
SERVING = frozenset({"up", "drained", "unchecked"})  # drained keeps its flows; unchecked has no health check
REBUILD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


@dataclass(frozen=True)
class Snapshot:
    status: Doc
    counters: Doc
    taken: float  # time.monotonic() when it was read


def reason_label(name: str) -> str:
    """STAT_DROP_FRAGMENT -> drop_fragment."""
    return name.removeprefix("STAT_").lower()


def _gauge(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=labels)


def _counter(name: str, doc: str, labels: list[str]) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, labels=labels)


def backend_families(status: Doc) -> Iterator[Metric]:
    """Per-VIP and per-backend traffic, health and ring placement."""
    vip_packets = _counter("edge_lb_vip_packets", "Packets sent to the VIP's backends.", ["vip"])
    vip_bytes = _counter("edge_lb_vip_bytes", "Bytes sent to the VIP's backends.", ["vip"])
    bl = ["vip", "backend"]
    packets = _counter("edge_lb_backend_packets", "Packets sent to the backend.", bl)
    nbytes = _counter("edge_lb_backend_bytes", "Bytes sent to the backend.", bl)
    up = _gauge("edge_lb_backend_up", "1 if the backend takes traffic (up, drained or unchecked).", bl)
    state = _gauge("edge_lb_backend_state", "1 for the backend's current state.", [*bl, "state"])
    weight = _gauge("edge_lb_backend_weight", "Effective weight (0 = drained).", bl)
    share = _gauge("edge_lb_backend_ring_share", "Fraction of the Maglev ring held by the backend.", bl)
    latency = _gauge("edge_lb_backend_check_latency_seconds", "Duration of the last health check.", bl)
    for vip in status.get("vips", []):
        name = vip["vip"]
        vip_packets.add_metric([name], vip["packets"])
        vip_bytes.add_metric([name], vip["bytes"])
        for b in vip["backends"]:
            labels = [name, b["address"]]
            packets.add_metric(labels, b["packets"])
            nbytes.add_metric(labels, b["bytes"])
            up.add_metric(labels, 1 if b["state"] in SERVING else 0)
            for s in (*STATES, *([b["state"]] if b["state"] not in STATES else [])):
                state.add_metric([*labels, s], 1 if s == b["state"] else 0)
            weight.add_metric(labels, b["weight"])
            share.add_metric(labels, b["ring_share"])
            if b.get("latency") is not None:
                latency.add_metric(labels, b["latency"])
    yield from (vip_packets, vip_bytes, packets, nbytes, up, state, weight, share, latency)


def node_families(status: Doc, counters: Doc) -> Iterator[Metric]:
    """Data-plane reasons, BGP and the node's switches."""
    reasons = dict.fromkeys(reason_names(), 0) | counters.get("reasons", {})
    by_reason = _counter("edge_lb_packets", "Packets seen by the XDP program, by verdict reason.", ["reason"])
    for name, value in reasons.items():
        by_reason.add_metric([reason_label(name)], value)
    yield by_reason
    yield CounterMetricFamily("edge_lb_conntable_hits", "Backend taken from the connection table.",
                              value=reasons.get("STAT_CT_HIT", 0))
    yield CounterMetricFamily("edge_lb_conntable_misses", "Backend taken from the Maglev ring.",
                              value=reasons.get("STAT_CT_MISS", 0))
    bgp = status.get("bgp") or {}
    peers = _gauge("edge_lb_bgp_peer_up", "1 if the BGP session is established.", ["peer"])
    for peer, session in sorted(bgp.get("peers", {}).items()):
        peers.add_metric([peer], 1 if session == "up" else 0)
    announced = _gauge("edge_lb_bgp_announced", "1 for each prefix announced to ExaBGP.", ["prefix"])
    for prefix in bgp.get("announced", []):
        announced.add_metric([prefix], 1)
    yield from (peers, announced)
    yield GaugeMetricFamily("edge_lb_node_disabled", "1 while the node is disabled for maintenance.",
                            value=1 if bgp.get("disabled") else 0)
    yield GaugeMetricFamily("edge_lb_dataplane_attached", "1 while the XDP program is attached.",
                            value=1 if status.get("attached") else 0)


class _SnapshotCollector:
    def __init__(self, owner: Metrics) -> None:
        self.owner = owner

    def collect(self) -> Iterator[Metric]:
        snap = self.owner.snapshot()
        yield from backend_families(snap.status)
        yield from node_families(snap.status, snap.counters)
        yield GaugeMetricFamily("edge_lb_snapshot_age_seconds", "Seconds since the counters were read.",
                                value=max(time.monotonic() - snap.taken, 0.0))


class Metrics:
    """The node's metrics in their own registry; `run()` refreshes, `render()` and GET /metrics read."""

    def __init__(self, ops: Operations, interval: float = 1.0,
                 registry: CollectorRegistry | None = None) -> None:
        if not interval > 0:
            raise ValueError(f"metrics interval must be positive, got {interval!r}")
        self.ops = ops
        self.interval = interval
        self.registry = CollectorRegistry() if registry is None else registry
        self._snapshot: Snapshot | None = None
        self.registry.register(_SnapshotCollector(self))
        self.rebuild_seconds = Histogram("edge_lb_ring_rebuild_seconds",
                                         "Duration of map applies that changed ring slots.",
                                         buckets=REBUILD_BUCKETS, registry=self.registry)
        self.rebuilds = Counter("edge_lb_ring_rebuilds", "Map applies that changed ring slots.",
                                registry=self.registry)
        self.slots_written = Counter("edge_lb_ring_slots_written", "Ring slots written to the map.",
                                     registry=self.registry)

    def refresh(self) -> Snapshot:
        """Read the node once (the only place that does); scrapes render the result."""
        self._snapshot = Snapshot(self.ops.status(), self.ops.counters(), time.monotonic())
        return self._snapshot

    def snapshot(self) -> Snapshot:
        return self.refresh() if self._snapshot is None else self._snapshot

    async def run(self) -> None:
        """Refresh every `interval` seconds until cancelled; a failed read keeps the previous snapshot."""
        while True:
            await asyncio.sleep(self.interval)
            try:
                self.refresh()
            except Exception as exc:
                events.emit("metrics", logging.WARNING, result="refresh failed", error=repr(exc))

    def observe_apply(self, seconds: float, slots: int) -> None:
        """Called by the supervisor after a map apply that changed `slots` ring slots in `seconds`."""
        self.rebuild_seconds.observe(seconds)
        self.rebuilds.inc()
        self.slots_written.inc(slots)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    async def handle(self, request: web.Request) -> web.Response:
        body, content_type = self.render()
        return web.Response(body=body, headers={"Content-Type": content_type})

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/metrics", self.handle)
