"""Where the operator's interface listens: the REST API (edge_lb.api.rest) with /metrics and the dashboard, on
two sites of the supervisor's event loop.

    /run/edge-lb/<instance>.sock   Unix socket, mode 0660 root: the CLI's way in; file permissions are its
                                   authentication, so mutations need no token here
    [api].listen (127.0.0.1:9100)  TCP: dashboard, metrics and reads for anyone who can reach it; mutations
                                   need the bearer token ([api].token or token_file). On loopback, a Host
                                   header that is a DNS name gets 403 (DNS rebinding from a browser)

Each site holds at most a bounded number of connections and times out idle and slow clients
(edge_lb.api.gate; the numbers: edge_lb.control.limits), so the API never takes the health checks' sockets.
The instance lock (edge_lb.control.instance) keeps a second supervisor off the instance; a live socket is
refused too, and a stale one replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from edge_lb.api import dashboard, rest
from edge_lb.api.gate import IDLE, LINGER, Gate
from edge_lb.config import Api, check_token
from edge_lb.configtools import Invalid
from edge_lb.control import limits
from edge_lb.control.document import ApiSite
from edge_lb.control.operations import Operations
from edge_lb.errors import SupervisorError

Doc = dict[str, Any]
Listen = Callable[[Callable[[], asyncio.Protocol]], Awaitable[asyncio.Server]]


def listening(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
        return True


def read_token(settings: Api) -> str | None:
    """The bearer token from [api]: inline, or the first line of token_file (its newline stripped)."""
    if settings.token_file is None:
        return settings.token
    try:
        token = Path(settings.token_file).read_text().strip()
    except OSError as exc:
        raise SupervisorError(f"api.token_file {settings.token_file}: {exc.strerror or exc}") from exc
    try:
        return check_token(token)
    except Invalid as exc:
        raise SupervisorError(f"api.token_file {settings.token_file}: the token {exc}") from exc


class ControlServer:
    def __init__(self, ops: Operations, extra: list[Callable[[web.Application], None]]) -> None:
        self.ops = ops
        self.extra = [*extra, dashboard.add_routes]
        self._runners: list[web.AppRunner] = []
        self._servers: list[asyncio.Server] = []
        self.gates: dict[str, Gate] = {}  # site ("unix", "tcp") -> its connections
        self.path: Path | None = None

    async def start(self, path: Path) -> None:
        """The Unix socket first: it is also the lock that keeps a second supervisor off the instance."""
        if path.exists():
            if listening(path):
                raise SupervisorError(f"another supervisor is running for this instance (it owns {path}); "
                                      "stop it first")
            path.unlink()
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        app = rest.make_app(self.ops, token=None, require_token=False, extra=self.extra)
        umask = os.umask(0o177)  # born 0600: never reachable by others, not even before the chmod
        try:
            await self._serve(app, Gate("unix", limits.api_limit(limits.API_UNIX)),
                              lambda conn: asyncio.get_running_loop().create_unix_server(conn, str(path)),
                              f"cannot listen on {path}")
        finally:
            os.umask(umask)
        os.chmod(path, 0o660)
        self.path = path

    async def start_tcp(self, settings: Api) -> None:
        if not settings.enabled:
            return
        loopback = ipaddress.ip_address(settings.host).is_loopback
        app = rest.make_app(self.ops, token=read_token(settings), require_token=True, extra=self.extra,
                           literal_hosts_only=loopback)
        listen: Listen = lambda conn: asyncio.get_running_loop().create_server(  # noqa: E731
            conn, settings.host, settings.port, backlog=128)
        await self._serve(app, Gate("tcp", limits.api_limit(limits.API_TCP)), listen,
                          f"cannot listen on {settings.listen} ([api].listen)")

    async def _serve(self, app: web.Application, gate: Gate, listen: Listen, what: str) -> None:
        """The app behind the gate: aiohttp speaks HTTP on each connection the gate admits."""
        app.middlewares.insert(0, gate.middleware)  # outermost: a request is in progress from the start
        runner = web.AppRunner(app, access_log=None, keepalive_timeout=IDLE, lingering_time=LINGER)
        await runner.setup()
        assert runner.server is not None
        gate.make_handler = runner.server
        try:
            server = await listen(gate.protocol)
        except OSError as exc:
            await runner.cleanup()
            raise SupervisorError(f"{what}: {exc.strerror or exc}") from exc
        self._runners.append(runner)
        self._servers.append(server)
        self.gates[gate.site] = gate

    def connections(self) -> dict[str, ApiSite]:
        """Each site's open, limit, evicted and refused connections (status "api", /metrics)."""
        return {site: gate.stats() for site, gate in self.gates.items()}

    async def stop(self) -> None:
        for server in reversed(self._servers):
            server.close()  # no new connections; the runners close the open ones
        self._servers.clear()
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


async def request(path: Path, method: str, url: str, body: Doc | None = None,
                  timeout: float = 60.0) -> tuple[int, Any]:
    """One call to a running supervisor over its Unix socket: (HTTP status, JSON). SupervisorError when none
    answers."""
    if not path.exists():
        raise SupervisorError(f"no supervisor is running for this instance ({path} does not exist); "
                              "start one with `edge-lb run -c FILE`")
    try:
        session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(path)),
                                        timeout=aiohttp.ClientTimeout(total=timeout))
        async with session, session.request(method, f"http://edge-lb{url}", json=body) as resp:
            try:
                return resp.status, await resp.json(content_type=None)
            except ValueError:
                return resp.status, {"error": (await resp.text())[:500]}
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise SupervisorError(f"the supervisor at {path} did not answer {method} {url}: {exc}") from exc


async def status_doc(path: Path, timeout: float = 60.0) -> Doc:
    """The node and its VIPs in one document (what `edge-lb status` renders)."""
    code, node = await request(path, "GET", f"{rest.PREFIX}/node", timeout=timeout)
    if code != 200:
        raise SupervisorError(f"GET {rest.PREFIX}/node: HTTP {code}: {node}")
    code, vips = await request(path, "GET", f"{rest.PREFIX}/vips", timeout=timeout)
    if code != 200:
        raise SupervisorError(f"GET {rest.PREFIX}/vips: HTTP {code}: {vips}")
    return {**node, "vips": vips}
