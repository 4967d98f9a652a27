"""The tcp checks of every backend in one batch: no task, timer or future per check.

A tcp check is a connect and nothing else, so the asyncio machinery around each check (a prober task and its
sleep, the check's timeout, the monitor's backstop, sock_connect's add_writer/remove_writer and future) cost
far more than the connect itself (~200 us of CPU a check: 10,000 backends at 1 s wanted two cores). Here all
connecting sockets are in ONE epoll object, read by the event loop as one reader; the next checks and the
connects' deadlines are one heap behind ONE loop timer; readiness is drained in a batch (SO_ERROR is the
result) and a deadline that passes is the timeout.

What a check means is the same as TcpChecker (and TunnelChecker around it) run by a prober: sockets from
Target.socket() (marks honoured), local.failed() classification, spec.timeout per connect, a failed tunnelled
check that is not local re-checked directly at once, resolve(target) -> None a NOT_WRITTEN result. The monitor
records each result (its one _record path) and says when the key's next check is due.
"""

from __future__ import annotations

import asyncio
import errno
import heapq
import logging
import os
import select
import socket
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from healthchecks import local, reasons, tunnel
from healthchecks.base import Result, Target

if TYPE_CHECKING:
    from healthchecks.monitor import CheckKey, Resolve
    from healthchecks.tunnel import Disturbed

log = logging.getLogger("edge_lb.health")

Completed = Callable[["CheckKey", Result, float], float]  # (key, result, its seconds) -> seconds to the next
_BATCH = 0.001  # s: heap entries due this close together are taken in one timer tick
_EVENTS = 256  # connects read per callback (~10 ms of work at most): the loop serves others in between
_CONNECTED = Result(ok=True, reason="connected")


class _Probe:
    """One key: waiting for its turn (sock None) or connecting (sock set, its deadline in the heap)."""

    __slots__ = ("active", "began", "busy", "dialled", "disturbed", "failed", "first", "judging", "key",
                 "sock", "sockaddr", "target", "token")

    def __init__(self, key: CheckKey, disturbed: Disturbed | None) -> None:
        self.key = key
        self.disturbed = disturbed  # asked before a tunnel check blames its backend (tunnel.py)
        self.judging: asyncio.Task[None] | None = None  # that question, while it is asked
        self.failed = 0.0  # time.monotonic() when the tunnel check failed
        self.token = 0  # the seq of the key's one live heap entry; older entries are skipped
        self.sock: socket.socket | None = None
        self.target: Target = key.target  # where the connect in flight goes (resolved, or direct re-check)
        self.began = 0.0  # time.monotonic() when the check (not a wait for a slot) began
        self.first: Result | None = None  # a failed tunnel check while its direct re-check runs
        self.busy = False  # holds an in-flight slot
        self.active = True
        self.dialled: Target | None = None  # the target sockaddr was made for (str(address) is not free)
        self.sockaddr: tuple[str, int] = ("", 0)


