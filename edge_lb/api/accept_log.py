"""A listener that cannot accept (EMFILE, ENFILE, ENOBUFS, ENOMEM) is logged once a minute, not per try.

asyncio logs "socket.accept() out of system resource" with a traceback through the loop's exception handler
on every failed accept; Python 3.11 goes on trying up to `backlog` (100) times per wake-up and wakes each
listener again a second later, so a node out of file descriptors wrote its log at megabytes a minute. This
handler lets one such line through per EVERY seconds (an event line naming the listener and how many were
left out since), and hands every other context to the handler that was there before.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from edge_lb import events

EVERY = 60.0  # seconds between two lines about failed accepts
_MESSAGE = "socket.accept() out of system resource"

Handler = Callable[[asyncio.AbstractEventLoop, dict[str, Any]], object]


class AcceptErrors:
    """The loop's exception handler while the supervisor runs (install())."""

    def __init__(self, previous: Handler | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.previous = previous
        self.clock = clock
        self.last: float | None = None
        self.left_out = 0  # failed accepts not logged since the last line
        self.total = 0

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("message") != _MESSAGE:
            if self.previous is not None:
                self.previous(loop, context)
            else:
                loop.default_exception_handler(context)
            return
        self.total += 1
        now = self.clock()
        if self.last is not None and now - self.last < EVERY:
            self.left_out += 1
            return
        events.emit("api", logging.WARNING, error=f"accept failed: {context.get('exception')!r}",
                    listener=str(context.get("socket")), not_logged_since_last=self.left_out,
                    next_line_in=f"{EVERY:g}s at the earliest")
        self.last, self.left_out = now, 0


def install(loop: asyncio.AbstractEventLoop) -> AcceptErrors:
    handler = AcceptErrors(loop.get_exception_handler())
    loop.set_exception_handler(handler)
    return handler
