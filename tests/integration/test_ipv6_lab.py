"""IPv6 and 4in6 end to end (issue 10, item 8): real TCP clients through the XDP balancer to IPv6 backends.

    client --- router --- lb (edge-lb run, HTTP checks to the backends' IPv6 addresses)
                 |
             b1 b2 b3   decap.c strips IP6IP6 / 4in6; VIP6 and VIP4_OVER_V6 on lo; HTTP on "::"

One dual-stack lab (a /64 per link) serves both cases: VIP6 (an IPv6 VIP, IP6IP6) and VIP4_OVER_V6 (an IPv4
VIP, 4in6). Replies go backend -> router -> client: the LB's counters show every client packet sent on and
its kernel (tcpdump on eth0 sees what XDP passed) sees no packet from a VIP.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator

import pytest

from edge_lb.lab.labs import VIP4_OVER_V6, VIP6, DataplaneLab, wait_for
from edge_lb.lab.netns import Lab

pytestmark = pytest.mark.root

REQUESTS = 200
CHECK = '  type = "http"\n  interval = 1.0\n  fast_interval = 0.25\n  timeout = 0.5\n  fall = 2\n  rise = 2\n'


@pytest.fixture(scope="module")
def v6lab() -> Iterator[DataplaneLab]:
    """One dual-stack lab for the module, `edge-lb run` with both IPv6-backend VIPs, every backend up."""
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces, veths and XDP")
    with Lab(prefix="elbt") as lab:
        d = DataplaneLab(lab, ipv6=True)
        try:
            d.build()
            d.prepare_lb()
            d.wait_ready()
            d.config_path.write_text(d.config_text_v6(check=CHECK))
            d.start_supervisor()
            wait_for(lambda: all(b["state"] == "up" for v in d.status()["vips"] for b in v["backends"]),
                     15, "every backend of both VIPs up")
            yield d
        finally:
            for path in sorted(lab.tmpdir.glob("*.log")):
                print(f"--- {path.name} ---\n{path.read_text(errors='replace')[-4000:]}")
            d.close()


def capture_start(d: DataplaneLab) -> tuple[subprocess.Popen[bytes], str]:
    """tcpdump on the LB's eth0: it sees every packet XDP passed to the kernel, none it sent back out.
    Returns tcpdump and its pcap's path once it listens."""
    assert d.lb is not None
    pcap = str(d.lab.tmpdir / "lb.pcap")
    log = d.lab.tmpdir / "tcpdump.log"
    proc = d.lb.ns.spawn(["tcpdump", "-i", "eth0", "-n", "-U", "--immediate-mode", "-w", pcap], log)
    wait_for(lambda: "listening on" in log.read_text(errors="replace"), 10, "tcpdump listening")
    return proc, pcap


def capture_read(d: DataplaneLab, pcap: str, expr: str = "") -> list[str]:
    """The captured packets matching `expr`, one line each."""
    assert d.lb is not None
    out = d.lb.ns.run(["tcpdump", "-r", pcap, "-n", *([expr] if expr else [])]).stdout
    return list(out.splitlines())


@pytest.mark.parametrize("vip,encap", [(VIP6, "ip6ip6"), (VIP4_OVER_V6, "4in6")])
def test_requests_spread_over_ipv6_backends_and_replies_bypass_the_lb(
        v6lab: DataplaneLab, vip: str, encap: str) -> None:
    d = v6lab
    assert d.client is not None and d.lb is not None and d.lb.address6 is not None
    tcpdump, pcap = capture_start(d)
    before = d.lb_reasons()
    t0 = time.monotonic()
    result = d.http_get(REQUESTS, vip)
    took = time.monotonic() - t0
    after = d.lb_reasons()
    # The capture's control: a ping to the LB's own address is passed by XDP, so tcpdump must see it.
    d.client.ns.run(["ping", "-6", "-c", "1", "-W", "2", d.lb.address6])
    time.sleep(0.3)
    tcpdump.terminate()
    tcpdump.wait(timeout=5)
    # Tunnel health checks' replies do come from the VIP, to the LB's own address (DSR to the checker): only
    # a packet from the VIP to anyone else would be a client's reply crossing the LB.
    own = d.lb.address6 if ":" in vip else d.lb.address
    from_vip = len(capture_read(d, pcap, f"src host {vip} and not dst host {own}"))
    pings = len(capture_read(d, pcap, f"icmp6 and dst host {d.lb.address6} and ip6[40] == 128"))
    seen = capture_read(d, pcap)
    # What the LB's kernel does see: the control ping, the health checks' packets to the LB's own address
    # (counted STAT_PASS_NOT_VIP too), now and then neighbour discovery.
    print(f"LB kernel saw {len(seen)} packets, first ones:", *seen[:6], sep="\n  ")
    delta = {k: after[k] - before[k] for k in after if after[k] != before[k]}
    # The supervisor's per-backend packet counts (its sampler sums the per-CPU maps once a second).
    def rows() -> dict[str, int]:
        return {b["address"]: b["packets"] for v in d.status()["vips"] if v["address"] == vip
                for b in v["backends"]}
    wait_for(lambda: sum(rows().values()) >= 4 * REQUESTS, 3, "the status counts this VIP's packets")
    print(f"{encap} {vip}: {REQUESTS} requests in {took:.1f} s, served {result['served']}, "
          f"failures {result['failures']}; LB counter deltas {delta}; LB kernel saw {from_vip} packets from "
          f"the VIP, {pings} control ping(s); per-backend packets (status) {rows()}")

    assert result["failures"] == 0, result["errors"]
    served = result["served"]
    assert sum(served.values()) == REQUESTS and set(served) == {"b1", "b2", "b3"}
    for name, n in served.items():
        assert 0.20 * REQUESTS <= n <= 0.45 * REQUESTS, f"{name} served {n} of {REQUESTS}"
    # Every client packet (SYN, ACK, request, FIN-ACK at least) was encapsulated and sent on ...
    assert delta["STAT_TX"] >= 4 * REQUESTS
    assert delta["STAT_CT_HIT"] >= 2 * REQUESTS
    # ... and no reply came back through the LB: its kernel saw none, though the capture worked.
    assert pings == 1
    assert from_vip == 0
