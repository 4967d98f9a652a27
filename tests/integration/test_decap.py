"""bpf/decap.c on a real veth: a client sends encapsulated ICMP echo requests to the backend's VIP and must
get the echo reply straight from the VIP, unencapsulated (direct server return). Also the Lab and labhttp."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

import pytest

from edge_lb.lab.netns import Lab, Netns

pytestmark = pytest.mark.root

CLIENT4, BACKEND4, VIP4 = "10.0.0.1", "10.0.0.2", "10.200.1.1"
CLIENT6, BACKEND6, VIP6 = "fd00::1", "fd00::2", "fd00:200::1"

# Runs inside the client namespace: sends `count` encapsulated echo requests from a raw socket and counts
# plain echo replies from the VIP. Prints {"replies": n, "encapsulated_replies": m}. Bounded by `timeout`.
PROBE = r"""
import json, sys
from scapy.all import ICMP, IP, Ether, ICMPv6EchoReply, ICMPv6EchoRequest, IPv6, Raw, sendp, sniff
a = json.loads(sys.argv[1])
inner_cls = IPv6 if ":" in a["vip"] else IP
outer_cls = IPv6 if ":" in a["outer_dst"] else IP
if inner_cls is IP:
    inner = IP(src=a["client"], dst=a["vip"]) / ICMP(id=a["ident"])
else:
    inner = IPv6(src=a["client"], dst=a["vip"]) / ICMPv6EchoRequest(id=a["ident"])
if outer_cls is IP:
    outer = IP(src=a["outer_src"], dst=a["outer_dst"], proto=4)
else:
    outer = IPv6(src=a["outer_src"], dst=a["outer_dst"], nh=4 if inner_cls is IP else 41)
frames = []
for seq in range(a["count"]):
    inner[1].seq = seq
    frames.append(Ether(dst=a["backend_mac"]) / outer / inner.copy() / Raw(b"edge-lb decap probe"))
result = {"replies": 0, "encapsulated_replies": 0}

def is_reply(p):
    ip = p.getlayer(inner_cls)
    if ip is None or ip.src != a["vip"] or ip.dst != a["client"]:
        return False
    echo = p.getlayer(ICMP) if inner_cls is IP else p.getlayer(ICMPv6EchoReply)
    if echo is None or echo.id != a["ident"] or (inner_cls is IP and echo.type != 0):
        return False
    if p[1] is not ip:
        result["encapsulated_replies"] += 1
        return False
    return True

got = sniff(iface=a["iface"], lfilter=is_reply, count=a["count"], timeout=a["timeout"],
            started_callback=lambda: sendp(frames, iface=a["iface"], verbose=False))
