"""`edge-lb demo`: the whole appliance in namespaces, narrated.

    client --- router (BIRD 2, ECMP) --- lb1, lb2 (edge-lb run + ExaBGP + XDP)  b1 b2 b3 (backend setup; HTTP)

Balancing over two LB nodes and three backends, a backend failure leaving the ring, a backend whose
decapsulation is broken taken out by its tunnel health check while its own address still answers (and
`edge-lb backend check` / `setup` naming and mending it), a node disabled for maintenance and dropped by the
router while the client keeps working, everything restored, torn down.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections import Counter
from typing import Any

from edge_lb.control import status
from edge_lb.lab.bgplab import HTTP_PORT, VIP, BgpLab
from edge_lb.lab.labbackend import backend_argv
from edge_lb.lab.labs import PY, wait_for
from edge_lb.lab.netns import Lab

_T0 = time.monotonic()


def say(text: str) -> None:
    print(f"[{time.monotonic() - _T0:6.2f}s] {text}", flush=True)


def show(lines: str) -> None:
    print("".join(f"           {line}\n" for line in lines.strip().splitlines()), end="", flush=True)


def route(b: BgpLab) -> None:
    assert b.router is not None
    show(b.router.ip("route", "show", f"{VIP}/32").stdout or "(no route)")


def traffic(b: BgpLab, count: int) -> None:
    """`count` fresh HTTP connections: who served them (backends) and who carried them (LB nodes)."""
    before = {n: b.node_vip_packets(n, "tcp") for n in b.nodes}
    result = b.http_get(count)
    carried = {f"lb{n}": b.node_vip_packets(n, "tcp") - before[n] for n in b.nodes}
    backends = ", ".join(f"{k} {v}" for k, v in sorted(Counter(result["served"]).items()))
    nodes = ", ".join(f"{k} {v} packets" for k, v in carried.items())
    say(f"    {count} requests, {result['failures']} failed; backends: {backends}; LB nodes: {nodes}")


def cli(b: BgpLab, command: str) -> None:
    """`edge-lb disable|enable -c lb1.toml`, as an operator would type it."""
    subprocess.run([PY, "-m", "edge_lb", command, "-c", str(b.config_path(1))], check=True, timeout=30,
                   stdout=subprocess.DEVNULL)


def all_up(b: BgpLab) -> bool:
    return all(all(r["state"] == "up" for r in b.status(n)["vips"][0]["backends"]) for n in b.nodes)


def ring_of(doc: dict[str, Any], address: str) -> str:
    row = next(r for r in doc["vips"][0]["backends"] if r["address"] == address)
    return f"{row['state']}, {row['ring_share']:.0%} of the ring"


def row_of(doc: dict[str, Any], address: str) -> dict[str, Any]:
    row: dict[str, Any] = next(r for r in doc["vips"][0]["backends"] if r["address"] == address)
    return row


def backend_cmd(b: BgpLab, role: str, command: str) -> str:
    """`edge-lb backend check|setup --vip VIP` on the backend, as its operator would run it; its output."""
    server = b.server(role)
    out = server.ns.run([*backend_argv(server, command, [VIP]), *(["--mode", "xdp"] if command == "setup"
                                                                   else [])], check=False, timeout=120)
    return out.stdout.strip()


def broken_decap(b: BgpLab) -> None:
    """b3's decap.c detached: its server still answers on b3's own address, but clients' (encapsulated)
    packets are lost. The tunnel check, which travels the clients' path, takes it out; the direct check run
    beside it tells a setup problem from a dead service."""
    b3 = b.server("b3")
    say("detaching b3's decapsulation (decap.c); its HTTP server keeps answering on its own address ...")
    b3.ns.run([PY, "-m", "edge_lb.dataplane.decap", "detach", "--interface", "eth0"], timeout=60)
    took = wait_for(lambda: all(row_of(b.status(n), b3.address)["state"] == "down" for n in b.nodes), 10,
                    "b3 down on both nodes")
    row = row_of(b.status(1), b3.address)
    say(f"b3's {row['check']} check via {row['via']} (to {VIP} through b3's tunnel, as a client) took it out "
        f"of the ring on both nodes within {took:.2f} s; lb1's reason: {row['reason']!r}")
    url = f"http://{b3.address}:{HTTP_PORT}/"
    got = json.loads(b.node(1).ns.run([PY, "-m", "edge_lb.lab.labtools", "http-get", url, "--count", "1"],
                                      timeout=30).stdout)
    answer = f"answered by {', '.join(got['served'])}" if got["served"] else f"failed: {got['errors']}"
    say(f"    while its direct check still passes: GET {url} from lb1 -> {answer}")
    traffic(b, 150)
    say("on b3, `edge-lb backend check` says what is wrong:")
    show(backend_cmd(b, "b3", "check"))
    say("`edge-lb backend setup` mends it; b3 comes back once its tunnel check passes ...")
    show(backend_cmd(b, "b3", "setup"))
    took = wait_for(lambda: all(row_of(b.status(n), b3.address)["state"] == "up" for n in b.nodes), 15,
                    "b3 back on both nodes")
    say(f"b3 back in the ring on both nodes ({took:.2f} s)")


def run(lab: Lab) -> None:
    b = BgpLab(lab)
    try:
        say(f"building lab {lab.id}: client, router (BIRD 2, ECMP with L4 hashing), LB nodes lb1 and lb2, "
            f"backends b1-b3 (`edge-lb backend setup`: VIP on lo, decap.c, ARP, rp_filter, MSS; HTTP)")
        b.build()
        say("starting `edge-lb run` on both LB nodes (XDP program, health checks, ExaBGP) ...")
        b.start_supervisors()
        took = b.wait_nexthops({n.address for n in b.nodes.values()}, 15)
        wait_for(lambda: all_up(b), 15, "every backend up on both nodes")
        say(f"both nodes announce {VIP}/32 ({took:.2f} s after start); the router's route:")
        route(b)
        say(f"traffic: fresh HTTP connections to {VIP}:{HTTP_PORT}")
        traffic(b, 200)

        b2 = b.server("b2").address
        say("killing b2's HTTP server ...")
        b.stop_http("b2")
        took = wait_for(lambda: all(ring_of(b.status(n), b2).startswith("down") for n in b.nodes), 10,
                        "b2 down on both nodes")
        say(f"both nodes took b2 out of the ring within {took:.2f} s: lb1 says b2 is "
            f"{ring_of(b.status(1), b2)}")
        traffic(b, 150)

        broken_decap(b)

        held = b.hold(20)
        before = held.round()
        say("disabling lb1 for maintenance: edge-lb disable -c lb1.toml (20 connections held open)")
        cli(b, "disable")
        took = b.wait_nexthops({b.node(2).address}, 5)
        say(f"lb1 withdrew; the router dropped its next hop {took:.2f} s later, BGP session still "
            f"{b.bird_protocols()['lb1']}:")
        route(b)
        after = held.round()
        kept = sum(1 for x, y in zip(before, after, strict=True) if x == y)
        say(f"    held connections still answered by the same backend through lb2: {kept}/20")
        traffic(b, 150)

        say("restoring: b2's server back, lb1 enabled ...")
        b.start_http("b2")
        cli(b, "enable")
        took = b.wait_nexthops({n.address for n in b.nodes.values()}, 10)
        wait_for(lambda: all_up(b), 10, "b2 back on both nodes")
        say(f"both next hops and all backends back ({took:.2f} s):")
        route(b)
        traffic(b, 150)
        say("edge-lb status on lb1:")
        show(status.render(b.status(1)))
    finally:
        b.close()


def main() -> int:
    with Lab(prefix="demo") as lab:
        run(lab)
    say("lab torn down: namespaces, BIRD, supervisors and ExaBGP, pinned maps removed")
    return 0
