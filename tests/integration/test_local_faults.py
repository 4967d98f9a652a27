"""Local faults are not backend faults, in the namespace lab (real XDP, real checks, real TCP clients):

    client --- router --- lb (edge-lb run)        b1 b2 b3: decap + HTTP on the VIP and their own address

(a) the LB's own link goes down for a few seconds, set down on the LB (its routes go: checks fail at once
    with ENETUNREACH) or losing its carrier (the router's end set down: routes stay, checks time out and only
    the link state tells): no backend is marked down, status says why, and no held connection is reset once
    it is back (before: every backend down, then re-hashed flows reset);
(b) the supervisor runs out of file descriptors: the checks fail with EMFILE, the backends stay up, the data
    plane keeps serving, the fault is logged, counted and shown, and it clears when the limit is raised.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from edge_lb.control import status
from edge_lb.lab.labs import ENCAP_PREFIX, VIP, DataplaneLab, wait_for

pytestmark = pytest.mark.root

INTERVAL, FALL = 1.0, 2
CHECK = (f'  type = "http"\n  interval = {INTERVAL}\n  fast_interval = 0.25\n  timeout = 0.5\n'
         f'  fall = {FALL}\n  rise = 2\n')
BOUND = 2.0  # [node].local_fault_after: the node says it cannot judge its backends after this long
DOWN_FOR = INTERVAL * FALL + 2.5  # long enough for every backend to have been marked down without the fix


def start(d: DataplaneLab, kind: str = "http") -> None:
    text = d.config_text(check=CHECK.replace('"http"', f'"{kind}"')).replace('[node]\ninterface = "eth0"\n',
                                               f'[node]\ninterface = "eth0"\nlocal_fault_after = {BOUND}\n')
    d.config_path.write_text(text)
    d.start_supervisor()
    wait_for(lambda: all(s == "up" for s, _ in d.backend_states().values()), 15, "every backend up")


def faults(d: DataplaneLab) -> dict[str, object]:
    doc: dict[str, object] = d.status()["local_faults"]
    return doc


def _link(d: DataplaneLab, how: str, up: bool) -> None:
    """The LB's link down or up: set so on the LB ("admin"), or its carrier lost ("carrier": the router's end
    set down). Each puts back the routes the kernel removed with the link."""
    assert d.lb is not None and d.router is not None
    state = "up" if up else "down"
    if how == "admin":
        d.lb.ns.ip("link", "set", "dev", "eth0", state)
        if up:
            d.lb.ns.route("default", via="10.77.2.1")
        return
    d.router.ip("link", "set", "dev", d.lb.router_if, state)
    if up:
        d.router.route(f"{VIP}/32", via=d.lb.address)
        d.router.route(ENCAP_PREFIX, via=d.lb.address)


@pytest.mark.parametrize(("how", "shown", "causes"), [
    ("admin", "eth0 administratively down", {"link down", "ENETUNREACH"}),
    ("carrier", "eth0 operstate", {"link down"}),
])
def test_own_link_down_marks_no_backend_down_and_resets_no_held_connection(
        dlab: DataplaneLab, how: str, shown: str, causes: set[str]) -> None:
    start(dlab)
    held = dlab.hold(40)
    before = held.round()
    assert len(set(before)) == 3, before
    _link(dlab, how, up=False)
    try:
        took = wait_for(lambda: "link down" in str(faults(dlab)["cannot_judge"]), 3, "the link fault shown")
        print(f"link fault ({how}) shown {took:.2f} s after the link went down")
        time.sleep(DOWN_FOR)
        doc = dlab.status()
        states = dlab.backend_states()
    finally:
        _link(dlab, how, up=True)
    assert {s for s, _ in states.values()} == {"up"}, states
    local = doc["local_faults"]
    assert local["withdrawn"] is True, "past the bound the node says it would withdraw"
    assert set(local["faulty"]) <= causes and sum(local["faulty"].values()) == 3, local
    text = status.render(doc)
    assert shown in text and "LOCAL FAULT, this node cannot judge its backends" in text, text
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


@pytest.mark.parametrize("kind", ["http", "tcp"])  # tcp: the batched engine (healthchecks/tcpengine.py)
def test_out_of_file_descriptors_is_a_local_fault_not_a_dead_backend(dlab: DataplaneLab, kind: str) -> None:
    start(dlab, kind)
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
