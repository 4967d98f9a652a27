"""Local faults are not backend faults, in the namespace lab (real XDP, real checks, real TCP clients):

    client --- router --- lb (edge-lb run)        b1 b2 b3: decap + HTTP on the VIP and their own address

(a) the LB's own link goes down for a few seconds: no backend is marked down, status says why, and no held
    connection is reset once it is back (before: every backend down, then re-hashed flows reset);
(b) the supervisor runs out of file descriptors: the checks fail with EMFILE, the backends stay up, the data
    plane keeps serving, the fault is logged, counted and shown, and it clears when the limit is raised.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from edge_lb.control import status
from edge_lb.lab.labs import DataplaneLab, wait_for

pytestmark = pytest.mark.root

INTERVAL, FALL = 1.0, 2
CHECK = (f'  type = "http"\n  interval = {INTERVAL}\n  fast_interval = 0.25\n  timeout = 0.5\n'
         f'  fall = {FALL}\n  rise = 2\n')
BOUND = 2.0  # [node].local_fault_after: the node says it cannot judge its backends after this long
DOWN_FOR = INTERVAL * FALL + 2.5  # long enough for every backend to have been marked down without the fix


def start(d: DataplaneLab) -> None:
    text = d.config_text(check=CHECK).replace('[node]\ninterface = "eth0"\n',
                                               f'[node]\ninterface = "eth0"\nlocal_fault_after = {BOUND}\n')
    d.config_path.write_text(text)
    d.start_supervisor()
    wait_for(lambda: all(s == "up" for s, _ in d.backend_states().values()), 15, "every backend up")


def faults(d: DataplaneLab) -> dict[str, object]:
    doc: dict[str, object] = d.status()["local_faults"]
    return doc


def test_own_link_down_marks_no_backend_down_and_resets_no_held_connection(dlab: DataplaneLab) -> None:
    assert dlab.lb is not None
    start(dlab)
    held = dlab.hold(40)
    before = held.round()
    assert len(set(before)) == 3, before
    dlab.lb.ns.ip("link", "set", "dev", "eth0", "down")
    try:
        took = wait_for(lambda: "link down" in str(faults(dlab)["cannot_judge"]), 3, "the link fault shown")
        print(f"link fault shown {took:.2f} s after `ip link set eth0 down`")
        time.sleep(DOWN_FOR)
        doc = dlab.status()
        states = dlab.backend_states()
    finally:
        dlab.lb.ns.ip("link", "set", "dev", "eth0", "up")
        dlab.lb.ns.route("default", via="10.77.2.1")  # an administratively downed link loses its routes
    assert {s for s, _ in states.values()} == {"up"}, states
    assert doc["local_faults"]["withdrawn"] is True, "past the bound the node says it would withdraw"
    assert doc["local_faults"]["faulty"].get("link down", 0) + doc["local_faults"]["faulty"].get(
        "ENETUNREACH", 0) == 3, doc["local_faults"]
    text = status.render(doc)
    assert "link eth0 administratively down" in text or "link down" in text, text
    assert "LOCAL FAULT, this node cannot judge its backends" in text, text
    after = held.round()
    reset = sum(1 for was, now in zip(before, after, strict=True) if was != now)
    print(f"held connections moved or reset after link-up: {reset} of {len(before)}")
    assert after == before, "every held connection stays on its backend"
    wait_for(lambda: faults(dlab)["cannot_judge"] is None, 5, "the node judges its backends again")
    assert dlab.http_get(30)["failures"] == 0
    log = dlab.supervisor_log()
    assert "event=link interface=eth0 state=down" in log and "to=down" not in log


def _prlimit(pid: int, nofile: int | None) -> None:
    """Set the process's RLIMIT_NOFILE soft limit (None: back to its hard limit)."""
    hard = subprocess.run(["prlimit", "--pid", str(pid), "--nofile", "--noheadings", "--raw",
                           "--output=HARD"], capture_output=True, text=True, timeout=10, check=True)
    soft = hard.stdout.strip() if nofile is None else str(nofile)
    subprocess.run(["prlimit", "--pid", str(pid), f"--nofile={soft}:{hard.stdout.strip()}"], timeout=10,
                   check=True)


def _open_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def test_out_of_file_descriptors_is_a_local_fault_not_a_dead_backend(dlab: DataplaneLab) -> None:
    start(dlab)
    assert dlab.supervisor is not None
    pid = dlab.supervisor.pid
    _prlimit(pid, _open_fds(pid))  # nothing new can be opened: every check's socket() fails
    try:
        wait_for(lambda: 'node="cannot judge its backends"' in dlab.supervisor_log(), BOUND + 5,
                 "the supervisor says it cannot judge its backends")
        time.sleep(INTERVAL * FALL + 1)  # without the fix every backend would be down by now
        served = dlab.http_get(30)  # the data plane needs no descriptor of the supervisor's
    finally:
        _prlimit(pid, None)
    states = dlab.backend_states()
    assert {s for s, _ in states.values()} == {"up"}, states
    assert served["failures"] == 0, served["errors"]
    log = dlab.supervisor_log()
    assert log.count("event=local_fault cause=EMFILE") == 1, "logged once per cause (rate-limited)"
    doc = faults(dlab)
    assert doc["counts"].get("EMFILE", 0) >= 3, doc  # type: ignore[union-attr]
    wait_for(lambda: faults(dlab)["cannot_judge"] is None and not faults(dlab)["faulty"], 5,
             "the fault clears once descriptors can be had again")
    assert 'node="judges its backends again"' in dlab.supervisor_log()
    assert "to=down" not in dlab.supervisor_log()
