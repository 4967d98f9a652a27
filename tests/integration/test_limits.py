"""Resource limits and instance ownership in the namespace lab (issue 12, items 2, 3 and 7), on one supervisor
started as systemd would start it without LimitNOFILE, but with no hard limit above either (1,024:1,024): only
the API's connection limits keep the health checks' sockets free.

    client --- router --- lb (edge-lb run)        b1 b2 b3: decap + HTTP; VIP .1 checked by HTTP, VIP .2 by
                                                  an exec check whose grandchild detaches and keeps stdout
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_lb import paths
from edge_lb.lab.labs import PY, DataplaneLab, wait_for, wait_supervisor
from edge_lb.lab.netns import Lab

from .conftest import ready_lab

pytestmark = pytest.mark.root

NOFILE = 1024
API_PORT = 9100  # [api].listen's default: 127.0.0.1:9100 in the LB's namespace
SLEEP = f"1000.{secrets.randbelow(10**9):09d}"  # the exec check's grandchild: `sleep 1000.NNN`, found by it
CHECK = '  type = "http"\n  interval = 0.5\n  timeout = 0.5\n  fall = 2\n  rise = 2\n'
EXEC_VIP = "10.77.100.2"
EXEC_CHECK = (f'  type = "exec"\n  command = ["/usr/bin/setsid", "-f", "/bin/sleep", "{SLEEP}"]\n'
              '  interval = 0.5\n  fast_interval = 0.25\n  timeout = 0.5\n  fall = 1\n  rise = 1\n')
FLOOD_TCP, FLOOD_UNIX, HOLD = 1000, 100, 20.0

# Opens FLOOD_TCP idle connections to the API's TCP site and FLOOD_UNIX to its control socket, says how many
# it made, holds them HOLD seconds (never sending a byte), then says how many the supervisor closed.
FLOOD = """
import json, socket, sys, time
tcp, unix, hold, path = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
conns, failed = [], 0
for i in range(tcp + unix):
    s = socket.socket(socket.AF_INET if i < tcp else socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    try:
        s.connect(("127.0.0.1", 9100) if i < tcp else path)
        conns.append(s)
    except OSError:
        failed += 1
        s.close()
print(json.dumps({"opened": len(conns), "failed": failed}), flush=True)
time.sleep(hold)
closed = 0
for s in conns:
    s.setblocking(False)
    try:
        closed += s.recv(1) == b""
    except BlockingIOError:
        pass
    except OSError:
        closed += 1
print(json.dumps({"closed_by_server": closed}), flush=True)
"""


def config(d: DataplaneLab) -> str:
    assert d.servers
    return (d.config_text(check=CHECK) + f'\n[[vip]]\naddress = "{EXEC_VIP}"\nport = 80\nprotocol = "tcp"\n'
            f'  [vip.healthcheck]\n{EXEC_CHECK}\n  [[vip.backend]]\n  address = "{d.servers[0].address}"\n'
            '  weight = 1\n')


def sleepers() -> list[int]:
    """The exec check's detached grandchildren (any namespace: /proc is the host's)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if SLEEP.encode() in (entry / "cmdline").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def kill_sleepers() -> None:
    for pid in sleepers():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue


@pytest.fixture(scope="module")
def node() -> Iterator[DataplaneLab]:
    """One lab and one supervisor for the module, under an open-file limit of 1,024 soft and hard."""
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces, veths and XDP")
    with Lab(prefix="elbl") as lab:
        steps = ready_lab(lab, DataplaneLab.prepare_lb)
        d = next(steps)
        try:
            assert d.lb is not None
            d.config_path.write_text(config(d))
            log = lab.tmpdir / "supervisor.log"
            run = [PY, "-m", "edge_lb", "run", "-c", str(d.config_path)]
            d.supervisor = d.lb.ns.spawn(["prlimit", f"--nofile={NOFILE}:{NOFILE}", *run], log,
                                         host_mounts=True)
            wait_supervisor(d.supervisor, d.instance, log)
            wait_for(lambda: healthy(d), 15, "every backend up and in the ring")
            yield d
        finally:
            steps.close()  # stops the supervisor, removes the instance's files and pins
            kill_sleepers()


def healthy(d: DataplaneLab) -> bool:
    vips = {v["address"]: v for v in d.status()["vips"]}
    http, exec_ = vips["10.77.100.1"], vips[EXEC_VIP]
    return (all(b["state"] == "up" for b in http["backends"]) and http["in_ring"] == 3
            and exec_["backends"][0]["state"] == "up")


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def cli(d: DataplaneLab, *args: str, timeout: float = 60) -> tuple[subprocess.CompletedProcess[str], float]:
    """`edge-lb ARGS -c CONFIG` in the LB's namespace: its result and how long it took."""
    assert d.lb is not None
    t0 = time.monotonic()
    done = d.lb.ns.run([PY, "-m", "edge_lb", *args, "-c", str(d.config_path)], check=False, timeout=timeout,
                       host_mounts=True)
    return done, time.monotonic() - t0


