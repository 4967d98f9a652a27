"""Shared set-up for data-plane tests: a private (unpinned) balancer programmed from a config dict."""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from typing import Any

import pytest

from edge_lb.config import Config, parse_config
from edge_lb.dataplane.simulate import Simulator

OWN_MAC, GW_MAC = "02:00:00:00:00:01", "00:00:de:ad:be:af"

BASE: dict[str, Any] = {
    "node": {"interface": "eth0", "mac": OWN_MAC, "gateway_mac": GW_MAC, "mtu": 1500},
    # The tests open hundreds of flows a second on one CPU: the flood guard (test_flood.py) must not decide
    # which of them get a connection-table entry.
    "dataplane": {"max_vips": 8, "max_backends": 64, "conn_table_size": 4096, "ring_size": 65537,
                  "new_flow_rate_limit": 1_000_000},
    "vip": [
        {"address": "10.200.1.1", "port": 80, "protocol": "tcp",
         "backend": [{"address": "10.0.0.1"}, {"address": "10.0.0.2"}, {"address": "10.0.0.3"}]},
        {"address": "10.200.1.1", "port": 53, "protocol": "udp",
         "backend": [{"address": "10.0.0.1"}, {"address": "10.0.0.2"}]},
        {"address": "10.200.1.2", "port": 0, "protocol": "tcp", "backend": [{"address": "10.0.0.4"}]},
        {"address": "fd00:200::1", "port": 443, "protocol": "tcp",
         "backend": [{"address": "fd00:1::1"}, {"address": "fd00:1::2"}]},
        {"address": "fd00:200::2", "port": 0, "protocol": "udp", "backend": [{"address": "fd00:1::3"}]},
        {"address": "10.200.1.3", "port": 80, "protocol": "tcp", "backend": [{"address": "fd00:1::4"}]},
        {"address": "10.200.1.4", "port": 80, "protocol": "tcp", "backend": []},
    ],
}

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="loading BPF programs needs root")


def make_config(mutate: Any = None) -> Config:
    data = copy.deepcopy(BASE)
    if mutate is not None:
        mutate(data)
    return parse_config(data)


@pytest.fixture(scope="module")
def sim() -> Iterator[Simulator]:
    s = Simulator(make_config())
    yield s
    s.close()


@pytest.fixture
def fresh_sim() -> Iterator[Simulator]:
    s = Simulator(make_config())
    yield s
    s.close()
