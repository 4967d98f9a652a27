"""What one health check is: a frozen spec parsed from config (edge_lb.config) and the kinds it may have.

A spec is inherited top-level [healthcheck] -> [vip.healthcheck] -> [vip.backend.healthcheck]; each level
replaces only the keys it sets. Fields that do not apply to the kind are ignored by its checker.
"""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("tcp", "http", "https", "udp-dns", "exec", "none")
VIAS = ("tunnel", "direct")  # where a check goes: the VIP through the backend's tunnel, or the backend itself


@dataclass(frozen=True, kw_only=True)
class CheckSpec:
    kind: str = "tcp"  # one of KINDS; "none" = never checked, always healthy
    port: int | None = None  # None: the VIP's port
    interval: float = 2.0  # seconds between checks while the state is steady
    fast_interval: float = 0.5  # seconds between checks while the state is changing (a rise/fall streak)
    timeout: float = 1.0  # seconds one check may take before it counts as failed
    rise: int = 2  # consecutive good checks that bring a down backend up
    fall: int = 2  # consecutive bad checks that take an up backend down
    jitter: float = 0.1  # each delay is scaled by a random factor in [1 - jitter, 1 + jitter]
    # "tunnel": to the VIP and port, encapsulated toward the backend as client packets are (what clients
    # get); when it fails, a direct check tells a setup problem from a dead service. "direct": its address.
    # None (unset): "direct" for exec (its {address} is the backend's own; only {mark} reaches the tunnel),
    # else "tunnel". Unset, not a value, so a table that only changes the type gets that type's default.
    via: str | None = None
    # http / https
    method: str = "GET"
    path: str = "/"
    status: tuple[int, ...] = (200,)  # accepted status codes
    body: str | None = None  # when set, the response body must contain it
    host: str | None = None  # Host header (and TLS server name); None: the target address
    tls_verify: bool = True  # https: verify the certificate chain and name
    # udp-dns
    query_name: str = "."
    query_type: str = "NS"
    rcode: str = "NOERROR"  # the answer's rcode must be this
    # exec: argv, no shell; "{address}" (the backend's), "{port}", "{vip}" and "{mark}" (the socket mark a
    # tunnel check uses, 0 direct) in any argument are replaced by the target's
    command: tuple[str, ...] = ()

    @property
    def checked(self) -> bool:
        return self.kind != "none"

    @property
    def effective_via(self) -> str:
        """The effective via: "tunnel" or "direct"."""
        return self.via or ("direct" if self.kind == "exec" else "tunnel")

    @property
    def tunnelled(self) -> bool:
        return self.effective_via == "tunnel" and self.checked

    @property
    def budget(self) -> float:
        """Seconds one check may take in all: a failed tunnel check is followed by a direct one."""
        return self.timeout * (2 if self.tunnelled else 1)
