"""The supervisor in the namespace lab: real XDP, real HTTP servers, real TCP clients.

    client --- router --- lb (edge-lb run)        b1 b2 b3: decap + HTTP on the VIP and their own address
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_lb import paths
from edge_lb.lab.labs import PY, VIP, VIP_PORT, DataplaneLab, wait_for

pytestmark = pytest.mark.root

INTERVAL, FAST, FALL, RISE = 1.0, 0.25, 2, 2
COUNTERS_EVERY = 1.0  # dataplane.counters.CounterSampler: the per-CPU maps are summed once a second
CHECK = (f'  type = "http"\n  interval = {INTERVAL}\n  fast_interval = {FAST}\n  timeout = 0.5\n'
         f'  fall = {FALL}\n  rise = {RISE}\n')


def start(d: DataplaneLab, roles: list[str] | None = None) -> None:
    d.config_path.write_text(d.config_text(roles=roles, check=CHECK))
    d.start_supervisor()
    want = roles or ["b1", "b2", "b3"]
    wait_for(lambda: all(d.backend_states()[r][0] == "up" for r in want), 15, "every backend up")


def test_dead_backend_leaves_the_ring_and_comes_back(dlab: DataplaneLab) -> None:
    start(dlab)
    dlab.stop_http("b2")
    took = wait_for(lambda: dlab.backend_states()["b2"] == ("down", 0), INTERVAL * FALL + 1, "b2 out")
    print(f"b2 out of the ring {took:.2f} s after its server died")
    after = dlab.http_get(100)
    assert after["failures"] == 0, after["errors"]
    assert set(after["served"]) == {"b1", "b3"}
    status = dlab.status()["vips"][0]["backends"]
    b2 = next(b for b in status if b["address"] == dlab.server("b2").address)
    assert "refused" in b2["reason"], b2
    dlab.start_http("b2")
    wait_for(lambda: dlab.backend_states()["b2"][0] == "up", INTERVAL * RISE + 2, "b2 back after rise")
    assert "b2" in dlab.http_get(60)["served"]
    assert "event=health" in dlab.supervisor_log() and "to=down" in dlab.supervisor_log()


def test_gateway_mac_change_is_followed(dlab: DataplaneLab) -> None:
    assert dlab.router is not None and dlab.lb is not None
    start(dlab)
    new_mac = "02:77:00:00:0a:01"
    dlab.router.ip("link", "set", dlab.lb.router_if, "address", new_mac)
    # The LB learns the new MAC the way it would from a real router: from the router's next ARP request.
    dlab.router.ip("neigh", "flush", "dev", dlab.lb.router_if)
    dlab.router.run(["ping", "-c", "1", "-W", "2", dlab.lb.address])
    learned = time.monotonic()
    wait_for(lambda: dlab.status()["gateway_mac"] == new_mac, 5, "supervisor follows the new MAC")
    print(f"gateway MAC followed {time.monotonic() - learned:.2f} s after the neighbour entry changed")
    assert time.monotonic() - learned < 1.5  # < 1 s, plus the status round trip
    result = dlab.http_get(30)
    assert result["failures"] == 0, result["errors"]  # frames reach the router only with its new MAC


def _packets(d: DataplaneLab, role: str) -> int:
    rows = d.status()["vips"][0]["backends"]
    return int(next(b["packets"] for b in rows if b["address"] == d.server(role).address))


def _sighup(d: DataplaneLab) -> None:
    assert d.supervisor is not None
    os.kill(d.supervisor.pid, signal.SIGHUP)


def test_reload_broken_config_changes_nothing_and_added_backend_gets_new_flows(dlab: DataplaneLab) -> None:
    start(dlab, roles=["b1", "b2"])
    held = dlab.hold(30)
    first = held.round()
    assert set(first) == {"b1", "b2"}, first
    good = dlab.config_path.read_text()
    dlab.config_path.write_text(good.replace('address = "10.77.11.2"', 'address = "10.77.11.300"'))
    _sighup(dlab)
    wait_for(lambda: "result=rejected" in dlab.supervisor_log(), 5, "the reload is rejected")
    cli = subprocess.run([PY, "-m", "edge_lb", "reload", "-c", str(dlab.config_path)],
                         capture_output=True, text=True, timeout=30)
    assert cli.returncode == 2
    assert "vip[0].backend[1].address: not an IP address" in cli.stderr
    assert dlab.backend_states() == {"b1": ("up", 32769), "b2": ("up", 32768)}
    assert dlab.http_get(30)["failures"] == 0

    dlab.config_path.write_text(dlab.config_text(roles=["b1", "b2", "b3"], check=CHECK))
    _sighup(dlab)
    wait_for(lambda: dlab.backend_states().get("b3", ("", 0))[0] == "up", 10, "b3 checked and up")
    fresh = dlab.http_get(90)
    assert fresh["failures"] == 0 and fresh["served"].get("b3", 0) > 0, fresh
    assert held.round() == first, "held connections stay on their backends"
    assert "result=applied" in dlab.supervisor_log()


def _xdp_id(d: DataplaneLab) -> str:
    assert d.lb is not None
    found = re.search(r"prog/xdp id (\d+)", d.lb.ns.ip("-d", "link", "show", "eth0").stdout)
    assert found, "an XDP program on the LB's eth0"
    return found.group(1)


def _kill9_and_restart(d: DataplaneLab) -> str:
    """SIGKILL the supervisor, start another; the new one's part of the log."""
    assert d.supervisor is not None
    d.supervisor.send_signal(signal.SIGKILL)
    d.supervisor.wait(timeout=10)
    mark = len(d.supervisor_log())
    d.start_supervisor()
    return d.supervisor_log()[mark:]


