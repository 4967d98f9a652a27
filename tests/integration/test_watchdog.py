"""The hang watchdog in the BGP lab (real BIRD, two LB nodes, `edge-lb run` + ExaBGP + XDP each):

- a stopped supervisor (SIGSTOP) no longer attracts traffic: ExaBGP's bridge misses its heartbeat and
  withdraws the node's route within [bgp].heartbeat_timeout while the BGP session stays up; SIGCONT
  announces it again once its checks are newer than the stall (a backend that died meanwhile is down by then).
  (Before: the route was kept for as long as the supervisor was stopped, and flows hashed to a backend that
  died meanwhile failed, 5 of 5 requests in the issue's run.)
- a stopped ExaBGP (SIGSTOP) is seen: status and /metrics say the speaker is wedged, it is killed and
  restarted, and the route comes back. (Before: status and edge_lb_bgp_peer_up kept saying up.)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from edge_lb import paths
from edge_lb.bgp import exabgp_liveness
from edge_lb.configbgp import Bgp
from edge_lb.lab.bgplab import BgpLab
from edge_lb.lab.labs import wait_for
from edge_lb.lab.netns import Lab

from .test_bgp_supervisor import both

pytestmark = pytest.mark.root

HEARTBEAT_TIMEOUT = Bgp(local_as=1, peers=()).heartbeat_timeout  # the default: the lab's config sets none
SLACK = 3.0  # s on a busy 2-core machine


@pytest.fixture
def hlab(lab: Lab) -> Iterator[BgpLab]:
    """test_bgp_supervisor's lab: both nodes announcing, every backend up on both."""
    b = BgpLab(lab)
    try:
        b.build()
        b.start_supervisors()
        b.wait_nexthops(both(b), 15)
        wait_for(lambda: all(all(r["state"] == "up" for r in b.status(n)["vips"][0]["backends"])
                             for n in b.nodes), 15, "every backend up on both nodes")
        yield b
    finally:
        for n in b.nodes:
            print(f"--- supervisor lb{n} ---\n{b.supervisor_log(n)[-4000:]}")
            exabgp_log = paths.exabgp_run(b.node(n).instance) / "exabgp.log"
            if exabgp_log.exists():
                print(f"--- exabgp lb{n} ---\n{exabgp_log.read_text(errors='replace')[-3000:]}")
        b.close()


def metrics(hlab: BgpLab, node: int) -> dict[str, float]:
    """GET /metrics over the node's Unix socket: sample name -> value (unlabelled samples only)."""
    async def get() -> str:
        connector = aiohttp.UnixConnector(path=str(paths.socket(hlab.node(node).instance)))
        async with aiohttp.ClientSession(connector=connector) as session, \
                session.get("http://edge-lb/metrics", timeout=aiohttp.ClientTimeout(total=10)) as resp:
            assert resp.status == 200
            return await resp.text()

    text = asyncio.run(get())
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples
            if not s.labels}


def test_a_stopped_supervisor_is_withdrawn_by_the_bridge_and_announced_on_sigcont(hlab: BgpLab) -> None:
    lb2 = hlab.node(2).address
    hlab.kill_supervisor(1, signal.SIGSTOP)
    try:
        hlab.stop_http("b1")  # dies while lb1 cannot notice: lb1's ring still sends flows to it
        took = hlab.wait_nexthops({lb2}, HEARTBEAT_TIMEOUT + SLACK)
        print(f"SIGSTOP of lb1's supervisor -> its route withdrawn in {took:.2f} s "
              f"(heartbeat_timeout {HEARTBEAT_TIMEOUT:g} s)")
        assert hlab.bird_protocols()["lb1"] == "up", "the bridge withdrew the route; the session stays"
        wait_for(lambda: hlab.status(2)["vips"][0]["backends"][0]["state"] == "down", 10, "lb2 sees b1 down")
        result = hlab.http_get(20)
        print(f"while lb1 is stopped and b1 dead: {result['failures']} of 20 requests failed")
        assert result["failures"] == 0, result
        time.sleep(HEARTBEAT_TIMEOUT)
        assert hlab.router_nexthops() == {lb2}, "nothing re-announces while the supervisor is stopped"
    finally:
        hlab.kill_supervisor(1, signal.SIGCONT)
    took = hlab.wait_nexthops(both(hlab), 10)
    b1 = hlab.status(1)["vips"][0]["backends"][0]
    print(f"SIGCONT -> lb1 announced again in {took:.2f} s, b1 {b1['state']} in its status")
    assert b1["state"] == "down", "announced again only on checks newer than the stall (b1 died meanwhile)"
    result = hlab.http_get(20)
    print(f"after SIGCONT, b1 still dead: {result['failures']} of 20 requests failed")
    assert result["failures"] == 0, result
    hlab.start_http("b1")
    wait_for(lambda: 'action="withdrawn by the bridge"' in hlab.supervisor_log(1), 10,
             "the supervisor told of the bridge's withdraw")


def _speaker(hlab: BgpLab, node: int) -> dict[str, Any]:
    speaker: dict[str, Any] = hlab.status(node)["bgp"]["speaker"]
    return speaker


def test_a_stopped_exabgp_is_reported_wedged_restarted_and_announces_again(hlab: BgpLab) -> None:
    before = _speaker(hlab, 1)
    assert before["state"] == "up" and before["restarts"] == 0
    assert metrics(hlab, 1)["edge_lb_bgp_speaker_up"] == 1
    pid = int(before["pid"])
    began = time.monotonic()
    os.kill(pid, signal.SIGSTOP)
    try:
        seen: list[tuple[float, dict[str, float]]] = []

        def wedged() -> bool:
            if _speaker(hlab, 1)["state"] != "wedged":
                return False
            seen.append((time.monotonic() - began, metrics(hlab, 1)))
            return True

        bound = exabgp_liveness.PROBE_INTERVAL + exabgp_liveness.WEDGED_AFTER
        wait_for(wedged, bound + SLACK, "status says the speaker is wedged")
        took, sample = seen[0]
        print(f"SIGSTOP of lb1's ExaBGP -> status 'wedged' after {took:.2f} s (bound {bound:g} s)")
        assert sample["edge_lb_bgp_speaker_up"] == 0
    finally:
        with contextlib.suppress(ProcessLookupError):  # killed by the supervisor: gone already
            os.kill(pid, signal.SIGCONT)
    wait_for(lambda: _speaker(hlab, 1)["state"] == "up", 30, "ExaBGP restarted")
    after = _speaker(hlab, 1)
    assert after["restarts"] == 1 and after["pid"] != pid
    took = hlab.wait_nexthops(both(hlab), 30)
    print(f"restarted ExaBGP (pid {after['pid']}) -> lb1 announced again {took:.2f} s later, "
          f"{time.monotonic() - began:.2f} s after the SIGSTOP")
    sample = metrics(hlab, 1)
    assert sample["edge_lb_bgp_speaker_up"] == 1 and sample["edge_lb_bgp_speaker_restarts_total"] == 1
    assert hlab.http_get(20)["failures"] == 0
