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
        self.local: dict[IPAddress, str] = {}  # address -> a local cause its checks fail with (set_local)
        self.calls: list[Target] = []
        self.closed = False
        for address, ok in (results or {}).items():
            self.set(address, ok)

    def set(self, address: IPAddress | str, ok: bool) -> None:
        self.results[ipaddress.ip_address(address)] = ok

    def set_local(self, address: IPAddress | str, cause: str | None) -> None:
        """Checks of `address` fail for a reason on this node ("EMFILE"), or (None) answer as set again."""
        if cause is None:
            self.local.pop(ipaddress.ip_address(address), None)
        else:
            self.local[ipaddress.ip_address(address)] = cause

    def calls_for(self, address: IPAddress | str) -> int:
        wanted = ipaddress.ip_address(address)
        return sum(1 for target in self.calls if target.address == wanted)

    async def check(self, target: Target) -> Result:
        if self.closed:
            raise RuntimeError("FakeChecker used after aclose()")  # a supervisor bug the tests should see
        self.calls.append(target)
        if target.address in self.local:
            return Result(ok=False, reason="fake local fault", local=self.local[target.address])
        ok = self.results.get(target.address, self.default)
        return Result(ok=ok, reason="fake ok" if ok else "fake fail")

    async def aclose(self) -> None:
        self.closed = True
