"""GET /metrics: every family's values from a canned node document, then over an in-memory node
(tests/unit/memnode.py): scrapes read the node at the moment, their traffic from the one counter sampler, and
edge_lb_snapshot_age_seconds is that sampler's snapshot age."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from edge_lb.api.metrics import Metrics, reason_label
from edge_lb.dataplane import counters
from edge_lb.dataplane.counters import CounterSampler, CounterSnapshot

from .memnode import MemNode, running

VIP = "10.0.0.1:80/tcp"
B1, B2 = "10.1.0.1", "10.1.0.2"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


Doc = dict[str, Any]


def _backend(address: str) -> Doc:
    return {"address": address, "weight": 1, "state": "up", "config_weight": 1, "reason": "HTTP 200",
            "last_check": time.time(), "latency": 0.002, "check": "http", "via": "tunnel", "ring_slots": 0,
            "ring_share": 0.0, "packets": 0, "bytes": 0}


def _reasons(**packets: int) -> dict[int, tuple[int, int]]:
    return {counters.reason_names().index(name): (n, 0) for name, n in packets.items()}


@dataclass
class CountingOperations:
    """A canned node document and counter snapshot (the families' edge cases); counts status() reads."""

    doc: Doc = field(default_factory=lambda: {
        "vips": [{"vip": VIP, "address": "10.0.0.1", "port": 80, "protocol": "tcp", "healthy": 2,
                  "in_ring": 2, "backends": [_backend(B1), _backend(B2)], "packets": 0, "bytes": 0}],
        "ring_size": 65537, "phase": "running", "instance": "fake", "interface": "eth0", "pid": 1,
        "uptime": 1.0, "config": "/etc/edge-lb.toml", "gateway_mac": "02:00:00:00:00:02", "applies": 1,
        "bgp": {"peers": {"10.9.0.1": "up"}, "announced": ["10.0.0.1/32"], "withheld": {}, "disabled": False,
                "disable_file": "/var/lib/edge-lb/fake.disabled"},
        "attached": True})
    snapshot: CounterSnapshot = field(default_factory=lambda: CounterSnapshot(
        {}, {}, _reasons(STAT_TX=10, STAT_CT_HIT=7, STAT_CT_MISS=3), time.monotonic()))
    reads: int = 0

    def status(self) -> Doc:
        self.reads += 1
        return copy.deepcopy(self.doc)

    def counters(self) -> CounterSnapshot:
        return self.snapshot


def parse(body: bytes) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(body.decode()) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def names(samples: Samples, name: str, label: str) -> set[str]:
    return {dict(key)[label] for n, key in samples if n == name}


def scrape(metrics: Metrics) -> Samples:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    return parse(body)


@pytest.fixture
def ops() -> CountingOperations:
    ops = CountingOperations()
    vip = ops.doc["vips"][0]
    vip.update(packets=300, bytes=45000)
    b1, b2 = vip["backends"]
    b1.update(packets=200, bytes=30000, ring_share=0.6, latency=0.004)
    b2.update(packets=100, bytes=15000, ring_share=0.4, state="down", weight=3, latency=None, via="direct")
    return ops


def test_vip_and_backend_traffic(ops: CountingOperations) -> None:
    s = scrape(Metrics(ops))
    assert value(s, "edge_lb_vip_packets_total", vip=VIP) == 300
    assert value(s, "edge_lb_vip_bytes_total", vip=VIP) == 45000
    assert value(s, "edge_lb_backend_packets_total", vip=VIP, backend=B1) == 200
    assert value(s, "edge_lb_backend_bytes_total", vip=VIP, backend=B2) == 15000


def test_health_weight_ring_and_latency(ops: CountingOperations) -> None:
    s = scrape(Metrics(ops))
    assert value(s, "edge_lb_backend_up", vip=VIP, backend=B1) == 1
    assert value(s, "edge_lb_backend_up", vip=VIP, backend=B2) == 0
    for state in ("up", "down", "drained", "unchecked"):
        assert value(s, "edge_lb_backend_state", vip=VIP, backend=B1, state=state) == (state == "up")
        assert value(s, "edge_lb_backend_state", vip=VIP, backend=B2, state=state) == (state == "down")
    assert value(s, "edge_lb_backend_weight", vip=VIP, backend=B2) == 3
    assert value(s, "edge_lb_backend_ring_share", vip=VIP, backend=B1) == pytest.approx(0.6)
    assert value(s, "edge_lb_backend_check_latency_seconds", vip=VIP, backend=B1) == pytest.approx(0.004)
    assert names(s, "edge_lb_backend_check_latency_seconds", "backend") == {B1}  # B2's latency unknown


def test_the_path_each_check_takes(ops: CountingOperations) -> None:
    ops.doc["vips"][0]["backends"].append({**_backend("10.1.0.3"), "via": None, "check": None})  # unchecked
    s = scrape(Metrics(ops))
    assert value(s, "edge_lb_backend_check_via", vip=VIP, backend=B1, via="tunnel") == 1
    assert value(s, "edge_lb_backend_check_via", vip=VIP, backend=B2, via="direct") == 1
    assert names(s, "edge_lb_backend_check_via", "backend") == {B1, B2}


def test_the_tunnel_checks_encapsulator(ops: CountingOperations) -> None:
    assert not any(n.startswith("edge_lb_check_tunnel") for n, _ in scrape(Metrics(ops))), "no tunnel: none"
    ops.doc["check_tunnel"] = {"ready": False, "restores": 2, "failures": 5, "local_vips": ["10.0.0.1"]}
    s = scrape(Metrics(ops))
    assert value(s, "edge_lb_check_tunnel_ready") == 0
    assert value(s, "edge_lb_check_tunnel_restores_total") == 2
    assert value(s, "edge_lb_check_tunnel_failures_total") == 5
    assert value(s, "edge_lb_check_tunnel_local_vips") == 1
    ops.doc["check_tunnel"]["ready"] = True
    assert value(scrape(Metrics(ops)), "edge_lb_check_tunnel_ready") == 1


@pytest.mark.parametrize(("state", "up"), [("drained", 1), ("unchecked", 1), ("down", 0), ("starting", 0)])
def test_serving_states_and_an_unknown_state(state: str, up: int) -> None:
    ops = CountingOperations()
    ops.doc["vips"][0]["backends"][0]["state"] = state
    s = scrape(Metrics(ops))
    assert value(s, "edge_lb_backend_up", vip=VIP, backend=B1) == up
    assert value(s, "edge_lb_backend_state", vip=VIP, backend=B1, state=state) == 1
    assert sum(v for (n, key), v in s.items()
               if n == "edge_lb_backend_state" and dict(key)["backend"] == B1) == 1


def test_reasons_named_from_the_c_enum(ops: CountingOperations) -> None:
    s = scrape(Metrics(ops))
    assert names(s, "edge_lb_packets_total", "reason") == {reason_label(n) for n in counters.reason_names()}
    assert {"tx", "ct_hit", "ct_miss", "ct_flood_no_insert", "ct_stateless", "pass_not_vip",
            "drop_fragment"} <= names(s, "edge_lb_packets_total", "reason")
    assert value(s, "edge_lb_packets_total", reason="tx") == 10
    assert value(s, "edge_lb_packets_total", reason="ct_hit") == 7
    assert value(s, "edge_lb_packets_total", reason="drop_fragment") == 0
    assert value(s, "edge_lb_conntable_hits_total") == 7
    assert value(s, "edge_lb_conntable_misses_total") == 3


def test_bgp_and_node_switches(ops: CountingOperations) -> None:
    ops.doc["bgp"]["peers"]["10.9.0.2"] = "connected"
    metrics = Metrics(ops)
    s = scrape(metrics)
    assert value(s, "edge_lb_bgp_peer_up", peer="10.9.0.1") == 1
    assert value(s, "edge_lb_bgp_peer_up", peer="10.9.0.2") == 0
    assert value(s, "edge_lb_bgp_announced", prefix="10.0.0.1/32") == 1
    assert value(s, "edge_lb_node_disabled") == 0
    assert value(s, "edge_lb_dataplane_attached") == 1

    ops.doc["bgp"].update(disabled=True, announced=[])
    s = scrape(metrics)  # the node as it is at the scrape
    assert value(s, "edge_lb_node_disabled") == 1
    assert names(s, "edge_lb_bgp_announced", "prefix") == set()


def test_speaker_liveness_and_the_watchdog(ops: CountingOperations) -> None:
    ops.doc["bgp"]["speaker"] = {"state": "wedged", "pid": 42, "restarts": 3, "reason": "no answer",
                                 "last_answer": 4.0}
    ops.doc["watchdog"] = {"ok": False, "reason": "late", "loop_lag": 1.5, "checks_age": 0.2, "systemd": True}
    metrics = Metrics(ops)
    s = scrape(metrics)
    assert value(s, "edge_lb_bgp_speaker_up") == 0
    assert value(s, "edge_lb_bgp_speaker_restarts_total") == 3
    assert value(s, "edge_lb_watchdog_ok") == 0 and value(s, "edge_lb_loop_lag_seconds") == 1.5
    ops.doc["bgp"]["speaker"]["state"] = "up"
    ops.doc["watchdog"]["ok"] = True
    s = scrape(metrics)
    assert value(s, "edge_lb_bgp_speaker_up") == 1 and value(s, "edge_lb_watchdog_ok") == 1
    ops.doc = {"phase": "starting", "pid": 1, "config": "/etc/edge-lb.toml", "vips": []}
    s = scrape(metrics)
    assert not [n for n, _ in s if n.startswith(("edge_lb_bgp_speaker", "edge_lb_watchdog"))]


def test_without_bgp_and_while_starting() -> None:
    ops = CountingOperations()
    ops.doc = {"phase": "starting", "pid": 1, "config": "/etc/edge-lb.toml", "vips": []}
    s = scrape(Metrics(ops))
    assert names(s, "edge_lb_bgp_peer_up", "peer") == set()
    assert value(s, "edge_lb_node_disabled") == 0
    assert value(s, "edge_lb_dataplane_attached") == 0
    assert names(s, "edge_lb_vip_packets_total", "vip") == set()


def test_ring_rebuilds(ops: CountingOperations) -> None:
    metrics = Metrics(ops)
    metrics.observe_apply(0.003, 65537)
    metrics.observe_apply(0.2, 100)
    s = scrape(metrics)
    assert value(s, "edge_lb_ring_rebuild_seconds_count") == 2
    assert value(s, "edge_lb_ring_rebuild_seconds_sum") == pytest.approx(0.203)
    assert value(s, "edge_lb_ring_rebuild_seconds_bucket", le="0.005") == 1
    assert value(s, "edge_lb_ring_rebuild_seconds_bucket", le="0.25") == 2
    assert value(s, "edge_lb_ring_rebuilds_total") == 2
    assert value(s, "edge_lb_ring_slots_written_total") == 65637


def test_own_registry_not_the_global_one(ops: CountingOperations) -> None:
    registry = CollectorRegistry()
    Metrics(ops)
    Metrics(ops)  # a second instance does not clash (prometheus_client raises on a duplicate in one registry)
    metrics = Metrics(ops, registry=registry)
    assert metrics.registry is registry
    metrics.observe_apply(0.01, 7)
    assert registry.get_sample_value("edge_lb_ring_slots_written_total") == 7, "the instruments live there"
    samples = parse(metrics.render()[0])
    assert samples[("edge_lb_vip_packets_total", frozenset({("vip", VIP)}))] == 300, "the node's, per scrape"
    assert samples[("edge_lb_ring_slots_written_total", frozenset())] == 7


def test_a_scrape_reads_the_node_on_the_loop_and_formats_in_a_thread(ops: CountingOperations) -> None:
    """The read (ops.status, ops.counters) stays in the event loop's thread: the node is not thread-safe;
    the formatting, most of a scrape's cost, goes to a worker thread."""
    import threading

    metrics = Metrics(ops)
    loop_thread: list[int] = []
    format_threads: list[int] = []
    real_format = metrics.format

    def spy(reading: Any) -> bytes:
        format_threads.append(threading.get_ident())
        return real_format(reading)

    metrics.format = spy  # type: ignore[method-assign]

    async def main() -> int:
        loop_thread.append(threading.get_ident())
        app = web.Application()
        metrics.add_routes(app)
        async with TestClient(TestServer(app)) as client:
            response = await client.get("/metrics")
            await response.read()
            return response.status

    reads = ops.reads
    assert asyncio.run(main()) == 200
    assert ops.reads == reads + 1
    assert format_threads and format_threads[0] != loop_thread[0]


def test_route() -> None:
    async def main() -> tuple[int, str, Any]:
        ops = CountingOperations()
        metrics = Metrics(ops)
        metrics.observe_apply(0.01, 10)
        app = web.Application()
        metrics.add_routes(app)
        async with TestClient(TestServer(app)) as client:
            response = await client.get("/metrics")
            return response.status, response.headers["Content-Type"], await response.read()

    status, content_type, body = asyncio.run(main())
    assert status == 200
    assert content_type.startswith("text/plain; version=")
    s = parse(body)
    assert value(s, "edge_lb_backend_up", vip=VIP, backend=B1) == 1
    assert value(s, "edge_lb_ring_rebuilds_total") == 1


# -- over the in-memory node: one counter sampler, the node as it is at the scrape


def over_node(tmp_path: Path, body: Any) -> None:
    async def main() -> None:
        async with running(tmp_path) as node:
            await body(node, Metrics(node.ops))

    asyncio.run(main())


def test_traffic_comes_from_the_one_sampler_and_the_rest_from_the_scrape(tmp_path: Path) -> None:
    async def body(node: MemNode, metrics: Metrics) -> None:
        node.send(B1, 20, 100)
        s = scrape(metrics)
        assert value(s, "edge_lb_backend_packets_total", vip=VIP, backend=B1) == 20
        assert value(s, "edge_lb_vip_bytes_total", vip=VIP) == 2000
        assert value(s, "edge_lb_packets_total", reason="tx") == 20
        assert value(s, "edge_lb_snapshot_age_seconds") == pytest.approx(node.ops.counters().age(), abs=0.05)

        node.io.counters["backend_stats"][node.index(B1)] = (999, 99900)  # in the maps, not sampled yet
        await node.ops.set_weight(VIP, B2, 0)
        s = scrape(metrics)
        assert value(s, "edge_lb_backend_packets_total", vip=VIP, backend=B1) == 20, "the sampler's figures"
        assert value(s, "edge_lb_backend_weight", vip=VIP, backend=B2) == 0, "the drain, at once"
        assert value(s, "edge_lb_backend_state", vip=VIP, backend=B2, state="drained") == 1
        assert value(s, "edge_lb_backend_ring_share", vip=VIP, backend=B1) == 1.0
        node.counters.refresh()
        assert value(scrape(metrics), "edge_lb_backend_packets_total", vip=VIP, backend=B1) == 999

    over_node(tmp_path, body)


def test_the_age_is_the_samplers_and_grows_while_its_reads_fail(tmp_path: Path) -> None:
    async def body(node: MemNode, metrics: Metrics) -> None:
        sampler = CounterSampler(node.io, interval=0.01)  # the node's, on a faster timer
        assert node.node is not None
        node.ops.serve(dataclasses.replace(node.node, counters=sampler))
        first = sampler.refresh()
        task = asyncio.create_task(sampler.run())
        try:
            await asyncio.sleep(0.05)
            assert sampler.snapshot is not first, "the timer refreshes"
            assert value(scrape(metrics), "edge_lb_snapshot_age_seconds") < 0.05
            broken = sampler.snapshot

            def refuse(name: str) -> dict[int, tuple[int, int]]:
                raise OSError("map read failed")

            node.io.read_counters = refuse  # type: ignore[method-assign]
            await asyncio.sleep(0.15)
            assert sampler.snapshot is broken, "a failed read keeps the last snapshot"
            assert value(scrape(metrics), "edge_lb_snapshot_age_seconds") >= 0.15
            del node.io.read_counters
            await asyncio.sleep(0.05)
            assert sampler.snapshot is not broken, "refreshed once reads work again"
            assert value(scrape(metrics), "edge_lb_snapshot_age_seconds") < 0.05
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    over_node(tmp_path, body)


def test_before_the_node_runs_the_age_counts_from_the_start() -> None:
    from edge_lb.control.operations import NodeOperations

    ops = NodeOperations("/etc/edge-lb.toml")
    time.sleep(0.02)
    s = scrape(Metrics(ops))
    assert value(s, "edge_lb_snapshot_age_seconds") >= 0.02, "nothing has been read yet"
    assert value(s, "edge_lb_packets_total", reason="tx") == 0
    assert names(s, "edge_lb_vip_packets_total", "vip") == set()


def test_the_sampler_interval_must_be_positive() -> None:
    from edge_lb.dataplane.mapio import FakeMapIO

    with pytest.raises(ValueError, match="interval"):
        CounterSampler(FakeMapIO(7), interval=0)
