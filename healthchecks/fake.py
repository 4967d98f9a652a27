"""FakeChecker: the in-memory twin of a checker for supervisor unit tests, scripted per backend address (a
tunnel check's backend, not its VIP), and per backend for its tunnel alone (set_tunnel: a broken decap)."""

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
        self.tunnel: dict[IPAddress, bool] = {}  # backend -> what its tunnel checks get, whatever set() says
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

    def set_tunnel(self, address: IPAddress | str, ok: bool | None) -> None:
        """Tunnel checks of backend `address` get `ok` (None: as its direct checks again)."""
        if ok is None:
            self.tunnel.pop(ipaddress.ip_address(address), None)
        else:
            self.tunnel[ipaddress.ip_address(address)] = ok

    def calls_for(self, address: IPAddress | str) -> int:
        wanted = ipaddress.ip_address(address)
        return sum(1 for target in self.calls if target.backend_address == wanted)

    async def check(self, target: Target) -> Result:
        if self.closed:
            raise RuntimeError("FakeChecker used after aclose()")  # a supervisor bug the tests should see
        self.calls.append(target)
        backend = target.backend_address
        if backend in self.local:
            return Result(ok=False, reason="fake local fault", local=self.local[backend])
        ok = self.results.get(backend, self.default)
        if target.tunnelled:
            ok = self.tunnel.get(backend, ok)
        return Result(ok=ok, reason="fake ok" if ok else "fake fail")

    async def aclose(self) -> None:
        self.closed = True
