"""GET /metrics: Prometheus families built from the node as it is at the scrape.

A scrape renders ops.status() and ops.counters() of the moment; neither touches the per-CPU maps: their
traffic figures come from the node's one counter sampler (edge_lb.dataplane.counters.CounterSampler), which
reads the maps once a second, so a scraper hammering /metrics costs the data plane nothing.
`edge_lb_snapshot_age_seconds` is the age of that sampler's snapshot: how stale the traffic figures are (it
grows while refreshes fail). Health, weights, ring shares and BGP are as they are at the scrape.

    edge_lb_vip_packets_total, edge_lb_vip_bytes_total                  {vip}
    edge_lb_backend_packets_total, edge_lb_backend_bytes_total          {vip, backend}
    edge_lb_backend_up (up/drained/unchecked = 1), edge_lb_backend_weight, edge_lb_backend_ring_share,
    edge_lb_backend_check_latency_seconds (when known)                  {vip, backend}
    edge_lb_backend_state (one-hot)                                     {vip, backend, state}
    edge_lb_packets_total (enum lb_stat without STAT_, lower case)      {reason}
    edge_lb_conntable_hits_total, edge_lb_conntable_misses_total
    edge_lb_bgp_peer_up {peer}, edge_lb_bgp_announced {prefix}
    edge_lb_bgp_speaker_up, edge_lb_bgp_speaker_restarts_total, edge_lb_watchdog_ok, edge_lb_loop_lag_seconds
    edge_lb_node_disabled, edge_lb_dataplane_attached
    edge_lb_local_faults_total, edge_lb_local_fault_checks               {cause}
    edge_lb_local_fault_withdrawn
    edge_lb_ring_rebuild_seconds (histogram), edge_lb_ring_rebuilds_total, edge_lb_ring_slots_written_total
    edge_lb_snapshot_age_seconds
    edge_lb_api_connections, edge_lb_api_connection_limit,
    edge_lb_api_connections_evicted_total, edge_lb_api_connections_refused_total   {site}
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from edge_lb.control.document import NodeDocument
from edge_lb.control.operations import Operations
from edge_lb.dataplane.counters import CounterSnapshot

STATES = ("up", "down", "drained", "unchecked")  # edge_lb.control.reconciler.BackendView.state
SERVING = frozenset({"up", "drained", "unchecked"})  # drained keeps its flows; unchecked has no health check
REBUILD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


def reason_label(name: str) -> str:
    """STAT_DROP_FRAGMENT -> drop_fragment."""
    return name.removeprefix("STAT_").lower()


def _gauge(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=labels)


def _counter(name: str, doc: str, labels: list[str]) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, labels=labels)


def backend_families(status: NodeDocument) -> Iterator[Metric]:
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
    via = _gauge("edge_lb_backend_check_via", "1 for the path the backend's check takes: tunnel (the VIP "
                 "through its tunnel, as clients reach it) or direct (its own address).", [*bl, "via"])
    for vip in status["vips"]:
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
            seconds = b["latency"]
            if seconds is not None:
                latency.add_metric(labels, seconds)
            if b["via"] is not None:
                via.add_metric([*labels, b["via"]], 1)
    yield from (vip_packets, vip_bytes, packets, nbytes, up, state, weight, share, latency, via)


def node_families(status: NodeDocument, counters: CounterSnapshot) -> Iterator[Metric]:
    """Data-plane reasons, BGP and the node's switches."""
    reasons = counters.reason_packets()
    by_reason = _counter("edge_lb_packets", "Packets seen by the XDP program, by verdict reason.", ["reason"])
    for name, value in reasons.items():
        by_reason.add_metric([reason_label(name)], value)
    yield by_reason
    yield CounterMetricFamily("edge_lb_conntable_hits", "Backend taken from the connection table.",
                              value=reasons.get("STAT_CT_HIT", 0))
    yield CounterMetricFamily("edge_lb_conntable_misses", "Backend taken from the Maglev ring.",
                              value=reasons.get("STAT_CT_MISS", 0))
    bgp = status.get("bgp")
    peers = _gauge("edge_lb_bgp_peer_up", "1 if the BGP session is established.", ["peer"])
    announced = _gauge("edge_lb_bgp_announced", "1 for each prefix announced to ExaBGP.", ["prefix"])
    if bgp is not None:
        for peer, session in sorted(bgp["peers"].items()):
            peers.add_metric([peer], 1 if session == "up" else 0)
        for prefix in bgp["announced"]:
            announced.add_metric([prefix], 1)
    yield from (peers, announced)
    yield GaugeMetricFamily("edge_lb_node_disabled", "1 while the node is disabled for maintenance.",
                            value=1 if bgp is not None and bgp["disabled"] else 0)
    yield GaugeMetricFamily("edge_lb_dataplane_attached", "1 while the XDP program is attached.",
                            value=1 if status.get("attached") else 0)
    yield from local_fault_families(status)
    yield from check_tunnel_families(status)


