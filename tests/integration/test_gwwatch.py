"""edge_lb.control.gwwatch: the gateway MAC followed from the kernel. These root tests run the watcher inside
a "lb" namespace whose default route goes through a "router" namespace, and change the router's MAC under
it. The pure parts and the watcher's state machine: tests/unit/test_gwwatch.py."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from edge_lb.lab.netns import Lab, Netns

LB4, RT4, NOBODY4 = "10.79.1.2", "10.79.1.1", "10.79.1.99"
LB_IF, RT_IF = "lb-r", "r-lb"
NEW_MAC = "02:79:00:00:00:02"

# Runs inside the lb namespace: starts a GatewayWatcher, writes "<monotonic> <kind> <text>" lines to the
# events file (kinds: begin, start, error, change, stopped) and stops when the stop file appears (at most
# after 60 s). Its logging goes to stdout, i.e. the spawn log.
WATCH = r"""
import asyncio, logging, os, sys, time
from edge_lb.errors import NetlinkError
from edge_lb.control.gwwatch import GatewayWatcher

ifname, events_path, stop_path = sys.argv[1:4]
logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                    format="%(relativeCreated)d %(levelname)s %(message)s")
logging.getLogger("edge_lb").setLevel(logging.DEBUG)
out = open(events_path, "a", buffering=1)

def note(kind, text=""):
    out.write(f"{time.monotonic():.6f} {kind} {text}\n")

async def main():
    # A poll far longer than the test: every change seen must have come from a netlink event.
    watcher = GatewayWatcher(ifname, lambda mac: note("change", mac), poll_interval=300.0)
    note("begin")
    try:
        note("start", await watcher.start())
    except NetlinkError as exc:
        note("error", " ".join(str(exc).split()))
        return 3
    deadline = time.monotonic() + 60
    while not os.path.exists(stop_path) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    began = time.monotonic()
    await watcher.stop()
    await watcher.stop()
    note("stopped", f"{time.monotonic() - began:.3f}")
    return 0