result["replies"] = len(got)
print(json.dumps(result))
"""


@dataclass(frozen=True)
class Pair:
    client: Netns
    backend: Netns
    backend_mac: str


@pytest.fixture
def pair(lab: Lab) -> Pair:
    """client c0 <-veth-> b0 backend; the backend holds both VIPs on lo, as a DSR backend does."""
    client, backend = lab.netns("cl"), lab.netns("be")
    lab.veth(client, "c0", backend, "b0")
    client.addr("c0", f"{CLIENT4}/24")
    client.addr("c0", f"{CLIENT6}/64")
    backend.addr("b0", f"{BACKEND4}/24")
    backend.addr("b0", f"{BACKEND6}/64")
    backend.addr("lo", f"{VIP4}/32")
    backend.addr("lo", f"{VIP6}/128")
    return Pair(client=client, backend=backend, backend_mac=link(backend, "b0")["address"])


def link(ns: Netns, ifname: str) -> dict[str, Any]:
    info: list[dict[str, Any]] = json.loads(ns.ip("-j", "-d", "link", "show", ifname).stdout)
    return info[0]


def decap_cli(ns: Netns, *argv: str) -> None:
    ns.run([sys.executable, "-m", "edge_lb.dataplane.decap", *argv], timeout=60)


def probe(
    pair: Pair, outer_src: str, outer_dst: str, vip: str, client: str, count: int = 3, timeout: float = 3.0
) -> dict[str, int]:
    args = {
        "iface": "c0",
        "backend_mac": pair.backend_mac,
        "outer_src": outer_src,
        "outer_dst": outer_dst,
        "vip": vip,
        "client": client,
        "ident": 0x4C42,
        "count": count,
        "timeout": timeout,
    }
    proc = pair.client.run([sys.executable, "-c", PROBE, json.dumps(args)], timeout=timeout + 30)
    result: dict[str, int] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


# (outer source, outer destination, VIP, inner source) per encapsulation.
ENCAPS = {
    "ipip": (CLIENT4, BACKEND4, VIP4, CLIENT4),
    "ip6ip6": (CLIENT6, BACKEND6, VIP6, CLIENT6),
    "4in6": (CLIENT6, BACKEND6, VIP4, CLIENT4),
}


@pytest.mark.parametrize("encap", sorted(ENCAPS))
def test_echo_through_decap_native(pair: Pair, encap: str) -> None:
    decap_cli(pair.backend, "attach", "--interface", "b0", "--mode", "native")
    assert "xdp" in link(pair.backend, "b0"), "decap program not attached"
    assert probe(pair, *ENCAPS[encap]) == {"replies": 3, "encapsulated_replies": 0}


def test_echo_through_decap_generic(pair: Pair) -> None:
    decap_cli(pair.backend, "attach", "--interface", "b0", "--mode", "generic")
    assert probe(pair, *ENCAPS["ipip"]) == {"replies": 3, "encapsulated_replies": 0}


def test_no_reply_without_decap(pair: Pair) -> None:
    # The kernel here has no ipip module: without the program the VIP never sees the inner packet.
    assert probe(pair, *ENCAPS["ipip"], count=1, timeout=1.5)["replies"] == 0


def test_no_decap_for_addresses_not_given(pair: Pair) -> None:
    decap_cli(pair.backend, "attach", "--interface", "b0", "--address", "10.0.0.99")
    assert probe(pair, *ENCAPS["ipip"], count=1, timeout=1.5)["replies"] == 0


def test_detach(pair: Pair) -> None:
    decap_cli(pair.backend, "attach", "--interface", "b0")
    decap_cli(pair.backend, "detach", "--interface", "b0")
    assert "xdp" not in link(pair.backend, "b0")
    decap_cli(pair.backend, "detach", "--interface", "b0")  # nothing attached: still fine


def test_attach_to_missing_interface_fails_clearly(pair: Pair) -> None:
    argv = [sys.executable, "-m", "edge_lb.dataplane.decap", "attach", "--interface", "nope0"]
    proc = pair.backend.run(argv, check=False)
    assert proc.returncode == 1
    assert "nope0" in proc.stderr


# The lab and the lab HTTP server, which the decap tests above stand on.


def wait_http(ns: Netns, url: str, deadline_s: float = 10.0) -> str:
    deadline = time.monotonic() + deadline_s
    while True:
        proc = ns.run(["curl", "-sS", "--max-time", "2", url], check=False, timeout=10)
        if proc.returncode == 0 or time.monotonic() > deadline:
            assert proc.returncode == 0, proc.stderr
            return proc.stdout
        time.sleep(0.1)


def test_labhttp_answers_with_its_name_v4_and_v6(pair: Pair, lab: Lab) -> None:
    for bind, name in ((VIP4, "be-v4"), (VIP6, "be-v6")):
        pair.backend.spawn(
            [sys.executable, "-m", "edge_lb.lab.labhttp", "--bind", bind, "--port", "8080", "--name", name],
            lab.tmpdir / f"{name}.log",
        )
    pair.client.route(VIP4, via=BACKEND4)
    pair.client.route(VIP6, via=BACKEND6)
    assert wait_http(pair.client, f"http://{VIP4}:8080/") == "be-v4\n"
    assert wait_http(pair.client, f"http://[{VIP6}]:8080/anything") == "be-v6\n"


def test_labhttp_exits_cleanly_on_sigterm(pair: Pair, lab: Lab) -> None:
    proc = pair.backend.spawn(
        [sys.executable, "-m", "edge_lb.lab.labhttp", "--bind", VIP4, "--port", "8081", "--name", "x"],
        lab.tmpdir / "x.log",
    )
    wait_http(pair.backend, f"http://{VIP4}:8081/")
    proc.terminate()
    assert proc.wait(timeout=5) == 0


def test_lab_close_removes_everything(require_root: None) -> None:
    lab = Lab(prefix="elbt")
    try:
        ns = lab.netns("x")
        sleeper = ns.spawn(["sleep", "600"], lab.tmpdir / "sleep.log")
        stubborn = ns.spawn(["sh", "-c", "trap '' TERM; sleep 600 & wait"], lab.tmpdir / "stubborn.log")
        tmpdir = lab.tmpdir
    finally:
        started = time.monotonic()
        lab.close()
    assert time.monotonic() - started < 10
    lab.close()  # idempotent
    assert sleeper.returncode is not None and stubborn.returncode is not None
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert ns.name not in names
    assert not tmpdir.exists()
