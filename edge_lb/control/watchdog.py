"""The hang watchdog: one main-loop worker that judges whether the supervisor makes progress, and only then
pings systemd (WATCHDOG=1) and sends ExaBGP's bridge its heartbeat.

    notify("READY=1")                                  # startup done (Type=notify)
    await Watchdog().run(state.monitor, bgp)           # a main-loop worker, until cancelled
    notify("STOPPING=1")                               # shutdown begins

Progress is two things:
- the event loop: the worker ticks every TICK seconds; a tick later than LAG_BOUND means the loop was blocked
  (a hung loop does not tick at all, so then nothing is sent);
- the check scheduler: some health check completed within the slowest check's own period (interval with
  jitter, its timeout) plus slack. No checks running counts as progress.

After a stall of [bgp].heartbeat_timeout or more (the bridge withdrew everything meanwhile), the heartbeat
that would announce again waits until every prober completed a check begun after the stall and none is
half-way through a rise/fall streak (RESYNC_MAX at most): a backend that died while the supervisor was
stopped is down before its node is announced again.

Two layers act on a hang: the bridge (edge_lb.bgp.exabgp_bridge) withdraws every route once the heartbeat
stops for [bgp].heartbeat_timeout, with or without systemd; systemd (WatchdogSec in the unit) kills and
restarts the supervisor once WATCHDOG=1 stops. A loop that ticks shows progress by ticking, so the heartbeat
needs only the scheduler; systemd's ping needs a loop that is not lagging too.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

from edge_lb import events
from edge_lb.bgp.controller import BgpController
from edge_lb.control.document import WatchdogStatus
from healthchecks.monitor import HealthMonitor

log = logging.getLogger("edge_lb.watchdog")

TICK = 0.25  # s between the worker's looks; the bridge's heartbeat_timeout is at least 4 of them
LAG_BOUND = 1.0  # s a tick may come late before the loop counts as stalled
_SLACK = 2.0  # s past the slowest check's period (and its 1 s backstop): the scheduler stalled
_JUDGE_EVERY = 1.0  # s between sums over the probers (cheap, but O(probers))
RESYNC_MAX = 10.0  # s a heartbeat may wait, after a stall, for health checks newer than the stall


def notify(message: str, environ: Mapping[str, str] = os.environ) -> bool:
    """sd_notify(3): one datagram to $NOTIFY_SOCKET; False when there is none (not run by systemd with
    Type=notify) or it cannot be reached (logged)."""
    path = environ.get("NOTIFY_SOCKET", "")
    if not path:
        return False
    address = "\0" + path[1:] if path.startswith("@") else path  # "@...": the abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        log.warning("sd_notify %r to %s failed: %s", message, path, exc)
        return False
    return True


def watchdog_interval(environ: Mapping[str, str] = os.environ, pid: int | None = None) -> float | None:
    """systemd's WatchdogSec in seconds when it is meant for this process (WATCHDOG_PID unset or ours)."""
    usec, owner = environ.get("WATCHDOG_USEC", ""), environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if owner and owner != str(os.getpid() if pid is None else pid):
        return None
    return int(usec) / 1e6


class Scheduler:
    """Are health checks completing: the number done by the running probers, and when it last changed."""

    def __init__(self, monitor: HealthMonitor, clock: Callable[[], float] = time.monotonic) -> None:
        self.monitor = monitor
        self.clock = clock
        self._done = -1
        self._changed = clock()
        self.bound = _SLACK
        self.running = 0

    def judge(self) -> float | None:
        """Seconds since a check last completed (None: no checks run); refreshes `bound` for them."""
        keys = self.monitor.running()
        now = self.clock()
        done, bound = 0, 0.0
        for key in keys:
            seen = self.monitor.observation(key)
            done += seen.checks if seen is not None else 0
            spec = key.spec
            bound = max(bound, spec.interval * (1 + spec.jitter) + spec.budget)
        self.bound, self.running = bound + 1.0 + _SLACK, len(keys)
        if done != self._done or not keys:
            self._done, self._changed = done, now
        return now - self._changed if keys else None

    def fresh_since(self, since: float) -> bool:
        """Every prober completed a check that began after `since` (epoch seconds) and none is half-way
        through a rise/fall streak: health is as it is now, not as it was before a stall. A check that began
        before `since` does not count even if it completed after: its answer may have sat in a socket since
        before the stall (a reply read on SIGCONT from a backend that died meanwhile)."""
        for key in self.monitor.running():
            seen = self.monitor.observation(key)
            if (seen is None or seen.began_at is None or seen.began_at < since or seen.health.changing
                    or seen.local is not None):  # "overran" during the stall is no judgement of the backend
                return False
        return True