sys.exit(asyncio.run(main()))
"""


@dataclass(frozen=True)
class Event:
    at: float  # time.monotonic() in the watcher process (CLOCK_MONOTONIC is system-wide)
    kind: str
    text: str


@dataclass(frozen=True)
class GwLab:
    lab: Lab
    lb: Netns
    router: Netns

    @property
    def events_path(self) -> Path:
        return self.lab.tmpdir / "gwwatch-events.log"

    @property
    def log_path(self) -> Path:
        return self.lab.tmpdir / "gwwatch.log"

    @property
    def stop_path(self) -> Path:
        return self.lab.tmpdir / "stop"

    def spawn_watcher(self) -> subprocess.Popen[bytes]:
        argv = [sys.executable, "-c", WATCH, LB_IF, str(self.events_path), str(self.stop_path)]
        return self.lb.spawn(argv, self.log_path)

    def events(self, kind: str | None = None) -> list[Event]:
        if not self.events_path.exists():
            return []
        rows = [line.split(" ", 2) for line in self.events_path.read_text().splitlines()]
        events = [Event(float(at), k, text) for at, k, text in rows]
        return [e for e in events if kind is None or e.kind == kind]

    def wait_event(self, kinds: tuple[str, ...], count: int = 1, timeout: float = 10.0) -> Event:
        """The count-th event of one of `kinds`, waiting at most `timeout`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [e for e in self.events() if e.kind in kinds]
            if len(found) >= count:
                return found[count - 1]
            time.sleep(0.02)
        raise AssertionError(f"no {kinds} event #{count} within {timeout} s: {self.events()}")

    def wait_log(self, needle: str, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.log_path.read_text(errors="replace"):
            assert time.monotonic() < deadline, f"{needle!r} not logged within {timeout} s"
            time.sleep(0.02)


@pytest.fixture
def gw(lab: Lab) -> GwLab:
    """lb (LB_IF, LB4) <-veth-> router (RT_IF, RT4); lb's default route via the router; no neighbours yet."""
    lb, router = lab.netns("lb"), lab.netns("router")
    lab.veth(lb, LB_IF, router, RT_IF)
    lb.addr(LB_IF, f"{LB4}/24")
    router.addr(RT_IF, f"{RT4}/24")
    lb.route("default", via=RT4)
    return GwLab(lab, lb, router)


def _link_mac(ns: Netns, ifname: str) -> str:
    return str(json.loads(ns.ip("-j", "link", "show", ifname).stdout)[0]["address"])


def _neighbours(ns: Netns, ifname: str) -> dict[str, tuple[str | None, list[str]]]:
    """dst -> (lladdr, states) of ifname's IPv4 neighbour entries."""
    rows = json.loads(ns.ip("-4", "-j", "neigh", "show", "dev", ifname).stdout or "[]")
    return {r["dst"]: (r.get("lladdr"), r.get("state", [])) for r in rows}


def _gateway_mac(ns: Netns) -> str | None:
    """What the kernel would send to: the router's entry if usable (not INCOMPLETE/FAILED), else None."""
    lladdr, states = _neighbours(ns, LB_IF).get(RT4, (None, []))
    return None if not lladdr or {"INCOMPLETE", "FAILED"} & set(states) else lladdr


def _wait_neighbour_change(ns: Netns, old: str, since: float, timeout: float = 5.0) -> tuple[float, float]:
    """Poll until the gateway entry holds a MAC other than `old`: (changed after, seen at), both monotonic."""
    changed_after, deadline = since, time.monotonic() + timeout
    while time.monotonic() < deadline:
        asked = time.monotonic()
        mac = _gateway_mac(ns)
        if mac is not None and mac != old:
            return changed_after, time.monotonic()
        changed_after = asked  # this read still saw the old entry: the change came later
    raise AssertionError(f"lb's neighbour entry for {RT4} still {old} after {timeout} s")


@pytest.mark.root
def test_resolves_follows_and_keeps_the_gateway_mac(gw: GwLab) -> None:
    # (1) No neighbour entry yet: start() prompts the kernel (UDP to the discard port) and gets the MAC.
    assert _gateway_mac(gw.lb) is None
    router_mac = _link_mac(gw.router, RT_IF)
    proc = gw.spawn_watcher()
    started = gw.wait_event(("start", "error"))
    assert (started.kind, started.text) == ("start", router_mac)
    assert _gateway_mac(gw.lb) == router_mac

    # (2) The router's MAC changes; lb learns it the way it would in life, from the router's ARP request.
    gw.router.ip("link", "set", RT_IF, "address", NEW_MAC)
    gw.router.ip("neigh", "flush", "dev", RT_IF)
    since = time.monotonic()
    assert _gateway_mac(gw.lb) == router_mac
    ping = subprocess.Popen([*gw.router.prefix(), "ping", "-c", "1", "-W", "2", LB4],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        changed_after, seen_at = _wait_neighbour_change(gw.lb, router_mac, since)
    finally:
        ping.wait(timeout=10)
    assert _gateway_mac(gw.lb) == NEW_MAC
    change = gw.wait_event(("change",), timeout=5.0)
    assert change.text == NEW_MAC
    upper, lower = change.at - changed_after, change.at - seen_at
    print(f"gateway MAC followed in at most {upper * 1000:.0f} ms "
          f"({lower * 1000:.0f} ms after the test saw the neighbour entry change)")
    assert upper < 1.0

    # (3) The entry goes away, then more events come: the last MAC is kept, one warning for the streak.
    gw.lb.ip("neigh", "del", RT4, "dev", LB_IF)
    gw.wait_log("result=unresolvable keeping=")
    gw.lb.ip("neigh", "add", "10.79.1.50", "lladdr", "02:79:00:00:00:50", "dev", LB_IF)
    gw.wait_log("still unresolvable")
    time.sleep(0.3)
    assert [e.text for e in gw.events("change")] == [NEW_MAC]
    assert gw.log_path.read_text().count("result=unresolvable keeping=") == 1

    gw.stop_path.touch()
    assert proc.wait(timeout=15) == 0
    assert float(gw.wait_event(("stopped",)).text) < 2.5


@pytest.mark.root
def test_start_gives_up_when_the_gateway_never_answers(gw: GwLab) -> None:
    gw.lb.route("default", via=NOBODY4)
    proc = gw.spawn_watcher()
    failed = gw.wait_event(("start", "error"))
    assert proc.wait(timeout=10) == 3
    assert failed.kind == "error" and "node.gateway_mac" in failed.text
    assert 1.5 < failed.at - gw.wait_event(("begin",)).at < 4.0
    # The prompt made the kernel ARP for the gateway; its INCOMPLETE/FAILED entry did not count.
    assert NOBODY4 in _neighbours(gw.lb, LB_IF)
