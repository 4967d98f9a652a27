"""GUE end to end (issue 10, item 5): real TCP clients through the XDP balancer to backends reached in GUE.

    client --- router --- lb (edge-lb run, every VIP encap = "gue", HTTP checks to the backends)
                 |
             b1 b2 b3   decap.c strips GUE on UDP 6080 (outer IPv4 and IPv6); the VIPs on lo; HTTP on "::"

One dual-stack lab for the module, three GUE VIPs: an IPv4 VIP with IPv4 backends (IPv4/UDP/IPv4), an IPv6 VIP
(IPv6/UDP/IPv6: its UDP checksum is 0, which the backend's decapsulation takes) and an IPv4 VIP with IPv6
backends (IPv6/UDP/IPv4). tcpdump on the router's link to b1 sees what the LB sent there: UDP to 6080 from
many source ports, no IPIP. tcpdump on the LB's eth0 (after XDP) sees no reply from a VIP: replies go
backend -> router -> client. With decap.c taken off b1 for a moment, Linux's own UDP code shows what a
kernel receiver makes of the zero checksum over IPv6 (RFC 6936): dropped, unless the socket allows it. And
path MTU discovery through a GUE VIP: the client learns 1472.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import subprocess
import time
from collections.abc import Iterator

import pytest

from edge_lb.lab.labs import (
    ENCAP_PREFIX,
    ENCAP_PREFIX_V6,
    PY,
    VIP,
    VIP4_OVER_V6,
    VIP6,
    VIP_PORT,
    DataplaneLab,
    wait_for,
)
from edge_lb.lab.netns import Lab

from .test_ipv6_lab import capture_read, capture_start
from .test_pmtu import big_get, client_route

pytestmark = pytest.mark.root

REQUESTS = 100
GUE_PORT = 6080  # the default of [dataplane] gue_port and of `edge-lb decap attach --gue-port`
CHECK = '  type = "http"\n  interval = 1.0\n  fast_interval = 0.25\n  timeout = 0.5\n  fall = 2\n  rise = 2\n'


def gue_config(d: DataplaneLab) -> str:
    """Three VIPs, each with encap = "gue": VIP (IPv4 backends), VIP6 and VIP4_OVER_V6 (IPv6 backends)."""
    def vip(address: str, backends: list[str]) -> str:
        rows = "".join(f'  [[vip.backend]]\n  address = "{b}"\n' for b in backends)
        return (f'[[vip]]\naddress = "{address}"\nport = {VIP_PORT}\nprotocol = "tcp"\nencap = "gue"\n'
                f'  [vip.healthcheck]\n{CHECK}\n{rows}\n')

    v4 = [s.address for s in d.servers]
    v6 = [str(s.address6) for s in d.servers]
    return (f'[node]\ninterface = "eth0"\n\n[dataplane]\ninstance = "{d.instance}"\n'
            f'conn_table_size = 65536\nmax_vips = 4\nmax_backends = 64\n'
            f'encap_src_v4 = "{ENCAP_PREFIX}"\nencap_src_v6 = "{ENCAP_PREFIX_V6}"\n\n'
            + vip(VIP, v4) + vip(VIP6, v6) + vip(VIP4_OVER_V6, v6))


@pytest.fixture(scope="module")
def guelab() -> Iterator[DataplaneLab]:
    """One dual-stack lab for the module, `edge-lb run` with the three GUE VIPs, every backend up."""
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces, veths and XDP")
    with Lab(prefix="elbg") as lab:
        # backend setup --overhead 0: the MSS is not lowered, the PMTU test needs full-size segments
        d = DataplaneLab(lab, ipv6=True, backend_overhead=0)
        try:
            d.build()
            d.prepare_lb()
            d.wait_ready()
            d.config_path.write_text(gue_config(d))
            d.start_supervisor()
            wait_for(lambda: all(b["state"] == "up" for v in d.status()["vips"] for b in v["backends"]),
                     15, "every backend of the three VIPs up")
            yield d
        finally:
            for path in sorted(lab.tmpdir.glob("*.log")):
                print(f"--- {path.name} ---\n{path.read_text(errors='replace')[-4000:]}")
            d.close()


def to_b1_start(d: DataplaneLab) -> tuple[subprocess.Popen[bytes], str]:
    """tcpdump on the router's end of b1's link: every packet the router forwards to b1, as on the wire."""
    assert d.router is not None
    b1 = d.server("b1")
    pcap = str(d.lab.tmpdir / "to-b1.pcap")
    log = d.lab.tmpdir / "tcpdump-b1.log"
    # Headers only and a big buffer: a busy machine must not make tcpdump drop what it should count.
    proc = d.router.spawn(["tcpdump", "-i", b1.router_if, "-n", "-s", "128", "-B", "16384", "-U",
                           "--immediate-mode", "-w", pcap], log)
    wait_for(lambda: "listening on" in log.read_text(errors="replace"), 10, "tcpdump on b1's link listening")
    return proc, pcap


def read(d: DataplaneLab, pcap: str, expr: str) -> list[str]:
    assert d.router is not None
    return list(d.router.run(["tcpdump", "-r", pcap, "-n", expr]).stdout.splitlines())


def stop(*procs: subprocess.Popen[bytes]) -> None:
    time.sleep(0.3)  # the last packets reach the files
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=5)


@pytest.mark.parametrize("vip,outer", [(VIP, "ip"), (VIP6, "ip6"), (VIP4_OVER_V6, "ip6")],
                         ids=["IPv4-UDP-IPv4", "IPv6-UDP-IPv6", "IPv6-UDP-IPv4"])
def test_gue_vip_serves_tcp_and_replies_bypass_the_lb(guelab: DataplaneLab, vip: str, outer: str) -> None:
    d = guelab
    b1 = d.server("b1")
    b1_addr = b1.address if outer == "ip" else str(b1.address6)
    on_lb, lb_pcap = capture_start(d)
    on_b1, b1_pcap = to_b1_start(d)
    before = d.lb_reasons()
    t0 = time.monotonic()
    result = d.http_get(REQUESTS, vip)
    took = time.monotonic() - t0
    after = d.lb_reasons()
    assert d.client is not None and d.lb is not None
    d.client.ns.run(["ping", "-c", "1", "-W", "2", d.lb.address])  # the LB capture's control: XDP passes it
    stop(on_lb, on_b1)
    delta = {k: after[k] - before[k] for k in after if after[k] != before[k]}
    gue = read(d, b1_pcap, f"{outer} dst host {b1_addr} and udp dst port {GUE_PORT}")
    ipip = read(d, b1_pcap, f"{outer} dst host {b1_addr} and ({outer} proto 4 or {outer} proto 41)")
    sports = {int(m[1]) for line in gue if (m := re.search(r"\.(\d+) > \S+\.6080: UDP", line))}
    own = d.lb.address6 if ":" in vip else d.lb.address  # tunnel checks' replies come to the LB itself
    from_vip = capture_read(d, lb_pcap, f"src host {vip} and not dst host {own}")
    pings = capture_read(d, lb_pcap, f"icmp and dst host {d.lb.address} and icmp[0] == 8")
    print(f"GUE {vip} ({outer} outer): {REQUESTS} requests in {took:.1f} s, served {result['served']}, "
          f"failures {result['failures']}; LB counter deltas {delta}; to b1: {len(gue)} GUE packets from "
          f"{len(sports)} UDP source ports ({min(sports, default=0)}..{max(sports, default=0)}), {len(ipip)} "
          f"IPIP; LB kernel saw {len(from_vip)} packets from the VIP; first GUE lines:", *gue[:3], sep="\n  ")

    assert result["failures"] == 0, result["errors"]
    served = result["served"]
    assert sum(served.values()) == REQUESTS and set(served) == {"b1", "b2", "b3"}
    assert delta["STAT_TX"] >= 4 * REQUESTS  # every client packet (SYN, ACK, request, FIN at least) sent on
    # b1's share went in GUE (UDP to 6080), none in IPIP, one source port per flow from the ephemeral range
    # (b1 served served["b1"] connections of >= 4 client packets each; the capture may miss a few).
    assert len(gue) >= 2 * served["b1"] and not ipip
    assert len(sports) >= served["b1"] // 2 and min(sports) >= 49152
    assert len(pings) == 1, "the LB's capture works"
    assert from_vip == [], "a reply crossed the LB"


# A UDP socket on the GUE port in a backend without decap.c: what Linux's own UDP code does with the
# balancer's zero-checksum GUE over IPv6 (datagrams over IPv4, where a zero checksum means none, left out).
# argv: 1 = set UDP_NO_CHECK6_RX (102, linux/udp.h); seconds to listen.
RECEIVE = """
import json, socket, sys, time
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
if sys.argv[1] == "1":
    s.setsockopt(socket.IPPROTO_UDP, 102, 1)
