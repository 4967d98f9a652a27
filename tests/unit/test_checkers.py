"""The checkers against real servers on loopback, started inside each test: no root, no network."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import dns.message
import dns.rcode
import pytest
import trustme
from aiohttp import web

from healthchecks import reasons
from healthchecks.base import Checker, Result, Target
from healthchecks.command import ExecChecker
from healthchecks.dns import DnsChecker
from healthchecks.factory import make_checker
from healthchecks.fake import FakeChecker
from healthchecks.http import HttpChecker
from healthchecks.spec import CheckSpec
from healthchecks.tcp import TcpChecker
from healthchecks.tunnel import TunnelChecker

from .tcpcheck import HOWS, first_result

LOCAL = ipaddress.ip_address("127.0.0.1")
LOCAL6 = ipaddress.ip_address("::1")
CA = trustme.CA()  # the test servers' certificates; trusted only where a test says so


@dataclass(frozen=True)
class CountingTarget(Target):
    """A Target that records the sockets it opens: proves a checker gets its sockets from Target.socket()."""

    opened: list[socket.SocketKind] = field(default_factory=list, compare=False)

    def socket(self, kind: socket.SocketKind = socket.SOCK_STREAM) -> socket.socket:
        self.opened.append(kind)
        return super().socket(kind)


def target(port: int, address: str = "127.0.0.1") -> CountingTarget:
    return CountingTarget(ipaddress.ip_address(address), port)


async def run_check(checker: Checker, tgt: Target) -> Result:
    try:
        return await checker.check(tgt)
    finally:
        await checker.aclose()


def check(checker: Checker, tgt: Target) -> Result:
    return asyncio.run(run_check(checker, tgt))


def free_port(kind: socket.SocketKind = socket.SOCK_STREAM) -> int:
    """A port nothing listens on (bound once, then released)."""
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# --- reasons ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "text"),
                         [(1.0, "1s"), (0.5, "0.5s"), (2, "2s"), (0.25, "0.25s"), (10.0, "10s")])
def test_seconds_are_compact(value: float, text: str) -> None:
    assert reasons.seconds(value) == text
    assert reasons.timeout(value) == f"timeout after {text}"


def test_clip_makes_one_short_line() -> None:
    assert reasons.clip("a\nb  c") == "a b c"
    assert len(reasons.clip("x" * 500)) == 160


# --- tcp ----------------------------------------------------------------------------------------------------


# Through the monitor both ways (a prober task with TcpChecker, the batched engine): tests/unit/tcpcheck.py.
DIRECT = CheckSpec(via="direct")


@pytest.mark.parametrize("how", HOWS)
def test_tcp_connected(how: str) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        tgt = target(server.getsockname()[1])
        assert asyncio.run(first_result(how, DIRECT, tgt)) == Result(ok=True, reason="connected")
    assert tgt.opened == [socket.SOCK_STREAM]


@pytest.mark.parametrize("how", HOWS)
def test_tcp_refused(how: str) -> None:
    assert asyncio.run(first_result(how, DIRECT, target(free_port()))) == Result(False, "connect: refused")


@pytest.mark.parametrize("how", HOWS)
def test_tcp_timeout_when_the_accept_queue_is_full(how: str) -> None:
    # Linux drops a SYN while the listener's accept queue is full, so the connect hangs until the timeout.
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(socket.socket())
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        port = server.getsockname()[1]
        for _ in range(3):
            filler = stack.enter_context(socket.socket())
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
        result = asyncio.run(first_result(how, CheckSpec(timeout=0.3, via="direct"), target(port)))
    assert result == Result(ok=False, reason="connect: timeout after 0.3s")


# --- http / https -------------------------------------------------------------------------------------------


@dataclass
class Seen:
    requests: list[tuple[str, str, str]] = field(default_factory=list)  # (method, path, Host header)
    server_names: list[str | None] = field(default_factory=list)  # TLS SNI


SEEN = web.AppKey("seen", Seen)


async def _handle(request: web.Request) -> web.StreamResponse:
    seen = request.app[SEEN]
    seen.requests.append((request.method, request.path, request.headers.get("Host", "")))
    if request.path.startswith("/status/"):
        return web.Response(status=int(request.path.rsplit("/", 1)[1]), text="status page")
    if request.path == "/big":  # the marker lies beyond the 64 KiB the checker reads
        return web.Response(body=b"x" * (70 * 1024) + b"MARKER")
    return web.Response(text="all systems ok")


@contextlib.asynccontextmanager
async def http_server(address: str = "127.0.0.1", tls: ssl.SSLContext | None = None) -> AsyncIterator[
        tuple[int, Seen]]:
    seen = Seen()
    if tls is not None:
        def record_sni(_sock: Any, name: str | None, _ctx: Any) -> None:
            seen.server_names.append(name)
        tls.sni_callback = record_sni
    app = web.Application()
    app[SEEN] = seen
    app.router.add_route("*", "/{tail:.*}", _handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, address, 0, ssl_context=tls)
    await site.start()
    try:
        yield runner.addresses[0][1], seen
    finally:
        await settle()
        await runner.cleanup()


async def settle() -> None:
    """Let the server finish the handshakes a client abandoned (a rejected certificate), or asyncio leaves
    their transports unclosed when the loop ends."""
    others = asyncio.all_tasks() - {asyncio.current_task()}
    if others:
        await asyncio.wait(others, timeout=1)


def http_check(spec: CheckSpec, path_tls: ssl.SSLContext | None = None,
               address: str = "127.0.0.1") -> tuple[Result, Seen, CountingTarget]:
    async def go() -> tuple[Result, Seen, CountingTarget]:
        async with http_server(address, path_tls) as (port, seen):
            tgt = target(port, address)
            return await run_check(HttpChecker(spec), tgt), seen, tgt
    return asyncio.run(go())


def test_http_ok_through_target_socket() -> None:
    result, seen, tgt = http_check(CheckSpec(kind="http", path="/health"))
    assert result == Result(ok=True, reason="HTTP 200")
    assert [r[:2] for r in seen.requests] == [("GET", "/health")]
    assert seen.requests[0][2].startswith("127.0.0.1:")  # no spec.host: the target's address
    assert tgt.opened == [socket.SOCK_STREAM]


def test_http_over_ipv6() -> None:
    try:
        socket.socket(socket.AF_INET6).close()
    except OSError:
        pytest.skip("no IPv6")
    result, _, tgt = http_check(CheckSpec(kind="http"), address="::1")
    assert result == Result(ok=True, reason="HTTP 200")
    assert tgt.opened == [socket.SOCK_STREAM]


def test_http_status_rejected() -> None:
    result, _, _ = http_check(CheckSpec(kind="http", path="/status/503"))
    assert result == Result(ok=False, reason="HTTP 503 (want 200)")
    result, _, _ = http_check(CheckSpec(kind="http", path="/status/404", status=(200, 204)))
    assert result == Result(ok=False, reason="HTTP 404 (want 200, 204)")


def test_http_status_accepted_from_the_list() -> None:
    result, _, _ = http_check(CheckSpec(kind="http", path="/status/503", status=(200, 503)))
    assert result == Result(ok=True, reason="HTTP 503")


def test_http_body_substring() -> None:
    assert http_check(CheckSpec(kind="http", body="systems ok"))[0] == Result(ok=True, reason="HTTP 200")
    result = http_check(CheckSpec(kind="http", body="healthy"))[0]
    assert result == Result(ok=False, reason="HTTP 200 but body lacks 'healthy'")


def test_http_body_is_searched_only_in_the_first_64k() -> None:
    result = http_check(CheckSpec(kind="http", path="/big", body="MARKER"))[0]
    assert result == Result(ok=False, reason="HTTP 200 but body lacks 'MARKER'")


def test_http_host_header_and_method() -> None:
    result, seen, _ = http_check(CheckSpec(kind="http", method="HEAD", path="/x", host="svc.example"))
    assert result == Result(ok=True, reason="HTTP 200")
    assert seen.requests == [("HEAD", "/x", "svc.example")]


def test_http_refused() -> None:
    result = check(HttpChecker(CheckSpec(kind="http")), target(free_port()))
    assert result == Result(ok=False, reason="connect: refused")


def test_http_timeout_when_the_server_never_answers() -> None:
    writers: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        await reader.read()

    async def go() -> Result:
        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        async with server:
            spec = CheckSpec(kind="http", timeout=0.3)
            result = await run_check(HttpChecker(spec), target(server.sockets[0].getsockname()[1]))
            for writer in writers:
                writer.close()
                await writer.wait_closed()
            return result

    assert asyncio.run(go()) == Result(ok=False, reason="timeout after 0.3s")


def test_http_every_check_opens_its_own_marked_connection() -> None:
    # No connection is kept between checks (a backend that stopped accepting must fail at once), and every
    # socket comes from Target.socket(), so a tunnel check's SO_MARK is on each of them.
    async def go() -> None:
        async with http_server() as (port, seen):
            checker, tgt = HttpChecker(CheckSpec(kind="http")), target(port)
            for _ in range(3):
                assert (await checker.check(tgt)).ok
            await checker.aclose()
            assert len(seen.requests) == 3
            assert tgt.opened == [socket.SOCK_STREAM] * 3

    asyncio.run(go())


@pytest.fixture(scope="module")
def server_tls() -> ssl.SSLContext:
    cert = CA.issue_cert("127.0.0.1", "svc.example")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    return ctx


def test_https_verify_fails_for_an_untrusted_ca(server_tls: ssl.SSLContext) -> None:
    result, seen, _ = http_check(CheckSpec(kind="https"), server_tls)
    assert not result.ok
    assert result.reason.startswith("TLS: certificate verify failed: "), result.reason
    assert seen.requests == []


def test_https_without_verify_passes_and_sends_the_server_name(server_tls: ssl.SSLContext) -> None:
    result, seen, _ = http_check(CheckSpec(kind="https", tls_verify=False, host="svc.example"), server_tls)
    assert result == Result(ok=True, reason="HTTP 200")
    assert seen.server_names == ["svc.example"]
    assert seen.requests[0][2] == "svc.example"


def test_https_against_plain_http_is_a_tls_failure() -> None:
    result = http_check(CheckSpec(kind="https", tls_verify=False))[0]
    assert not result.ok
    assert result.reason.startswith("TLS: "), result.reason


def test_https_verifies_the_name_even_with_a_trusted_chain(server_tls: ssl.SSLContext,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # The chain is trusted (the test CA added to what create_default_context loads), the name is not the
    # certificate's: verification (the default) fails on the name, and passes for a name the certificate has.
    ca_ctx = ssl.create_default_context()
    CA.configure_trust(ca_ctx)
    monkeypatch.setattr("healthchecks.http.ssl.create_default_context", lambda: ca_ctx)
    result = http_check(CheckSpec(kind="https", host="other.example"), server_tls)[0]
    assert result.reason.startswith("TLS: certificate verify failed: "), result.reason
    result, seen, _ = http_check(CheckSpec(kind="https", host="svc.example"), server_tls)
    assert result == Result(ok=True, reason="HTTP 200")
    assert seen.server_names == ["svc.example"]


# --- udp-dns ------------------------------------------------------------------------------------------------


class Responder(asyncio.DatagramProtocol):
    """Answers every query with `rcode`, after `mangle` has had a chance to spoil the wire form."""

    def __init__(self, rcode: str, mangle: Callable[[bytes], bytes] = lambda wire: wire) -> None:
        self.rcode = dns.rcode.from_text(rcode)
        self.mangle = mangle
        self.questions: list[str] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        query = dns.message.from_wire(data)
        self.questions.append(query.question[0].to_text())
        response = dns.message.make_response(query)
        response.set_rcode(self.rcode)
        assert self.transport is not None
        self.transport.sendto(self.mangle(response.to_wire()), addr)


def dns_check(spec: CheckSpec, responder: Responder) -> tuple[Result, CountingTarget]:
    async def go() -> tuple[Result, CountingTarget]:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: responder, local_addr=("127.0.0.1", 0))
        try:
            tgt = target(transport.get_extra_info("sockname")[1])
            return await run_check(DnsChecker(spec), tgt), tgt
        finally:
            transport.close()
    return asyncio.run(go())


def test_dns_rcode_matches() -> None:
    responder = Responder("NOERROR")
    result, tgt = dns_check(CheckSpec(kind="udp-dns", query_name="example.org", query_type="A"), responder)
    assert result == Result(ok=True, reason="rcode NOERROR")
    assert responder.questions == ["example.org. IN A"]
    assert tgt.opened == [socket.SOCK_DGRAM]


def test_dns_rcode_mismatch() -> None:
    result, _ = dns_check(CheckSpec(kind="udp-dns"), Responder("SERVFAIL"))
    assert result == Result(ok=False, reason="rcode SERVFAIL (want NOERROR)")


def test_dns_expected_rcode_can_be_an_error() -> None:
    result, _ = dns_check(CheckSpec(kind="udp-dns", rcode="NXDOMAIN"), Responder("NXDOMAIN"))
    assert result == Result(ok=True, reason="rcode NXDOMAIN")


def test_dns_answer_to_another_query_is_rejected() -> None:
    def other_id(wire: bytes) -> bytes:
        return bytes([wire[0] ^ 0xFF]) + wire[1:]

    result, _ = dns_check(CheckSpec(kind="udp-dns"), Responder("NOERROR", other_id))
    assert result == Result(ok=False, reason="bad response: not an answer to the query")


def test_dns_garbage_is_a_bad_response() -> None:
    result, _ = dns_check(CheckSpec(kind="udp-dns"), Responder("NOERROR", lambda _: b"junk"))
    assert not result.ok
    assert result.reason.startswith("bad response: "), result.reason


def test_dns_timeout_when_nobody_answers() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        result = check(DnsChecker(CheckSpec(kind="udp-dns", timeout=0.3)), target(silent.getsockname()[1]))
    assert result == Result(ok=False, reason="timeout after 0.3s")


def test_dns_closed_port_is_refused() -> None:
    result = check(DnsChecker(CheckSpec(kind="udp-dns")), target(free_port(socket.SOCK_DGRAM)))
    assert result == Result(ok=False, reason="udp: refused")


def test_dns_bad_query_type_is_a_config_error() -> None:
    with pytest.raises(ValueError, match="udp-dns"):
        DnsChecker(CheckSpec(kind="udp-dns", query_type="NOPE"))


# --- exec ---------------------------------------------------------------------------------------------------


def sh(script: str, *args: str, timeout: float = 1.0) -> ExecChecker:
    command = ("/bin/sh", "-c", script, "sh", *args)
    return ExecChecker(CheckSpec(kind="exec", timeout=timeout, command=command))


def _dead(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    except FileNotFoundError:
        return True


def gone(pid: int, within: float = 5.0) -> bool:
    """The process stops running within `within` seconds (it may linger as a zombie of a PID 1
    that does not reap). killpg only queues SIGKILL: a busy machine may run the victim later."""
    deadline = time.monotonic() + within
    while not _dead(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_exec_ok_with_last_line_of_stdout() -> None:
    result = check(sh("echo first; echo; echo '  last line  '"), target(80))
    assert result == Result(ok=True, reason="exit 0: last line")


def test_exec_ok_silent() -> None:
    assert check(sh("true"), target(80)) == Result(ok=True, reason="exit 0")


def test_exec_nonzero() -> None:
    assert check(sh("echo backend sad; exit 3"), target(80)) == Result(ok=False, reason="exit 3: backend sad")


def test_exec_killed_by_a_signal() -> None:
    assert check(sh("kill -TERM $$"), target(80)) == Result(ok=False, reason="killed by signal SIGTERM")


def test_exec_placeholders_and_environment() -> None:
    script = ('test "$1" = 127.0.0.1 && test "$2" = "port=8080" '
              '&& test "$EDGE_LB_ADDRESS:$EDGE_LB_PORT" = 127.0.0.1:8080 && test -n "$PATH"')
    assert check(sh(script, "{address}", "port={port}"), target(8080)).ok
    assert not check(sh(script, "{address}", "port={port}"), target(8081)).ok


def test_exec_chatty_program_does_not_block_and_keeps_the_tail() -> None:
    result = check(sh("i=0; while [ $i -lt 2000 ]; do echo line $i of noise; i=$((i+1)); done; echo done"),
                   target(80))
    assert result == Result(ok=True, reason="exit 0: done")


def test_exec_missing_program() -> None:
    checker = ExecChecker(CheckSpec(kind="exec", command=("/nonexistent/probe", "{address}")))
    assert check(checker, target(80)) == Result(ok=False, reason="exec: no such program /nonexistent/probe")


def test_exec_not_executable(tmp_path: Path) -> None:
    script = tmp_path / "probe"
    script.write_text("#!/bin/sh\nexit 0\n")
    checker = ExecChecker(CheckSpec(kind="exec", command=(str(script),)))
    # This node cannot run its own check: a local fault, not the backend's.
    assert check(checker, target(80)) == Result(ok=False, reason=f"exec: permission denied {script}",
                                                local="EACCES")


def test_exec_timeout_kills_the_program_and_what_it_forked(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    script = f"sleep 30 & echo $$ $! > {pids}; wait"
    result = check(sh(script, timeout=0.3), target(80))
    assert result == Result(ok=False, reason="timeout after 0.3s (killed)")
    shell, child = (int(p) for p in pids.read_text().split())
    assert gone(shell)
    assert gone(child)


def test_exec_cancelled_check_kills_the_program(tmp_path: Path) -> None:
    pids = tmp_path / "pids"

    async def go() -> None:
        task = asyncio.create_task(run_check(sh(f"echo $$ > {pids}; exec sleep 30", timeout=5), target(80)))
        for _ in range(100):
            await asyncio.sleep(0.02)
            if pids.exists() and pids.read_text().strip():
                break
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(go())
    assert gone(int(pids.read_text()))


def test_exec_empty_command_is_a_config_error() -> None:
    with pytest.raises(ValueError, match="empty"):
        ExecChecker(CheckSpec(kind="exec"))


# --- factory and fake ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "cls"), [("tcp", TcpChecker), ("http", HttpChecker), ("https", HttpChecker),
                                          ("udp-dns", DnsChecker), ("exec", ExecChecker)])
def test_make_checker_by_kind(kind: str, cls: type) -> None:
    direct = make_checker(CheckSpec(kind=kind, command=("/bin/true",), via="direct"))
    assert isinstance(direct, cls)
    asyncio.run(direct.aclose())
    tunnel = make_checker(CheckSpec(kind=kind, command=("/bin/true",), via="tunnel"))
    assert isinstance(tunnel, TunnelChecker) and isinstance(tunnel.inner, cls)
    asyncio.run(tunnel.aclose())
    default = make_checker(CheckSpec(kind=kind, command=("/bin/true",)))  # exec: direct, the others: tunnel
    assert isinstance(default, cls if kind == "exec" else TunnelChecker)
    asyncio.run(default.aclose())


@pytest.mark.parametrize("kind", ["none", "smtp"])
def test_make_checker_rejects_none_and_unknown(kind: str) -> None:
    with pytest.raises(ValueError, match=kind):
        make_checker(CheckSpec(kind=kind))


def test_fake_checker_scripts_results_and_records_calls() -> None:
    fake = FakeChecker({ipaddress.ip_address("10.0.0.2"): False})
    a, b = Target(ipaddress.ip_address("10.0.0.1"), 80), Target(ipaddress.ip_address("10.0.0.2"), 80)

    async def go() -> list[Result]:
        first = [await fake.check(a), await fake.check(b)]
        fake.set("10.0.0.1", False)
        fake.set(ipaddress.ip_address("10.0.0.2"), True)
        return [*first, await fake.check(a), await fake.check(b)]

    assert [r.ok for r in asyncio.run(go())] == [True, False, False, True]
    assert fake.calls == [a, b, a, b]
    assert fake.calls_for("10.0.0.1") == 2
    asyncio.run(fake.aclose())
    assert fake.closed
