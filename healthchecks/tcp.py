"""The tcp check: the backend accepts a connection on the port. Nothing is sent."""

from __future__ import annotations

import asyncio

from healthchecks import local, reasons
from healthchecks.base import Result, Target
from healthchecks.spec import CheckSpec


class TcpChecker:
    def __init__(self, spec: CheckSpec) -> None:
        self.spec = spec

    async def check(self, target: Target) -> Result:
        try:
            sock = target.socket()
        except OSError as exc:
            return local.failed("socket", exc, target)
        try:
            async with asyncio.timeout(self.spec.timeout):
                await asyncio.get_running_loop().sock_connect(sock, (str(target.address), target.port))
        # TimeoutError is an OSError: catch it first.
        except TimeoutError:
            return Result(ok=False, reason=f"connect: {reasons.timeout(self.spec.timeout)}")
        except OSError as exc:
            return local.failed("connect", exc, target)
        finally:
            sock.close()
        return Result(ok=True, reason="connected")

    async def aclose(self) -> None:
        pass