def test_kill9_and_restart_keeps_50_connections(dlab: DataplaneLab) -> None:
    """Unchanged build: the restarted supervisor adopts the pinned program without compiling (issue 13,
    item 5). Changed build (another compile flag): it compiles and replaces the program. Both keep every
    held connection on its backend."""
    start(dlab)
    assert "program=compiled" in dlab.supervisor_log()
    held = dlab.hold(50)
    before = held.round()
    assert not [s for s in before if s.startswith("error")], before
    attached = _xdp_id(dlab)
    assert dlab.supervisor is not None
    dlab.supervisor.send_signal(signal.SIGKILL)
    dlab.supervisor.wait(timeout=10)
    assert held.round() == before, "the attached program keeps serving without its supervisor"
    mark = len(dlab.supervisor_log())
    dlab.start_supervisor()
    log = dlab.supervisor_log()[mark:]
    assert "adopted_up=3" in log
    assert "program=adopted" in log and "program=compiling" not in log, log
    assert dlab.status()["program"]["origin"] == "adopted"
    assert _xdp_id(dlab) == attached, "the same program stays attached"
    assert held.round() == before, "every connection survives the restart on its backend"
    assert len(set(before)) > 1, "the held connections span several backends"
    assert dlab.http_get(30)["failures"] == 0

    # Another build: a compile flag derived from [dataplane] changes the digest.
    dlab.config_path.write_text(dlab.config_path.read_text().replace(
        "[dataplane]\n", "[dataplane]\nicmp_too_big_rate = 500\n", 1))
    log = _kill9_and_restart(dlab)
    assert "program=compiling why=\"not adopted: the pinned program is another build" in log, log
    assert "program=compiled" in log and dlab.status()["program"]["origin"] == "compiled"
    assert _xdp_id(dlab) != attached, "the new build replaced the attached program"
    assert held.round() == before, "every connection survives the replacement on its backend"


def test_sigterm_keeps_serving_and_unload_removes_everything(dlab: DataplaneLab) -> None:
    assert dlab.lb is not None and dlab.supervisor is None
    start(dlab)
    held = dlab.hold(10)
    before = held.round()
    assert dlab.supervisor is not None
    dlab.supervisor.send_signal(signal.SIGTERM)
    assert dlab.supervisor.wait(timeout=15) == 0
    assert "event=shutdown phase=done attached=kept" in dlab.supervisor_log()
    assert not paths.socket(dlab.instance).exists()
    assert held.round() == before, "a stopped supervisor leaves the data plane serving"
    assert "xdp" in dlab.lb.ns.ip("link", "show", "eth0").stdout
    dlab.lb.ns.run([PY, "-m", "edge_lb", "unload", "-c", str(dlab.config_path)], host_mounts=True)
    assert "xdp" not in dlab.lb.ns.ip("link", "show", "eth0").stdout
    assert not paths.pins(dlab.instance).exists()