s.bind(("::", 6080))
s.settimeout(0.2)
print("ready", flush=True)
got, end = [], time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    try:
        data, sender = s.recvfrom(4096)
    except socket.timeout:
        continue
    if not sender[0].startswith("::ffff:"):  # over IPv4: the IPv4 VIPs' tunnel checks, checksum 0 is fine
        got.append(data.hex())
print(json.dumps(got), flush=True)
"""
# 30 TCP SYNs to a VIP (argv[1]) from fresh ports, not waited for: about a third of them go to b1. Closed
# after 0.5 s, before any retransmission (1 s) and well inside the receiver's window: nothing arrives after.
SYNS = """
import socket, sys, time
socks = []
for _ in range(30):
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setblocking(False)
    try:
        s.connect((sys.argv[1], 80))
    except BlockingIOError:
        pass
    socks.append(s)
time.sleep(0.5)
"""


def udp6_csum_errors(d: DataplaneLab) -> int:
    text = d.server("b1").ns.run(["cat", "/proc/net/snmp6"]).stdout
    return next(int(line.split()[1]) for line in text.splitlines() if line.startswith("Udp6InCsumErrors"))


def received(d: DataplaneLab, allow_zero: bool) -> tuple[list[bytes], int]:
    """GUE datagrams a UDP socket on b1 got while the client sent SYNs to VIP6, and the growth of b1's
    Udp6InCsumErrors meanwhile (Linux counts a zero checksum there also when no socket has the port)."""
    assert d.client is not None
    b1 = d.server("b1")
    log = d.lab.tmpdir / f"udp-receiver-{int(allow_zero)}.log"
    errors = udp6_csum_errors(d)
    proc = b1.ns.spawn([PY, "-c", RECEIVE, "1" if allow_zero else "0", "3"], log)
    wait_for(lambda: "ready" in log.read_text(), 10, "the UDP receiver on b1 bound")
    d.client.ns.run([PY, "-c", SYNS, VIP6], timeout=20)
    proc.wait(timeout=10)
    got = [bytes.fromhex(h) for h in json.loads(log.read_text().splitlines()[-1])]
    return got, udp6_csum_errors(d) - errors


def test_linux_takes_zero_checksum_gue_over_ipv6_when_the_socket_allows_it(guelab: DataplaneLab) -> None:
    """RFC 6935 / 6936 on this kernel, with the balancer's real GUE/IPv6 datagrams (UDP checksum 0): a UDP
    socket on the GUE port of a backend without decap.c drops them (Udp6InCsumErrors) unless it sets
    UDP_NO_CHECK6_RX, as the kernel's fou/gue sockets do; then each datagram is the client's IPv6 packet."""
    d = guelab
    b1 = d.server("b1")
    b1.ns.run([PY, "-m", "edge_lb.dataplane.decap", "detach", "--interface", "eth0"], timeout=60)
    try:
        refused, errors = received(d, allow_zero=False)
        allowed, errors_allowed = received(d, allow_zero=True)
    finally:
        b1.ns.run([PY, "-m", "edge_lb.dataplane.decap", "attach", "--interface", "eth0"], timeout=120)
    print(f"without UDP_NO_CHECK6_RX: {len(refused)} datagrams, Udp6InCsumErrors +{errors}; with it: "
          f"{len(allowed)} datagrams (+{errors_allowed}); first: {allowed[0].hex() if allowed else None}")
    assert refused == [] and errors > 0
    assert allowed and errors_allowed == 0
    vip6 = ipaddress.IPv6Address(VIP6).packed
    # GUE variant 1: the datagram is the client's IPv6 packet, a SYN to VIP6:80 (the IPv4 VIP's tunnel health
    # checks arrive too: an IPv4 packet in GUE over IPv6, 4in6)
    inner6 = [inner for inner in allowed if inner[0] >> 4 == 6]
    assert inner6 and all(inner[0] >> 4 == 4 for inner in allowed if inner not in inner6)
    for inner in inner6:
        assert inner[6] == 6 and inner[24:40] == vip6 and inner[42:44] == b"\x00\x50"
    # Its tunnel checks took b1 out while it could not decapsulate: it serves again once they pass.
    wait_for(lambda: all(b["state"] == "up" for v in d.status()["vips"] for b in v["backends"]), 15, "b1 up")
    assert len(d.http_get(30, VIP6)["served"]) == 3, "b1 decapsulates again"


def test_a_big_request_to_a_gue_vip_teaches_the_client_the_gue_mtu(guelab: DataplaneLab) -> None:
    """Path MTU discovery counts GUE's 8 more bytes: a 20 KB request from a client on a 1500-byte path to the
    IPv4 GUE VIP completes, and the client's route cache shows 1472 (1500 - 20 - 8), not IPIP's 1480."""
    d = guelab
    assert "mtu" not in client_route(d)
    before = d.lb_reasons()
    got = big_get(d)
    after = d.lb_reasons()
    replies = after["STAT_TX_TOO_BIG_REPLY"] - before["STAT_TX_TOO_BIG_REPLY"]
    print("route:", client_route(d), "too-big replies:", replies)
    assert got.returncode == 0, got.stderr
    assert got.stdout.strip() in {"b1", "b2", "b3"}
    assert replies > 0
    assert "mtu 1472" in client_route(d)
