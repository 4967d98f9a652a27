"""Issue 13, item 3 (reaction): how long an apply (desired state -> Maglev -> changed slots -> map writes)
takes, and how long the event loop waits meanwhile, for many VIPs in front of one pool of backends.

When a backend shared by every VIP dies, every VIP's ring is rebuilt at once. The maps are the real program's
(loaded unpinned and unattached, written through FdMapIO as the supervisor does: `kernel_maps`) or the
in-memory twin (FakeMapIO). `edge-lb bench` and benchmarks/apply_bench.py both measure through here.
"""

from __future__ import annotations

import asyncio
import ipaddress
import statistics
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

from edge_lb.config import Config, IPAddress, parse_config
from edge_lb.dataplane.desired import VipKey
from edge_lb.dataplane.maglev import DEFAULT_RING_SIZE
from edge_lb.dataplane.mapio import MapIO
from edge_lb.dataplane.node import Link, NodeMaps

LINK = Link("02:00:00:00:00:01", "02:00:00:00:00:02", 1500)
TICK = 0.001  # the lag probe's sleep: a loop that keeps its turns wakes it within about this
Health = dict[tuple[VipKey, IPAddress], bool]


@dataclass(frozen=True)
class Sizes:
    """What `measure` runs: VIPs (each with `backends` from one pool) per case, ring slots, runs per case."""

    flip_vips: int = 1  # health flip -> changed slots written, one VIP
    pool_vips: int = 50  # one pool backend's death behind this many VIPs: apply time, loop lag
    big_vips: int = 500  # first apply and a one-backend reload
    backends: int = 10
    ring_size: int = DEFAULT_RING_SIZE
    runs: int = 5  # of the flip; the pool case runs max(1, runs // 2) times, the big one once

    @property
    def max_vips(self) -> int:
        return max(self.flip_vips, self.pool_vips, self.big_vips)


def pool_config(vips: int, backends: int, ring_size: int = DEFAULT_RING_SIZE, max_vips: int = 0) -> Config:
    """`vips` VIPs (10.200.0.1 ...:80/tcp), each in front of the same `backends` (10.0.0.1 ...). Configs of
    different sizes with the same `max_vips` have the same [dataplane] section: one loaded program serves
    them all."""
    max_vips = max(max_vips, vips, 1)
    pool = [{"address": str(ipaddress.IPv4Address(0x0A000001 + n))} for n in range(backends)]
    return parse_config({
        "node": {"interface": "eth0"},
        "dataplane": {"ring_size": ring_size, "max_vips": max_vips, "max_backends": max_vips * backends + 1},
        "vip": [{"address": str(ipaddress.IPv4Address(0x0AC80001 + n)), "port": 80, "protocol": "tcp",
                 "backend": pool} for n in range(vips)]})


def dead_health(config: Config) -> Health:
    """The pool's second backend down behind every VIP."""
    dead = config.vips[0].backends[1].address
    return {(VipKey.of(v), dead): False for v in config.vips}


def one_weight_changed(config: Config) -> Config:
    """The config with the first VIP's first backend at weight 2: a reload that changes one backend."""
    vip = config.vips[0]
    backends = [replace(vip.backends[0], weight=2), *vip.backends[1:]]
    return replace(config, vips=(replace(vip, backends=tuple(backends)), *config.vips[1:]))


def _seconds(work: Callable[[], Any]) -> float:
    began = time.perf_counter()
    work()
    return time.perf_counter() - began


def apply_times(config: Config, io: MapIO, dead: bool = True) -> dict[str, float]:
    """Seconds of the first apply (every ring built and written), of a reload changing one backend's weight on
    one VIP, and (with `dead`) of the apply after one pool backend died (every VIP's ring)."""
    maps = NodeMaps(io, config, LINK, adopt=False)  # not adopted: the first apply writes every slot
    out = {"first_s": _seconds(lambda: maps.apply(config))}
    out["reload_s"] = _seconds(lambda: maps.apply(one_weight_changed(config)))
    if dead:
        maps.apply(config)
        out["dead_s"] = _seconds(lambda: maps.apply(config, dead_health(config)))
    return out


async def _lag_during(work: Callable[[], Coroutine[Any, Any, None]]) -> float:
    """The longest a TICK ticker on this loop waited beyond its sleep while `work` ran."""
    worst = 0.0
    done = asyncio.Event()

    async def ticker() -> None:
        nonlocal worst
        while not done.is_set():
            before = time.perf_counter()
            await asyncio.sleep(TICK)
            worst = max(worst, time.perf_counter() - before - TICK)

    tick = asyncio.create_task(ticker())
    await asyncio.sleep(5 * TICK)
    await work()
    done.set()
    await tick
    return worst


def loop_lag(config: Config, io: MapIO, in_thread: bool = True) -> float:
    """Seconds of the longest event-loop stall during the dead-backend apply: run in a worker thread as
    control/reconciler.py runs it (asyncio.to_thread), or (in_thread=False) called on the loop."""
    maps = NodeMaps(io, config, LINK, adopt=False)
    maps.apply(config)
    health = dead_health(config)

    async def work() -> None:
        if in_thread:
            await asyncio.to_thread(maps.apply, config, health)
        else:
            maps.apply(config, health)
    return asyncio.run(_lag_during(work))


@contextmanager
def kernel_maps(config: Config) -> Iterator[MapIO]:
    """The real balancer for config's [dataplane], loaded unpinned and unattached (root, bcc); its maps."""
    from edge_lb.dataplane.loader import Dataplane

    dp = Dataplane.load(config.dataplane, pin=False)
    try:
        yield dp.io
    finally:
        dp.close()


def _spread(values: list[float], scale: float) -> dict[str, Any]:
    digits = 2 if scale == 1000 else 4  # ms to 10 us, s to 0.1 ms
    scaled = [round(v * scale, digits) for v in values]
    return {"median": round(statistics.median(values) * scale, digits), "min": min(scaled),
            "max": max(scaled), "runs": scaled}


def measure(sizes: Sizes, io: MapIO) -> dict[str, Any]:
    """Every reaction figure over one set of maps (ms, except the big first apply in s): {"flip_ms",
    "pool_dead_ms", "pool_loop_lag_ms", "big_first_apply_s", "big_reload_ms"}, each {"median", "min",
    "max", "runs"}, plus the sizes."""
    def config(vips: int) -> Config:
        return pool_config(vips, sizes.backends, sizes.ring_size, sizes.max_vips)

    flip = [apply_times(config(sizes.flip_vips), io)["dead_s"] for _ in range(sizes.runs)]
    pool_runs = max(1, sizes.runs // 2)
    pool = config(sizes.pool_vips)
    dead = [apply_times(pool, io)["dead_s"] for _ in range(pool_runs)]
    lag = [loop_lag(pool, io) for _ in range(pool_runs)]
    big = apply_times(config(sizes.big_vips), io, dead=False)
    return {"sizes": {"flip_vips": sizes.flip_vips, "pool_vips": sizes.pool_vips, "big_vips": sizes.big_vips,
                      "backends": sizes.backends, "ring_size": sizes.ring_size},
            "flip_ms": _spread(flip, 1000), "pool_dead_ms": _spread(dead, 1000),
            "pool_loop_lag_ms": _spread(lag, 1000), "big_first_apply_s": _spread([big["first_s"]], 1),
            "big_reload_ms": _spread([big["reload_s"]], 1000)}
