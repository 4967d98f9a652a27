"""`edge-lb demo`: the namespace lab with the supervisor: balancing, failover, recovery, a live drain."""

from __future__ import annotations

import time
from typing import Any

from edge_lb import status
from edge_lb.lab import VIP, VIP_PORT, DataplaneLab, wait_for
from edge_lb.netns import Lab

_T0 = time.monotonic()
CHECK = '  type = "http"\n  path = "/"\n  interval = 1.0\n  fast_interval = 0.25\n  fall = 2\n  rise = 2\n'


def say(text: str) -> None:
    print(f"[{time.monotonic() - _T0:6.2f}s] {text}", flush=True)


def show_split(result: dict[str, Any]) -> None:
    total = sum(result["served"].values())
    for name, n in sorted(result["served"].items()):
        say(f"    {name}: {n:4d} requests ({100 * n / max(total, 1):5.1f}%)")
    say(f"    failures: {result['failures']}")


def balance(d: DataplaneLab, count: int) -> None:
    say(f"{count} fresh HTTP connections from the client to {VIP}:{VIP_PORT} ...")
    before = d.lb_reasons()
    show_split(d.http_get(count))
    after = d.lb_reasons()
    sent = after["STAT_TX"] - before["STAT_TX"]
    replies = after["STAT_PASS_NOT_VIP"] - before["STAT_PASS_NOT_VIP"]
    say(f"LB node encapsulated {sent} client packets and saw {replies} replies: backends answered the "
        "client directly (DSR)")


def failover(d: DataplaneLab) -> None:
    say("killing b2's HTTP server ...")
    d.stop_http("b2")
    took = wait_for(lambda: d.backend_states()["b2"] == ("down", 0), 10, "b2 out of the ring")
    say(f"b2 failed 2 checks and left the ring {took:.2f} s later (interval 1 s, fall 2)")
    show_split(d.http_get(150))
    say("restarting b2's HTTP server ...")
    d.start_http("b2")
    took = wait_for(lambda: d.backend_states()["b2"][0] == "up", 10, "b2 back")
    say(f"b2 passed 2 checks and is back in the ring {took:.2f} s later")


def run(lab: Lab) -> None:
    d = DataplaneLab(lab)
    try:
        say(f"building lab {lab.id}: client, router, LB node, 3 backends (namespaces {lab.id}-*)")
        d.build()
        d.prepare_lb()
        d.wait_ready()
        say("backends: VIP on lo, decap.c on eth0, HTTP server on the VIP and their own address")
        d.config_path.write_text(d.config_text(check=CHECK))
        say(f"starting the supervisor: edge-lb run -c {d.config_path}")
        d.start_supervisor()
        wait_for(lambda: all(s == "up" for s, _ in d.backend_states().values()), 15, "backends up")
        say("all 3 backends passed their HTTP checks")
        balance(d, 300)
        failover(d)
        say("draining b3 (weight 0) with a live reload: new flows avoid it, its existing flows stay")
        d.config_path.write_text(d.config_text(weights={"b3": 0}, check=CHECK))
        say("reload: " + d.reload())
        show_split(d.http_get(150))
        say("edge-lb status:")
        print(status.render(d.status()), flush=True)
        say("supervisor log (one structured line per event):")
        print("".join(f"    {line}\n" for line in d.supervisor_log().splitlines()[-12:]), end="", flush=True)
    finally:
        d.close()


def main() -> int:
    with Lab(prefix="demo") as lab:
        run(lab)
    say("lab torn down: namespaces, processes, pinned maps removed")
    return 0
