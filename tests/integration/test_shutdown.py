"""SIGTERM ends `edge-lb run` within its bound in every phase (issue 12, item 1), at 1 VIP x 1,000 backends
and at 500 VIPs x 10 backends, with tcp checks to addresses that answer and to addresses that do not.

    lb (edge-lb run + ExaBGP, XDP on eth0) --- router: 10.79.0.0/17 local (AnyIP), a listener on :80 that
                                                        accepts for PERIOD s, then refuses for PERIOD s;
                                                        10.79.128.0/17 blackholed (checks time out)

Half the backends are in each range, so under churn every PERIOD half of them flip while the other half's
checks are in flight until their timeout. The BGP peer (the router's address) runs no BGP: ExaBGP keeps
trying, and takes the supervisor's announce and withdraw commands all the same.
"""

from __future__ import annotations

import ipaddress
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_lb.control.supervisor import EXIT_HUNG, shutdown_bound
from edge_lb.lab.labs import PY, DataplaneLab, remove_instance, spawn_supervisor, wait_supervisor
from edge_lb.lab.netns import Lab

pytestmark = pytest.mark.root

PERIOD = 1.0  # seconds the listener accepts, then refuses: the answering half flips up and down
DRAIN = 0.5  # [bgp].drain_time of the generated configs
# Shutdown is normally over in drain_time + about a second; this much slack is for a busy 2-core machine, and
# is still well below the supervisor's own backstop (shutdown_bound), so a shutdown that hangs shows here.
BOUND = DRAIN + 15.0
ANSWERING, SILENT = "10.79.0.0/17", "10.79.128.0/17"
VIP = "10.77.100.1"
SCALES = {"1x1000": (1, 1000), "500x10": (500, 10)}
FLAPPER = f"""
import socket, time
while True:
    server = socket.create_server(("0.0.0.0", 80), backlog=4096)
    server.settimeout(0.05)
    end = time.monotonic() + {PERIOD}
    while time.monotonic() < end:
        try:
            server.accept()[0].close()
        except OSError:
            pass
    server.close()
    time.sleep({PERIOD})
"""


@pytest.fixture(scope="module")
def lab_lb(request: pytest.FixtureRequest) -> Iterator[DataplaneLab]:
    """The data-plane lab without backends: the router holds the check targets; one per module (each test
    runs its own supervisor on the same LB namespace and removes its instance afterwards)."""
    import os

    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces, veths and XDP")
    with Lab(prefix="elbs") as lab:
        d = DataplaneLab(lab, backends=0)
        try:
            d.build()
            d.prepare_lb()
            assert d.router is not None
            d.router.ip("route", "add", "local", ANSWERING, "dev", "lo")
            d.router.ip("route", "add", "blackhole", SILENT)
            d.router.spawn([PY, "-c", FLAPPER], lab.tmpdir / "flapper.log")
            yield d
        finally:
            d.close()


def config_text(d: DataplaneLab, vips: int, per_vip: int) -> str:
    """`vips` VIPs on one address (ports 1000...), each with `per_vip` backends of its own, alternately in the
    answering and the silent range; tcp checks on port 80, rise = fall = 1 so the flaps flip them at once.
    Direct checks: the targets are the router's own addresses, which decapsulate nothing."""
    assert d.lb is not None
    answering = ipaddress.ip_network(ANSWERING).network_address + 1
    silent = ipaddress.ip_network(SILENT).network_address + 1
    head = (f'[node]\ninterface = "eth0"\n\n[dataplane]\ninstance = "{d.instance}"\nring_size = 1009\n'
            f'max_vips = 512\nmax_backends = 8192\nconn_table_size = 65536\n\n'
            f'[healthcheck]\ntype = "tcp"\nvia = "direct"\nport = 80\ninterval = 1.0\nfast_interval = 0.25\n'
            f'timeout = 1.0\n'
            f'rise = 1\nfall = 1\n\n'
            f'[bgp]\nlocal_as = 65001\nrouter_id = "{d.lb.address}"\ndrain_time = {DRAIN}\n'
            f'  [[bgp.peer]]\n  address = "10.77.2.1"\n  as = 65000\n  hold_time = 3\n'
            f'  local_address = "{d.lb.address}"\n\n')
    parts, n = [head], 0
    for v in range(vips):
        parts.append(f'[[vip]]\naddress = "{VIP}"\nport = {1000 + v}\nprotocol = "tcp"\n')
        for _ in range(per_vip):
            address = (answering if n % 2 == 0 else silent) + n // 2
            parts.append(f'  [[vip.backend]]\n  address = "{address}"\n')
            n += 1
    return "".join(parts)


