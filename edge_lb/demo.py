"""`edge-lb demo`: build the data-plane lab, show balancing, a drain and direct server return, tear down."""

from __future__ import annotations

import time
from typing import Any

from edge_lb.lab import VIP, VIP_PORT, DataplaneLab
from edge_lb.netns import Lab

_T0 = time.monotonic()


def say(text: str) -> None:
    print(f"[{time.monotonic() - _T0:6.2f}s] {text}", flush=True)


def show_split(result: dict[str, Any]) -> None:
    total = sum(result["served"].values())
    for name, n in sorted(result["served"].items()):
        say(f"    {name}: {n:4d} requests ({100 * n / max(total, 1):5.1f}%)")
    say(f"    failures: {result['failures']}")


def run(lab: Lab) -> None:
    d = DataplaneLab(lab)
    try:
        say(f"building lab {lab.id}: client, router, LB node, 3 backends (namespaces {lab.id}-*)")
        d.build()
        say("backends: VIP on lo, decap.c on eth0, HTTP server on the VIP")
        say("LB node: " + d.load_balancer())
        d.wait_ready()
        say(f"300 fresh HTTP connections from the client to {VIP}:{VIP_PORT} ...")
        before = d.lb_reasons()
        show_split(d.http_get(300))
        after = d.lb_reasons()
        sent = after["STAT_TX"] - before["STAT_TX"]
        replies = after["STAT_PASS_NOT_VIP"] - before["STAT_PASS_NOT_VIP"]
        say(f"LB node encapsulated {sent} client packets (conn-table hits "
            f"{after['STAT_CT_HIT'] - before['STAT_CT_HIT']}, ring look-ups "
            f"{after['STAT_CT_MISS'] - before['STAT_CT_MISS']}) and saw {replies} replies: "
            "backends answered the client directly (DSR)")
        say("draining b2 (weight 0) and reloading: pinned maps adopted, only changed ring slots written")
        say("LB node: " + d.load_balancer(weights={"b2": 0}))
        show_split(d.http_get(150))
    finally:
        d.close()


def main() -> int:
    with Lab(prefix="demo") as lab:
        run(lab)
    say("lab torn down: namespaces, processes, pinned maps removed")
    return 0
