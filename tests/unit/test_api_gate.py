"""The API's door (edge_lb.api.gate) on a real Unix socket and TCP listener: a connection limit that never
queues, idle/slow clients timed out, the counts in status and /metrics; and RLIMIT_NOFILE raised at start."""

from __future__ import annotations

import asyncio
import resource
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from aiohttp import web

from edge_lb.api import gate, sockets
from edge_lb.api.metrics import Metrics
from edge_lb.config import Api
from edge_lb.control import limits
from edge_lb.control.operations import NodeOperations

LIMIT = 4
Wait = asyncio.Event


@pytest.fixture(autouse=True)
def small(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits, "API_UNIX", LIMIT)
    monkeypatch.setattr(limits, "API_TCP", LIMIT)
    monkeypatch.setattr(sockets, "IDLE", 0.5)
    monkeypatch.setattr(gate, "BODY", 0.3)
    monkeypatch.setattr(gate, "WRITE_STALL", 0.3)


@asynccontextmanager
async def server(tmp_path: Path, release: Wait) -> AsyncIterator[tuple[sockets.ControlServer, Path, int]]:
    """Both sites over a supervisor that is still starting, with /slow (waits for `release`) and /big."""
    ops = NodeOperations(str(tmp_path / "none.toml"))
    metrics = Metrics(ops)

    async def slow(request: web.Request) -> web.Response:
        await release.wait()
        return web.json_response({"ok": True})

    async def big(request: web.Request) -> web.Response:
        return web.Response(body=b"x" * (32 << 20))

    def routes(app: web.Application) -> None:
        app.router.add_get("/slow", slow)
        app.router.add_get("/big", big)
        metrics.add_routes(app)

    control = sockets.ControlServer(ops, [routes])
    ops.api = control.connections
    path = tmp_path / "api.sock"
    await control.start(path)
    await control.start_tcp(Api(port=0))
    port = control._servers[-1].sockets[0].getsockname()[1]
    try:
        yield control, path, port
    finally:
        release.set()
        await control.stop()


async def unix_conn(path: Path) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_unix_connection(str(path))


async def until(cond: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.01)


async def closed(reader: asyncio.StreamReader, timeout: float = 5.0) -> bytes:
    """Everything the server sent until it closed the connection."""
    async with asyncio.timeout(timeout):
        return await reader.read()


def run(tmp_path: Path, body: Callable[[sockets.ControlServer, Path, int, Wait], Awaitable[None]]) -> None:
    async def main() -> None:
        release = asyncio.Event()
        async with server(tmp_path, release) as (control, path, port):
            await body(control, path, port, release)
    asyncio.run(main())


def test_an_idle_flood_is_capped_and_the_cli_still_gets_in(tmp_path: Path) -> None:
    async def body(control: sockets.ControlServer, path: Path, port: int, release: Wait) -> None:
        flood = [await unix_conn(path) for _ in range(3 * LIMIT)]
        tcp_flood = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3 * LIMIT)]
        await until(lambda: control.connections()["tcp"]["evicted"] == 2 * LIMIT, "tcp evictions")
        doc = await sockets.status_doc(path, timeout=5)  # a fresh connection displaces an idle one
        assert doc["phase"] == "starting"
        api = doc["api"]  # as GET /node saw it: its own connection in, displacing a 9th idle one
        assert api["unix"] == {"open": LIMIT, "limit": LIMIT, "evicted": 2 * LIMIT + 1, "refused": 0}, api
        assert api["tcp"] == {"open": LIMIT, "limit": LIMIT, "evicted": 2 * LIMIT, "refused": 0}, api
        for _, writer in flood + tcp_flood:
            writer.close()

    run(tmp_path, body)


def test_every_connection_busy_a_new_one_is_answered_503_at_once(tmp_path: Path) -> None:
    async def body(control: sockets.ControlServer, path: Path, port: int, release: Wait) -> None:
        busy = []
        for _ in range(LIMIT):
            reader, writer = await unix_conn(path)
            writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
            busy.append((reader, writer))
        await until(lambda: control.gates["unix"]._idle == {}, "every connection busy")
        reader, writer = await unix_conn(path)
        answer = await closed(reader, timeout=1)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 503"), answer
        assert b"connection limit (4, every one busy)" in answer, answer
        assert control.connections()["unix"]["refused"] == 1
        release.set()
        for reader, writer in busy:
            assert (await reader.readline()).startswith(b"HTTP/1.1 200")
            writer.close()

    run(tmp_path, body)


def test_idle_and_slow_clients_are_timed_out(tmp_path: Path) -> None:
    async def body(control: sockets.ControlServer, path: Path, port: int, release: Wait) -> None:
        silent, silent_w = await unix_conn(path)
        trickle, trickle_w = await unix_conn(path)
        trickle_w.write(b"GET /api/v1/node HTTP/1.1\r\n")
        body_r, body_w = await asyncio.open_connection("127.0.0.1", port)
        body_w.write(b"PUT /api/v1/reload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n")

        async def drip() -> None:
            for _ in range(40):  # a header byte every 0.1 s: the request never completes within IDLE
                await asyncio.sleep(0.1)
                trickle_w.write(b"X")

        dripping = asyncio.create_task(drip())
        assert await closed(silent, timeout=3) == b""
        assert await closed(trickle, timeout=3) == b""
        dripping.cancel()
        assert (await closed(body_r, timeout=3)).startswith(b"HTTP/1.1 408")
        await until(lambda: control.connections()["unix"]["open"] == 0, "unix connections closed")
        for writer in (silent_w, trickle_w, body_w):
            writer.close()

    run(tmp_path, body)


def test_a_client_that_does_not_read_its_answer_is_cut(tmp_path: Path) -> None:
    async def body(control: sockets.ControlServer, path: Path, port: int, release: Wait) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(str(path))
        sock.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            await until(lambda: control.connections()["unix"]["open"] == 1, "the request in")
            await until(lambda: control.connections()["unix"]["open"] == 0, "the stalled reader cut")
        finally:
            sock.close()

    run(tmp_path, body)


def test_metrics_show_the_api_connections(tmp_path: Path) -> None:
    async def body(control: sockets.ControlServer, path: Path, port: int, release: Wait) -> None:
        code, _ = await sockets.request(path, "GET", "/api/v1/node")
        assert code == 200
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        text = (await closed(reader)).decode()
        writer.close()
        assert 'edge_lb_api_connections{site="tcp"} 1.0' in text, text
        assert 'edge_lb_api_connection_limit{site="unix"} 4.0' in text
        assert 'edge_lb_api_connections_evicted_total{site="tcp"} 0.0' in text

    run(tmp_path, body)


def test_the_open_file_limit_is_raised_to_the_hard_one() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lower = min(soft, hard, 512)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lower, hard))
    try:
        assert limits.raise_nofile() == hard
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert limits.api_limit(256, 1024) == 64 and limits.api_limit(256, 65536) == 256
    assert limits.api_limit(64, 32) == 4  # never below 4
