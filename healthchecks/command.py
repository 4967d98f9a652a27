"""The exec check: run a program (never a shell); healthy when it exits 0.

"{address}" and "{port}" in any argument become the target's, and the environment gains EDGE_LB_ADDRESS and
EDGE_LB_PORT. The last line of stdout goes into the reason. The program runs in its own session so that on a
timeout (or cancellation) the whole process group, including anything it forked, is killed, and the child is
always reaped.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal

from healthchecks import reasons
from healthchecks.base import Result, Target
from healthchecks.spec import CheckSpec

TAIL = 512  # bytes of stdout kept; the rest is read and dropped so a chatty program never blocks on the pipe
DRAIN = 1.0  # seconds to wait for the pipe's EOF after a kill (a grandchild that left the group may hold it)


class ExecChecker:
    def __init__(self, spec: CheckSpec) -> None:
        if not spec.command:
            raise ValueError("exec check: command is empty")
        self.spec = spec

    def argv(self, target: Target) -> list[str]:
        return [arg.replace("{address}", str(target.address)).replace("{port}", str(target.port))
                for arg in self.spec.command]

    async def check(self, target: Target) -> Result:
        argv = self.argv(target)
        env = {**os.environ, "EDGE_LB_ADDRESS": str(target.address), "EDGE_LB_PORT": str(target.port)}
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, env=env, start_new_session=True, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
        except FileNotFoundError:
            return Result(ok=False, reason=f"exec: no such program {argv[0]}")
        except OSError as exc:
            return Result(ok=False, reason=f"exec: {reasons.os_error(exc)} {argv[0]}")
        assert proc.stdout is not None
        try:
            async with asyncio.timeout(self.spec.timeout):
                output = await _tail(proc.stdout, TAIL)
                code = await proc.wait()
        except TimeoutError:
            await _kill(proc)
            return Result(ok=False, reason=f"{reasons.timeout(self.spec.timeout)} (killed)")
        except BaseException:  # cancelled: leave nothing running
            await _kill(proc)
            raise
        return Result(ok=code == 0, reason=_exit_reason(code, _last_line(output)))

    async def aclose(self) -> None:
        pass


async def _tail(stream: asyncio.StreamReader, keep: int) -> bytes:
    """Read the stream to its end, keeping only the last `keep` bytes."""
    data = b""
    while chunk := await stream.read(4096):
        data = (data + chunk)[-keep:]
    return data


async def _kill(proc: asyncio.subprocess.Process) -> None:
    """Kill the program's process group, reap the child, and drain the pipe so its transport closes."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: the group id is its pid
    await proc.wait()
    assert proc.stdout is not None
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(DRAIN):
            while await proc.stdout.read(4096):
                pass


def _last_line(output: bytes) -> str:
    lines = output.decode(errors="replace").strip().splitlines()
    return reasons.clip(lines[-1]) if lines else ""


def _exit_reason(code: int, line: str) -> str:
    what = f"exit {code}" if code >= 0 else f"killed by signal {_signal_name(-code)}"
    return f"{what}: {line}" if line else what


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:  # a real-time signal has no name
        return str(number)
