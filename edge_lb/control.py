"""The supervisor's control socket: a small HTTP API on a Unix socket, used by `edge-lb status|reload`.

    GET  /v1/status   -> the status document (edge_lb.status)
    POST /v1/reload   -> {"ok": true, "changes": {...}} or 400 {"ok": false, "problems": [...]}

A Unix socket (mode 0660, root) rather than TCP: only local administrators may reload the balancer.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from edge_lb.errors import SupervisorError

RUN_DIR = Path("/run/edge-lb")
Doc = dict[str, Any]


def socket_path(instance: str) -> Path:
    return RUN_DIR / f"{instance}.sock"


def _listening(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
        return True


class ControlServer:
    def __init__(self, status: Callable[[], Doc], reload: Callable[[], Awaitable[Doc]]) -> None:
        self._status = status
        self._reload = reload
        self._runner: web.AppRunner | None = None
        self.path: Path | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/status", self._get_status)
        app.router.add_post("/v1/reload", self._post_reload)
        return app

    async def start(self, path: Path) -> None:
        """Listen on path; refuse when a live supervisor already owns it, replace a stale one."""
        if path.exists():
            if _listening(path):
                raise SupervisorError(f"another supervisor is running for this instance (it owns {path}); "
                                      "stop it first")
            path.unlink()
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        runner = web.AppRunner(self.app(), access_log=None)
        await runner.setup()
        try:
            await web.UnixSite(runner, str(path)).start()
        except OSError as exc:
            await runner.cleanup()
            raise SupervisorError(f"cannot listen on {path}: {exc}") from exc
        os.chmod(path, 0o660)
        self._runner, self.path = runner, path

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    async def _get_status(self, request: web.Request) -> web.Response:
        return web.json_response(self._status())

    async def _post_reload(self, request: web.Request) -> web.Response:
        result = await self._reload()
        return web.json_response(result, status=200 if result.get("ok") else 400)


async def request(path: Path, method: str, url: str, timeout: float = 60.0) -> Doc:
    """One call to a running supervisor; SupervisorError when none answers."""
    if not path.exists():
        raise SupervisorError(f"no supervisor is running for this instance ({path} does not exist); "
                              "start one with `edge-lb run -c FILE`")
    try:
        session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(path)),
                                        timeout=aiohttp.ClientTimeout(total=timeout))
        async with session, session.request(method, f"http://edge-lb{url}") as resp:
            doc: Doc = await resp.json()
            return doc
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise SupervisorError(f"the supervisor at {path} did not answer {method} {url}: {exc}") from exc
