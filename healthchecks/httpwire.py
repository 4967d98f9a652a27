"""What the http check makes of the bytes a server sent: pure, so a table of answers can test it.

Only what a verdict needs is read: the status code of the final response (interim 1xx heads skipped), and
the body (Content-Length, chunked, or up to the end of the stream), of which at most BODY_LIMIT bytes are
kept: a huge page must not cost the checker memory. Strict where a lenient reading could call a broken
answer good (RFC 9112): a head that is not CRLF lines of a status line and name: value fields, a
Content-Length that is not digits or is repeated, Content-Length beside Transfer-Encoding, a chunk not
framed as its size says, a body cut short by the server. Every problem is returned as text, never raised.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

BODY_LIMIT = 64 * 1024  # bytes of the body searched for spec.body (also the longest head accepted)

_STATUS = re.compile(rb"HTTP/1\.[01] ([0-9]{3})(?: [^\x00-\x08\x0a-\x1f\x7f]*)?")
_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_FIELD = re.compile(rb"(" + _TOKEN + rb"):([^\x00-\x08\x0a-\x1f\x7f]*)")
_QUOTED = rb'"(?:[^"\\\x00-\x08\x0a-\x1f\x7f]|\\[^\x00-\x08\x0a-\x1f\x7f])*"'
_CHUNK_EXT = rb";[ \t]*" + _TOKEN + rb"(?:[ \t]*=[ \t]*(?:" + _TOKEN + rb"|" + _QUOTED + rb"))?[ \t]*"
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:" + _CHUNK_EXT + rb")*")  # no backtracking blow-up
_LENGTH_DIGITS = 18  # a longer Content-Length is no answer a check waits for (and int() has a digit limit)


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes  # at most BODY_LIMIT bytes, de-chunked


class _Bad(Exception):
    """Internal to parse(): what was wrong, which parse() returns as text."""


def parse(data: bytes, *, head_only: bool = False, ended: bool = True) -> Answer | str:
    """The answer in `data`, or why it is not one ("server disconnected", "bad response: ...").

    `ended`: the server closed the stream after `data`, so a body shorter than its framing says was cut
    short. False: the reader stopped on its own (it had what the verdict needs), a body prefix is enough."""
    try:
        return _parse(data, head_only, ended)
    except _Bad as exc:
        return str(exc)


def final_head(data: bytes | bytearray, start: int = 0, searched: int = 0) -> tuple[int, int]:
    """(start, end) of the final response's head in `data`: interim 1xx heads (not 101) before it skipped;
    end is where its blank line starts, -1 while it is not all there. `start`: where a head begins (an
    earlier call's answer); `searched`: bytes after it already searched, so a head read a byte at a time
    costs linear time, not quadratic."""
    while True:
        end = data.find(b"\r\n\r\n", max(start, searched - 3))
        if end < 0:
            return start, end
        status = _STATUS.fullmatch(data[start:data.find(b"\r\n", start)])
        if status is None or not (100 <= int(status[1]) < 200) or status[1] == b"101":
            return start, end
        start = end + 4


def _parse(data: bytes, head_only: bool, ended: bool) -> Answer:
    start, end = final_head(data)
    if end < 0 or end + 4 > BODY_LIMIT:
        if not data:
            raise _Bad("server disconnected")
        if len(data) > BODY_LIMIT:
            raise _Bad(f"bad response: head longer than {BODY_LIMIT} bytes")
        raise _Bad("server disconnected in the head")
    for interim in data[:start].split(b"\r\n\r\n")[:-1]:  # checked as strictly as the final head
        _framing(_head(interim)[1])
    status, headers = _head(data[start:end])
    chunked, length = _framing(headers)
    if head_only or status in (204, 304) or 100 <= status < 200:
        return Answer(status, b"")
    raw = data[end + 4:]
    if chunked:
        return Answer(status, _dechunk(raw, ended))
    if length is not None:
        raw = raw[:length]
        if ended and len(raw) < min(length, BODY_LIMIT):
            raise _Bad(f"server disconnected in the body ({len(raw)} of {length} bytes)")
    return Answer(status, raw[:BODY_LIMIT])


def _framing(headers: dict[bytes, bytes]) -> tuple[bool, int | None]:
    """(chunked, Content-Length) from the head, checked even when no body is read: a bad one is a bad head."""
    encoding = headers.get(b"transfer-encoding")
    length = headers.get(b"content-length")
    if encoding is not None and length is not None:
        raise _Bad("bad response: both Transfer-Encoding and Content-Length")
    if length is not None and (not length.isdigit() or len(length) > _LENGTH_DIGITS):
        raise _Bad(f"bad response: Content-Length {length[:40].decode('latin-1')!r}")
    chunked = encoding is not None and encoding.rsplit(b",", 1)[-1].strip(b" \t").lower() == b"chunked"
    return chunked, None if length is None else int(length)


def _head(head: bytes) -> tuple[int, dict[bytes, bytes]]:
    lines = head.split(b"\r\n")
    return _status(lines[0]), _headers(lines[1:])


def _status(line: bytes) -> int:
    """b"HTTP/1.1 200 OK" -> 200."""
    match = _STATUS.fullmatch(line)
    if match is None:
        raise _Bad(f"bad response: status line {line[:60].decode('latin-1')!r}")
    return int(match[1])


def _headers(lines: list[bytes]) -> dict[bytes, bytes]:
    """Lower-cased names -> values (the last of repeated names; a repeated Content-Length is an error)."""
    out: dict[bytes, bytes] = {}
    for line in lines:
        match = _FIELD.fullmatch(line)
        if match is None:
            raise _Bad(f"bad response: header line {line[:60].decode('latin-1')!r}")
        name = match[1].lower()
        if name == b"content-length" and name in out:
            raise _Bad("bad response: Content-Length repeated")
        out[name] = match[2].strip(b" \t")
    return out


def _dechunk(raw: bytes, ended: bool) -> bytes:
    """The chunks' data, up to BODY_LIMIT bytes or the last (zero-size) chunk. Bytes that end before either:
    a prefix if the reader stopped, else the server disconnected."""
    body, pos = bytearray(), 0
    while len(body) < BODY_LIMIT:
        eol = raw.find(b"\r\n", pos)
        if eol < 0:
            return _cut(body, ended)
        size_line = raw[pos:eol]
        match = _CHUNK_SIZE.fullmatch(size_line)
        if match is None:
            raise _Bad(f"bad response: chunk size {size_line[:20].decode('latin-1')!r}")
        size = int(match[1], 16)
        if size == 0:
            _trailers(raw[eol + 2:], ended)
            return bytes(body)
        data_end = eol + 2 + size
        body += raw[eol + 2:data_end]
        if len(raw) < data_end + 2:
            return _cut(body, ended)
        if raw[data_end:data_end + 2] != b"\r\n":
            raise _Bad(f"bad response: a chunk of {size} bytes not followed by CRLF")
        pos = data_end + 2
    return bytes(body[:BODY_LIMIT])


def _trailers(rest: bytes, ended: bool) -> None:
    """The trailer section after the last chunk: field lines up to an empty line."""
    if rest.startswith(b"\r\n"):
        return
    end = rest.find(b"\r\n\r\n")
    if end < 0:
        if ended:
            raise _Bad("server disconnected in the body (chunked)")
        return
    for line in rest[:end].split(b"\r\n"):
        if _FIELD.fullmatch(line) is None:
            raise _Bad(f"bad response: trailer line {line[:60].decode('latin-1')!r}")


def _cut(body: bytearray, ended: bool) -> bytes:
    if ended and len(body) < BODY_LIMIT:
        raise _Bad("server disconnected in the body (chunked)")
    return bytes(body[:BODY_LIMIT])
