"""The exec check: run a program (never a shell); healthy when it exits 0.

"{address}" (the backend's own address), "{port}", "{vip}" (the VIP, empty when not known) and "{mark}"
(the socket mark of a tunnel check, 0 for a direct one: e.g. for `socat ...,so-mark={mark}`) in any
argument become the target's, and the environment gains EDGE_LB_ADDRESS, EDGE_LB_PORT, EDGE_LB_VIP and
EDGE_LB_MARK. The last line of stdout goes into the reason. The program runs in its own session so that on
a timeout (or cancellation) the whole process group, including anything it forked, is killed, and the child
is always reaped. The verdict is the program's exit status, not the end of its output: a grandchild that
detached (`setsid -f`) and keeps stdout open neither turns an exit 0 into a timeout nor keeps the pipe's
read end, which the check closes every time, open in the supervisor.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal

from healthchecks import local, reasons
from healthchecks.base import Result, Target
from healthchecks.spec import CheckSpec

TAIL = 512  # bytes of stdout kept; the rest is read and dropped so a chatty program never blocks on the pipe
EOF_GRACE = 0.1  # s after the program exited for the rest of its output (a grandchild may hold the pipe)


class ExecChecker:
    def __init__(self, spec: CheckSpec) -> None:
        if not spec.command:
            raise ValueError("exec check: command is empty")
        self.spec = spec

    def argv(self, target: Target) -> list[str]:
        fields = _fields(target)
        argv = list(self.spec.command)
        for name, value in fields.items():  # values are addresses and numbers: no braces to re-expand
            argv = [arg.replace(f"{{{name}}}", value) for arg in argv]
        return argv

    async def check(self, target: Target) -> Result:
        argv = self.argv(target)
        env = {**os.environ, **{f"EDGE_LB_{k.upper()}": v for k, v in _fields(target).items()}}
        try:
            proc, output = await _spawn(argv, env)
        except FileNotFoundError:
            return Result(ok=False, reason=f"exec: no such program {argv[0]}")
        except OSError as exc:  # EMFILE for the pipe, EAGAIN or ENOMEM for the fork: this node's
            return Result(ok=False, reason=f"exec: {reasons.os_error(exc)} {argv[0]}",
                          local=local.cause(exc.errno, None))
        try:
            async with asyncio.timeout(self.spec.timeout):
                code = await proc.wait()  # the verdict is the child's exit, never the pipe's EOF
                await output.eof_within(EOF_GRACE)
        except TimeoutError:
            await _kill(proc)
            return Result(ok=False, reason=f"{reasons.timeout(self.spec.timeout)} (killed)")
        except BaseException:  # cancelled: leave nothing running
            await _kill(proc)
            raise
        finally:
            output.close()
            _killpg(proc.pid)  # what it left in its group; a detached grandchild is not ours to kill
        return Result(ok=code == 0, reason=_exit_reason(code, _last_line(output.tail)))

    async def aclose(self) -> None:
        pass


def _fields(target: Target) -> dict[str, str]:
    return {"address": str(target.backend_address), "port": str(target.port),
            "vip": "" if target.vip is None else str(target.vip), "mark": str(target.mark)}


class _Tail(asyncio.Protocol):
    """The read end of the program's stdout: keeps the last TAIL bytes. Closed by the check whatever
    happens, so a grandchild that keeps the write end open holds no descriptor of ours."""

    def __init__(self) -> None:
        self.tail = b""
        self.eof = asyncio.get_running_loop().create_future()
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.tail = (self.tail + data)[-TAIL:]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.eof.done():
            self.eof.set_result(None)

    async def eof_within(self, seconds: float) -> None:
        """The rest of what the program wrote: at once when every writer has closed, else after `seconds`."""
        await asyncio.wait({self.eof}, timeout=seconds)  # neither cancels the future nor eats a cancel

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def _spawn(argv: list[str], env: dict[str, str]) -> tuple[asyncio.subprocess.Process, _Tail]:
    """The program in its own session, stdout into a pipe whose read end only we hold (and close)."""
    read_fd, write_fd = os.pipe()
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, env=env, start_new_session=True, stdin=asyncio.subprocess.DEVNULL, stdout=write_fd,
            stderr=asyncio.subprocess.DEVNULL)
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)  # the child has its copy; ours would keep the pipe from ever reaching EOF
    pipe = os.fdopen(read_fd, "rb", 0)
    try:
        _, output = await asyncio.get_running_loop().connect_read_pipe(_Tail, pipe)
    except BaseException:
        pipe.close()
        _killpg(proc.pid)
        await proc.wait()
        raise
    return proc, output


def _killpg(pgid: int) -> None:
    # Its own session: the group id is its pid. The kernel does not give that id to a new process while the
    # group has members, so this reaches the program's leftovers or no one.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


async def _kill(proc: asyncio.subprocess.Process) -> None:
    """Kill the program's process group and reap the child (its pipe is closed by the caller)."""
    _killpg(proc.pid)
    await proc.wait()


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
