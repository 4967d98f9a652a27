"""ExaBgpSpeaker against a real BIRD 2 router, in namespaces (root).

    lb (lb-r 10.81.1.2/24, fd81:1::2/64)  <-veth->  rt (r-lb 10.81.1.1/24, fd81:1::1/64; BIRD, AS 65000)

The speaker runs inside lb, driven by DRIVER (a stand-in supervisor, started with Netns.interactive): it reads
commands on stdin and writes timestamped events to a file. BIRD installs what it learns into rt's kernel
table, which is what the test watches.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from edge_lb.lab.bird import SAME_SINCE, since
from edge_lb.lab.netns import Lab, Netns

LB4, RT4, LB6, RT6 = "10.81.1.2", "10.81.1.1", "fd81:1::2", "fd81:1::1"
VIP4, VIP6 = "10.81.100.1", "fd81:100::1"
LB_IF, RT_IF = "lb-r", "r-lb"

BIRD_CONF = f"""
router id {RT4};
protocol device {{ scan time 5; }}
protocol kernel kern4 {{
  ipv4 {{ import none; export filter {{ if source = RTS_BGP then accept; reject; }}; }};
  merge paths on limit 16; learn off; persist off;
}}
protocol kernel kern6 {{
  ipv6 {{ import none; export filter {{ if source = RTS_BGP then accept; reject; }}; }};
  merge paths on limit 16; learn off; persist off;
}}
filter vip4_in {{ if net ~ [ 10.81.100.0/24{{32,32}} ] then accept; reject; }}
filter vip6_in {{ if net ~ [ fd81:100::/64{{128,128}} ] then accept; reject; }}
template bgp lbpeer {{
  local as 65000; hold time 3; keepalive time 1;
  connect retry time 1; connect delay time 1;
  error wait time 1, 2; error forget time 10;
}}
protocol bgp lb4 from lbpeer {{
  neighbor {LB4} as 65001; source address {RT4};
  ipv4 {{ import filter vip4_in; export none; }};
}}
protocol bgp lb6 from lbpeer {{
  neighbor {LB6} as 65001; source address {RT6};
  ipv6 {{ import filter vip6_in; export none; }};
}}
"""

# The stand-in supervisor, run inside lb. argv: run_dir events_path peers_json. stdin: "announce PREFIX",
# "withdraw PREFIX", "peers JSON" (reconfigure: a reload's peer list), "stop". Events: "<monotonic> <kind>
# <text>", kinds: started, error, ok, refused, peers, reconfigured, restart, reannounced, stopped.
# on_restart re-announces everything announced, as the supervisor does.
DRIVER = r"""
import asyncio, ipaddress, json, logging, sys, time
from pathlib import Path
from edge_lb.bgp.policy import Route, render
from edge_lb.configbgp import Bgp, Peer
from edge_lb.errors import BgpError
from edge_lb.bgp.exabgp import ExaBgpSpeaker

run_dir, events_path, peers = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
logging.basicConfig(level=logging.DEBUG, stream=sys.stderr,
                    format="%(relativeCreated)d %(levelname)s %(name)s %(message)s")
out = open(events_path, "a", buffering=1)

def note(kind, text=""):
    out.write(f"{time.monotonic():.6f} {kind} {text}\n")

def make_bgp(peers):
    # each peer: [address, asn] or [address, asn, md5 key]
    return Bgp(local_as=65001, peers=tuple(Peer(address=ipaddress.ip_address(p[0]), asn=p[1],
                                                md5_password=p[2] if len(p) > 2 else None) for p in peers))

async def main():
    bgp = make_bgp(peers)
    restarted = asyncio.Event()
    speaker = ExaBgpSpeaker(bgp, "t", Path(run_dir), restarted.set)
    announced = {}

    async def send(action, prefix):
        try:
            await speaker.send(render(action, Route(ipaddress.ip_network(prefix))))
        except BgpError as exc:
            note("refused", f"{action} {prefix} {exc}")
            return
        note("ok", f"{action} {prefix}")
        if action == "announce":
            announced[prefix] = True
        else:
            announced.pop(prefix, None)

    async def reannounce():
        while True:
            await restarted.wait()
            restarted.clear()
            note("restart", speaker.pid)
            for prefix in list(announced):
                await send("announce", prefix)
            note("reannounced", len(announced))

    async def watch_peers():
        last = None
        while True:
            now = speaker.peers()
            if now != last:
                note("peers", json.dumps(now, sort_keys=True))
                last = now
            await asyncio.sleep(0.01)

    try:
        await speaker.start()
    except BgpError as exc:
        note("error", " ".join(str(exc).split()))
        return 3
    note("started", speaker.pid)
    tasks = [asyncio.create_task(reannounce()), asyncio.create_task(watch_peers())]
    reader = asyncio.StreamReader()
    protocol = asyncio.StreamReaderProtocol(reader)
    await asyncio.get_running_loop().connect_read_pipe(lambda: protocol, sys.stdin)
    while line := (await reader.readline()).decode().strip().split(None, 1):
        if line[0] == "stop":
            break
        if line[0] == "peers":  # a reload's peer list, then everything announced again (as the controller)
            try:
                await speaker.reconfigure(make_bgp(json.loads(line[1])))
            except BgpError as exc:
                note("refused", "peers " + " ".join(str(exc).split()))
                continue
            note("reconfigured", line[1])
            for prefix in list(announced):
                await send("announce", prefix)
            continue
        await send(line[0], line[1])
    for task in tasks:
        task.cancel()
    began = time.monotonic()
    await speaker.stop()
    await speaker.stop()
    note("stopped", f"{time.monotonic() - began:.3f}")
    return 0

