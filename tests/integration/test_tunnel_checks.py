"""Health checks that travel the clients' path (issue 11, item 4 a-c), in one dual-stack namespace lab:

    client --- router --- lb (edge-lb run: XDP + checkencap.c on eth0)
                 |
             b1 b2 b3   decap.c, every VIP on lo, HTTP on "::" (their own addresses and the VIPs)

Three VIPs: VIP (IPv4 backends, IPIP), VIP6 (IPv6 backends, IP6IP6), VIP4_OVER_V6 (IPv4 VIP, IPv6 backends,
4in6). A backend broken for clients but alive on its own address (its decapsulation detached, or a VIP taken
off its lo) stays in the ring under direct checks while requests to it fail; under tunnel checks it leaves
the ring within interval x fall + 1 s, no request fails afterwards, and its reason says "direct OK".
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from edge_lb.config import Dataplane
from edge_lb.dataplane import checkencap
from edge_lb.lab.labs import PY, VIP, VIP4_OVER_V6, VIP6, VIP_PORT, DataplaneLab, wait_for
from edge_lb.lab.netns import Lab

pytestmark = pytest.mark.root

INTERVAL, FALL = 1.0, 2
CHECK = (f'  type = "http"\n  interval = {INTERVAL}\n  fast_interval = 0.25\n  timeout = 0.5\n'
         f'  fall = {FALL}\n  rise = 2\n')
BOUND = INTERVAL * FALL + 1.0  # the issue's: a backend broken for clients leaves the ring within this
SLACK = 1.0  # a busy 2-core machine
REQUESTS = 60


def config_text(d: DataplaneLab, via: str, kind: str = "http") -> str:
    """VIP6 and VIP4_OVER_V6 (tunnel checks) and VIP with IPv4 backends, checked `via` tunnel or direct by
    `kind` checks (tcp: the batched engine, healthchecks/tcpengine.py)."""
    backends = "".join(f'  [[vip.backend]]\n  address = "{s.address}"\n' for s in d.servers)
    check = CHECK.replace('"http"', f'"{kind}"')
    return (d.config_text_v6(check=CHECK) + f'[[vip]]\naddress = "{VIP}"\nport = {VIP_PORT}\n'
            f'protocol = "tcp"\n  [vip.healthcheck]\n{check}  via = "{via}"\n{backends}')


def rows(d: DataplaneLab) -> dict[tuple[str, str], dict[str, Any]]:
    """(VIP address, backend role) -> its status row."""
    roles = {address: role for s in d.servers for role in [s.ns.name.rsplit("-", 1)[1]]
             for address in (s.address, s.address6)}
    return {(v["address"], roles[b["address"]]): b for v in d.status()["vips"] for b in v["backends"]}


def all_up(d: DataplaneLab) -> bool:
    return all(r["state"] == "up" and r["ring_slots"] for r in rows(d).values())


def reload(d: DataplaneLab, via: str, kind: str = "http") -> None:
    d.config_path.write_text(config_text(d, via, kind))
    assert d.reload().startswith("reloaded "), "the reload was applied"
    wait_for(lambda: all(r["via"] == via for (v, _), r in rows(d).items() if v == VIP), 10, f"via {via}")


@pytest.fixture(scope="module")
def tlab() -> Iterator[DataplaneLab]:
    """One dual-stack lab for the module, `edge-lb run` with the three VIPs, every backend up via tunnel."""
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces, veths and XDP")
    with Lab(prefix="elbtc") as lab:
        d = DataplaneLab(lab, ipv6=True)
        try:
            d.build()
            d.prepare_lb()
            d.wait_ready()
            d.config_path.write_text(config_text(d, "tunnel"))
            d.start_supervisor()
            wait_for(lambda: all_up(d), 20, "every backend of the three VIPs up")
            yield d
        finally:
            for path in sorted(lab.tmpdir.glob("*.log")):
                print(f"--- {path.name} ---\n{path.read_text(errors='replace')[-4000:]}")
            d.close()


def decap(d: DataplaneLab, role: str, action: str) -> None:
    """Attach or detach the backend's decapsulator (its HTTP server keeps answering on its own address)."""
    d.server(role).ns.run([PY, "-m", "edge_lb.dataplane.decap", action, "--interface", "eth0"], timeout=120)


