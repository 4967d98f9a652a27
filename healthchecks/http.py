"""The http and https checks: one HTTP/1.1 request, an accepted status and, optionally, a body substring.

A lean probe over one asyncio transport, no client session: the socket comes from Target.socket() (so its
SO_MARK steers a tunnel check), is connected, wrapped in TLS for https (SNI and verification as the spec
says), and one protocol object collects the answer. Every check opens a fresh connection (`Connection:
close`), so a backend that stopped accepting fails at once instead of being hidden behind a kept-alive
socket. The answer is read only as far as the verdict needs: the head, and the body only when `body` is set
(at most BODY_LIMIT bytes of it, chunked or not). An aiohttp session per spec cost twice the CPU per check
(benchmarks/README.md, supervisor_cpu.py).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable
from typing import cast

from healthchecks import local, reasons
from healthchecks.base import Result, Target
from healthchecks.httpwire import BODY_LIMIT, Answer, final_head, parse
from healthchecks.spec import CheckSpec

USER_AGENT = "edge-lb-healthcheck"
_DEFAULT_PORT = {"http": 80, "https": 443}


class HttpChecker:
    def __init__(self, spec: CheckSpec) -> None:
        if spec.kind not in ("http", "https"):
            raise ValueError(f"HttpChecker cannot run a {spec.kind!r} check")
        self.spec = spec
        self._tls = _tls_context(spec.tls_verify) if spec.kind == "https" else None
        self._accept = frozenset(spec.status)

    async def check(self, target: Target) -> Result:
        try:
            sock = target.socket()
        except OSError as exc:
            return local.failed("socket", exc, target)
        phase = ["connect"]  # where a failure happened: connect, TLS or HTTP
        try:
            async with asyncio.timeout(self.spec.timeout):
                return self._judge(await self._exchange(sock, target, phase))
        except TimeoutError:  # an OSError too: caught first
            where = "connect: " if phase[0] == "connect" else ""
            return Result(ok=False, reason=where + reasons.timeout(self.spec.timeout))
        except OSError as exc:
            return self._failed(phase[0], exc, target)
        except Exception as exc:  # the checker's contract: a failed check, never an exception
            return Result(ok=False, reason=reasons.clip(f"error: {type(exc).__name__}: {exc}"))
        finally:
            sock.close()  # a no-op once the transport closed it

    async def aclose(self) -> None:
        pass  # nothing is kept between checks

    async def _exchange(self, sock: socket.socket, target: Target, phase: list[str]) -> Answer | str:
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, (str(target.address), target.port))
        phase[0] = "TLS" if self._tls is not None else "HTTP"
        done: asyncio.Future[tuple[bytes, bool]] = loop.create_future()
        server_name = (self.spec.host or str(target.address)) if self._tls is not None else None
        transport, _ = await loop.create_connection(
            lambda: _Reader(self._request(target), self._reads_body, done), sock=sock,
            ssl=self._tls, server_hostname=server_name)
        phase[0] = "HTTP"
        try:
            data, ended = await done
            return parse(data, head_only=self.spec.method == "HEAD", ended=ended)
        finally:
            transport.close()

    def _reads_body(self, status: int) -> bool:
        return self.spec.body is not None and status in self._accept

    def _request(self, target: Target) -> bytes:
        spec = self.spec
        host = spec.host or (target.host if target.port == _DEFAULT_PORT[spec.kind]
                             else f"{target.host}:{target.port}")
        return (f"{spec.method} {spec.path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: {USER_AGENT}\r\n"
                "Accept: */*\r\nConnection: close\r\n\r\n").encode("latin-1")

    def _judge(self, answer: Answer | str) -> Result:
        spec = self.spec
        if isinstance(answer, str):
            return Result(ok=False, reason=reasons.clip(f"HTTP: {answer}"))
        if answer.status not in self._accept:
            want = ", ".join(str(s) for s in spec.status)
            return Result(ok=False, reason=f"HTTP {answer.status} (want {want})")
        if spec.body is not None and spec.body.encode() not in answer.body:
            return Result(ok=False, reason=reasons.clip(f"HTTP {answer.status} but body lacks {spec.body!r}"))
        return Result(ok=True, reason=f"HTTP {answer.status}")

    def _failed(self, phase: str, exc: OSError, target: Target) -> Result:
        if phase == "connect":
            return local.failed("connect", exc, target)
        if phase == "TLS":
            return Result(ok=False, reason=reasons.clip(f"TLS: {_tls_text(exc)}"))
        return Result(ok=False, reason=reasons.clip(f"HTTP: {reasons.os_error(exc)}"))


class _Reader(asyncio.Protocol):
    """Sends the request, collects the answer; `done` gets (the bytes, whether the stream ended) once the
    verdict can be made from them (the final head when the body is not needed, else the end or BODY_LIMIT),
    or at the end of the stream. Nothing is kept after that: what it holds is bounded by the server's reads,
    not by how much the server sends."""

    def __init__(self, request: bytes, reads_body: Callable[[int], bool],
                 done: asyncio.Future[tuple[bytes, bool]]) -> None:
        self._request = request
        self._reads_body = reads_body
        self._done = done
        self._data = bytearray()
        self._head_start = 0  # of the final head: interim 1xx heads skipped
        self._head_end = -1

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # cast, not isinstance: uvloop's transports are not subclasses of asyncio's
        cast(asyncio.WriteTransport, transport).write(self._request)

    def data_received(self, data: bytes) -> None:
        if self._done.done():
            return
        searched = len(self._data)
        self._data += data
        if self._head_end < 0:
            self._head_start, self._head_end = final_head(self._data, self._head_start, searched)
            if self._head_end < 0:
                if len(self._data) > BODY_LIMIT:
                    self._finish()  # parse() names the oversized head
                return
            if not self._wants_body(self._head_start):
                self._finish(keep=self._head_end + 4)  # the head only, however the bytes came
                return
        enough = self._head_end + 4 + 2 * BODY_LIMIT  # the head and BODY_LIMIT with room for chunk framing
        if len(self._data) >= enough:
            self._finish(keep=enough)

    def eof_received(self) -> bool:
        self._finish(ended=True)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None and not self._data and not self._done.done():
            self._done.set_exception(exc)
        self._finish(ended=True)

    def _wants_body(self, start: int) -> bool:
        try:
            status = int(self._data[start + 9:start + 12])  # "HTTP/1.1 200": parse() checks the line
        except ValueError:
            return False
        return self._reads_body(status)

    def _finish(self, ended: bool = False, keep: int | None = None) -> None:
        """`keep`: the bytes the verdict reads, so that it does not depend on how the bytes came in reads."""
        if not self._done.done():
            if keep is not None:
                del self._data[keep:]
            self._done.set_result((bytes(self._data), ended))


def _tls_context(verify: bool) -> ssl.SSLContext:
    """Built once per spec: the system CAs and the name checked, or (tls_verify = false) nothing checked."""
    ctx = ssl.create_default_context()
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _tls_text(exc: Exception) -> str:
    """"certificate verify failed: self-signed certificate", "wrong version number", ..."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return exc.reason.lower().replace("_", " ")
    if isinstance(exc, OSError):
        return reasons.os_error(exc)
    return str(exc)
