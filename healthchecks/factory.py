"""make_checker: the checker for a spec's kind (wrapped for via = "tunnel": a failure is re-checked directly,
healthchecks/tunnel.py). Checkers are built once per spec and shared by its targets."""

from __future__ import annotations

from collections.abc import Callable

from healthchecks.base import Checker
from healthchecks.command import ExecChecker
from healthchecks.dns import DnsChecker
from healthchecks.http import HttpChecker
from healthchecks.spec import CheckSpec
from healthchecks.tcp import TcpChecker
from healthchecks.tunnel import Disturbed, TunnelChecker

_BY_KIND: dict[str, Callable[[CheckSpec], Checker]] = {
    "tcp": TcpChecker,
    "http": HttpChecker,
    "https": HttpChecker,
    "udp-dns": DnsChecker,
    "exec": ExecChecker,
}


def make_checker(spec: CheckSpec, disturbed: Disturbed | None = None) -> Checker:
    """ValueError for "none" (nothing to run: the backend is simply healthy) and for unknown kinds.
    `disturbed`: asked before a tunnel check blames its backend (healthchecks/tunnel.py)."""
    try:
        build = _BY_KIND[spec.kind]
    except KeyError:
        raise ValueError(f"no checker for health check kind {spec.kind!r}") from None
    checker = build(spec)
    return TunnelChecker(checker, disturbed) if spec.tunnelled else checker
