"""Follow the default gateway's MAC for the supervisor: read from the kernel, re-read on netlink events.

    watcher = GatewayWatcher("eth0", on_change=write_gateway_mac)
    mac = await watcher.start()   # the MAC now; NetlinkError if the kernel cannot tell within ~2 s
    ...                           # on_change(new_mac) runs in this loop whenever the MAC changes
    await watcher.stop()

Events come from netlink.NetlinkEvents (link, neighbour and IPv4/IPv6 route groups), read by a task in the
caller's loop (no thread to stop). An event only wakes the resolver: the answer is always read afresh
from the kernel (netlink.gateway_mac: default route, then the gateway's neighbour entry), so a lost event
(ENOBUFS) costs a resync and nothing more, and a poll every poll_interval covers what no event announced.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any

from edge_lb import events, netlink
from edge_lb.errors import NetlinkError

log = logging.getLogger("edge_lb.control.gwwatch")

DEBOUNCE = 0.05  # s: the events of one change (neighbour, route, link) arrive together: resolve once
START_WINDOW = 2.0  # s: how long start() waits for the kernel to resolve the gateway after prompting it
_START_RETRY = 0.1  # s: start() re-reads at least this often even without an event
_RESOLVE_TIMEOUT = 5.0  # s: one resolution is two netlink dumps; far longer means something is wrong
_RESUBSCRIBE_DELAY = 0.1  # s: keeps a socket that fails at once from spinning
_STOP_TIMEOUT = 2.0
_DISCARD_PORT = 9
_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_NOT_A_GATEWAY = {"00:00:00:00:00:00", "ff:ff:ff:ff:ff:ff"}


def usable_mac(mac: str) -> bool:
    """A lower-case colon-separated MAC that a gateway can have (not all zeros, not broadcast)."""
    return bool(_MAC_RE.match(mac)) and mac not in _NOT_A_GATEWAY


def is_relevant(msg: Any, ifindex: int, ifname: str) -> bool:
    """Whether an rtnetlink event can change the gateway MAC seen through `ifname` (index `ifindex`)."""
    event = msg.get("event")
    if event in ("RTM_NEWNEIGH", "RTM_DELNEIGH"):
        return bool(msg.get("ifindex") == ifindex)
    if event in ("RTM_NEWROUTE", "RTM_DELROUTE"):
        return bool(msg.get("dst_len") == 0)  # a default route: the gateway itself may have changed
    if event in ("RTM_NEWLINK", "RTM_DELLINK"):
        # By name too: a re-created interface comes back with a new index.
        return bool(msg.get("index") == ifindex or msg.get_attr("IFLA_IFNAME") == ifname)
    return False


def _ifindex(ifname: str) -> int:
    try:
        return socket.if_nametoindex(ifname)
    except OSError:
        return 0  # gone for now: link events by name still wake us


def prompt_resolution(ifname: str) -> None:
    """Send one datagram to the gateway's discard port out of `ifname`: to deliver it the kernel ARPs (or
    NDs) for the gateway, which creates the neighbour entry resolution reads. Best effort, never raises."""
    try:
        gw = netlink.gateway_address(ifname)
        family = socket.AF_INET6 if ":" in gw else socket.AF_INET
        addr: tuple[Any, ...] = (gw, _DISCARD_PORT)
        if family == socket.AF_INET6:
            addr = (gw, _DISCARD_PORT, 0, socket.if_nametoindex(ifname))  # scope, for a link-local gateway
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, ifname.encode())
            sock.sendto(b"", addr)
    except Exception as exc:  # NetlinkError, OSError, pyroute2's own: start() reports the real failure
        log.debug("gateway MAC on %s: could not prompt resolution: %s", ifname, exc)
        return
    events.emit("gateway", interface=ifname, result="unknown yet", prompted=gw)


class GatewayWatcher:
    """Keeps `current` equal to the kernel's gateway MAC for `ifname` and reports changes to `on_change`.

    on_change(mac) is called in the event loop, only with a MAC different from the last one reported (start()
    returns the first, it is not passed to on_change). When resolution fails later (neighbour entry deleted,
    INCOMPLETE, FAILED, route gone) the last MAC is kept: a stale gateway MAC still forwards, none does not.
    """

    def __init__(
        self,
        ifname: str,
        on_change: Callable[[str], None],
        *,
        poll_interval: float = 5.0,
        resolve: Callable[[str], str] | None = None,
    ) -> None:
        self.ifname = ifname
        self._on_change = on_change
        self._poll_interval = poll_interval
        self._resolve = resolve or netlink.gateway_mac
        self._current: str | None = None
        self._failing = False
        self._ifindex = 0
        self._wake = asyncio.Event()
        self._sock: netlink.NetlinkEvents | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def current(self) -> str | None:
        return self._current

    async def start(self) -> str:
        """Resolve the gateway MAC (prompting the kernel once if it has no entry), start following it."""
        if self._sock is not None:
            raise RuntimeError(f"gateway watcher for {self.ifname} already started")
        self._ifindex = _ifindex(self.ifname)
        # Subscribed before the first resolution, so a change between the two is not missed.
        self._sock = await _subscribe(self.ifname)
        self._spawn(self._listen(), "listen")
        try:
            mac = await self._first_resolution()
        except BaseException:
            await self.stop()
            raise
        self._current = mac
        events.emit("gateway", interface=self.ifname, mac=mac, result="resolved")
        self._spawn(self._follow(), "follow")
        return mac

    async def stop(self) -> None:
        """Stop following and close the netlink socket. Bounded and idempotent."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=_STOP_TIMEOUT)
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def _spawn(self, coro: Coroutine[Any, Any, None], what: str) -> None:
        task = asyncio.create_task(coro, name=f"gwwatch-{what}-{self.ifname}")
        task.add_done_callback(self._task_done)
        self._tasks.append(task)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("gateway watcher task %s died", task.get_name(), exc_info=task.exception())

    async def _first_resolution(self) -> str:
        try:
            return await self._resolve_once()
        except NetlinkError:
            pass
        await asyncio.to_thread(prompt_resolution, self.ifname)
        deadline = time.monotonic() + START_WINDOW
        while True:
            # The listener wakes us on the neighbour event; the timeout re-reads anyway.
            await self._woken(min(_START_RETRY, max(deadline - time.monotonic(), 0.0)))
            try:
                return await self._resolve_once()
            except NetlinkError as exc:
                if time.monotonic() >= deadline:
                    raise NetlinkError(
                        f"{self.ifname}: gateway MAC not resolved within {START_WINDOW:g} s of prompting the "
                        f"kernel; set node.gateway_mac in the config. Last error: {exc}"
                    ) from exc

    async def _woken(self, timeout: float) -> bool:
        """Wait up to `timeout` for an event; True if one came. Clears the wake-up either way."""
        try:
            async with asyncio.timeout(timeout):  # not wait_for: it can swallow a cancel (Python 3.11)
                await self._wake.wait()
        except TimeoutError:
            return False
        finally:
            self._wake.clear()
        return True

    async def _resolve_once(self) -> str:
        # In a worker thread: pyroute2's sync IPRoute runs its own event loop, which cannot nest in ours.
        try:
            async with asyncio.timeout(_RESOLVE_TIMEOUT):  # not wait_for: it can swallow a cancel (3.11)
                mac = await asyncio.to_thread(self._resolve, self.ifname)
        except NetlinkError:
            raise
        except Exception as exc:  # pyroute2's errors, OSError, a timeout: the watcher must outlive them
            raise NetlinkError(f"resolving the gateway MAC on {self.ifname}: {exc!r}") from exc
        mac = str(mac).lower()
        if not usable_mac(mac):
            raise NetlinkError(f"gateway MAC on {self.ifname} resolved to {mac!r}, not a usable MAC")
        return mac

    async def _follow(self) -> None:
        while True:
            if await self._woken(self._poll_interval):
                await asyncio.sleep(DEBOUNCE)  # let the rest of the burst land: one resolution for it
                self._wake.clear()
            await self._refresh()

    async def _refresh(self) -> None:
        self._ifindex = _ifindex(self.ifname) or self._ifindex
        try:
            mac = await self._resolve_once()
        except NetlinkError as exc:
            if self._failing:  # warned once per failure streak: a flapping entry must not flood the log
                log.debug("gateway MAC on %s still unresolvable: %s", self.ifname, exc)
            else:
                events.emit("gateway", logging.WARNING, interface=self.ifname, result="unresolvable",
                            keeping=self._current, error=exc)
            self._failing = True
            return
        if self._failing:
            events.emit("gateway", interface=self.ifname, result="resolvable again")
            self._failing = False
        if mac != self._current:
            self._report(mac)

    def _report(self, mac: str) -> None:
        try:
            self._on_change(mac)
        except Exception:
            # `current` stays old, so the next event or poll calls on_change again.
            log.exception("gateway MAC on %s: on_change(%s) failed", self.ifname, mac)
            return
        events.emit("gateway", interface=self.ifname, old=self._current, new=mac, result="changed")
        self._current = mac

    async def _listen(self) -> None:
        while True:
            try:
                async for msg in self._events().messages():
                    if is_relevant(msg, self._ifindex, self.ifname):
                        self._wake.set()
            except Exception as exc:  # ENOBUFS (events lost) or a broken socket: pyroute2 advises a new one
                log.debug("gateway watcher %s: netlink events: %r; resubscribing", self.ifname, exc)
                await self._resubscribe()

    def _events(self) -> netlink.NetlinkEvents:
        if self._sock is None:
            raise RuntimeError(f"gateway watcher for {self.ifname} not started")
        return self._sock

    async def _resubscribe(self) -> None:
        await asyncio.sleep(_RESUBSCRIBE_DELAY)
        try:
            new = await _subscribe(self.ifname)
        except NetlinkError as exc:
            # The old socket fails again at once and brings us back here; meanwhile the poll still runs.
            log.warning("gateway watcher %s: %s; retrying", self.ifname, exc)
            await asyncio.sleep(1.0)
            return
        old, self._sock = self._sock, new
        if old is not None:
            old.close()
        self._wake.set()  # whatever was lost is re-read


async def _subscribe(ifname: str) -> netlink.NetlinkEvents:
    """Link, neighbour and IPv4/IPv6 route events: what can change the gateway of `ifname`."""
    return await netlink.NetlinkEvents.open(f"the gateway of {ifname}")
