"""systemd/edge-lb@.service: systemd itself accepts it, and it stops the node the way the supervisor needs."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

from edge_lb.bgp import controller
from edge_lb.configbgp import Bgp
from edge_lb.control import supervisor

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
