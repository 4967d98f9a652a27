"""Is ExaBGP alive: judged from its answers on the API channel, so a wedged ExaBGP (stopped, deadlocked, stuck
in a loop) is noticed, shown, and restarted, rather than looking announced while routers drop its sessions.

    liveness = Liveness(channel, kill=speaker_kill)
    task = asyncio.create_task(liveness.run())   # probes an idle ExaBGP, judges the command in flight
    liveness.status(pid)                         # {"state": "up", "pid": 1234, "restarts": 0, ...}

ExaBGP answers every command with "done" or "error" in ~3 ms. When nothing was asked for PROBE_INTERVAL, a
"version" command is sent (read-only; ExaBGP answers "exabgp 5.0.15" and "done"). A command or probe left
unanswered for WEDGED_AFTER seconds (the smallest hold time: by then the routers drop its sessions anyway)
makes ExaBGP "wedged": kill() SIGKILLs it, and the speaker's supervision restarts it with backoff and has
the supervisor announce everything again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Literal

from edge_lb import events
from edge_lb.bgp.exabgp_api import ApiChannel
from edge_lb.control.document import SpeakerStatus
from edge_lb.errors import BgpError

PROBE = "version"
PROBE_INTERVAL = 1.0  # s without an answer before an idle ExaBGP is asked
WEDGED_AFTER = 3.0  # s a command may wait for its answer
State = Literal["starting", "up", "wedged", "restarting", "stopped"]


class Liveness:
    """The speaker's liveness: its state, restarts and the age of ExaBGP's last answer."""

    def __init__(self, channel: ApiChannel, kill: Callable[[], None], *, interval: float = PROBE_INTERVAL,
                 wedged_after: float = WEDGED_AFTER, clock: Callable[[], float] = time.monotonic) -> None:
        self.channel = channel
        self.kill = kill
        self.interval = interval
        self.wedged_after = wedged_after
        self.clock = clock
        self.state: State = "starting"
        self.reason: str | None = None
        self.restarts = 0
        self._probes: set[asyncio.Task[None]] = set()

    def connected(self) -> None:
        """ExaBGP's bridge connected: it runs and answers."""
        self.state, self.reason = "up", None

    def died(self, code: int | None) -> None:
        """ExaBGP exited (killed by us when wedged, or on its own): a restart follows."""
        self.restarts += 1
        if self.state != "wedged":
            self.state, self.reason = "restarting", f"exited with code {code}"

    def stopped(self) -> None:
        self.state, self.reason = "stopped", None
        for task in self._probes:
            task.cancel()

    async def run(self) -> None:
        """Until cancelled: probe an idle ExaBGP, and kill one that does not answer within wedged_after."""
        step = min(self.interval, self.wedged_after) / 2
        while True:
            began = self.clock()
            await asyncio.sleep(step)
            if self.clock() - began > step + self.wedged_after / 2:
                # This process stalled, not ExaBGP: its answer may sit unread in our socket. Judge on the
                # next step, once the reads have run (it would kill a healthy ExaBGP and reset every session).
                continue
            self.look()

    def look(self) -> None:
        if self.state != "up" or not self.channel.connected.is_set():
            return
        now = self.clock()
        waited = self.channel.unanswered_for(now)
        if waited > self.wedged_after:
            self.state = "wedged"
            self.reason = f"no answer to a command within {self.wedged_after:g} s"
            self.channel.reset_peers("unknown")
            events.emit("exabgp", logging.ERROR, phase="wedged", waited=f"{waited:.1f}s",
                        action="killed, to be restarted")
            self.kill()
            return
        last = self.channel.answered_at
        if not self.channel.busy() and (last is None or now - last >= self.interval) and not self._probes:
            task = asyncio.create_task(self._probe(), name="exabgp probe")
            self._probes.add(task)
            task.add_done_callback(self._probes.discard)

    async def _probe(self) -> None:
        with contextlib.suppress(BgpError):  # judged by look(), from the command's age
            await self.channel.send(PROBE)

    def status(self, pid: int | None) -> SpeakerStatus:
        last = self.channel.answered_at
        return {"state": self.state, "pid": pid, "restarts": self.restarts, "reason": self.reason,
                "last_answer": None if last is None else round(max(self.clock() - last, 0.0), 3)}