def check_tunnel_families(status: NodeDocument) -> Iterator[Metric]:
    """The tunnel checks' encapsulator (absent when no check goes through a tunnel)."""
    tunnel = status.get("check_tunnel")
    if tunnel is None:
        return
    ready = 1 if tunnel["ready"] else 0
    yield GaugeMetricFamily("edge_lb_check_tunnel_ready", "1 while the tunnel checks' encapsulator (tc "
                            "filter and fwmark rule) is in place; 0: tunnel checks wait.", value=ready)
    yield CounterMetricFamily("edge_lb_check_tunnel_restores", "Times the encapsulator was found removed "
                              "from outside and put back.", value=tunnel["restores"])
    yield CounterMetricFamily("edge_lb_check_tunnel_failures", "Failed attempts to put the encapsulator in "
                              "place (retried).", value=tunnel["failures"])
    yield GaugeMetricFamily("edge_lb_check_tunnel_local_vips", "Tunnelled VIPs that are local addresses on "
                            "this node: their checks are answered locally.", value=len(tunnel["local_vips"]))


def local_fault_families(status: NodeDocument) -> Iterator[Metric]:
    """Checks that failed for a reason on this node (EMFILE, its link down, ...): not the backends'."""
    faults = status.get("local_faults")
    total = _counter("edge_lb_local_faults", "Check results that failed for a reason on this node, not "
                     "counted against the backend.", ["cause"])
    checks = _gauge("edge_lb_local_fault_checks", "Checks whose last result was a local fault.", ["cause"])
    for cause, count in (faults["counts"] if faults else {}).items():
        total.add_metric([cause], count)
    for cause, count in (faults["faulty"] if faults else {}).items():
        checks.add_metric([cause], count)
    yield from (total, checks)
    yield GaugeMetricFamily("edge_lb_local_fault_withdrawn", "1 while the node cannot judge its backends "
                            "(for longer than the bound): every VIP withdrawn.",
                            value=1 if faults and faults["withdrawn"] else 0)


def watchdog_families(status: NodeDocument) -> Iterator[Metric]:
    """The hang watchdog's judgement and the BGP speaker's liveness (a wedged ExaBGP is restarted)."""
    bgp, dog = status.get("bgp"), status.get("watchdog")
    speaker = bgp.get("speaker") if bgp is not None else None
    up = GaugeMetricFamily("edge_lb_bgp_speaker_up", "1 while ExaBGP answers its commands (0: wedged, "
                           "restarting, stopped).", labels=[])
    restarts = CounterMetricFamily("edge_lb_bgp_speaker_restarts", "ExaBGP restarts (it died, or did not "
                                   "answer and was killed).", labels=[])
    if speaker is not None:
        up.add_metric([], 1 if speaker["state"] == "up" else 0)
        restarts.add_metric([], speaker["restarts"])
    yield from (up, restarts)
    ok = GaugeMetricFamily("edge_lb_watchdog_ok", "1 while the main loop and the health checks make "
                           "progress (systemd is pinged, ExaBGP's bridge gets its heartbeat).", labels=[])
    lag = GaugeMetricFamily("edge_lb_loop_lag_seconds", "How late the main loop's last tick came.", labels=[])
    if dog is not None:
        ok.add_metric([], 1 if dog["ok"] else 0)
        lag.add_metric([], dog["loop_lag"])
    yield from (ok, lag)