def vip_on_lo(d: DataplaneLab, role: str, vip: str, action: str) -> None:
    d.server(role).ns.ip("addr", action, f"{vip}/{128 if ':' in vip else 32}", "dev", "lo")


Fault = Callable[[DataplaneLab, str], None]
FAULTS: dict[str, tuple[Fault, Fault]] = {  # how to break a backend for clients, and how to mend it
    "decap removed": (lambda d, r: decap(d, r, "detach"), lambda d, r: decap(d, r, "attach")),
    "VIP off lo": (lambda d, r: vip_on_lo(d, r, VIP, "del"), lambda d, r: vip_on_lo(d, r, VIP, "add")),
}


def get(d: DataplaneLab, count: int, vip: str = VIP) -> dict[str, Any]:
    """`count` fresh HTTP connections from the client, each given up after 0.5 s (a black hole's share)."""
    assert d.client is not None
    host = f"[{vip}]" if ":" in vip else vip
    out = d.client.ns.run([PY, "-m", "edge_lb.lab.labtools", "http-get", f"http://{host}:{VIP_PORT}/",
                           "--count", str(count), "--timeout", "0.5"], timeout=30 + count)
    result: dict[str, Any] = json.loads(out.stdout)
    return result


@pytest.mark.parametrize(("fault", "role", "kind"), [
    ("decap removed", "b2", "http"), ("VIP off lo", "b3", "http"),
    ("decap removed", "b2", "tcp"),  # tcp: the batched engine (healthchecks/tcpengine.py), marks and all
])
def test_a_backend_broken_for_clients_stays_under_direct_checks_and_leaves_under_tunnel_checks(
        tlab: DataplaneLab, fault: str, role: str, kind: str) -> None:
    d = tlab
    breaks, mends = FAULTS[fault]
    # Direct checks: the backend answers on its own address, so it stays in the ring and clients fail.
    reload(d, "direct", kind)
    wait_for(lambda: all_up(d), 10, "every backend up")
    breaks(d, role)
    try:
        time.sleep(BOUND + SLACK)
        row = rows(d)[(VIP, role)]
        assert row["state"] == "up" and row["ring_slots"] > 0, f"{fault}, direct check: {row}"
        result = get(d, REQUESTS)
        print(f"{fault}, direct checks: {result['failures']}/{REQUESTS} failed, served {result['served']}")
        assert result["failures"] > 0 and role not in result["served"], "its share of the clients black-holed"
    finally:
        mends(d, role)
    # Tunnel checks: the same fault takes it out of the ring in time, and no request fails.
    reload(d, "tunnel", kind)
    wait_for(lambda: all_up(d), 10, "every backend up through its tunnel")
    breaks(d, role)
    try:
        took = wait_for(lambda: rows(d)[(VIP, role)]["ring_slots"] == 0, BOUND + SLACK + 5, f"{role} out")
        row = rows(d)[(VIP, role)]
        print(f"{fault}, tunnel checks: {role} out of the ring {took:.2f} s after the fault "
              f"(bound {BOUND:g} s); reason {row['reason']!r}")
        assert took <= BOUND + SLACK
        assert row["state"] == "down" and row["reason"].startswith("direct OK, via tunnel: "), row
        result = get(d, REQUESTS)
        assert result["failures"] == 0 and role not in result["served"], result
        others = {r: b for (v, r), b in rows(d).items() if v == VIP and r != role}
        assert all(b["state"] == "up" and b["via"] == "tunnel" for b in others.values()), others
    finally:
        mends(d, role)
    wait_for(lambda: all_up(d), 10, f"{role} back once mended")
    if kind != "http":
        reload(d, "tunnel")  # as the module's other tests expect it