class TcpEngine:
    """Runs the tcp checks of the keys added, at most `concurrency` connecting at once."""

    def __init__(self, completed: Completed, resolve: Resolve, concurrency: int) -> None:
        self._completed = completed
        self._resolve = resolve
        self._free = concurrency
        self._loop = asyncio.get_running_loop()
        self._epoll = select.epoll()
        self._loop.add_reader(self._epoll.fileno(), self._ready)
        self._probes: dict[CheckKey, _Probe] = {}
        self._fds: dict[int, _Probe] = {}  # connecting sockets by fd
        self._heap: list[tuple[float, int, _Probe]] = []  # (loop time, seq, probe): due checks and deadlines
        self._seq = 0
        self._waiting: deque[_Probe] = deque()  # due, waiting for an in-flight slot
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")
        self._pumping = False

    def __contains__(self, key: object) -> bool:
        return key in self._probes

    def __iter__(self) -> Iterator[CheckKey]:
        return iter(self._probes)

    @property
    def in_flight(self) -> int:
        return len(self._fds)

    def add(self, key: CheckKey, delay: float, disturbed: Disturbed | None = None) -> None:
        """Check key first after `delay` seconds, then when the monitor says."""
        probe = self._probes[key] = _Probe(key, disturbed)
        self._schedule(probe, self._loop.time() + delay)

    def remove(self, keys: Iterable[CheckKey]) -> None:
        """Stop checking keys: their sockets in flight are closed, their slots handed on."""
        for key in keys:
            probe = self._probes.pop(key, None)
            if probe is not None:
                probe.active, probe.token = False, 0
                self._release(probe)
        self._pump()

    def close(self) -> None:
        self.remove(list(self._probes))
        if self._timer is not None:
            self._timer.cancel()
        self._loop.remove_reader(self._epoll.fileno())
        self._epoll.close()

    # --- the loop's two callbacks ------------------------------------------------------------------------

    def _tick(self) -> None:
        """The timer: start the checks now due, time out the connects past their deadline."""
        self._timer, self._timer_at = None, float("inf")
        horizon, drained = self._loop.time() + _BATCH, False
        heap = self._heap
        try:
            while heap and heap[0][0] <= horizon:
                _, seq, probe = heapq.heappop(heap)
                if probe.token != seq:
                    continue  # rescheduled or removed since
                if probe.sock is None:
                    self._guarded(probe, self._due)
                    continue
                if not drained:  # a connect that completed during a stall is an answer, not a timeout
                    self._ready()
                    drained = True
                    if probe.token != seq:
                        continue
                self._guarded(probe, self._timed_out)
        finally:  # whatever happened, the next tick is armed
            if heap:
                self._arm(heap[0][0])

    def _ready(self) -> None:
        """The epoll object is readable: every connect that completed, in one batch."""
        for fd, _ in self._epoll.poll(0, _EVENTS):
            probe = self._fds.get(fd)
            if probe is not None:
                self._guarded(probe, self._answered)

    # --- one check ---------------------------------------------------------------------------------------

    def _due(self, probe: _Probe) -> None:
        probe.token = 0
        self._waiting.append(probe)
        self._pump()

    def _pump(self) -> None:
        """Begin waiting checks while slots are free (iteratively: a check may end at once and free one)."""
        if self._pumping:
            return
        self._pumping = True
        try:
            while self._free > 0 and self._waiting:
                probe = self._waiting.popleft()
                if probe.active and probe.token == 0 and not probe.busy:
                    self._guarded(probe, self._begin)
        finally:
            self._pumping = False

    def _begin(self, probe: _Probe) -> None:
        probe.began, probe.first = time.monotonic(), None
        target = self._resolve(probe.key.target)
        if target is None:  # its backend is not in the data plane yet: nothing to tunnel to
            self._finish(probe, Result(False, "tunnel: not in place yet", local.NOT_WRITTEN), 0.0)
            return
        probe.busy = True
        self._free -= 1
        self._connect(probe, target)

    def _connect(self, probe: _Probe, target: Target) -> None:
        probe.target = target
        try:
            sock = target.socket()
        except OSError as exc:
            self._end(probe, local.failed("socket", exc, target))
            return
        if target is not probe.dialled:  # the same Target object each time, unless resolved anew
            probe.dialled, probe.sockaddr = target, (str(target.address), target.port)
        err = sock.connect_ex(probe.sockaddr)
        if err != errno.EINPROGRESS:
            sock.close()
            self._end(probe, _CONNECTED if err == 0 else _connect_failed(err, target))
            return
        try:
            self._epoll.register(sock.fileno(), select.EPOLLOUT)
        except OSError as exc:  # ENOMEM, ENOSPC (fs.epoll.max_user_watches): always this node's
            sock.close()
            cause = errno.errorcode.get(exc.errno or 0, "epoll")
            self._end(probe, Result(False, f"epoll: {reasons.os_error(exc)}", cause))
            return
        probe.sock = sock
        self._fds[sock.fileno()] = probe
        self._schedule(probe, self._loop.time() + probe.key.spec.timeout)

    def _answered(self, probe: _Probe) -> None:
        sock = self._unhook(probe)
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        sock.close()
        self._end(probe, _CONNECTED if err == 0 else _connect_failed(err, probe.target))

    def _timed_out(self, probe: _Probe) -> None:
        self._unhook(probe).close()
        self._end(probe, Result(ok=False, reason=f"connect: {reasons.timeout(probe.key.spec.timeout)}"))

    def _end(self, probe: _Probe, result: Result) -> None:
        """One connect's result: a failed tunnel check goes straight to its direct re-check (tunnel.py)."""
        if probe.first is None and probe.key.spec.tunnelled and probe.target.tunnelled and not result.ok \
                and result.local is None:
            probe.first, probe.failed = result, time.monotonic()
            self._connect(probe, probe.target.direct())
            return
        if probe.first is None:
            self._finish(probe, result)
        elif result.ok and probe.disturbed is not None:  # rare: a task may ask, holding the slot meanwhile
            probe.judging = asyncio.ensure_future(self._judge(probe, probe.first, result, probe.disturbed))
        else:
            self._finish(probe, tunnel.verdict(probe.first, result, False))

    async def _judge(self, probe: _Probe, first: Result, direct: Result, disturbed: Disturbed) -> None:
        """Direct OK: blamed on the backend unless this node's encapsulator was out of place meanwhile."""
        try:
            result = tunnel.verdict(first, direct, await disturbed(probe.began, probe.failed))
        except Exception as exc:  # as the monitor counts a checker's exception: this node's
            log.exception("tunnel check of %s: was the encapsulator in place?", probe.key.target)
            result = Result(False, f"checker error: {exc.__class__.__name__}", local.CHECKER_ERROR)
        probe.judging = None
        if probe.active:
            self._finish(probe, result)

    def _finish(self, probe: _Probe, result: Result, took: float | None = None) -> None:
        self._release(probe)
        took = time.monotonic() - probe.began if took is None else took
        delay = self._completed(probe.key, result, took)
        if probe.active:
            self._schedule(probe, self._loop.time() + delay)
        self._pump()

    # --- bookkeeping -------------------------------------------------------------------------------------

    def _guarded(self, probe: _Probe, step: Callable[[_Probe], None]) -> None:
        """A bug in one step must not stop every check: it is the checker's error, as a prober's would be."""
        try:
            step(probe)
        except Exception as exc:
            log.exception("tcp check of %s failed", probe.key.target)
            if probe.active and probe.token == 0:  # not due again: end it as a failed check (rescheduled)
                self._finish(probe, Result(False, f"checker error: {exc.__class__.__name__}",
                                           local.CHECKER_ERROR))

    def _unhook(self, probe: _Probe) -> socket.socket:
        """The probe's socket out of the fd table; the caller closes it, which takes it out of the epoll set
        (no unregister: one syscall a check less)."""
        sock, probe.sock, probe.token = probe.sock, None, 0
        assert sock is not None
        self._fds.pop(sock.fileno(), None)
        return sock

    def _release(self, probe: _Probe) -> None:
        if probe.sock is not None:
            self._unhook(probe).close()
        if probe.judging is not None:
            probe.judging.cancel()
            probe.judging = None
        if probe.busy:
            probe.busy = False
            self._free += 1

    def _schedule(self, probe: _Probe, when: float) -> None:
        self._seq += 1
        probe.token = self._seq
        heapq.heappush(self._heap, (when, self._seq, probe))
        if when < self._timer_at:
            self._arm(when)

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_at = self._loop.call_at(when, self._tick), when


def _connect_failed(err: int, target: Target) -> Result:
    return local.failed("connect", OSError(err, os.strerror(err)), target)
