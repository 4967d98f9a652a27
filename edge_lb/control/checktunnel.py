"""The tunnel checks' encapsulator kept in place: a main-loop worker that re-runs the idempotent
checkencap.ensure() every second (issue 11 review).

- Removed from outside (the tc filter, its clsact qdisc, the fwmark rule): marked checks would leave
  unencapsulated to VIP:port, the router would balance them to a healthy backend, and every tunnel check would
  pass while a backend with broken decap stays in the ring. The next pass puts them back and says so.
- Failed (at startup or later): tunnel checks wait ("tunnel not ready", a local fault); the worker retries
  with a bounded backoff until it is in place again, instead of leaving the node to withdraw until a restart.
- Found missing, it may have been missing for up to a period already: a tunnel check that failed then
  ("direct OK, via tunnel") is no judgement of its backend. Before that verdict the check asks `disturbed()`:
  a pass at once (shared by every check that asks) and the outages seen, so a check that overlapped one is
  this node's fault (it waits, not counted), not the backend's.
- A tunnelled VIP that is a local address on this node (on lo or a dummy) catches the marked checks in the
  local table before the fwmark rule: each such VIP gets a warning (once per reload that changes the set).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

from edge_lb import events, netlink_tc
from edge_lb.config import Config, Dataplane
from edge_lb.control.document import CheckTunnelStatus
from edge_lb.dataplane import checkencap
from edge_lb.dataplane.checkencap import Ensured

PERIOD = 1.0  # seconds between passes while it is in place
BACKOFF_MAX = 30.0  # the longest wait between retries while it fails
OUTAGES_KEPT = 16  # the most recent outages remembered for disturbed()

Ensure = Callable[[Dataplane, str], Ensured]
LocalUnderMark = Callable[[list[str], int], list[str]]


class TunnelState(Protocol):
    """What the keeper reads and writes of the node: NodeState has both."""

    tunnel_ready: bool

    @property
    def config(self) -> Config: ...


def tunnelled_vips(config: Config) -> list[str]:
    """The VIP addresses that have a backend checked through its tunnel, in config order, once each."""
    seen = dict.fromkeys(str(v.address) for v in config.vips
                         if any(b.healthcheck.tunnelled for b in v.backends))
    return list(seen)


class TunnelKeeper:
    def __init__(self, state: TunnelState, interface: str, ensure: Ensure = checkencap.ensure,
                 local_under_mark: LocalUnderMark = netlink_tc.local_under_mark,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.state = state
        self.interface = interface
        self._ensure = ensure
        self._local_under_mark = local_under_mark
        self._clock = clock
        self._intact_at = float("-inf")  # monotonic start of the last pass that found everything in place
        self._outages: deque[tuple[float, float]] = deque(maxlen=OUTAGES_KEPT)  # (last seen whole, put back)
        self._pass: asyncio.Future[bool] | None = None
        self._last: tuple[float, bool] = (float("-inf"), False)  # (start of the last pass, its result)
        self.ever_ready = False
        self.restores = 0  # passes that had to put the filter or the rule back
        self.failures = 0  # failed passes
        self.local_vips: list[str] = []  # tunnelled VIPs that are local addresses here, as last looked
        self._looked: list[str] | None = None  # the tunnelled VIPs last looked at
        self._error = ""

    async def disturbed(self, start: float, end: float) -> bool:
        """Was the encapsulator out of place at any time of [start, end] (monotonic)? Asked by a tunnel check
        that failed while its direct check passed, before it blames the backend: answered after a pass that
        began at or after `end` (checks failing together share one)."""
        await self.shared_pass(end)
        return not self.state.tunnel_ready or any(lo < end and hi > start for lo, hi in self._outages)

    async def shared_pass(self, after: float) -> bool:
        """The result of a pass begun at or after `after`: the one in flight if it did, else a new one."""
        for _ in range(3):  # at most: the pass in flight (begun earlier), then one of our own
            started, ok = self._last
            if started >= after:
                return ok
            if self._pass is None or self._pass.done():
                self._pass = asyncio.ensure_future(self._timed_pass())
            await asyncio.shield(self._pass)
        return self._last[1]

    async def _timed_pass(self) -> bool:
        started = self._clock()
        ok = await self.once(started)
        self._last = (started, ok)
        return ok

    async def once(self, started: float | None = None) -> bool:
        """One pass: in place afterwards (tunnel_ready), or not (tunnel checks wait)."""
        settings = self.state.config.dataplane
        started = self._clock() if started is None else started
        try:
            got = await asyncio.to_thread(self._ensure, settings, self.interface)
        except Exception as exc:  # any failure: the worker must go on retrying
            if self.state.tunnel_ready and not _cannot_look(exc):
                self._outages.append((self._intact_at, self._clock()))
            self._failed(exc)
            return False
        self._error = ""
        if got.origin == "adopted" and not got.rules_added:
            self._intact_at = started
        else:  # missing since some time after the last pass that saw it whole; in place again now
            self._outages.append((self._intact_at, self._clock()))
        if not self.ever_ready:
            events.emit("startup", phase="check tunnel", program=got.origin, interface=self.interface,
                        mark=f"{settings.check_mark_base:#x}/{checkencap.MARK_MASK:#x}",
                        via=",".join(got.gateways) or "no default gateway: the main table")
        elif got.origin != "adopted" or got.rules_added:
            self.restores += 1
            events.emit("check_tunnel", logging.WARNING, result="restored",
                        filter=_FILTER_SAID.get(got.origin, "in place"),
                        rules_added=got.rules_added, interface=self.interface,
                        why="removed from outside: marked checks would have left unencapsulated")
        elif not self.state.tunnel_ready:
            events.emit("check_tunnel", result="ready again", interface=self.interface)
        self.ever_ready = self.state.tunnel_ready = True
        await self._look_local(settings.check_mark_base)
        return True

    def _failed(self, exc: Exception) -> None:
        self.failures += 1
        if self.state.tunnel_ready or repr(exc) != self._error:
            events.emit("check_tunnel", logging.ERROR, result="failed", error=exc,
                        effect="tunnel checks wait (not counted); retrying")
        self._error = repr(exc)
        if not _cannot_look(exc):  # out of descriptors or memory: the filter is as it was, unseen
            self.state.tunnel_ready = False

    async def _look_local(self, base: int) -> None:
        """Warn of each tunnelled VIP that is local here, when the set of tunnelled VIPs changed."""
        vips = tunnelled_vips(self.state.config)
        if vips == self._looked:
            return
        try:
            local = await asyncio.to_thread(self._local_under_mark, vips, checkencap.mark_of(base, 1))
        except Exception as exc:
            events.emit("check_tunnel", logging.WARNING, check="local VIPs", error=exc)
            return
        self._looked, self.local_vips = vips, local
        for vip in local:
            events.emit("check_tunnel", logging.WARNING, vip=vip,
                        problem=f"VIP {vip} is a local address on this node: tunnel checks to it are "
                                'answered locally; remove it or use via = "direct"')

    def status(self) -> CheckTunnelStatus:
        return {"ready": self.state.tunnel_ready, "restores": self.restores, "failures": self.failures,
                "local_vips": list(self.local_vips)}

    async def run(self) -> None:
        """Until cancelled: a pass every PERIOD while in place, else a doubling wait up to BACKOFF_MAX."""
        wait = PERIOD
        while True:
            ok = await self.shared_pass(self._clock())
            wait = PERIOD if ok else min(wait * 2, BACKOFF_MAX)
            await asyncio.sleep(wait)


_FILTER_SAID = {"compiled": "compiled and re-attached", "pinned": "re-attached from its pin"}


def _cannot_look(exc: Exception) -> bool:
    """This node could not ask the kernel (a local fault the checks report themselves), which says nothing of
    whether the filter is in place: without this, fd exhaustion read as "tunnel not ready" over EMFILE."""
    return isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS)