def test_ipv6_backends_are_checked_through_ip6ip6_and_4in6(tlab: DataplaneLab) -> None:
    """VIP6 off b1's lo fails only (VIP6, b1), through IP6IP6; VIP4_OVER_V6 off b2's lo fails only
    (VIP4_OVER_V6, b2), through 4in6: each tunnel check reached its backend addressed to its own VIP."""
    d = tlab
    reload(d, "tunnel")
    wait_for(lambda: all_up(d), 10, "every backend up")
    assert {r["via"] for r in rows(d).values()} == {"tunnel"}
    t0 = time.monotonic()
    vip_on_lo(d, "b1", VIP6, "del")
    vip_on_lo(d, "b2", VIP4_OVER_V6, "del")
    try:
        broken = {(VIP6, "b1"), (VIP4_OVER_V6, "b2")}
        wait_for(lambda: all(rows(d)[k]["ring_slots"] == 0 for k in broken), BOUND + SLACK + 5, "both out")
        took = time.monotonic() - t0
        print(f"IP6IP6 and 4in6 faults out of their rings within {took:.2f} s")
        assert took <= BOUND + SLACK
        now = rows(d)
        for key in broken:
            assert now[key]["reason"].startswith("direct OK, via tunnel: "), (key, now[key])
        assert all(r["state"] == "up" for k, r in now.items() if k not in broken), now
        for vip in (VIP6, VIP4_OVER_V6):
            result = get(d, REQUESTS, vip)
            assert result["failures"] == 0 and set(result["served"]) == {"b1", "b2", "b3"} - {
                r for v, r in broken if v == vip}, (vip, result)
    finally:
        vip_on_lo(d, "b1", VIP6, "add")
        vip_on_lo(d, "b2", VIP4_OVER_V6, "add")
    wait_for(lambda: all_up(d), 10, "both back once mended")


def test_the_encapsulator_removed_at_runtime_is_restored_and_still_catches_a_broken_backend(
        tlab: DataplaneLab) -> None:
    """The tc filter and the fwmark rules deleted from outside under a running supervisor (an operator's
    `tc filter del`, a network manager's rule flush): without them marked checks would leave unencapsulated,
    the router would send them back to the balancer, and every check would pass whatever a backend's decap.
    The keeper puts both back within its period, says so, blames no backend, and the checks catch a broken
    decap again afterwards."""
    d = tlab
    assert d.lb is not None
    reload(d, "tunnel")
    wait_for(lambda: all_up(d), 10, "every backend up")
    before = d.status()["check_tunnel"]["restores"]
    base = Dataplane().check_mark_base
    d.lb.ns.run(["tc", "filter", "del", "dev", "eth0", "egress", "pref", str(checkencap.FILTER_PRIO)])
    for family in ("-4", "-6"):
        d.lb.ns.run(["ip", family, "rule", "del", "priority", str(checkencap.rule_priority(base))])
    assert "bpf" not in d.lb.ns.run(["tc", "filter", "show", "dev", "eth0", "egress"]).stdout, "removed"
    took = wait_for(lambda: d.status()["check_tunnel"]["restores"] > before, 5, "the keeper restored them")
    print(f"encapsulator and rules removed from outside: restored within {took:.2f} s")
    assert "bpf" in d.lb.ns.run(["tc", "filter", "show", "dev", "eth0", "egress"]).stdout
    assert f"fwmark {base:#x}" in d.lb.ns.run(["ip", "-4", "rule", "show"]).stdout
    assert d.status()["check_tunnel"]["ready"] and all_up(d), "no backend blamed for it"
    assert "result=restored" in d.supervisor_log()
    FAULTS["decap removed"][0](d, "b1")
    try:
        wait_for(lambda: rows(d)[(VIP, "b1")]["ring_slots"] == 0, BOUND + SLACK + 5, "b1 out once restored")
        assert rows(d)[(VIP, "b1")]["reason"].startswith("direct OK, via tunnel: ")
    finally:
        FAULTS["decap removed"][1](d, "b1")
    wait_for(lambda: all_up(d), 10, "b1 back once mended")
