"""The exec check leaks nothing: a grandchild that detaches (`setsid -f`) and keeps the program's stdout open
neither leaves a descriptor in the checking process per run nor turns the program's exit 0 into a timeout."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import secrets
import signal
import time
from pathlib import Path

from healthchecks.base import Result, Target
from healthchecks.command import ExecChecker
from healthchecks.spec import CheckSpec

RUNS = 30
TARGET = Target(ipaddress.ip_address("127.0.0.1"), 80)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def sleepers(token: str) -> list[int]:
    """PIDs of the detached `sleep` grandchildren this test started (their argv carries its unique token)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if token.encode() in argv:
                found.append(int(entry.name))
    return found


def kill_sleepers(token: str) -> None:
    for pid in sleepers(token):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


async def runs(checker: ExecChecker, count: int) -> list[Result]:
    return [await checker.check(TARGET) for _ in range(count)]


def test_detached_grandchild_holding_stdout_leaks_no_fd_and_counts_as_its_exit() -> None:
    token = f"1000.{secrets.randbelow(10**9):09d}"  # `sleep 1000.NNN`: a unique argv to find and kill them by
    checker = ExecChecker(CheckSpec(kind="exec", timeout=2.0,
                                    command=("/usr/bin/setsid", "-f", "/bin/sleep", token)))

    async def go() -> tuple[int, list[Result], int, float]:
        await runs(checker, 2)  # the event loop's own descriptors (child watcher, ...) exist from here on
        before = open_fds()
        t0 = time.monotonic()
        results = await runs(checker, RUNS)
        return before, results, open_fds(), time.monotonic() - t0

    try:
        before, results, after, took = asyncio.run(go())
        assert len(sleepers(token)) >= RUNS, "the grandchildren did not detach: the test shows nothing"
    finally:
        kill_sleepers(token)
    print(f"{RUNS} runs in {took:.2f} s; fds {before} -> {after}")
    assert after <= before, f"{after - before} descriptors leaked over {RUNS} runs"
    assert results == [Result(ok=True, reason="exit 0")] * RUNS


def test_program_output_before_a_detached_grandchild_is_kept() -> None:
    token = f"1000.{secrets.randbelow(10**9):09d}"
    script = f"echo first; echo all good; /usr/bin/setsid -f /bin/sleep {token}; exit 0"
    checker = ExecChecker(CheckSpec(kind="exec", timeout=2.0, command=("/bin/sh", "-c", script)))
    try:
        result = asyncio.run(checker.check(TARGET))
    finally:
        kill_sleepers(token)
    assert result == Result(ok=True, reason="exit 0: all good")


def test_background_child_left_in_the_group_is_killed_after_the_exit(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    script = f"sleep 30 & echo $! > {pid_file}; exit 0"
    checker = ExecChecker(CheckSpec(kind="exec", timeout=2.0, command=("/bin/sh", "-c", script)))
    assert asyncio.run(checker.check(TARGET)) == Result(ok=True, reason="exit 0")
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{child}/stat").read_text().split(") ", 1)[1][0]
        except FileNotFoundError:
            break
        if state == "Z":
            break
        time.sleep(0.01)
    else:
        raise AssertionError(f"the background child {child} still runs after the check ended")