def test_idle_api_flood_leaves_checks_the_vip_and_the_cli_alone(node: DataplaneLab) -> None:
    d = node
    assert d.supervisor is not None and d.lb is not None
    limits = (Path(f"/proc/{d.supervisor.pid}/limits").read_text())
    assert f"Max open files            {NOFILE}                 {NOFILE}" in limits, limits
    log_before = len(d.supervisor_log())
    flood_log = d.lab.tmpdir / "flood.log"
    d.lb.ns.spawn([PY, "-c", FLOOD, str(FLOOD_TCP), str(FLOOD_UNIX), str(HOLD),
                   str(paths.socket(d.instance))], flood_log)
    wait_for(lambda: "opened" in flood_log.read_text(), 60, "the flood's connections opened")
    opened = json.loads(flood_log.read_text().splitlines()[0])
    print(f"flood: {opened}")
    assert opened["opened"] + opened["failed"] == FLOOD_TCP + FLOOD_UNIX
    most_fds = fds(d.supervisor.pid)
    done, took = cli(d, "status")  # while the flood holds its connections (IDLE: 15 s)
    print(f"edge-lb status answered in {took:.2f} s under the flood:\n{done.stdout}{done.stderr}")
    assert done.returncode == 0 and "API connections: tcp 64 of 64, unix" in done.stdout
    assert took < 10  # the CLI hung 55 s before; a fresh connection displaces an idle one
    api = d.status()["api"]
    assert api["tcp"]["open"] <= 64 and api["tcp"]["evicted"] >= opened["opened"] - FLOOD_UNIX - 64, api
    assert api["unix"]["open"] <= 64 and api["unix"]["evicted"] >= FLOOD_UNIX - 64, api
    t_end = time.monotonic() + 8
    while time.monotonic() < t_end:  # still within IDLE of the flood
        assert healthy(d), d.status()["vips"]
        most_fds = max(most_fds, fds(d.supervisor.pid))
        time.sleep(0.5)
    print(f"the supervisor had {most_fds} fds at most; API {api}")
    # 1,100 connections would have hit the limit of 1,024; what the supervisor holds besides the 128 capped
    # API connections (maps, checks, connections being displaced) reached 418 once in CI: half the limit.
    assert most_fds < NOFILE // 2, most_fds
    grown = len(d.supervisor_log()) - log_before
    assert grown < 20_000, f"the log grew {grown} bytes during the flood"
    assert d.supervisor_log().count("at its connection limit") <= 2  # once per site
    wait_for(lambda: "closed_by_server" in flood_log.read_text(), HOLD + 30, "the flood ends")


def test_exec_check_with_a_detached_grandchild_leaks_nothing(node: DataplaneLab) -> None:
    d = node
    assert d.supervisor is not None
    runs_before, fds_before = len(sleepers()), fds(d.supervisor.pid)
    time.sleep(8)  # ~16 runs at a 0.5 s interval
    runs = len(sleepers()) - runs_before
    grown = fds(d.supervisor.pid) - fds_before
    exec_vip = next(v for v in d.status()["vips"] if v["address"] == EXEC_VIP)
    backend = exec_vip["backends"][0]
    print(f"{runs} exec checks: supervisor fds {fds_before} -> {fds_before + grown}; {backend['reason']}")
    assert runs >= 8, "the exec check did not run: the test shows nothing"
    assert grown <= 3, f"{grown} descriptors more after {runs} runs (a pipe per run leaked before)"
    assert backend["state"] == "up" and backend["reason"] == "exit 0", backend


def test_deleted_socket_does_not_free_the_instance(node: DataplaneLab) -> None:
    d = node
    assert d.supervisor is not None and d.lb is not None
    pid = d.supervisor.pid
    paths.socket(d.instance).unlink()
    second, _ = cli(d, "run", timeout=120)
    print(f"second run: exit {second.returncode}: {second.stderr.strip()}")
    assert second.returncode == 1
    assert f"instance {d.instance} is held by pid {pid} edge-lb run" in second.stderr
    assert "a second supervisor would fight it" in second.stderr
    unload, _ = cli(d, "unload")
    assert unload.returncode == 1 and f"held by pid {pid} edge-lb run" in unload.stderr, unload.stderr
    status, _ = cli(d, "status")
    assert status.returncode == 1, status.stdout
    assert f"held by pid {pid} edge-lb run" in status.stderr and "does not answer" in status.stderr
    link = json.loads(d.lb.ns.run(["ip", "-j", "link", "show", "eth0"]).stdout)[0]
    assert link.get("xdp"), "unload detached the running node's program"
    assert d.supervisor.poll() is None, "the running supervisor stopped"
    result = d.http_get(20)
    assert result["failures"] == 0, result["errors"]  # still balancing
