"""Fuzz the http check's reading of an answer (healthchecks/httpwire.py, the reader in healthchecks/http.py):
seeded valid responses, mutations of them and random bytes, each fed to the reader whole and split into
pieces, judged as the checker judges. Properties, on every input:

- parse() returns an Answer or a reason, never raises, and returns (a hang is caught by an alarm);
- a verdict "ok" only for what aiohttp's parser (llhttp, an independent implementation) reads as a valid
  response with an accepted status, whose body (as far as BODY_LIMIT) holds the text asked for;
- a valid response (generated, not mutated) gets its own status and body;
- the verdict does not depend on how the bytes were split into reads;
- the reader holds at most what the verdict needs (its cap), whatever the server sends.

EDGE_LB_FUZZ_SEED and EDGE_LB_FUZZ_HTTP override the seed and the number of inputs."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_parser import HttpResponseParser

from healthchecks.base import Result
from healthchecks.http import HttpChecker, _Reader
from healthchecks.httpwire import BODY_LIMIT, Answer, parse
from healthchecks.spec import CheckSpec

SEED = int(os.environ.get("EDGE_LB_FUZZ_SEED", "13"))
INPUTS = int(os.environ.get("EDGE_LB_FUZZ_HTTP", "3000"))
NEEDLE = b"all systems ok"
CAP = 2 * BODY_LIMIT  # body bytes the reader takes past the head at most (healthchecks/http.py)
LOOP = asyncio.new_event_loop()  # only to make futures and parsers: never run


# --- the independent model: aiohttp's llhttp ----------------------------------------------------------------

class _Protocol:
    """What aiohttp's parser and its payload streams call on the connection's protocol."""

    _reading_paused = False
    transport = None

    def pause_reading(self, *args: object, **kwargs: object) -> None:
        pass

    def resume_reading(self, *args: object, **kwargs: object) -> None:
        pass


def _llhttp(data: bytes, with_body: bool, ended: bool) -> tuple[int | None, bytes, bool, bool]:
    """(final status, body, body complete, refused) as llhttp reads `data` (then the end of the stream).
    Fed in 1 KiB pieces; the piece it refuses again byte by byte, so what it read before is kept."""
    _, final, refused_at = _feed(data, with_body, ended, None)
    if refused_at is not None:
        _, final, refused_at = _feed(data, with_body, ended, refused_at)
    if final is None:
        return None, b"", False, True
    msg, payload = final
    body = b"".join(payload._buffer) if hasattr(payload, "_buffer") else b""
    return msg.code, body, payload.is_eof() and payload.exception() is None, refused_at is not None


def _feed(data: bytes, with_body: bool, ended: bool, slow_at: int | None) -> tuple[Any, Any, int | None]:
    parser = HttpResponseParser(_Protocol(), LOOP, 2**16, max_line_size=1 << 20, max_field_size=1 << 20,
                                max_headers=1 << 16, response_with_body=with_body, read_until_eof=True,
                                auto_decompress=False)
    cuts = list(range(0, len(data), 1024))
    if slow_at is not None:
        cuts = sorted(set(cuts) | set(range(slow_at, min(slow_at + 1024, len(data)))))
    final: Any = None
    for at, next_at in zip(cuts, [*cuts[1:], len(data)], strict=True):
        try:
            messages, _, _ = parser.feed_data(data[at:next_at])
        except HttpProcessingError:  # llhttp's refusal (any other error is the test's)
            return parser, final, at
        interim = [m for m in messages if 100 <= m[0].code < 200 and m[0].code != 101]
        final = final or next((m for m in messages if m not in interim), None)
    try:
        if ended:
            parser.feed_eof()
    except HttpProcessingError:
        return parser, final, len(data)
    return parser, final, None


def llhttp_head(data: bytes) -> int | None:
    """The final status llhttp reads in the heads at the start of `data` (the body not looked at)."""
    at = data.find(b"\r\n\r\n")
    while 0 <= at <= BODY_LIMIT:
        status, _, _, refused = _llhttp(data[:at + 4], False, False)
        if status is not None:
            return None if refused else status
        at = data.find(b"\r\n\r\n", at + 4)
    return None


def model_ok(data: bytes, ended: bool, spec: CheckSpec) -> bool:
    """What llhttp allows: may a check with `spec` be ok on these bytes (cut here by the reader or not)?"""
    if spec.body is None or spec.method == "HEAD":
        return llhttp_head(data) in spec.status
    status, body, complete, _ = _llhttp(data, True, ended)  # refused after the message: not its bytes
    if status not in spec.status or spec.body.encode() not in body[:BODY_LIMIT]:
        return False
    return complete or not ended or len(body) >= BODY_LIMIT


# --- the reader and the checker's verdict -------------------------------------------------------------------

class _Transport:
    def write(self, data: bytes) -> None:
        pass


def read(checker: HttpChecker, pieces: list[bytes]) -> tuple[bytes, bool, int]:
    """What the reader hands to parse() when the server sends `pieces` then closes: (bytes, ended, the
    most it held)."""
    done: asyncio.Future[tuple[bytes, bool]] = LOOP.create_future()
    reader = _Reader(b"", checker._reads_body, done)
    reader.connection_made(_Transport())  # type: ignore[arg-type]
    held = 0
    for piece in pieces:
        reader.data_received(piece)
        held = max(held, len(reader._data))
    reader.eof_received()
    data, ended = done.result()
    return data, ended, held


def verdict(checker: HttpChecker, data: bytes, ended: bool) -> Result:
    answer = parse(data, head_only=checker.spec.method == "HEAD", ended=ended)
    assert isinstance(answer, Answer | str), answer
    return checker._judge(answer)


@contextlib.contextmanager
def _alarm(data: bytes) -> Iterator[None]:
    def hung(*_: object) -> None:
        raise AssertionError("still reading after 10 s: parse() hangs")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(10)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def splits(rng: random.Random, data: bytes) -> Iterator[list[bytes]]:
    """The bytes as reads: whole, in two at every byte (short inputs) or at 12 places, in random pieces."""
    yield [data]
    cuts = range(1, len(data)) if len(data) <= 300 else rng.sample(range(1, len(data)), 12)
    for at in cuts:
        yield [data[:at], data[at:]]
    at, pieces = 0, []
    while at < len(data):
        step = rng.choice([1, 2, 7, 100, 4096, 65536])
        pieces.append(data[at:at + step])
        at += step
    yield pieces


# --- inputs -------------------------------------------------------------------------------------------------

def body_of(rng: random.Random) -> bytes:
    size = rng.choice([0, 1, 14, 100, 1000, 5000, BODY_LIMIT - 5, BODY_LIMIT + 3000, 2 * BODY_LIMIT + 100])
    text = bytes(rng.choice(b"abcdefgh \n") for _ in range(min(size, 200))) * (size // 200 + 1)
    body = text[:size]
    if rng.random() < 0.6 and size >= len(NEEDLE):
        at = rng.randrange(size - len(NEEDLE) + 1)
        body = body[:at] + NEEDLE + body[at + len(NEEDLE):]
    return body


def chunked(rng: random.Random, body: bytes) -> bytes:
    out, at = [], 0
    while at < len(body):
        size = rng.choice([1, 5, 100, 4000, 70000])
        ext = rng.choice([b"", b"", b";x=1", b" ;name"])
        out.append(b"%x%s\r\n%s\r\n" % (len(body[at:at + size]), ext, body[at:at + size]))
        at += size
    out.append(b"0\r\n" + rng.choice([b"", b"Trailer-Field: 1\r\n"]) + b"\r\n")
    return b"".join(out)


def valid(rng: random.Random) -> tuple[bytes, int, bytes]:
    """(a valid response, its final status, its body)."""
    status = rng.choice([200, 200, 200, 204, 301, 404, 500, 503])
    body = b"" if status == 204 else body_of(rng)
    headers = [b"Server: fuzz", b"Date: Mon, 30 Nov 2026 10:00:00 GMT"]
    headers += [b"X-Pad-%d: %s" % (i, b"v" * rng.choice([1, 80, 4000]))
                for i in range(rng.choice([0, 0, 1, 5, 14]))]
    framing = rng.choice(["length", "chunked", "eof"])
    if framing == "length" and status != 204:
        headers.append(b"Content-Length: %d" % len(body))
        payload = body
    elif framing == "chunked" and status != 204:
        headers.append(b"Transfer-Encoding: " + rng.choice([b"chunked", b"gzip, chunked", b"Chunked"]))
        payload = chunked(rng, body)
    else:
        payload = body
    rng.shuffle(headers)
    interim = rng.choice([b"", b"", b"", b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 103 Early Hints\r\n"
                          b"Link: </s.css>; rel=preload\r\n\r\n"])
    reason = rng.choice([b" OK", b" Whatever it is", b"", b" ", b" caf\xe9"])
    head = b"HTTP/1.%d %d%s\r\n" % (rng.choice([0, 1]), status, reason)
    head += b"".join(h + b"\r\n" for h in headers)
    return interim + head + b"\r\n" + payload, status, body


MUTATIONS = [
    lambda rng, b: b[:rng.randrange(len(b) + 1)],  # cut
    lambda rng, b: _flip(rng, b, len(b)),  # a byte anywhere
    lambda rng, b: _flip(rng, b, 200),  # a byte in the head
    lambda rng, b: b.replace(b"\r\n", b"\n", rng.choice([1, 2, -1])),  # LF for CRLF
    lambda rng, b: b.replace(b"\r\n", b"\r\nHTTP/1.1 500 Oops\r\n", 1),  # two status lines
    lambda rng, b: b"HTTP/1.1 500 Oops\r\n\r\n" * rng.choice([0, 1]) + b"HTTP/1.1 100 Continue\r\n\r\n" + b,
    lambda rng, b: b.replace(b"Content-Length: ", b"Content-Length: %d" % rng.choice([0, 1, 9, 99999]), 1),
    lambda rng, b: b.replace(b"Content-Length: ", rng.choice([b"Content-Length: -", b"Content-Length: +",
                                                               b"Content-Length: 9" * 2,
                                                               b"Content-Length: " + b"9" * 5000,
                                                               b"Content-Length : "]), 1),
    lambda rng, b: b.replace(b"\r\n\r\n", rng.choice([b"\r\nTransfer-Encoding: chunked\r\n\r\n",
                                                      b"\r\nContent-Length: 3\r\n\r\n",
                                                      b"\r\nTransfer-Encoding: xchunked\r\n\r\n"]), 1),
    lambda rng, b: _chunk_lie(rng, b),
    lambda rng, b: b.replace(b"\r\n\r\n", b"\r\nX-Huge: %s\r\n\r\n" % (
        b"h" * rng.choice([BODY_LIMIT - 200, BODY_LIMIT, 3 * BODY_LIMIT])), 1),
    lambda rng, b: b.replace(b" ", rng.choice([b"\xc3\xa9", b"\x00", b"\t", b"  ", b"\r"]), 1),
    lambda rng, b: b.replace(b"HTTP/1.", rng.choice([b"HTTP/2.", b"http/1.", b"HTTP/1.x", b"HTTP/1.10"]), 1),
    lambda rng, b: b + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 50))),  # trailing bytes
    lambda rng, b: b.replace(b"\r\nServer", rng.choice([b"\r\n Server", b"\r\n\tServer", b"\rServer",
                                                        b"\r\n:Server", b"\r\nServer\x00"]), 1),
]


def _flip(rng: random.Random, b: bytes, within: int) -> bytes:
    """A random byte at a random place of the first `within` bytes."""
    if not b:
        return b
    at = rng.randrange(min(len(b), within))
    return b[:at] + bytes([rng.randrange(256)]) + b[at + 1:]


def _chunk_lie(rng: random.Random, b: bytes) -> bytes:
    """A chunk size line changed: negative, 0x-prefixed, underscored, huge, or one more / less."""
    head_end = b.find(b"\r\n\r\n") + 4
    line_end = b.find(b"\r\n", head_end)
    if head_end < 4 or line_end < 0:
        return b
    new = rng.choice([b"-100", b"0x5", b"1_0", b"+5", b"f" * 40, b"%x" % rng.randrange(1, 200), b"", b"5 5"])
    return b[:head_end] + new + b[line_end:]


def one_input(rng: random.Random) -> tuple[str, bytes, int | None, bytes]:
    """(kind, the bytes, the status and body if they are a valid response as generated)."""
    pick = rng.random()
    data, status, body = valid(rng)
    if pick < 0.25:
        return "valid", data, status, body
    if pick < 0.9:
        for _ in range(rng.choice([1, 1, 2, 3])):
            data = rng.choice(MUTATIONS)(rng, data)
        return "mutated", data, None, b""
    return "random", bytes(rng.randrange(256) for _ in range(rng.randrange(300))), None, b""


SPECS = [CheckSpec(kind="http"), CheckSpec(kind="http", body=NEEDLE.decode()),
         CheckSpec(kind="http", method="HEAD", status=(200, 204)),
         CheckSpec(kind="http", body=NEEDLE.decode(), status=(100, 200, 404, 500))]


def check_one(rng: random.Random, data: bytes, spec: CheckSpec, want: tuple[int, bytes] | None,
              seen: Counter[str]) -> None:
    checker = HttpChecker(spec)
    results = set()
    for pieces in splits(rng, data):
        got, ended, held = read(checker, pieces)
        most = BODY_LIMIT + CAP + max((len(p) for p in pieces), default=0)
        assert held <= most, f"the reader held {held} bytes"
        result = verdict(checker, got, ended)
        results.add(result)
        if result.ok:
            assert model_ok(got, ended, spec), f"ok ({result.reason}) for what llhttp does not accept"
    assert len(results) == 1, f"the verdict depends on how the bytes were split: {results}"
    seen["ok" if results.pop().ok else "not ok"] += 1
    whole = parse(data, head_only=spec.method == "HEAD")
    if want is not None:
        status, body = want
        kept = b"" if spec.method == "HEAD" else body[:BODY_LIMIT]
        assert whole == Answer(status, kept), f"a valid response read as {whole}"


def test_fuzz_http_answers() -> None:
    seen: Counter[str] = Counter()
    started = time.monotonic()
    for index in range(INPUTS):
        rng = random.Random(SEED * 1_000_003 + index)  # one input replays alone from (seed, index)
        kind, data, status, body = one_input(rng)
        seen[kind] += 1
        spec = SPECS[index % len(SPECS)]
        want = (status, body) if status is not None else None
        try:
            with _alarm(data):
                check_one(rng, data, spec, want, seen)
        except AssertionError as exc:
            where = f"seed {SEED} input {index} ({kind}, {spec.method}, body={spec.body!r}, {spec.status})"
            raise AssertionError(f"{where}: {data[:300]!r}... ({len(data)} bytes): {exc}") from None
    elapsed = time.monotonic() - started
    print(f"http fuzz: seed {SEED}, {INPUTS} inputs in {elapsed:.1f} s: {dict(seen)}")
    assert seen["ok"] > INPUTS // 20 and seen["not ok"] > INPUTS // 5, dict(seen)
