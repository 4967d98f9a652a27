"""Time one reconciler apply (desired state -> Maglev -> slot diff) for many VIPs on one backend pool:
`python benchmarks/apply_bench.py [--vips 50] [--backends 10] [--runs 5]`.

The apply runs on the supervisor's event loop, so its length is how long health checks, the API and BGP wait
when a backend shared by every VIP dies. The maps are the in-memory twin (mapio.FakeMapIO): this measures the
Python side only; the kernel writes of the changed slots come on top (one batch per VIP).
"""

from __future__ import annotations

import argparse
import ipaddress
import statistics
import time

from edge_lb.config import Config, parse_config
from edge_lb.dataplane.desired import VipKey
from edge_lb.dataplane.maglev import DEFAULT_RING_SIZE
from edge_lb.dataplane.mapio import FakeMapIO
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


def one_run(config: Config) -> tuple[float, float]:
    """Seconds of the first apply (every ring built) and of the apply after one pool member died."""
    maps = NodeMaps(FakeMapIO(DEFAULT_RING_SIZE), config, LINK, adopt=False)
    began = time.perf_counter()
    maps.apply(config)
    first = time.perf_counter() - began
    dead = config.vips[0].backends[1].address
    began = time.perf_counter()
    maps.apply(config, {(VipKey.of(v), dead): False for v in config.vips})
    return first, time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vips", type=int, default=50)
    parser.add_argument("--backends", type=int, default=10)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    config = pool_config(args.vips, args.backends)
    runs = [one_run(config) for _ in range(args.runs)]
    cases = (("first apply", [r[0] for r in runs]), ("one backend of the pool dead", [r[1] for r in runs]))
    for name, values in cases:
        print(f"{args.vips} VIPs x {args.backends} backends, ring {DEFAULT_RING_SIZE}, {name}: "
              f"median {statistics.median(values) * 1000:.0f} ms (min {min(values) * 1000:.0f}, "
              f"max {max(values) * 1000:.0f}) of {args.runs}")


if __name__ == "__main__":
    main()
