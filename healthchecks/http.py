"""The http and https checks: one request, an accepted status and, optionally, a substring of the body.

Every check opens a fresh connection (force_close), so a backend that stopped accepting fails at once instead
of being hidden behind a kept-alive socket. aiohttp opens that socket through our socket_factory, which takes
it from the Target being checked: a ContextVar carries the target from check() down into the connector,
because one session serves every target of the spec and the factory is only told the addrinfo.
"""

from __future__ import annotations

import errno
import socket
import ssl
from contextvars import ContextVar

import aiohttp
from aiohappyeyeballs import AddrInfoType

from healthchecks import local, reasons
from healthchecks.base import Result, Target
from healthchecks.spec import CheckSpec

BODY_LIMIT = 64 * 1024  # bytes of the body searched for spec.body
USER_AGENT = "edge-lb-healthcheck"

_target: ContextVar[Target | None] = ContextVar("edge_lb_http_check_target", default=None)


def _target_socket(addr_info: AddrInfoType) -> socket.socket:
    """aiohttp's socket_factory: the socket comes from the Target, so its SO_MARK applies."""
    family, kind = addr_info[0], addr_info[1]
    target = _target.get()
    # Never fall back to a plain socket: an unmarked check would bypass the tunnel and test the wrong path.
    if target is None or family != target.family:
        raise OSError(errno.EINVAL, "socket not opened by a check")
    return target.socket(socket.SocketKind(kind))


class HttpChecker:
    def __init__(self, spec: CheckSpec) -> None:
        if spec.kind not in ("http", "https"):
            raise ValueError(f"HttpChecker cannot run a {spec.kind!r} check")
        self.spec = spec
        self._session: aiohttp.ClientSession | None = None

    async def check(self, target: Target) -> Result:
        token = _target.set(target)
        try:
            return await self._request(target)
        except TimeoutError as exc:
            where = "connect: " if isinstance(exc, aiohttp.ConnectionTimeoutError) else ""
            return Result(ok=False, reason=where + reasons.timeout(self.spec.timeout))
        except aiohttp.ClientError as exc:
            return _client_error(exc, target)
        except Exception as exc:  # the checker's contract: a failed check, never an exception
            return Result(ok=False, reason=reasons.clip(f"error: {type(exc).__name__}: {exc}"))
        finally:
            _target.reset(token)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _request(self, target: Target) -> Result:
        spec = self.spec
        url = f"{spec.kind}://{target.host}:{target.port}{spec.path}"
        headers = {"Host": spec.host} if spec.host else {}
        server_name = spec.host if spec.kind == "https" else None
        session = self._get_session()
        # ssl only matters for https URLs: True verifies with the system CAs, False skips verification.
        async with session.request(spec.method, url, headers=headers, allow_redirects=False,
                                   ssl=spec.tls_verify, server_hostname=server_name) as resp:
            if resp.status not in spec.status:
                want = ", ".join(str(s) for s in spec.status)
                return Result(ok=False, reason=f"HTTP {resp.status} (want {want})")
            if spec.body is not None and spec.body.encode() not in await _read_prefix(resp, BODY_LIMIT):
                lacks = f"HTTP {resp.status} but body lacks {spec.body!r}"
                return Result(ok=False, reason=reasons.clip(lacks))
            return Result(ok=True, reason=f"HTTP {resp.status}")

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            # limit=0: checks are already one per target at a time; a cap would turn a big pool into
            # false timeouts while checks queue for a connection slot.
            connector = aiohttp.TCPConnector(force_close=True, limit=0, socket_factory=_target_socket)
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=self.spec.timeout),
                cookie_jar=aiohttp.DummyCookieJar(),  # each check stands alone
                headers={"User-Agent": USER_AGENT},
            )
        return self._session


async def _read_prefix(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """Up to `limit` bytes of the body: a huge page must not cost the checker memory or time."""
    data = bytearray()
    while len(data) < limit:
        chunk = await resp.content.read(limit - len(data))
        if not chunk:
            break
        data += chunk
    return bytes(data)


def _client_error(exc: aiohttp.ClientError, target: Target) -> Result:
    if isinstance(exc, aiohttp.ClientConnectorError) and not isinstance(
            exc, aiohttp.ClientConnectorCertificateError | aiohttp.ClientConnectorSSLError):
        return local.failed("connect", exc.os_error, target)  # our socket factory's EMFILE lands here too
    return Result(ok=False, reason=_client_text(exc))


def _client_text(exc: aiohttp.ClientError) -> str:
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return reasons.clip(f"TLS: {_tls_text(exc.certificate_error)}")
    if isinstance(exc, aiohttp.ClientConnectorSSLError):
        return reasons.clip(f"TLS: {_tls_text(exc.os_error)}")
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "HTTP: server disconnected"
    if isinstance(exc, aiohttp.ClientResponseError):
        return reasons.clip(f"HTTP: bad response: {exc.message}")
    if isinstance(exc, aiohttp.ClientPayloadError):
        return reasons.clip(f"HTTP: bad body: {exc}")
    return reasons.clip(f"HTTP: {exc}")


def _tls_text(exc: Exception) -> str:
    """"certificate verify failed: self-signed certificate", "wrong version number", ..."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return exc.reason.lower().replace("_", " ")
    return str(exc)
