"""The lean http probe against raw servers on loopback (what it reads, and when it stops reading), and the
pure parser of what a server sent (healthchecks/httpwire.py) as a table."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest

from healthchecks.base import Result, Target
from healthchecks.http import HttpChecker, _Reader
from healthchecks.httpwire import BODY_LIMIT, Answer, parse
from healthchecks.spec import CheckSpec

OK_HEAD = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n"


async def raw_check(spec: CheckSpec, reply: bytes, hold: bool = False) -> tuple[Result, bytes]:
    """One check against a server that reads the request head, sends `reply` and closes (or, `hold`, keeps
    the connection open without sending more). Returns the result and the request the server read."""
    requests: list[bytes] = []
    release = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        requests.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(reply)
        await writer.drain()
        if hold:
            await release.wait()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        result = await HttpChecker(spec).check(Target(ipaddress.ip_address("127.0.0.1"), port))
        release.set()
    return result, requests[0] if requests else b""


def test_the_request_line_and_headers() -> None:
    spec = CheckSpec(kind="http", method="GET", path="/health?x=1", host="svc.example")
    result, request = asyncio.run(raw_check(spec, b"HTTP/1.1 200 OK\r\n\r\n"))
    assert result == Result(ok=True, reason="HTTP 200")
    lines = request.decode().split("\r\n")
    assert lines[0] == "GET /health?x=1 HTTP/1.1"
    assert {"Host: svc.example", "Connection: close", "User-Agent: edge-lb-healthcheck"} <= set(lines)


def test_without_a_body_to_match_the_head_is_enough() -> None:
    # The server sends the head of a 100 kB answer and then nothing: the verdict needs only the status.
    spec = CheckSpec(kind="http", timeout=0.5)
    result, _ = asyncio.run(raw_check(spec, OK_HEAD, hold=True))
    assert result == Result(ok=True, reason="HTTP 200")


def test_a_body_to_match_waits_for_the_body() -> None:
    spec = CheckSpec(kind="http", timeout=0.3, body="ok")
    result, _ = asyncio.run(raw_check(spec, OK_HEAD, hold=True))
    assert result == Result(ok=False, reason="timeout after 0.3s")


def test_a_chunked_body_is_matched_across_chunks() -> None:
    reply = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nall s\r\n9\r\nystems ok\r\n0\r\n\r\n"
    result, _ = asyncio.run(raw_check(CheckSpec(kind="http", body="systems ok"), reply))
    assert result == Result(ok=True, reason="HTTP 200")


@pytest.mark.parametrize(("reply", "reason"), [
    (b"", "HTTP: server disconnected"),
    (b"HTTP/1.1 200 OK\r\nContent-", "HTTP: server disconnected in the head"),
    (b"SSH-2.0-OpenSSH_9.2\r\n\r\n", "HTTP: bad response: status line 'SSH-2.0-OpenSSH_9.2'"),
    (b"HTTP/1.1 200 OK\r\nno colon\r\n\r\nbody", "HTTP: bad response: header line 'no colon'"),
])
def test_what_is_not_an_answer_is_named(reply: bytes, reason: str) -> None:
    result, _ = asyncio.run(raw_check(CheckSpec(kind="http", body="body"), reply))
    assert result == Result(ok=False, reason=reason)


@pytest.mark.parametrize(("reply", "want"), [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nall systems ok",  # the server died mid-answer
     Result(ok=False, reason="HTTP: server disconnected in the body (14 of 100 bytes)")),
    (b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 14\r\n\r\n"
     b"all systems ok", Result(ok=True, reason="HTTP 200")),  # an interim answer first
])
def test_the_verdict_is_the_final_complete_answers(reply: bytes, want: Result) -> None:
    result, _ = asyncio.run(raw_check(CheckSpec(kind="http", body="all systems ok"), reply))
    assert result == want


def _read(reads: list[bytes], spec: CheckSpec) -> tuple[bytes, bool, int]:
    """The reader fed `reads`, then the end of the stream: what it hands to parse() and the most it held."""
    loop = asyncio.new_event_loop()
    try:
        done: asyncio.Future[tuple[bytes, bool]] = loop.create_future()
        reader = _Reader(b"", HttpChecker(spec)._reads_body, done)
        held = 0
        for data in reads:
            reader.data_received(data)
            held = max(held, len(reader._data))
        reader.eof_received()
        return *done.result(), held
    finally:
        loop.close()


def test_the_reader_hands_on_the_same_bytes_however_they_came() -> None:
    """Before: the head plus whatever body came in the same read, so a bad chunk size right after the head
    failed the check in one read and passed it in two."""
    reply = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"
    head = reply.index(b"zz")
    spec = CheckSpec(kind="http")
    assert _read([reply], spec)[:2] == _read([reply[:head], reply[head:]], spec)[:2] == (reply[:head], False)


def test_the_reader_keeps_nothing_past_what_the_verdict_needs() -> None:
    """Before: every read after the verdict's bytes was still appended until the transport closed."""
    head = b"HTTP/1.1 200 OK\r\n\r\n"
    data, ended, held = _read([head] + [b"x" * 65536] * 40, CheckSpec(kind="http", body="ok"))
    assert (len(data), ended) == (len(head) + 2 * BODY_LIMIT, False) and held <= len(data) + 65536


