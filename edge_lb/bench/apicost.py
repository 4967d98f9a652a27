"""Issue 13, item 3: event-loop time of the operator's reads on a big node (500 VIPs x 10 backends).

Builds the real NodeState, Reconciler and NodeOperations over the in-memory maps (ring 1009, so the first
apply is quick; the ring size does not change these reads) with every backend up, then times, on one thread
as the event loop runs them: the status document, GET /api/v1/node, GET /api/v1/vips (their handlers' own
work, JSON encoding included), and a /metrics scrape's two parts: the read of the node (on the event loop)
and the formatting of the text (in a worker thread, api/metrics.py). `edge-lb bench` and
benchmarks/api_cost.py both measure through here.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

from edge_lb.api import rest
from edge_lb.api.metrics import Metrics, Reading
from edge_lb.config import Config, parse_config
from edge_lb.control.attachment import Attachment
from edge_lb.control.nodestate import NodeState
from edge_lb.control.operations import NodeOperations, RunningNode
from edge_lb.control.reconciler import NoRoutes, Reconciler
from edge_lb.dataplane.counters import CounterSampler
from edge_lb.dataplane.desired import VipKey
from edge_lb.dataplane.mapio import FakeMapIO
from edge_lb.dataplane.node import Link, NodeMaps
from edge_lb.errors import BenchError
from healthchecks.fake import FakeChecker

RING = 1009
LINK = Link("02:00:00:00:00:01", "02:00:00:00:00:02", 1500)
UP_BOUND = 10.0  # seconds for every fake prober's first check (BenchError after)
TARGET_READS = ("GET /metrics, read on the loop", "GET /api/v1/node")  # issue 13's, ms of event loop each
# read -> the key of its figures
READS = {"GET /metrics, read on the loop": "metrics_loop_ms", "GET /api/v1/node": "api_node_ms",
         "GET /api/v1/vips": "api_vips_ms", "status document": "status_ms",
         "GET /metrics, formatted in a thread": "metrics_thread_ms"}


def big_config(vips: int, backends: int) -> Config:
    """`vips` VIPs, each with its own `backends`, checked directly once an hour (one check each: all up)."""
    return parse_config({
        "node": {"interface": "eth0"},
        "dataplane": {"ring_size": RING, "max_vips": vips, "max_backends": vips * backends + 1},
        # direct: a tunnel check would wait (uncounted) for the encapsulator this node does not have
        "healthcheck": {"interval": 3600, "timeout": 1, "jitter": 0, "rise": 1, "fall": 1, "via": "direct"},
        "vip": [{"address": str(ipaddress.IPv4Address(0x0AC80001 + v)), "port": 80, "protocol": "tcp",
                 "backend": [{"address": str(ipaddress.IPv4Address(0x0A000001 + v * backends + b))}
                             for b in range(backends)]}
                for v in range(vips)]})


async def node_ops(config: Config) -> tuple[NodeOperations, NodeState]:
    """A running node's operations over in-memory maps, every backend up. The maps are written with every
    backend up first and adopted, as after a restart: the probers start up, so the set-up does not take
    5,000 health flips (NodeState._changed walks every check key on each: minutes at this size)."""
    io = FakeMapIO(RING)
    up = {(VipKey.of(v), b.address): True for v in config.vips for b in v.backends}
    NodeMaps(io, config, LINK, adopt=False).apply(config, up)
    maps = NodeMaps(io, config, LINK, adopt=True)
    state = NodeState(maps, config, {}, lambda spec: FakeChecker())
    rec = Reconciler(state, NoRoutes())
    await rec.change("startup")
    deadline = time.monotonic() + UP_BOUND
    while not all(state.health().values()):
        if time.monotonic() > deadline:
            await state.stop()
            raise BenchError(f"api cost: not every backend up within {UP_BOUND:g} s")
        await asyncio.sleep(0.02)
    await rec.change("health")
    counters = CounterSampler(io)
    counters.refresh()
    attachment = Attachment("eth0")
    attachment.prog_id, attachment.on_interface = 1, True
    ops = NodeOperations("big.toml")
    ops.serve(RunningNode("big.toml", state, rec, counters, attachment, None))
    return ops, state


def timed(fn: Callable[[], Any], runs: int) -> list[float]:
    """Milliseconds of each of `runs` calls."""
    samples = []
    for _ in range(runs):
        began = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - began) * 1000)
    return samples


async def _measure(vips: int, backends: int, runs: int, reads: tuple[str, ...]) -> dict[str, Any]:
    ops, state = await node_ops(big_config(vips, backends))
    try:
        metrics = Metrics(ops)
        reading = Reading.of(ops)
        calls: dict[str, Callable[[], Any]] = {
            "GET /metrics, read on the loop": lambda: Reading.of(ops),
            "GET /api/v1/node": lambda: json.dumps(rest._node(ops.status(vips=False))),
            "GET /api/v1/vips": lambda: json.dumps([rest._vip(v) for v in ops.status()["vips"]]),
            "status document": ops.status,
            "GET /metrics, formatted in a thread": lambda: metrics.format(reading),
        }
        out: dict[str, Any] = {"vips": vips, "backends": backends, "runs": runs}
        for name in reads:
            samples = timed(calls[name], runs)
            out[READS[name]] = {"median": round(statistics.median(samples), 2), "max": round(max(samples), 2),
                        "what": name}
        return out
    finally:
        await state.stop()


def measure(vips: int = 500, backends: int = 10, runs: int = 10,
            reads: tuple[str, ...] = tuple(READS)) -> dict[str, Any]:
    """{"vips", "backends", "runs", "<key>_ms": {"median", "max", "what"} per read (names of READS)}."""
    unknown = set(reads) - set(READS)
    if unknown:
        raise BenchError(f"api cost: no such read: {', '.join(sorted(unknown))}")
    return asyncio.run(_measure(vips, backends, runs, reads))