def start(d: DataplaneLab, scale: str, name: str) -> tuple[subprocess.Popen[bytes], Path]:
    assert d.lb is not None
    d.config_path.write_text(config_text(d, *SCALES[scale]))
    log_path = d.lab.tmpdir / f"supervisor-{name}.log"
    d.supervisor = spawn_supervisor(d.lb.ns, d.config_path, log_path)
    return d.supervisor, log_path


def wait_line(proc: subprocess.Popen[bytes], log_path: Path, text: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in log_path.read_text(errors="replace"):
        assert proc.poll() is None, f"exited with {proc.returncode} before {text!r}"
        assert time.monotonic() < deadline, f"no {text!r} within {timeout} s"
        time.sleep(0.02)


def terminate(proc: subprocess.Popen[bytes]) -> tuple[int, float]:
    """SIGTERM, then (exit status, seconds until the process ended)."""
    began = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=shutdown_bound(DRAIN) + 10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
        pytest.fail(f"edge-lb run still running {shutdown_bound(DRAIN) + 10:g} s after SIGTERM")
    return code, time.monotonic() - began


def exabgp_left(d: DataplaneLab) -> list[str]:
    assert d.lb is not None
    pids = subprocess.run(["ip", "netns", "pids", d.lb.ns.name], capture_output=True, text=True, timeout=10,
                          check=True).stdout.split()
    return [p for p in pids if "exabgp" in _cmdline(p)]


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text(errors="replace")
    except OSError:  # it exited after the listing
        return ""


def finish(d: DataplaneLab, log_path: Path, code: int, took: float, what: str) -> str:
    log = log_path.read_text(errors="replace")
    print(f"{what}: SIGTERM -> exit {code} in {took:.2f} s")
    print("".join(line for line in log.splitlines(keepends=True) if "event=shutdown" in line))
    remove_instance(d.supervisor, d.instance)
    d.supervisor = None
    assert code != EXIT_HUNG, "the backstop had to end it: " + log[-3000:]
    assert code == 0, log[-3000:]
    assert took < BOUND, f"{what}: {took:.1f} s (bound {BOUND:g} s)"
    assert "event=shutdown phase=done" in log, log[-3000:]
    for trouble in ('phase="worker did not stop"', 'phase="step failed"', "phase=overran"):
        assert trouble not in log, log[-3000:]
    assert not exabgp_left(d), "ExaBGP outlived its supervisor"
    return log


@pytest.mark.parametrize("scale", SCALES)
def test_sigterm_before_the_first_apply_stops_startup(lab_lb: DataplaneLab, scale: str) -> None:
    proc, log_path = start(lab_lb, scale, f"early-{scale}")
    wait_line(proc, log_path, "event=startup phase=config")  # then the balancer compiles (~2 s)
    log = finish(lab_lb, log_path, *terminate(proc), f"{scale}, before the first apply")
    assert 'phase="startup stopped"' in log and "phase=ready" not in log, log[-3000:]
    assert "ring_slots_written" not in log and "event=exabgp" not in log


@pytest.mark.parametrize("scale", SCALES)
def test_sigterm_while_bgp_starts_stops_exabgp(lab_lb: DataplaneLab, scale: str) -> None:
    proc, log_path = start(lab_lb, scale, f"bgp-{scale}")
    wait_line(proc, log_path, "event=exabgp phase=started")  # its bridge connects ~1 s later
    log = finish(lab_lb, log_path, *terminate(proc), f"{scale}, while ExaBGP starts")
    assert 'phase="startup stopped"' in log and "phase=ready" not in log, log[-3000:]
    assert "event=exabgp phase=stopped" in log


@pytest.mark.parametrize("scale", SCALES)
def test_sigterm_under_health_churn_withdraws_and_ends(lab_lb: DataplaneLab, scale: str) -> None:
    proc, log_path = start(lab_lb, scale, f"churn-{scale}")
    wait_supervisor(proc, lab_lb.instance, log_path)
    flips = 0
    for _ in range(100):  # bounded at ~20 s: churn is under way once hundreds of backends flipped
        flips = log_path.read_text(errors="replace").count("event=health")
        if flips >= 300:
            break
        time.sleep(0.2)
    assert flips >= 300, f"only {flips} health flips"
    log = finish(lab_lb, log_path, *terminate(proc), f"{scale}, {flips} flips, under churn")
    order = [log.index(s) for s in ("event=shutdown phase=requested", "event=shutdown phase=withdrawn",
                                    'event=shutdown phase="bgp stopped"', "event=shutdown phase=done")]
    assert order == sorted(order), log[-3000:]
