"""Short failure reasons shared by the checkers, so every protocol words a refused connect the same way."""

from __future__ import annotations

import errno

# strerror is long ("Connection refused"); the status line wants the gist.
_SHORT = {
    errno.ECONNREFUSED: "refused",
    errno.ECONNRESET: "reset",
    errno.ETIMEDOUT: "timeout",
    errno.EHOSTUNREACH: "no route to host",
    errno.ENETUNREACH: "network unreachable",
    errno.EADDRNOTAVAIL: "address not available",
    errno.EPERM: "not permitted",
    errno.EACCES: "permission denied",
}


def seconds(value: float) -> str:
    """1.0 -> "1s", 0.5 -> "0.5s", 0.25 -> "0.25s"."""
    return f"{value:g}s"


def timeout(value: float) -> str:
    return f"timeout after {seconds(value)}"


def os_error(exc: OSError) -> str:
    """ECONNREFUSED -> "refused"; otherwise the lower-case strerror, or the message when there is no errno."""
    if exc.errno in _SHORT:
        return _SHORT[exc.errno]
    if exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


def clip(text: str, limit: int = 160) -> str:
    """A reason is one short line: a server's message or a program's output must not flood the logs."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."
