"""GET /metrics against FakeOperations: every family's values, the timer-driven snapshot, the HTTP route."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from edge_lb.api.metrics import Metrics, reason_label
from edge_lb.control.operations import Doc, FakeOperations
from edge_lb.dataplane import counters

VIP = "10.0.0.1:80/tcp"
B1, B2 = "10.1.0.1", "10.1.0.2"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@dataclass
class CountingOperations(FakeOperations):
    reads: int = 0

    def status(self) -> Doc:
        self.reads += 1
        return super().status()


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
    b2.update(packets=100, bytes=15000, ring_share=0.4, state="down", weight=3, latency=None)
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


@pytest.mark.parametrize(("state", "up"), [("drained", 1), ("unchecked", 1), ("down", 0), ("starting", 0)])
def test_serving_states_and_an_unknown_state(state: str, up: int) -> None:
    ops = FakeOperations()
    ops.doc["vips"][0]["backends"][0]["state"] = state
    s = scrape(Metrics(ops))
    assert value(s, "edge_lb_backend_up", vip=VIP, backend=B1) == up
    assert value(s, "edge_lb_backend_state", vip=VIP, backend=B1, state=state) == 1
    assert sum(v for (n, key), v in s.items()
               if n == "edge_lb_backend_state" and dict(key)["backend"] == B1) == 1


def test_reasons_named_from_the_c_enum(ops: CountingOperations) -> None:
    s = scrape(Metrics(ops))
    assert names(s, "edge_lb_packets_total", "reason") == {reason_label(n) for n in counters.reason_names()}
    assert {"tx", "ct_hit", "ct_miss", "pass_not_vip", "drop_fragment"} <= names(s, "edge_lb_packets_total",
                                                                                    "reason")
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

    asyncio.run(ops.set_disabled(True))
    assert value(scrape(metrics), "edge_lb_node_disabled") == 0  # still the old snapshot
    metrics.refresh()
    s = scrape(metrics)
    assert value(s, "edge_lb_node_disabled") == 1
    assert names(s, "edge_lb_bgp_announced", "prefix") == set()


def test_without_bgp_and_while_starting() -> None:
    ops = FakeOperations()
    ops.doc = {"phase": "starting", "pid": 1, "config": "/etc/edge-lb.toml", "vips": [], "bgp": None}
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


def test_scrapes_render_the_snapshot_without_reading_the_maps(ops: CountingOperations) -> None:
    metrics = Metrics(ops)
    first = scrape(metrics)
    ops.doc["vips"][0]["packets"] = 999
    second = scrape(metrics)
    assert ops.reads == 1
    assert value(second, "edge_lb_vip_packets_total", vip=VIP) == 300
    assert 0 <= value(first, "edge_lb_snapshot_age_seconds") <= value(second, "edge_lb_snapshot_age_seconds")
    metrics.refresh()
    assert ops.reads == 2
    assert value(scrape(metrics), "edge_lb_vip_packets_total", vip=VIP) == 999


def test_own_registry_not_the_global_one(ops: CountingOperations) -> None:
    registry = CollectorRegistry()
    Metrics(ops)
    Metrics(ops)  # a second instance does not clash (prometheus_client raises on a duplicate in one registry)
    metrics = Metrics(ops, registry=registry)
    assert metrics.registry is registry
    assert registry.get_sample_value("edge_lb_vip_packets_total", {"vip": VIP}) == 300


def test_interval_must_be_positive(ops: CountingOperations) -> None:
    with pytest.raises(ValueError, match="interval"):
        Metrics(ops, interval=0)


def test_run_refreshes_on_a_timer_and_survives_a_failed_read(ops: CountingOperations) -> None:
    class Flaky(CountingOperations):
        failing = True

        def counters(self) -> Doc:
            if self.failing and self.reads > 1:
                raise OSError("map read failed")
            return super().counters()

    flaky = Flaky(doc=ops.doc)

    async def until(reads: int) -> None:
        async with asyncio.timeout(5):
            while flaky.reads < reads:
                await asyncio.sleep(0.005)

    async def main() -> None:
        metrics = Metrics(flaky, interval=0.01)
        first = metrics.refresh()
        task = asyncio.create_task(metrics.run())
        await until(3)  # two refreshes failed
        assert metrics.snapshot() is first, "a failed read keeps the last snapshot"
        flaky.failing = False
        await until(flaky.reads + 1)  # a refresh is synchronous: once counted, it has replaced the snapshot
        assert metrics.snapshot() is not first, "the timer refreshes once reads work again"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())


def test_route() -> None:
    async def main() -> tuple[int, str, Any]:
        ops = FakeOperations()
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
