"""The one small interface every checker implements, and what it is given and returns.

A Target says where a check's packets go: the backend's own address (direct), or the VIP through the
backend's tunnel (address = the VIP, `backend` set, and a `mark` on every socket: the node's policy route
and tc encapsulator, edge_lb/dataplane/checkencap.py, send marked packets into that backend's tunnel as
clients' are). Checkers must open every socket with Target.socket() so the mark is honoured.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import Protocol

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Target:
    address: IPAddress  # where the check's packets go
    port: int
    mark: int = 0  # SO_MARK on every socket (0 = none): steers a tunnel check into its backend's tunnel
    backend: IPAddress | None = None  # a tunnel check: the backend behind the VIP (address is the VIP)
    vip: IPAddress | None = None  # the VIP the check is for, when the check needs it (tunnel, exec's {vip})
    gue: bool = False  # a tunnel check: wrapped in GUE (the backend's encap under this VIP), else IP in IP

    @property
    def tunnelled(self) -> bool:
        return self.backend is not None

    @property
    def backend_address(self) -> IPAddress:
        """The backend's own address (where a direct check goes)."""
        return self.backend or self.address

    def direct(self) -> Target:
        """The same check to the backend's own address, unmarked."""
        return Target(self.backend_address, self.port, vip=self.vip)

    @property
    def family(self) -> socket.AddressFamily:
        return socket.AF_INET6 if self.address.version == 6 else socket.AF_INET

    @property
    def host(self) -> str:
        """The address as a URL host part: 10.0.0.1 or [fd00::1]."""
        return f"[{self.address}]" if self.address.version == 6 else str(self.address)

    def socket(self, kind: socket.SocketKind = socket.SOCK_STREAM) -> socket.socket:
        """A non-blocking socket of the target's family, marked when mark is set."""
        sock = socket.socket(self.family, kind)
        try:
            if self.mark:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, self.mark)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock


@dataclass(frozen=True)
class Result:
    ok: bool
    reason: str  # short, for logs and status: "connected", "connect: refused", "HTTP 503 (want 200)"
    # Set when the check failed for a reason on this node (healthchecks.local.cause: "EMFILE", "link down",
    # ...): the result says nothing about the backend, so it does not count against it.
    local: str | None = None


class Checker(Protocol):
    async def check(self, target: Target) -> Result:
        """One check, bounded by its spec's timeout. Never raises: every failure is Result(ok=False, why)."""
        ...

    async def aclose(self) -> None:
        """Release shared resources (HTTP sessions). The checker is not used afterwards."""
        ...
