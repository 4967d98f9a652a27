"""The tunnel checks' encapsulator kept in place: a main-loop worker that re-runs the idempotent
checkencap.ensure() every second (issue 11 review).

- Removed from outside (the tc filter, its clsact qdisc, the fwmark rule): marked checks would leave
  unencapsulated to VIP:port, the router would balance them to a healthy backend, and every tunnel check would
  pass while a backend with broken decap stays in the ring. The next pass puts them back and says so.
- Failed (at startup or later): tunnel checks wait ("tunnel not ready", a local fault); the worker retries
  with a bounded backoff until it is in place again, instead of leaving the node to withdraw until a restart.
- A tunnelled VIP that is a local address on this node (on lo or a dummy) catches the marked checks in the
  local table before the fwmark rule: each such VIP gets a warning (once per reload that changes the set).
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Callable
from typing import Protocol

from edge_lb import events, netlink_tc
from edge_lb.config import Config, Dataplane
from edge_lb.control.document import CheckTunnelStatus
from edge_lb.dataplane import checkencap
from edge_lb.dataplane.checkencap import Ensured

PERIOD = 1.0  # seconds between passes while it is in place
BACKOFF_MAX = 30.0  # the longest wait between retries while it fails

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
                 local_under_mark: LocalUnderMark = netlink_tc.local_under_mark) -> None:
        self.state = state
        self.interface = interface
        self._ensure = ensure
        self._local_under_mark = local_under_mark
        self.ever_ready = False
        self.restores = 0  # passes that had to put the filter or the rule back
        self.failures = 0  # failed passes
        self.local_vips: list[str] = []  # tunnelled VIPs that are local addresses here, as last looked
        self._looked: list[str] | None = None  # the tunnelled VIPs last looked at
        self._error = ""

    async def once(self) -> bool:
        """One pass: in place afterwards (tunnel_ready), or not (tunnel checks wait)."""
        settings = self.state.config.dataplane
        try:
            got = await asyncio.to_thread(self._ensure, settings, self.interface)
        except Exception as exc:  # any failure: the worker must go on retrying
            self._failed(exc)
            return False
        self._error = ""
        if not self.ever_ready:
            events.emit("startup", phase="check tunnel", program=got.origin, interface=self.interface,
                        mark=f"{settings.check_mark_base:#x}/{checkencap.MARK_MASK:#x}",
                        via=",".join(got.gateways) or "no default gateway: the main table")
        elif got.origin == "compiled" or got.rules_added:
            self.restores += 1
            events.emit("check_tunnel", logging.WARNING, result="restored",
                        filter="re-attached" if got.origin == "compiled" else "in place",
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
            ok = await self.once()
            wait = PERIOD if ok else min(wait * 2, BACKOFF_MAX)
            await asyncio.sleep(wait)


def _cannot_look(exc: Exception) -> bool:
    """This node could not ask the kernel (a local fault the checks report themselves), which says nothing of
    whether the filter is in place: without this, fd exhaustion read as "tunnel not ready" over EMFILE."""
    return isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS)