def api_families(status: NodeDocument) -> Iterator[Metric]:
    """The API sites' connections (edge_lb.api.gate): unix (the control socket) and tcp ([api].listen)."""
    site = ["site"]
    open_ = _gauge("edge_lb_api_connections", "Open connections to the API site.", site)
    limit = _gauge("edge_lb_api_connection_limit", "The most connections the API site holds.", site)
    evicted = _counter("edge_lb_api_connections_evicted", "Idle connections closed to make room.", site)
    refused = _counter("edge_lb_api_connections_refused", "New connections refused: every one busy.", site)
    for name, counts in sorted(status.get("api", {}).items()):
        open_.add_metric([name], counts["open"])
        limit.add_metric([name], counts["limit"])
        evicted.add_metric([name], counts["evicted"])
        refused.add_metric([name], counts["refused"])
    yield from (open_, limit, evicted, refused)


@dataclass(frozen=True)
class Reading:
    """One scrape's read of the node, taken in the event loop's thread (the sampler cannot refresh in
    between, so the status document's traffic and the reasons are the same snapshot's). Owned by the
    scrape alone: formatting it may run in another thread."""

    status: NodeDocument
    counters: CounterSnapshot
    age: float

    @classmethod
    def of(cls, ops: Operations) -> Reading:
        counters = ops.counters()
        return cls(ops.status(), counters, counters.age())


class _Scrape:
    """A collector over one Reading and the registry's own instruments (ring rebuilds)."""

    def __init__(self, reading: Reading, own: CollectorRegistry) -> None:
        self.reading = reading
        self.own = own

    def collect(self) -> Iterator[Metric]:
        status, counters = self.reading.status, self.reading.counters
        yield from self.own.collect()
        yield from backend_families(status)
        yield from node_families(status, counters)
        yield from api_families(status)
        yield from watchdog_families(status)
        yield GaugeMetricFamily("edge_lb_snapshot_age_seconds",
                                "Seconds since the counter sampler read the data plane's counter maps.",
                                value=self.reading.age)


class Metrics:
    """The node's metrics: `render()` and GET /metrics read the node at the scrape, in the event loop's
    thread; GET /metrics formats the text (most of a scrape's cost: ~240 ms at 500 VIPs x 10) in a worker
    thread, so the loop's health checks, BGP and API are not held up by it."""

    def __init__(self, ops: Operations, registry: CollectorRegistry | None = None) -> None:
        self.ops = ops
        self.registry = CollectorRegistry() if registry is None else registry  # the instruments below
        self.rebuild_seconds = Histogram("edge_lb_ring_rebuild_seconds",
                                         "Duration of map applies that changed ring slots.",
                                         buckets=REBUILD_BUCKETS, registry=self.registry)
        self.rebuilds = Counter("edge_lb_ring_rebuilds", "Map applies that changed ring slots.",
                                registry=self.registry)
        self.slots_written = Counter("edge_lb_ring_slots_written", "Ring slots written to the map.",
                                     registry=self.registry)

    def observe_apply(self, seconds: float, slots: int) -> None:
        """Called by the supervisor after a map apply that changed `slots` ring slots in `seconds`."""
        self.rebuild_seconds.observe(seconds)
        self.rebuilds.inc()
        self.slots_written.inc(slots)

    def render(self) -> tuple[bytes, str]:
        return self.format(Reading.of(self.ops)), CONTENT_TYPE_LATEST

    def format(self, reading: Reading) -> bytes:
        scrape = CollectorRegistry(auto_describe=False)
        scrape.register(_Scrape(reading, self.registry))
        return generate_latest(scrape)

    async def handle(self, request: web.Request) -> web.Response:
        body = await asyncio.to_thread(self.format, Reading.of(self.ops))
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/metrics", self.handle)
