"""Event-loop time of the operator's reads on a big node: `python benchmarks/api_cost.py [--vips 500]
[--backends 10] [--runs 20]`.

Builds the real NodeState, Reconciler and NodeOperations over the in-memory maps (ring 1009, so the first
apply is quick; ring size does not change these reads) with every backend up, then times, on one thread as
the event loop would run them: the status document, GET /api/v1/node, GET /api/v1/vips (their handlers'
own work, JSON encoding included), and a /metrics scrape's two parts: the read of the node (in the event
loop) and the formatting of the text (in a worker thread). Prints median and max in ms.
"""

from __future__ import annotations

import argparse
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
from edge_lb.dataplane.mapio import FakeMapIO
from edge_lb.dataplane.node import Link, NodeMaps
from healthchecks.fake import FakeChecker

RING = 1009
LINK = Link("02:00:00:00:00:01", "02:00:00:00:00:02", 1500)


def big_config(vips: int, backends: int) -> Config:
    return parse_config({
        "node": {"interface": "eth0"},
        "dataplane": {"ring_size": RING, "max_vips": vips, "max_backends": vips * backends + 1},
        "healthcheck": {"interval": 3600, "timeout": 1, "jitter": 0, "rise": 1, "fall": 1},
        "vip": [{"address": str(ipaddress.IPv4Address(0x0AC80001 + v)), "port": 80, "protocol": "tcp",
                 "backend": [{"address": str(ipaddress.IPv4Address(0x0A000001 + v * backends + b))}
                             for b in range(backends)]}
                for v in range(vips)]})


async def node_ops(config: Config) -> tuple[NodeOperations, NodeState]:
    io = FakeMapIO(RING)
    maps = NodeMaps(io, config, LINK, adopt=False)
    state = NodeState(maps, config, {}, lambda spec: FakeChecker())
    rec = Reconciler(state, NoRoutes())
    await rec.change("startup")
    for _ in range(500):  # every prober's first check (interval 1 h: one each)
        if all(state.health().values()):
            break
        await asyncio.sleep(0.02)
    await rec.change("health")
    counters = CounterSampler(io)
    counters.refresh()
    attachment = Attachment("eth0")
    attachment.prog_id, attachment.on_interface = 1, True
    ops = NodeOperations("big.toml")
    ops.serve(RunningNode("big.toml", state, rec, counters, attachment, None))
    return ops, state


def timed(fn: Callable[[], Any], runs: int) -> tuple[float, float]:
    samples = []
    for _ in range(runs):
        began = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - began) * 1000)
    return statistics.median(samples), max(samples)


async def main_async(vips: int, backends: int, runs: int) -> None:
    ops, state = await node_ops(big_config(vips, backends))
    metrics = Metrics(ops)
    reading = Reading.of(ops)
    cases = {
        "status document": ops.status,
        "GET /api/v1/node": lambda: json.dumps(rest._node(ops.status(vips=False))),
        "GET /api/v1/vips": lambda: json.dumps([rest._vip(v) for v in ops.status()["vips"]]),
        "GET /metrics, read on the loop": lambda: Reading.of(ops),
        "GET /metrics, formatted in a thread": lambda: metrics.format(reading),
    }
    print(f"{vips} VIPs x {backends} backends, {runs} runs each, ms of event-loop time (median / max)")
    for name, fn in cases.items():
        median, worst = timed(fn, runs)
        print(f"  {name:<36} {median:8.1f} {worst:8.1f}")
    await state.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--vips", type=int, default=500)
    parser.add_argument("--backends", type=int, default=10)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    asyncio.run(main_async(args.vips, args.backends, args.runs))


if __name__ == "__main__":
    main()