sys.exit(asyncio.run(main()))
"""


@dataclass(frozen=True)
class Event:
    at: float  # time.monotonic() in the driver (CLOCK_MONOTONIC is system-wide)
    kind: str
    text: str


@dataclass
class BgpLab:
    lab: Lab
    lb: Netns
    rt: Netns
    driver: subprocess.Popen[str] | None = None

    @property
    def events_path(self) -> Path:
        return self.lab.tmpdir / "driver-events.txt"

    @property
    def run_dir(self) -> Path:
        return self.lab.tmpdir / "bgp"

    def start_driver(self, peers: list[tuple[str, int]]) -> subprocess.Popen[str]:
        argv = [sys.executable, "-c", DRIVER, str(self.run_dir), str(self.events_path), json.dumps(peers)]
        self.driver = self.lb.interactive(argv, self.lab.tmpdir / "driver.log")
        return self.driver

    def command(self, line: str) -> float:
        """Send one command to the driver; returns when it was sent (monotonic)."""
        assert self.driver is not None and self.driver.stdin is not None
        sent = time.monotonic()
        self.driver.stdin.write(line + "\n")
        self.driver.stdin.flush()
        return sent

    def events(self, kind: str | None = None) -> list[Event]:
        if not self.events_path.exists():
            return []
        rows = [line.split(" ", 2) for line in self.events_path.read_text().splitlines()]
        found = [Event(float(r[0]), r[1], r[2] if len(r) > 2 else "") for r in rows]
        return [e for e in found if kind is None or e.kind == kind]

    def wait_event(self, kinds: tuple[str, ...], count: int = 1, timeout: float = 20.0,
                   match: Callable[[Event], bool] = lambda e: True) -> Event:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [e for e in self.events() if e.kind in kinds and match(e)]
            if len(found) >= count:
                return found[count - 1]
            time.sleep(0.02)
        raise AssertionError(f"no {kinds} event #{count} within {timeout} s: {self.events()}\n{self.bird()}")

    def wait_peers_up(self, *peers: str, timeout: float = 20.0) -> Event:
        def all_up(e: Event) -> bool:
            return all(json.loads(e.text).get(p) == "up" for p in peers)
        return self.wait_event(("peers",), match=all_up, timeout=timeout)

    def route(self, vip: str) -> str:
        version = "-6" if ":" in vip else "-4"
        return self.rt.ip(version, "route", "show", vip).stdout.strip()

    def wait_route(self, vip: str, present: bool, timeout: float = 10.0) -> float:
        """Poll rt's kernel table until the VIP's route is (or is no longer) there; returns when seen."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if bool(self.route(vip)) == present:
                return time.monotonic()
            time.sleep(0.002)
        state = "never came" if present else "still there"
        raise AssertionError(f"route to {vip} {state} after {timeout} s: {self.route(vip)!r}\n{self.bird()}")

    def bird(self) -> str:
        ctl = str(self.lab.tmpdir / "bird.ctl")
        proc = self.rt.run(["birdc", "-s", ctl, "show", "protocols"], check=False, timeout=5)
        return proc.stdout + proc.stderr


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, timeout=5, check=False)
    return [int(p) for p in out.stdout.split()]


def _alive(pid: int) -> bool:
    """Running (a zombie counts as gone)."""
    try:
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


