"""`edge-lb backend` on a real backend (issue 11, item 4(d)): the data-plane lab with one backend, which the
lab set up with the same `edge-lb backend setup`, and the LB loaded (`edge-lb load`).

    client --- router --- lb (XDP) --IPIP--> b1 (backend setup: VIP on lo, decap.c, ARP, rp_filter, MSS)

Each fault in turn (and an address added to eth0 after decap.c was attached for the old ones) is named by
`edge-lb backend check` (the real CLI, in b1's namespace, exit 1), setup fixes it (check exits 0) and HTTP
through the VIP from the client works again; setup twice changes nothing; teardown restores the namespace as
it was before setup. And the SYN-ACK's MSS option proves which route the
kernel takes the advertised MSS from: the route the reply takes, not the VIP's local route.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable, Iterator

import pytest

from edge_lb.backend.system import available_modules
from edge_lb.lab.labbackend import backend_argv, backend_state
from edge_lb.lab.labs import (
    VIP,
    VIP_PORT,
    DataplaneLab,
    Node,
    http_get,
    wait_for,
)
from edge_lb.lab.netns import Lab

from .conftest import ready_lab

pytestmark = pytest.mark.root

SYSCTLS = [f"net.ipv4.conf.{dev}.{name}" for dev in ("all", "eth0")
           for name in ("rp_filter", "arp_ignore", "arp_announce")]
EXTRA = "10.77.10.9/24"  # a second address for b1's eth0
CLAMPED = 1500 - 48 - 40  # the veth's MTU - the default overhead (48: GUE over IPv6) - IPv4 and TCP headers


@pytest.fixture(scope="module")
def blab() -> Iterator[DataplaneLab]:
    with Lab(prefix="elbbk") as lab:
        yield from ready_lab(lab, DataplaneLab.load_balancer, backends=1)


def b1(d: DataplaneLab) -> Node:
    return d.server("b1")


def backend(d: DataplaneLab, command: str, *extra: str) -> subprocess.CompletedProcess[str]:
    """`python -m edge_lb backend COMMAND --vip VIP ...` in b1's namespace (the lab's state file)."""
    result = b1(d).ns.run(backend_argv(b1(d), command, [VIP], *extra), check=False, timeout=120)
    print(f"$ edge-lb backend {command} -> {result.returncode}\n{result.stdout}{result.stderr}")
    return result


def failing(d: DataplaneLab) -> list[str]:
    """The items `edge-lb backend check --json` fails, asserting its exit code agrees."""
    result = backend(d, "check", "--json")
    doc = json.loads(result.stdout)
    assert result.returncode == (0 if doc["ok"] else 1)
    return [item["item"] for item in doc["items"] if not item["ok"]]


def served(d: DataplaneLab, count: int = 3) -> dict[str, int]:
    """`count` fresh HTTP connections from the client through the VIP: backend -> answered, plus failures."""
    assert d.client is not None
    result = http_get(d.client.ns, VIP, VIP_PORT, count)
    return {**result["served"], "failures": result["failures"]}


def snapshot(d: DataplaneLab) -> dict[str, object]:
    """What setup may change in b1's namespace: lo's addresses, every route, the sysctls, an XDP program."""
    ns = b1(d).ns
    routes = "".join(ns.ip(*family, "route", "show", "table", "all").stdout for family in ([], ["-6"]))
    return {"lo": ns.ip("-br", "addr", "show", "lo").stdout,
            "routes": sorted(line for line in routes.splitlines() if "cache" not in line),
            "sysctls": {key: ns.run(["sysctl", "-n", key]).stdout.strip() for key in SYSCTLS},
            "xdp": "prog/xdp" in ns.ip("link", "show", "eth0").stdout}


def syn_ack_mss(d: DataplaneLab) -> int:
    """The MSS option of the SYN-ACK the client gets from the VIP (tcpdump in the client's namespace)."""
    assert d.client is not None
    log = d.lab.tmpdir / "synack.log"
    log.write_text("")
    proc = d.client.ns.spawn(["tcpdump", "-i", "eth0", "-n", "-l", "-v", "-c", "1",
                              f"src host {VIP} and tcp[tcpflags] & tcp-syn != 0"], log)
    try:
        wait_for(lambda: "listening on" in log.read_text(errors="replace"), 10, "tcpdump listening")
        assert served(d, 1)["failures"] == 0
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
    found = re.search(r"mss (\d+)", log.read_text(errors="replace"))
    assert found, log.read_text(errors="replace")
    return int(found.group(1))


def test_the_syn_ack_mss_comes_from_the_reply_route_not_the_vip_route(blab: DataplaneLab) -> None:
    d, ns = blab, b1(blab).ns
    assert failing(d) == []
    assert syn_ack_mss(d) == CLAMPED  # the lab's setup put advmss on the default route
    # The same clamp moved to the VIP's own (local) route: the SYN-ACK is back to 1500 - 40; check says so.
    ns.ip("route", "change", "default", "via", "10.77.10.1", "dev", "eth0")
    local = ["local", VIP, "dev", "lo", "table", "local", "proto", "kernel", "scope", "host", "src", VIP]
    ns.ip("route", "replace", *local, "advmss", str(CLAMPED))
    assert syn_ack_mss(d) == 1460
    assert failing(d) == ["mss"]
    ns.ip("route", "replace", *local)
    assert backend(d, "setup").returncode == 0
    assert syn_ack_mss(d) == CLAMPED


def _sysctls(**values: int) -> Callable[[DataplaneLab], None]:
    def fault(d: DataplaneLab) -> None:
        for key, value in values.items():
            b1(d).ns.sysctl(f"net.ipv4.conf.{key.replace('__', '.')}", value)
    return fault


# fault -> (how to make it, the item check must name, whether requests through the VIP fail meanwhile)
FAULTS: dict[str, tuple[Callable[[DataplaneLab], object], str, bool]] = {
    "VIP removed from lo": (lambda d: b1(d).ns.ip("addr", "del", f"{VIP}/32", "dev", "lo"), "vip", True),
    "decap detached": (lambda d: b1(d).ns.ip("link", "set", "dev", "eth0", "xdp", "off"), "decap", True),
    # decap.c decapsulates for the addresses eth0 had when it was attached: a new one is not among them.
    "address added after decap": (lambda d: b1(d).ns.addr("eth0", EXTRA), "decap", False),
    "rp_filter=1": (_sysctls(eth0__rp_filter=1), "rp_filter", False),
    "arp_ignore=0": (_sysctls(all__arp_ignore=0, eth0__arp_ignore=0), "arp_ignore", False),
    "MSS not clamped": (lambda d: b1(d).ns.ip("route", "change", "default", "via", "10.77.10.1", "dev",
                                              "eth0"), "mss", False),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_check_names_the_fault_and_setup_fixes_it(blab: DataplaneLab, fault: str) -> None:
    d = blab
    make, item, breaks_requests = FAULTS[fault]
    assert failing(d) == []
    make(d)
    assert failing(d) == [item]
    check = backend(d, "check")
    assert check.returncode == 1 and re.search(rf"^FAIL +{item} ", check.stdout, re.M), check.stdout
    if breaks_requests:
        assert served(d, 1) == {"failures": 1}
    setup = backend(d, "setup")
    assert setup.returncode == 0 and "changed: " in setup.stdout
    assert failing(d) == []
    assert served(d) == {"b1": 3, "failures": 0}
    if fault == "address added after decap":
        b1(d).ns.ip("addr", "del", EXTRA, "dev", "eth0")


def test_setup_twice_changes_nothing_and_teardown_restores_the_namespace(blab: DataplaneLab) -> None:
    d, ns = blab, b1(blab).ns
    state = backend_state(b1(d))
    # From a bare b1 (every earlier setup undone) with strict rp_filter on eth0, as some hosts have it.
    assert backend(d, "teardown").returncode == 0 and not state.exists()
    ns.sysctl("net.ipv4.conf.eth0.rp_filter", 1)
    bare = snapshot(d)
    assert VIP not in str(bare["lo"]) and not bare["xdp"] and "advmss" not in str(bare["routes"])
    assert failing(d) == ["vip", "decap", "rp_filter", "arp_ignore", "arp_announce", "mss"]
    assert served(d, 1) == {"failures": 1}
    assert backend(d, "setup").returncode == 0
    assert failing(d) == [] and served(d) == {"b1": 3, "failures": 0}
    recorded, done = state.read_text(), snapshot(d)
    again = backend(d, "setup")
    assert again.returncode == 0 and "nothing to change" in again.stdout
    assert (snapshot(d), state.read_text()) == (done, recorded)
    down = backend(d, "teardown")
    assert down.returncode == 0 and not state.exists()
    assert "restored: net/ipv4/conf/eth0/rp_filter = 1 (was 2)" in down.stdout
    assert snapshot(d) == bare
    assert backend(d, "setup").returncode == 0  # serving again, for whatever runs next on this lab


def test_ipip_mode_is_refused_without_the_module_and_changes_nothing(blab: DataplaneLab) -> None:
    """The machines this project runs on have no ipip module (docs: environment.md), so `--mode ipip` must
    name it, point to --mode xdp, and leave b1 as it was."""
    assert "ipip" not in available_modules(["ipip"]), "this kernel has ipip: the refusal cannot be shown here"
    before = snapshot(blab)
    result = backend(blab, "setup", "--mode", "ipip")
    assert result.returncode == 1
    assert "--mode ipip needs the kernel module(s) ipip" in result.stderr
    assert "Use --mode xdp" in result.stderr
    assert snapshot(blab) == before and failing(blab) == []