class Watchdog:
    """Judges progress on every tick; status() shows the last judgement."""

    def __init__(self, environ: Mapping[str, str] = os.environ, clock: Callable[[], float] = time.monotonic,
                 notify_to: Callable[[str], bool] | None = None,
                 wall: Callable[[], float] = time.time) -> None:
        self.interval = watchdog_interval(environ)
        self.clock = clock
        self.wall = wall
        # A stall this long ([bgp].heartbeat_timeout) had the bridge withdraw everything: the next heartbeat,
        # which announces again, waits for health checks newer than the stall (a backend may have died).
        self.resync_after = float("inf")
        self._resync: tuple[float, float] | None = None  # (epoch the stall was seen to end, monotonic same)
        self.notify = notify_to or (lambda message: notify(message, environ))
        self.ok = True
        self.reason: str | None = None
        self.lag = 0.0
        self.checks_age: float | None = None
        self._pinged = -float("inf")
        self._judged = -float("inf")
        self._beat_at: float | None = None  # monotonic time of the last heartbeat sent to the bridge

    def status(self) -> WatchdogStatus:
        return {"ok": self.ok, "reason": self.reason, "loop_lag": round(self.lag, 3),
                "checks_age": None if self.checks_age is None else round(self.checks_age, 3),
                "systemd": self.interval is not None}

    async def run(self, monitor: HealthMonitor, bgp: BgpController | None) -> None:
        """Until cancelled: tick, judge, ping systemd and beat the bridge while there is progress."""
        scheduler = Scheduler(monitor, self.clock)
        beat = bgp.speaker.heartbeat if bgp is not None else None
        if bgp is not None and bgp.config.bgp is not None:
            self.resync_after = bgp.config.bgp.heartbeat_timeout
        last = self.clock()
        self.started(last)
        while True:
            await asyncio.sleep(TICK)
            now = self.clock()
            self.tick(scheduler, max(now - last - TICK, 0.0), now, beat)
            last = now

    def started(self, now: float) -> None:
        """The bridge got its first heartbeat when it connected (startup, before this worker): a stall before
        the first tick is a gap like any other (without it a SIGSTOP right after startup skipped the hold)."""
        if self._beat_at is None:
            self._beat_at = now

    def tick(self, scheduler: Scheduler, lag: float, now: float, beat: Callable[[], None] | None) -> None:
        self.lag = lag
        if now - self._judged >= _JUDGE_EVERY:
            self._judged, self.checks_age = now, scheduler.judge()
        checks_stalled = self.checks_age is not None and self.checks_age > scheduler.bound
        reason = (f"no health check completed for {self.checks_age:.1f} s ({scheduler.running} probers)"
                  if checks_stalled else
                  f"the main loop ran {lag:.2f} s late" if lag > LAG_BOUND else None)
        self._judgement(reason)
        if not checks_stalled and beat is not None:
            self._note_gap(now)
            if not self._held(scheduler, now):
                try:
                    beat()
                except Exception:  # the watchdog must outlive a faulty speaker; the bridge then withdraws
                    log.exception("the BGP heartbeat failed")
                self._beat_at = now
        if reason is None and self.interval is not None and now - self._pinged >= self.interval / 4:
            self._pinged = now
            self.notify("WATCHDOG=1")

    def _note_gap(self, now: float) -> None:
        """The bridge expires on the time since the last heartbeat, whatever stopped it (a stalled loop or
        stalled checks): a gap that long (less the bridge's 0.1 s check step) starts the hold."""
        if self._beat_at is None or self._resync is not None:
            return
        gap = now - self._beat_at
        if gap >= self.resync_after - 0.1:
            self._resync = (self.wall(), now)
            events.emit("watchdog", logging.WARNING, stalled=f"{gap:.1f}s",
                        effect="BGP announces again once health checks begun after the stall completed")

    def _held(self, scheduler: Scheduler, now: float) -> bool:
        """After a long stall: no heartbeat until fresh checks (RESYNC_MAX at most)."""
        if self._resync is None:
            return False
        since, ended = self._resync
        if scheduler.fresh_since(since) or now - ended > RESYNC_MAX:
            self._resync = None
            events.emit("watchdog", resynced=f"{now - ended:.1f}s after the stall")
            return False
        return True

    def _judgement(self, reason: str | None) -> None:
        ok = reason is None
        if ok != self.ok:
            effect = None
            if reason is not None:
                effect = "systemd is not pinged" + ("" if reason.startswith("the main loop")
                                                    else "; the BGP bridge gets no heartbeat")
            events.emit("watchdog", logging.INFO if ok else logging.ERROR, progress="yes" if ok else "no",
                        reason=reason, effect=effect)
        self.ok, self.reason = ok, reason