def _wait_gone(pid: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while _alive(pid):
        assert time.monotonic() < deadline, f"pid {pid} still alive after {timeout} s"
        time.sleep(0.01)


@pytest.fixture
def bgp_lab(lab: Lab) -> BgpLab:
    return _bgp_lab(lab, BIRD_CONF)


def _bgp_lab(lab: Lab, bird_conf: str) -> BgpLab:
    if shutil.which("bird") is None:
        pytest.skip("needs BIRD 2 (apt-get install bird2)")
    lb, rt = lab.netns("lb"), lab.netns("rt")
    lab.veth(lb, LB_IF, rt, RT_IF)
    lb.addr(LB_IF, f"{LB4}/24")
    lb.addr(LB_IF, f"{LB6}/64")
    rt.addr(RT_IF, f"{RT4}/24")
    rt.addr(RT_IF, f"{RT6}/64")
    conf = lab.tmpdir / "bird.conf"
    conf.write_text(bird_conf)
    # -f: foreground, so the pid spawn() records (and the lab stops) is BIRD's own.
    rt.spawn(["bird", "-f", "-c", str(conf), "-s", str(lab.tmpdir / "bird.ctl"), "-P",
              str(lab.tmpdir / "bird.pid")], lab.tmpdir / "bird.log")
    return BgpLab(lab, lb, rt)  # the lab stops the driver; ExaBGP dies with it or with the namespace


@pytest.mark.root
def test_announce_withdraw_restart_and_die_with_the_supervisor(bgp_lab: BgpLab) -> None:
    driver = bgp_lab.start_driver([(RT4, 65000), (RT6, 65000)])
    started = bgp_lab.wait_event(("started", "error"))
    assert started.kind == "started", started.text
    exabgp_pid = int(started.text)
    assert _children(driver.pid) == [exabgp_pid]
    up = bgp_lab.wait_peers_up(RT4, RT6)
    print(f"both sessions up {up.at - started.at:.2f} s after start() returned")
    conf = (bgp_lab.run_dir / "exabgp.conf").read_text()
    assert f"local-address {LB4};" in conf and f"local-address {LB6};" in conf  # resolved by the kernel
    assert f"router-id {LB4};" in conf

    # (a) announce: the router's kernel route appears, next hop = the LB
    sent = bgp_lab.command(f"announce {VIP4}/32")
    seen = bgp_lab.wait_route(VIP4, present=True)
    acked = bgp_lab.wait_event(("ok", "refused"))
    assert acked.kind == "ok", acked.text
    assert f"via {LB4}" in bgp_lab.route(VIP4)
    print(f"announce -> router kernel route: {(seen - sent) * 1000:.1f} ms "
          f"(ack after {(acked.at - sent) * 1000:.1f} ms)")
    sent = bgp_lab.command(f"announce {VIP6}/128")
    seen = bgp_lab.wait_route(VIP6, present=True)
    assert f"via {LB6}" in bgp_lab.route(VIP6)
    print(f"IPv6 announce -> router kernel route: {(seen - sent) * 1000:.1f} ms")

    # (b) withdraw: it disappears
    sent = bgp_lab.command(f"withdraw {VIP4}/32")
    gone = bgp_lab.wait_route(VIP4, present=False)
    print(f"withdraw -> router kernel route gone: {(gone - sent) * 1000:.1f} ms")
    bgp_lab.command(f"announce {VIP4}/32")
    bgp_lab.wait_route(VIP4, present=True)
    assert len(bgp_lab.events("ok")) == 4

    # (c0) kill -9 the bridge: ExaBGP respawns it, the new one is taken, on_restart re-announces; the sessions
    # and routes stay (peers() says "unknown": ExaBGP does not tell a new process about established sessions)
    [bridge_pid] = _children(exabgp_pid)
    os.kill(bridge_pid, signal.SIGKILL)
    assert bgp_lab.wait_event(("restart",)).text == str(exabgp_pid)
    assert bgp_lab.wait_event(("reannounced",)).text == "2"
    assert _children(exabgp_pid) not in ([], [bridge_pid])
    assert bgp_lab.route(VIP4) and bgp_lab.route(VIP6)

    # (c) kill -9 ExaBGP: restarted, on_restart re-announces, the routes come back
    killed = time.monotonic()
    os.kill(exabgp_pid, signal.SIGKILL)
    bgp_lab.wait_route(VIP4, present=False, timeout=5)
    restart = bgp_lab.wait_event(("restart",), count=2)
    new_pid = int(restart.text)
    assert new_pid != exabgp_pid and _children(driver.pid) == [new_pid]
    assert bgp_lab.wait_event(("reannounced",), count=2).text == "2"
    back = bgp_lab.wait_route(VIP4, present=True, timeout=15)
    bgp_lab.wait_route(VIP6, present=True, timeout=5)
    bgp_lab.wait_peers_up(RT4, RT6)
    print(f"ExaBGP kill -9 -> restarted (bridge connected) {restart.at - killed:.2f} s, "
          f"route back {back - killed:.2f} s")
    log = (bgp_lab.lab.tmpdir / "driver.log").read_text()
    assert "phase=died code=-9" in log

    # (d) kill -9 the driver (the supervisor): ExaBGP dies with it (PR_SET_PDEATHSIG), the routes go
    killed = time.monotonic()
    driver.kill()
    gone = bgp_lab.wait_route(VIP4, present=False, timeout=5)
    bgp_lab.wait_route(VIP6, present=False, timeout=5)
    _wait_gone(new_pid, timeout=3)
    print(f"driver kill -9 -> router route gone: {(gone - killed) * 1000:.1f} ms")
    assert gone - killed < 3.0


@pytest.mark.root
def test_stop_withdraws_everything_and_cleans_up(bgp_lab: BgpLab) -> None:
    driver = bgp_lab.start_driver([(RT4, 65000)])
    started = bgp_lab.wait_event(("started", "error"))
    assert started.kind == "started", started.text
    bgp_lab.wait_peers_up(RT4)
    bgp_lab.command(f"announce {VIP4}/32")
    bgp_lab.wait_route(VIP4, present=True)
    bgp_lab.command(f"announce {VIP6}/128")  # no IPv6 peer: ExaBGP takes it ("done") and sends it nowhere
    assert bgp_lab.wait_event(("ok", "refused"), count=2).kind == "ok"

    bgp_lab.command("stop")
    stopped = bgp_lab.wait_event(("stopped",))
    assert driver.wait(timeout=10) == 0
    assert float(stopped.text) < 2.0, "ExaBGP should exit on SIGTERM well before the SIGKILL grace"
    assert not _alive(int(started.text))
    bgp_lab.wait_route(VIP4, present=False, timeout=3)
    assert not (bgp_lab.run_dir / "api.sock").exists()
    assert "Thank you for using ExaBGP" in (bgp_lab.run_dir / "exabgp.log").read_text()


KEY = "s3cret key"  # TCP MD5 on the IPv6 session (BIRD: password); spaces survive exabgp.conf (base64)
BIRD_CONF_MD5 = BIRD_CONF.replace(f"neighbor {LB6} as 65001; source address {RT6};",
                                  f'neighbor {LB6} as 65001; source address {RT6}; password "{KEY}";')


def _since(bgp_lab: BgpLab, protocol: str) -> float:
    """BIRD's "Since" of a protocol: when its state last changed (a reset session changes it)."""
    return since(bgp_lab.bird(), protocol)


@pytest.mark.root
def test_peers_added_and_removed_live_the_other_session_and_routes_untouched(lab: Lab) -> None:
    """speaker.reconfigure (what a reload that changes [[bgp.peer]] runs): an IPv6 peer with a TCP MD5 key
    is added beside the IPv4 one, then the IPv4 one is removed; the session that stays is never reset
    (BIRD's "since" unchanged, no "down" seen) and its routes stay in the router's table throughout."""
    bgp_lab = _bgp_lab(lab, BIRD_CONF_MD5)
    bgp_lab.start_driver([(RT4, 65000)])
    assert bgp_lab.wait_event(("started", "error")).kind == "started"
    bgp_lab.wait_peers_up(RT4)
    bgp_lab.command(f"announce {VIP4}/32")
    bgp_lab.wait_route(VIP4, present=True)
    bgp_lab.wait_event(("ok",))
    since4 = _since(bgp_lab, "lb4")
    assert _since(bgp_lab, "lb6") and "Established" not in bgp_lab.bird().split("lb6")[1].splitlines()[0]

    sent = bgp_lab.command("peers " + json.dumps([[RT4, 65000], [RT6, 65000, KEY]], separators=(",", ":")))
    done = bgp_lab.wait_event(("reconfigured", "refused"))
    assert done.kind == "reconfigured", done.text
    up = bgp_lab.wait_peers_up(RT4, RT6)
    print(f"IPv6 peer (TCP MD5) added: reload taken {(done.at - sent) * 1000:.0f} ms, session up "
          f"{up.at - sent:.2f} s after the command")
    conf = (bgp_lab.run_dir / "exabgp.conf").read_text()
    assert "md5-base64 true;" in conf and KEY not in conf
    bgp_lab.command(f"announce {VIP6}/128")
    bgp_lab.wait_route(VIP6, present=True)
    assert f"via {LB6}" in bgp_lab.route(VIP6)
    assert bgp_lab.route(VIP4), "the IPv4 route stayed"
    assert abs(_since(bgp_lab, "lb4") - since4) < SAME_SINCE, "the IPv4 session was not reset"
    since6 = _since(bgp_lab, "lb6")

    bgp_lab.command("peers " + json.dumps([[RT6, 65000, KEY]], separators=(",", ":")))
    assert bgp_lab.wait_event(("reconfigured", "refused"), count=2).kind == "reconfigured"
    gone = bgp_lab.wait_route(VIP4, present=False)
    print(f"IPv4 peer removed: its route gone {gone - sent:.2f} s after the first command")
    assert bgp_lab.route(VIP6) and abs(_since(bgp_lab, "lb6") - since6) < SAME_SINCE, \
        "the IPv6 session and route stayed"
    downs = [e for e in bgp_lab.events("peers") if json.loads(e.text).get(RT6) == "down" and e.at > up.at]
    assert not downs, downs
