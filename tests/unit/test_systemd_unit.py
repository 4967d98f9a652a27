"""systemd/edge-lb@.service: systemd itself accepts it, and it stops the node the way the supervisor needs."""

from __future__ import annotations

import configparser
import shutil
import socket
import subprocess
import sys
from ipaddress import ip_address
from pathlib import Path

from edge_lb.bgp import controller
from edge_lb.configbgp import Bgp, Peer
from edge_lb.control import supervisor, watchdog

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "edge-lb@.service"
EDGE_LB = Path(sys.executable).parent / "edge-lb"


def service() -> configparser.SectionProxy:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive in systemd
    parser.read_string(UNIT.read_text())
    return parser["Service"]


def test_systemd_verifies_the_unit_without_a_warning(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing (Debian package systemd; scripts/setup.sh installs it)"
    instance = tmp_path / "edge-lb@default.service"  # an instance, with ExecStart where this venv has edge-lb
    instance.write_text(UNIT.read_text().replace("/usr/local/bin/edge-lb", str(EDGE_LB)))
    done = subprocess.run([analyze, "verify", "--man=no", str(instance)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and done.stderr.strip() == "", done.stderr


def test_stop_reaches_the_supervisor_alone_and_reload_is_sighup() -> None:
    unit = service()
    assert unit["KillMode"] == "mixed", "ExaBGP must outlive the SIGTERM until the VIPs are withdrawn"
    steps = 3 * supervisor._STEP_BOUND  # control socket, gateway watcher, health checks
    drain = Bgp(local_as=1, peers=()).drain_time  # the default
    assert int(unit["TimeoutStopSec"]) >= controller._WITHDRAW_BOUND + drain + steps
    # The supervisor's own backstop ends it before systemd's SIGKILL would (no drain, no withdraw then).
    assert int(unit["TimeoutStopSec"]) > supervisor.shutdown_bound(drain)
    assert unit["ExecStart"].split()[1:] == ["run", "-c", "/etc/edge-lb/%i.toml"]
    assert unit["ExecStartPre"].split()[1:] == ["check", "-c", "/etc/edge-lb/%i.toml"]
    assert unit["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert unit["Restart"] == "on-failure"


def test_the_unit_waits_for_ready_and_restarts_a_supervisor_that_makes_no_progress(tmp_path: Path) -> None:
    unit = service()
    assert unit["Type"] == "notify" and unit["NotifyAccess"] == "main"
    assert int(unit["TimeoutStartSec"]) >= 120, "startup compiles the XDP program before READY=1"
    # Pinged every WatchdogSec / 4 while healthy: a late tick (up to LAG_BOUND) or a slow check round (its
    # period + slack) must not get a working supervisor killed; a hang must, well within a minute.
    seconds = int(unit["WatchdogSec"])
    assert 4 * watchdog.LAG_BOUND + watchdog._SLACK < seconds <= 60
    assert unit["Restart"] == "on-failure", "a watchdog kill counts as a failure: restarted"
    # The other layer: a hung supervisor's routes go before a dead node's would (the default hold time).
    assert Bgp(local_as=1, peers=()).heartbeat_timeout < Peer(address=ip_address("10.0.0.1"), asn=1).hold_time
    # READY=1 reaches a socket like systemd's (the unit's Type=notify waits for it).
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(5)
        assert watchdog.notify("READY=1", {"NOTIFY_SOCKET": str(path)})
        assert sock.recv(64) == b"READY=1"


def test_open_files_leave_the_checks_their_budget_beside_the_api() -> None:
    """The unit's LimitNOFILE is what the supervisor raises its soft limit to; the API's two sites may hold
    api_limit() connections each, and everything else is the health checks' (issue 12, item 2)."""
    from edge_lb.control import limits

    nofile = int(service()["LimitNOFILE"])
    assert nofile >= 65536
    api = limits.api_limit(limits.API_TCP, nofile) + limits.api_limit(limits.API_UNIX, nofile)
    assert api == 320
    assert limits.api_limit(limits.API_TCP, 1024) == limits.api_limit(limits.API_UNIX, 1024) == 64
    probers = 500 * 10  # 500 VIPs x 10 backends, one socket each at a time
    assert nofile - api - 100 > 10 * probers
