"""What a tunnel check proves, told apart from a dead service: when a check through the tunnel fails, the same
check goes to the backend's own address at once. Direct OK means the service is alive but does not serve
what clients get (no decapsulation, the VIP not on lo, rp_filter dropping the inner packet, a service bound
to its own address only): "direct OK, via tunnel: timeout", a setup problem on the backend. The backend is
down either way: clients would be black-holed.

Unless this node's own tunnel was out of place meanwhile (its encapsulator removed from outside and not yet
put back: edge_lb/control/checktunnel.py): before that verdict the check asks `disturbed(start, end)`, and a
check that overlapped such an outage is this node's fault (local, not counted against the backend).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from healthchecks import local
from healthchecks.base import Checker, Result, Target

DIRECT_OK = "direct OK, via tunnel: "
Disturbed = Callable[[float, float], Awaitable[bool]]  # (start, end) monotonic -> the tunnel was out of place


class TunnelChecker:
    """Wraps the checker of a via = "tunnel" spec; direct targets pass straight through."""

    def __init__(self, inner: Checker, disturbed: Disturbed | None = None) -> None:
        self.inner = inner
        self.disturbed = disturbed

    async def check(self, target: Target) -> Result:
        began = time.monotonic()
        result = await self.inner.check(target)
        if result.ok or result.local is not None or not target.tunnelled:
            return result
        failed = time.monotonic()
        direct = await self.inner.check(target.direct())
        upset = direct.ok and self.disturbed is not None and await self.disturbed(began, failed)
        return verdict(result, direct, upset)

    async def aclose(self) -> None:
        await self.inner.aclose()


def verdict(tunnelled: Result, direct: Result, disturbed: bool) -> Result:
    """A failed tunnel check's result, given its direct re-check's and, when that passed, whether this node's
    encapsulator was out of place during the tunnel check (also healthchecks/tcpengine.py's)."""
    if not direct.ok:
        return Result(ok=False, reason=f"{tunnelled.reason}; direct: {direct.reason}")
    if disturbed:
        why = f"tunnel: this node's encapsulator was out of place ({tunnelled.reason})"
        return Result(ok=False, reason=why, local=local.NOT_WRITTEN)
    return Result(ok=False, reason=DIRECT_OK + tunnelled.reason)
