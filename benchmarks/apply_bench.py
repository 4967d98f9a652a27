"""Time one reconciler apply (desired state -> Maglev -> slot diff -> map writes) for many VIPs on one backend
pool: `python benchmarks/apply_bench.py [--vips 50] [--backends 10] [--runs 5] [--kernel] [--loop-lag]`.

When a backend shared by every VIP dies, every VIP's ring is rebuilt at once. By default the maps are the
in-memory twin (mapio.FakeMapIO): the Python side only. `--kernel` (root, bcc) loads the real program
unpinned and unattached and writes its maps through FdMapIO, as the supervisor does. `--loop-lag` also
runs the dead-backend apply under an asyncio loop with a 1 ms ticker and reports the ticker's longest wait:
once with the apply called on the loop, and once in a worker thread, as control/reconciler.py runs it.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from edge_lb.config import Config, parse_config
from edge_lb.dataplane.desired import VipKey
from edge_lb.dataplane.maglev import DEFAULT_RING_SIZE
from edge_lb.dataplane.mapio import FakeMapIO, MapIO
from edge_lb.dataplane.node import Link, NodeMaps

LINK = Link("02:00:00:00:00:01", "02:00:00:00:00:02", 1500)


def pool_config(vips: int, backends: int) -> Config:
    pool = [{"address": str(ipaddress.IPv4Address(0x0A000001 + n))} for n in range(backends)]
    return parse_config({
        "node": {"interface": "eth0"},
        "dataplane": {"ring_size": DEFAULT_RING_SIZE, "max_vips": max(vips, 1),
                      "max_backends": vips * backends + 1},
        "vip": [{"address": str(ipaddress.IPv4Address(0x0AC80001 + n)), "port": 80, "protocol": "tcp",
                 "backend": pool} for n in range(vips)]})


def dead_health(config: Config) -> dict[tuple[VipKey, Any], bool]:
    dead = config.vips[0].backends[1].address
    return {(VipKey.of(v), dead): False for v in config.vips}


def one_run(config: Config, io: MapIO) -> tuple[float, float, float]:
    """Seconds of the first apply (every ring built), of a reload that changes one backend's weight on one
    VIP, and of the apply after one pool member died (every VIP)."""
    maps = NodeMaps(io, config, LINK, adopt=False)
    began = time.perf_counter()
    maps.apply(config)
    first = time.perf_counter() - began
    reload = one_weight_changed(config)
    began = time.perf_counter()
    maps.apply(reload)
    one = time.perf_counter() - began
    maps.apply(config)
    began = time.perf_counter()
    maps.apply(config, dead_health(config))
    return first, one, time.perf_counter() - began


def one_weight_changed(config: Config) -> Config:
    """The config with the first VIP's first backend at weight 2."""
    vip = config.vips[0]
    backends = [replace(vip.backends[0], weight=2), *vip.backends[1:]]
    return replace(config, vips=(replace(vip, backends=tuple(backends)), *config.vips[1:]))


async def _lag_during(work: Callable[[], Any]) -> float:
    """The longest a 1 ms ticker on this loop waited beyond its sleep while `work` ran."""
    worst = 0.0
    done = asyncio.Event()

    async def ticker() -> None:
        nonlocal worst
        while not done.is_set():
            before = time.perf_counter()
            await asyncio.sleep(0.001)
            worst = max(worst, time.perf_counter() - before - 0.001)

    tick = asyncio.create_task(ticker())
    await asyncio.sleep(0.005)
    await work()
    done.set()
    await tick
    return worst


def loop_lag(config: Config, io_for: Callable[[], MapIO]) -> dict[str, float]:
    """Longest loop stall during the dead-backend apply: called on the loop vs. in a worker thread."""
    out = {}
    health = dead_health(config)
    for mode in ("on the loop", "worker thread"):
        maps = NodeMaps(io_for(), config, LINK, adopt=False)
        maps.apply(config)

        async def work(maps: NodeMaps = maps, mode: str = mode) -> None:
            if mode == "on the loop":
                maps.apply(config, health)
            else:
                await asyncio.to_thread(maps.apply, config, health)
        out[mode] = asyncio.run(_lag_during(work))
    return out


def _kernel_io(config: Config) -> Callable[[], MapIO]:
    from edge_lb.dataplane.loader import Dataplane
    loaded: list[Any] = []

    def make() -> MapIO:
        for dp in loaded:
            dp.close()
        loaded[:] = [Dataplane.load(config.dataplane, pin=False)]
        return loaded[0].io  # type: ignore[no-any-return]
    return make


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vips", type=int, default=50)
    parser.add_argument("--backends", type=int, default=10)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--kernel", action="store_true", help="real maps (root, bcc)")
    parser.add_argument("--loop-lag", action="store_true", help="event-loop stall during the apply")
    args = parser.parse_args()
    config = pool_config(args.vips, args.backends)
    io_for = _kernel_io(config) if args.kernel else (lambda: FakeMapIO(DEFAULT_RING_SIZE))
    maps_kind = "kernel maps" if args.kernel else "in-memory maps"
    runs = [one_run(config, io_for()) for _ in range(args.runs)]
    cases = (("first apply", [r[0] for r in runs]),
             ("reload: one VIP's backend weight", [r[1] for r in runs]),
             ("one backend of the pool dead", [r[2] for r in runs]))
    for name, values in cases:
        print(f"{args.vips} VIPs x {args.backends} backends, ring {DEFAULT_RING_SIZE}, {maps_kind}, {name}: "
              f"median {statistics.median(values) * 1000:.0f} ms (min {min(values) * 1000:.0f}, "
              f"max {max(values) * 1000:.0f}) of {args.runs}")
    if args.loop_lag:
        for mode, lag in loop_lag(config, io_for).items():
            print(f"  longest event-loop stall during the dead-backend apply, apply {mode}: "
                  f"{lag * 1000:.1f} ms")


if __name__ == "__main__":
    main()
