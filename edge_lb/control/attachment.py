"""Is our XDP program still the one on the interface? One watcher, every 0.5 s, with or without [bgp].

A program detached or replaced from outside is reported (log, status, /metrics) and BGP is poked to withdraw
at once. It is not put back: whoever removed it may have meant it; `edge-lb run` again attaches it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from edge_lb import events, netlink

_POLL = 0.5  # seconds between looks at the interface's XDP program


class Attachment:
    def __init__(self, interface: str) -> None:
        self.interface = interface
        self.prog_id: int | None = None  # what startup attached; None before
        self.on_interface = False  # ...and it is still the one on the interface, as last looked

    @property
    def attached(self) -> bool:
        """Startup attached the program (it may have been removed since: see on_interface)."""
        return self.prog_id is not None

    async def record(self) -> None:
        """Startup has just attached the program: remember which one it is."""
        self.prog_id = await asyncio.to_thread(netlink.xdp_prog_id, self.interface)
        self.on_interface = self.prog_id is not None

    async def look(self) -> bool:
        """Our program is the one on the interface now (not detached or replaced behind our back)."""
        now = await asyncio.to_thread(netlink.xdp_prog_id, self.interface)
        return now is not None and now == self.prog_id

    async def run(self, on_change: Callable[[], None]) -> None:
        """Until cancelled; on_change() on every flip (BGP re-evaluates at once: the attachment is part of
        the announce policy). When it cannot tell (interface gone?) it keeps the last answer, says so once."""
        error = ""
        while True:
            await asyncio.sleep(_POLL)
            try:
                now = await self.look()
            except Exception as exc:
                if repr(exc) != error:
                    error = repr(exc)
                    events.emit("dataplane", logging.WARNING, check="attachment", error=exc)
                continue
            error = ""
            if now != self.on_interface:
                self.on_interface = now
                events.emit("dataplane", logging.INFO if now else logging.WARNING, check="attachment",
                            attached=now, interface=self.interface)
                on_change()

    async def final_look(self, bound: float) -> bool:
        """The attachment now, not as last polled; the last poll if it cannot tell within `bound` seconds."""
        try:
            async with asyncio.timeout(bound):
                return await self.look()
        except Exception:
            return self.on_interface
