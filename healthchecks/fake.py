"""FakeChecker: the in-memory twin of a checker for supervisor unit tests, scripted per address."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping

from healthchecks.base import IPAddress, Result, Target


class FakeChecker:
    """Answers ok for an address unless told otherwise; records every target it was asked to check."""

    def __init__(self, results: Mapping[IPAddress | str, bool] | None = None, default: bool = True) -> None:
        self.default = default
        self.results: dict[IPAddress, bool] = {}
        self.calls: list[Target] = []
        self.closed = False
        for address, ok in (results or {}).items():
            self.set(address, ok)

    def set(self, address: IPAddress | str, ok: bool) -> None:
        self.results[ipaddress.ip_address(address)] = ok

    def calls_for(self, address: IPAddress | str) -> int:
        wanted = ipaddress.ip_address(address)
        return sum(1 for target in self.calls if target.address == wanted)

    async def check(self, target: Target) -> Result:
        if self.closed:
            raise RuntimeError("FakeChecker used after aclose()")  # a supervisor bug the tests should see
        self.calls.append(target)
        ok = self.results.get(target.address, self.default)
        return Result(ok=ok, reason="fake ok" if ok else "fake fail")

    async def aclose(self) -> None:
        self.closed = True