def test_a_program_detached_behind_its_back_is_reported(dlab: DataplaneLab) -> None:
    """A node without BGP still looks at its interface: status and the log say when XDP is gone."""
    assert dlab.lb is not None
    start(dlab)
    assert dlab.status()["attached"] is True
    dlab.lb.ns.ip("link", "set", "dev", "eth0", "xdp", "off")
    took = wait_for(lambda: dlab.status()["attached"] is False, 5, "status shows the program detached")
    print(f"detachment reported {took:.2f} s after `ip link set xdp off`")
    assert "event=dataplane check=attachment attached=False interface=eth0" in dlab.supervisor_log()
    assert dlab.supervisor is not None
    dlab.supervisor.send_signal(signal.SIGTERM)
    assert dlab.supervisor.wait(timeout=15) == 0
    assert 'attached="no (detached from outside)"' in dlab.supervisor_log()


def test_failed_backend_loses_its_flows_and_drained_backend_keeps_them(dlab: DataplaneLab) -> None:
    """An exec check on a flag file fails b2 while its server still runs: its held connections must be
    re-hashed away (and so reset by the backend that receives them), the others untouched. A drain keeps
    held connections where they are."""
    flags = dlab.lab.tmpdir
    check = (f'  type = "exec"\n  command = ["/usr/bin/test", "-e", "{flags}/up-{{address}}"]\n'
             f'  interval = {INTERVAL}\n  fast_interval = {FAST}\n  fall = {FALL}\n  rise = {RISE}\n')
    for role in ("b1", "b2", "b3"):
        (flags / f"up-{dlab.server(role).address}").touch()
    dlab.config_path.write_text(dlab.config_text(check=check))
    dlab.start_supervisor()
    wait_for(lambda: all(s == "up" for s, _ in dlab.backend_states().values()), 15, "every backend up")
    held = dlab.hold(30)
    before = held.round()
    assert set(before) == {"b1", "b2", "b3"}, before

    (flags / f"up-{dlab.server('b2').address}").unlink()
    wait_for(lambda: dlab.backend_states()["b2"] == ("down", 0), INTERVAL * FALL + 1, "b2 out")
    # The counters are read from the maps once a second: let one read pass the first round's last packets,
    # and after the round wait until a read includes it (b1 and b3 moved), or the comparison proves nothing.
    time.sleep(COUNTERS_EVERY + 0.2)
    b2_packets, others = _packets(dlab, "b2"), _packets(dlab, "b1") + _packets(dlab, "b3")
    after = held.round()
    wait_for(lambda: _packets(dlab, "b1") + _packets(dlab, "b3") > others, 5, "the round in the counters")
    assert _packets(dlab, "b2") == b2_packets, "the LB sent none of b2's held flows to b2"
    for was, now in zip(before, after, strict=True):
        if was == "b2":
            assert now.startswith("error"), "a flow of a failed backend is not carried to it any more"
        else:
            assert now == was
    assert "exit 1" in next(b["reason"] for b in dlab.status()["vips"][0]["backends"]
                            if b["address"] == dlab.server("b2").address)

    held = dlab.hold(30)
    before = held.round()
    dlab.config_path.write_text(dlab.config_text(weights={"b1": 0}, check=check))
    dlab.reload()
    assert dlab.backend_states()["b1"] == ("drained", 0)
    assert held.round() == before, "drained b1 keeps its existing flows"
    assert "b1" not in dlab.http_get(60)["served"]


def _send_big_segment(d: DataplaneLab, size: int) -> None:
    """One TCP segment of `size` bytes (IP header included) from the client to the VIP, through the router."""
    assert d.client is not None
    payload = size - 40
    segment = f"IP(dst='{VIP}')/TCP(sport=40000, dport={VIP_PORT}, flags='A')/Raw(b'x' * {payload})"
    d.client.ns.run([PY, "-c", f"from scapy.all import IP, TCP, Raw, send; send({segment}, verbose=False)"],
                    timeout=60)


