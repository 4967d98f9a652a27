"""What a tunnel check proves, told apart from a dead service: when a check through the tunnel fails, the same
check goes to the backend's own address at once. Direct OK means the service is alive but does not serve
what clients get (no decapsulation, the VIP not on lo, rp_filter dropping the inner packet, a service bound
to its own address only): "direct OK, via tunnel: timeout", a setup problem on the backend. The backend is
down either way: clients would be black-holed.
"""

from __future__ import annotations

from healthchecks.base import Checker, Result, Target

DIRECT_OK = "direct OK, via tunnel: "


class TunnelChecker:
    """Wraps the checker of a via = "tunnel" spec; direct targets pass straight through."""

    def __init__(self, inner: Checker) -> None:
        self.inner = inner

    async def check(self, target: Target) -> Result:
        result = await self.inner.check(target)
        if result.ok or result.local is not None or not target.tunnelled:
            return result
        direct = await self.inner.check(target.direct())
        if direct.ok:
            return Result(ok=False, reason=DIRECT_OK + result.reason)
        return Result(ok=False, reason=f"{result.reason}; direct: {direct.reason}")

    async def aclose(self) -> None:
        await self.inner.aclose()
