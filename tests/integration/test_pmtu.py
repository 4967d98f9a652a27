"""Path MTU discovery through the LB (issue 10, item 2): a client on a 1500-byte path sends full-size
segments, which no longer fit once encapsulated. With ICMP too-big replies the client lowers its path MTU
and its big request completes; with them switched off ([dataplane] icmp_too_big_rate = 0) the same request
hangs."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

from edge_lb.lab.labs import PY, VIP, VIP_PORT, DataplaneLab
from edge_lb.lab.netns import Lab

from .conftest import ready_lab

pytestmark = pytest.mark.root

PAD = 20_000  # bytes of header padding: a 20 KB request, about 14 full-size segments

# One GET with a 20 KB header over one connection; prints the serving backend's name. Exit 1 on timeout.
BIG_GET = f"""
import socket, sys
s = socket.create_connection(("{VIP}", {VIP_PORT}), timeout=4)
s.sendall(b"GET / HTTP/1.1\\r\\nHost: lab\\r\\nX-Pad: " + b"x" * {PAD}
          + b"\\r\\nConnection: close\\r\\n\\r\\n")
data = b""
try:
    while chunk := s.recv(65536):
        data += chunk
except socket.timeout:
    sys.exit("timed out after " + str(len(data)) + " bytes of answer")
print(data.partition(b"\\r\\n\\r\\n")[2].decode().strip())
"""


@pytest.fixture
def dlab(lab: Lab) -> Iterator[DataplaneLab]:
    """Loaded with `edge-lb load` (ICMP too-big replies at their default rate). The backends keep the kernel's
    MSS (`backend setup --overhead 0`): with it lowered, the client's segments would fit and need no PMTUD."""
    yield from ready_lab(lab, DataplaneLab.load_balancer, backend_overhead=0)


def big_get(d: DataplaneLab) -> subprocess.CompletedProcess[str]:
    assert d.client is not None
    return subprocess.run(["ip", "netns", "exec", d.client.ns.name, PY, "-c", BIG_GET], capture_output=True,
                          text=True, timeout=30, check=False)


def client_route(d: DataplaneLab) -> str:
    assert d.client is not None
    return str(d.client.ns.run(["ip", "route", "get", VIP]).stdout)


def test_a_big_request_completes_and_the_client_learns_the_mtu(dlab: DataplaneLab) -> None:
    assert "mtu" not in client_route(dlab)
    before = dlab.lb_reasons()
    got = big_get(dlab)
    after = dlab.lb_reasons()
    replies = after["STAT_TX_TOO_BIG_REPLY"] - before["STAT_TX_TOO_BIG_REPLY"]
    print("route:", client_route(dlab), "replies:", replies)
    assert got.returncode == 0, got.stderr
    assert got.stdout.strip() in {"b1", "b2", "b3"}
    assert after["STAT_TX_TOO_BIG_REPLY"] > before["STAT_TX_TOO_BIG_REPLY"]
    assert "mtu 1480" in client_route(dlab)  # 1500 less the IPIP header, in the client's route cache


def test_without_too_big_replies_the_same_request_hangs(dlab: DataplaneLab) -> None:
    assert dlab.lb is not None
    dlab.config_path.write_text(dlab.config_text().replace(
        "[dataplane]\n", "[dataplane]\nicmp_too_big_rate = 0\n"))
    dlab.lb.ns.run([PY, "-m", "edge_lb", "load", "-c", str(dlab.config_path)], timeout=180, host_mounts=True)
    before = dlab.lb_reasons()
    got = big_get(dlab)
    after = dlab.lb_reasons()
    assert got.returncode != 0 and "timed out" in got.stderr, (got.stdout, got.stderr)
    assert after["STAT_DROP_TOO_BIG"] > before["STAT_DROP_TOO_BIG"]
    assert after["STAT_TX_TOO_BIG_REPLY"] == before["STAT_TX_TOO_BIG_REPLY"]
    assert "mtu" not in client_route(dlab)