def test_an_mtu_change_is_followed_live(dlab: DataplaneLab) -> None:
    """`ip link set eth0 mtu 1400` on the LB: the data plane checks against 1400 within a second, so a segment
    that no longer fits once encapsulated is counted too big instead of being sent to die in the driver."""
    assert dlab.lb is not None
    start(dlab)
    assert dlab.status()["mtu"] == 1500
    before = dlab.lb_reasons()
    _send_big_segment(dlab, 1390)  # 1,410 bytes once in IPIP: fits 1500
    wait_for(lambda: dlab.lb_reasons()["STAT_TX"] > before["STAT_TX"], 5, "the segment sent on at MTU 1500")
    assert dlab.lb_reasons()["STAT_DROP_TOO_BIG"] == before["STAT_DROP_TOO_BIG"]

    dlab.lb.ns.ip("link", "set", "eth0", "mtu", "1400")
    changed = time.monotonic()
    took = wait_for(lambda: dlab.status()["mtu"] == 1400, 5, "the supervisor follows the new MTU")
    print(f"MTU followed {took:.2f} s after `ip link set eth0 mtu 1400`")
    assert time.monotonic() - changed < 2.5  # the watcher wakes on the link event (1 s poll at worst)
    before = dlab.lb_reasons()
    _send_big_segment(dlab, 1390)
    wait_for(lambda: dlab.lb_reasons()["STAT_DROP_TOO_BIG"] > before["STAT_DROP_TOO_BIG"], 5,
             "the same segment counted too big at MTU 1400")
    assert "event=link interface=eth0 old_mtu=1500 new_mtu=1400" in dlab.supervisor_log()


@contextlib.contextmanager
def _read_only(path: Path) -> Iterator[None]:
    """`path` read-only for everyone on the host (a read-only bind mount over itself), undone on exit."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "--bind", str(path), str(path)], check=True, timeout=10)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], check=True, timeout=10)
        yield
    finally:
        subprocess.run(["umount", str(path)], check=True, timeout=10)


def _cli(d: DataplaneLab, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", "edge_lb", *argv, "-c", str(d.config_path)], capture_output=True,
                          text=True, timeout=60, check=False)


def test_a_read_only_state_dir_refuses_drains_and_reloads_whole(dlab: DataplaneLab) -> None:
    """Runtime weights that cannot be kept across a restart are not made live: a drain is refused before any
    map or route changes, and a reload that must rewrite the weights says "rejected" and changes nothing
    (it used to say so after it had been applied)."""
    start(dlab)
    vip = f"{VIP}:{VIP_PORT}/tcp"
    b2, b3 = dlab.server("b2").address, dlab.server("b3").address
    assert _cli(dlab, "drain", "--vip", vip, "--backend", b2).returncode == 0
    wait_for(lambda: dlab.backend_states()["b2"] == ("drained", 0), 5, "b2 drained")
    b3_slots = dlab.backend_states()["b3"][1]
    with _read_only(paths.STATE_DIR):
        drain = _cli(dlab, "drain", "--vip", vip, "--backend", b3)
        assert drain.returncode != 0 and "runtime weights file" in drain.stderr, drain
        assert "Read-only file system" in drain.stderr, drain.stderr
        dlab.config_path.write_text(dlab.config_text(roles=["b1", "b3"], check=CHECK))  # drops drained b2
        reload = _cli(dlab, "reload")
        assert reload.returncode == 2 and "runtime weights file" in reload.stdout + reload.stderr, reload
        assert dlab.backend_states() == {"b1": dlab.backend_states()["b1"], "b2": ("drained", 0),
                                         "b3": ("up", b3_slots)}, "nothing changed"
    assert dlab.reload().startswith("reloaded"), "the same reload goes through once the dir is writable"
    assert "b2" not in dlab.backend_states()
    assert _cli(dlab, "drain", "--vip", vip, "--backend", b3).returncode == 0