CASES = [
    # (what the server sent, head_only, the answer or why not); the server closed the stream after it
    (b"HTTP/1.1 503 Service Unavailable\r\n\r\n", False, Answer(503, b"")),
    (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA", False, Answer(200, b"ok")),
    (b"HTTP/1.1 200 OK\r\n\r\nto the end", False, Answer(200, b"to the end")),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", True, Answer(200, b"")),  # HEAD: no body
    (b"HTTP/1.1 204 No Content\r\n\r\nx", False, Answer(204, b"")),
    (b"HTTP/1.1 200 OK\r\ntransfer-encoding: Chunked\r\n\r\n3;ext=1\r\nabc\r\n0\r\n\r\n", False,
     Answer(200, b"abc")),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", False, "bad response: chunk size 'zz'"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", False, "bad response: Content-Length '-1'"),
    (b"HTTP/2 200\r\n\r\n", False, "bad response: status line 'HTTP/2 200'"),
    (b"HTTP/1.1 20x OK\r\n\r\n", False, "bad response: status line 'HTTP/1.1 20x OK'"),
    (b"", False, "server disconnected"),
    (b"x" * (BODY_LIMIT + 1), False, f"bad response: head longer than {BODY_LIMIT} bytes"),
    # Found by tests/unit/test_httpwire_fuzz.py; each was taken as an answer (or raised, or hung) before.
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab", False,  # was Answer(200, b"ab")
     "server disconnected in the body (2 of 5 bytes)"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nd", False,  # was "abcd"
     "server disconnected in the body (chunked)"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-100\r\nabc", False,  # looped forever
     "bad response: chunk size '-100'"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x3\r\nabc\r\n0\r\n\r\n", False,  # int(, 16)
     "bad response: chunk size '0x3'"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcXX3\r\ndef\r\n0\r\n\r\n", False,
     "bad response: a chunk of 3 bytes not followed by CRLF"),  # was Answer(200, b"abcdef")
    (b"HTTP/1.1 200 OK\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\nx", False,  # raised ValueError
     f"bad response: Content-Length '{'9' * 40}'"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", False,
     "bad response: Content-Length repeated"),  # was Answer(200, b"ab"): the last one won
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
     False, "bad response: both Transfer-Encoding and Content-Length"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: xchunked\r\n\r\n2\r\nok", False,  # was read as chunked
     Answer(200, b"2\r\nok")),
    (b"HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\nok", False,
     "bad response: header line 'Content-Length : 2'"),
    (b"HTTP/1.1 200 OK\r\nHTTP/1.1 500 Oops\r\n\r\n", True,  # HEAD: the head was not read past line 1
     "bad response: header line 'HTTP/1.1 500 Oops'"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", True, "bad response: Content-Length 'x'"),
    (b"HTTP/1.1 200 OK\nX: 1\r\n\r\n", False, "bad response: status line 'HTTP/1.1 200 OK\\nX: 1'"),
    (b"HTTP/1.x 200 OK\r\n\r\n", False, "bad response: status line 'HTTP/1.x 200 OK'"),
    (b"HTTP/1.8 200 OK\r\n\r\n", False, "bad response: status line 'HTTP/1.8 200 OK'"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2;x=\xec\r\nok\r\n0\r\n\r\n", False,
     "bad response: chunk size '2;x=\xec'"),  # a chunk extension is a token (= a token or a quoted string)
    (b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2 ; x="a b" ;y\r\nok\r\n0\r\n\r\n', False,
     Answer(200, b"ok")),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nT\xbcailer: 1\r\n\r\n", False,
     "bad response: trailer line 'T\xbcailer: 1'"),  # the trailer section was not read
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n", False,  # no end of trailers
     "server disconnected in the body (chunked)"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nT: 1\r\n\r\n", False,
     Answer(200, b"ok")),
    (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 500 Oops\r\n\r\n", False, Answer(500, b"")),  # was 100
    (b"HTTP/1.1 100 Continue\r\nContent-Length: x\r\n\r\nHTTP/1.1 200 OK\r\n\r\n", False,
     "bad response: Content-Length 'x'"),  # an interim head is checked as the final one
    (b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\nHTTP/1.1 200 OK\r\n\r\nok", False,
     Answer(200, b"ok")),  # was 103: a healthy server that sends early hints failed its check
    (b"HTTP/1.1 200 OK\r\nX-Huge: " + b"h" * BODY_LIMIT + b"\r\n\r\n", False,  # accepted in one read
     f"bad response: head longer than {BODY_LIMIT} bytes"),
]


@pytest.mark.parametrize(("data", "head_only", "want"), CASES)
def test_parse(data: bytes, head_only: bool, want: Answer | str) -> None:
    assert parse(data, head_only=head_only) == want


@pytest.mark.parametrize(("data", "want"), [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab", Answer(200, b"ab")),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nd", Answer(200, b"abcd")),
])
def test_a_body_prefix_is_an_answer_when_the_reader_stopped(data: bytes, want: Answer) -> None:
    """ended=False: the reader stopped on its own (it had BODY_LIMIT), the server did not cut it short."""
    assert parse(data, ended=False) == want


def test_parse_keeps_at_most_the_body_limit() -> None:
    body = b"y" * (BODY_LIMIT + 10)
    answer = parse(b"HTTP/1.1 200 OK\r\n\r\n" + body)
    assert isinstance(answer, Answer) and answer.body == body[:BODY_LIMIT]
    chunked = b"".join(b"%x\r\n%s\r\n" % (1000, b"z" * 1000) for _ in range(80)) + b"0\r\n\r\n"
    answer = parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked)
    assert isinstance(answer, Answer) and answer.body == b"z" * BODY_LIMIT
