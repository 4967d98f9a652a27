"""What the http check makes of the bytes a server sent: pure, so a table of answers can test it.

Only what a verdict needs is read: the status code, and the body (Content-Length, chunked, or up to the end
of the stream), of which at most BODY_LIMIT bytes are kept: a huge page must not cost the checker memory.
"""

from __future__ import annotations

from dataclasses import dataclass

BODY_LIMIT = 64 * 1024  # bytes of the body searched for spec.body (also the longest head accepted)


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes  # at most BODY_LIMIT bytes, de-chunked


class _Bad(Exception):
    """Internal to parse(): what was wrong, which parse() returns as text."""


def parse(data: bytes, *, head_only: bool = False) -> Answer | str:
    """The answer in `data` (possibly cut short: only the head and a prefix of the body are needed), or why
    it is not one ("server disconnected", "bad response: ...")."""
    try:
        return _parse(data, head_only)
    except _Bad as exc:
        return str(exc)


def _parse(data: bytes, head_only: bool) -> Answer:
    end = data.find(b"\r\n\r\n")
    if end < 0:
        if not data:
            raise _Bad("server disconnected")
        if len(data) > BODY_LIMIT:
            raise _Bad(f"bad response: head longer than {BODY_LIMIT} bytes")
        raise _Bad("server disconnected in the head")
    lines = data[:end].split(b"\r\n")
    status = _status(lines[0])
    if head_only or status in (204, 304) or 100 <= status < 200:
        return Answer(status, b"")
    headers = _headers(lines[1:])
    raw = data[end + 4:]
    if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
        return Answer(status, _dechunk(raw))
    length = headers.get(b"content-length")
    if length is not None:
        if not length.strip().isdigit():
            raise _Bad(f"bad response: Content-Length {length.decode('latin-1')!r}")
        raw = raw[:int(length)]
    return Answer(status, raw[:BODY_LIMIT])


def _status(line: bytes) -> int:
    """b"HTTP/1.1 200 OK" -> 200."""
    version, _, rest = line.partition(b" ")
    code = rest[:3]
    if not version.startswith(b"HTTP/1.") or not code.isdigit() or rest[3:4] not in (b"", b" "):
        raise _Bad(f"bad response: status line {line[:60].decode('latin-1')!r}")
    return int(code)


def _headers(lines: list[bytes]) -> dict[bytes, bytes]:
    """Lower-cased names -> values (the last of repeated names)."""
    out = {}
    for line in lines:
        name, colon, value = line.partition(b":")
        if not colon:
            raise _Bad(f"bad response: header line {line[:60].decode('latin-1')!r}")
        out[name.strip().lower()] = value.strip()
    return out


def _dechunk(raw: bytes) -> bytes:
    """The chunks' data, up to BODY_LIMIT bytes or where the bytes end (a cut-short answer is fine)."""
    body, pos = bytearray(), 0
    while len(body) < BODY_LIMIT:
        eol = raw.find(b"\r\n", pos)
        if eol < 0:
            break
        size_text = raw[pos:eol].split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise _Bad(f"bad response: chunk size {size_text[:20].decode('latin-1')!r}") from None
        if size == 0:
            break
        body += raw[eol + 2:eol + 2 + size]
        pos = eol + 2 + size + 2
    return bytes(body[:BODY_LIMIT])
