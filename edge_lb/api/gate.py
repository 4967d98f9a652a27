"""Each API site's door: a connection limit and timeouts, so clients can never take the sockets the health
checks need (edge_lb.control.limits has the arithmetic) nor hold the API with connections that do nothing.

    limit        at most `limit` connections per site. A new one over it closes the site's longest-idle
                 connection (no request in progress) to make room; when every one is busy it is answered
                 503 and closed at once. Nothing waits in a queue, so a flood of idle connections from any
                 local user neither grows the supervisor's open files nor keeps the CLI out.
    IDLE         seconds a connection may sit without a complete request: before its first one, between
                 keep-alive requests, and while its request line and headers trickle in (aiohttp's
                 keepalive_timeout, which runs from the connection's start and from each response's end)
    BODY         seconds for a request's body to arrive, once its headers have (408 after, and the
                 connection closed LINGER seconds later)
    WRITE_STALL  seconds a response may wait on a client that does not read it; then the connection is cut

The site's open, limit, evicted and refused counts are in status (`api`) and /metrics. Reaching the limit is
logged once, then at most once a minute with the counts: a flood does not flood the log.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable

from aiohttp import web

from edge_lb import events
from edge_lb.control.document import ApiSite

IDLE = 15.0
BODY = 10.0
WRITE_STALL = 10.0
LINGER = 1.0  # seconds aiohttp reads a body no one read before it closes (its default: 10)
LOG_EVERY = 60.0  # seconds between two "at its connection limit" lines of one site

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Gate:
    """One site's connections. `protocol` is the site's asyncio protocol factory; `make_handler` (the aiohttp
    server) builds the HTTP protocol of each admitted connection."""

    def __init__(self, site: str, limit: int) -> None:
        self.site = site
        self.limit = limit
        self.make_handler: Callable[[], asyncio.Protocol] | None = None
        self.evicted = 0
        self.refused = 0
        self._open: dict[asyncio.BaseTransport, _Conn] = {}
        self._idle: OrderedDict[_Conn, None] = OrderedDict()  # no request in progress, longest-idle first
        self._next_log = 0.0

    def protocol(self) -> asyncio.Protocol:
        return _Conn(self)

    def stats(self) -> ApiSite:
        return {"open": len(self._open), "limit": self.limit, "evicted": self.evicted,
                "refused": self.refused}

    def admit(self, conn: _Conn, transport: asyncio.BaseTransport) -> bool:
        if len(self._open) >= self.limit:
            if not self._idle:
                self.refused += 1
                self._at_limit()
                return False
            victim, _ = self._idle.popitem(last=False)
            self._forget(victim)
            victim.close()
            self.evicted += 1
            self._at_limit()
        self._open[transport] = conn
        self._idle[conn] = None
        return True

    def _forget(self, conn: _Conn) -> None:
        self._idle.pop(conn, None)
        if conn.transport is not None:
            self._open.pop(conn.transport, None)

    def _at_limit(self) -> None:
        now = time.monotonic()
        if now >= self._next_log:
            self._next_log = now + LOG_EVERY
            events.emit("api", logging.WARNING, site=self.site, result="at its connection limit",
                        limit=self.limit, evicted_total=self.evicted, refused_total=self.refused,
                        next_report=f"in {LOG_EVERY:g} s at the most")

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Marks the connection busy while its request runs, and bounds the wait for the request's body."""
        conn = self._open.get(request.transport) if request.transport is not None else None
        if conn is not None:
            conn.requests += 1
            self._idle.pop(conn, None)
        try:
            if request.can_read_body:
                try:
                    async with asyncio.timeout(BODY):
                        await request.read()  # kept by aiohttp: the handler's request.json() reads it again
                except TimeoutError:
                    response = web.json_response({"error": f"the body took over {BODY:g} s"}, status=408)
                    response.force_close()  # closed after the answer (and LINGER)
                    return response
            return await handler(request)
        finally:
            if conn is not None:
                conn.requests -= 1
                if conn.requests == 0 and conn.transport in self._open:
                    self._idle[conn] = None  # the most recently idle: evicted last


def _refusal(limit: int) -> bytes:
    body = json.dumps({"error": f"the API is at its connection limit ({limit}, every one busy): "
                                "try again"}).encode()
    return (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)


class _Conn(asyncio.Protocol):
    """One connection: admitted by the gate (then aiohttp's protocol does the HTTP, through this), or
    answered 503 and closed at once."""

    def __init__(self, gate: Gate) -> None:
        self.gate = gate
        self.transport: asyncio.BaseTransport | None = None
        self.handler: asyncio.Protocol | None = None
        self.requests = 0
        self._stall: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        if not self.gate.admit(self, transport):
            assert isinstance(transport, asyncio.WriteTransport)
            transport.write(_refusal(self.gate.limit))
            transport.close()
            return
        assert self.gate.make_handler is not None
        self.handler = self.gate.make_handler()
        self.handler.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.handler is not None:
            self.handler.data_received(data)

    def eof_received(self) -> bool | None:
        return self.handler.eof_received() if self.handler is not None else None

    def connection_lost(self, exc: Exception | None) -> None:
        self._unstall()
        self.gate._forget(self)
        if self.handler is not None:
            self.handler.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._stall is None and self.transport is not None:
            self._stall = asyncio.get_running_loop().call_later(WRITE_STALL, self._cut)
        if self.handler is not None:
            self.handler.pause_writing()

    def resume_writing(self) -> None:
        self._unstall()
        if self.handler is not None:
            self.handler.resume_writing()

    def close(self) -> None:
        if self.transport is not None:
            # abort, not close: close() keeps the socket open until unsent data drains, which a client that
            # stops reading holds off for ever, while the gate no longer counts it. Evicted connections are
            # idle (no request in flight): nothing of value is dropped.
            if isinstance(self.transport, asyncio.Transport):
                self.transport.abort()
            else:
                self.transport.close()

    def _unstall(self) -> None:
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None

    def _cut(self) -> None:
        self._stall = None
        if isinstance(self.transport, asyncio.WriteTransport):
            self.transport.abort()  # the client stopped reading: what is left unsent is dropped
