"""What the operator's interface (REST API, dashboard, metrics, CLI) may read and do on a running node.

The supervisor implements it; FakeOperations is the in-memory twin the API's tests run against. Documents
are plain JSON-ready dicts so the API only serialises them.

    status()            the status document (edge_lb.control.status.document + node fields + "bgp")
    events(limit)       the most recent structured events, newest last: {"time": epoch, "event": name, ...}
    reload()            re-read the config file: {"ok": true, "changes": {...}}
                        or {"ok": false, "problems": [...]}
    set_weight(vip, backend, weight)
                        a runtime weight for one backend of one VIP (0 = drain; None = back to the config's
                        weight); kept across restarts. KeyError names an unknown VIP or backend.
    set_disabled(flag)  the maintenance switch (withdraw every VIP / announce again)
    counters()          raw data-plane counters for metrics: {"reasons": {name: packets}}
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

Doc = dict[str, Any]


class Operations(Protocol):
    def status(self) -> Doc: ...

    def events(self, limit: int = 100) -> list[Doc]: ...

    async def reload(self) -> Doc: ...

    async def set_weight(self, vip: str, backend: str, weight: int | None) -> Doc: ...

    async def set_disabled(self, disabled: bool) -> Doc: ...

    def counters(self) -> Doc: ...


def _backend(address: str, weight: int, state: str = "up") -> Doc:
    return {"address": address, "weight": weight, "config_weight": weight, "state": state,
            "reason": "HTTP 200", "last_check": time.time(), "latency": 0.002, "check": "http",
            "ring_slots": 0, "ring_share": 0.0, "packets": 0, "bytes": 0}


@dataclass
class FakeOperations:
    """A node with one VIP (10.0.0.1:80/tcp) and two backends; mutations change the document."""

    doc: Doc = field(default_factory=lambda: {
        "phase": "running", "instance": "fake", "interface": "eth0", "pid": 1, "uptime": 1.0,
        "config": "/etc/edge-lb.toml", "gateway_mac": "02:00:00:00:00:02", "applies": 1, "attached": True,
        "ring_size": 65537,
        "bgp": {"peers": {"10.9.0.1": "up"}, "announced": ["10.0.0.1/32"], "withheld": {}, "disabled": False,
                "disable_file": "/var/lib/edge-lb/fake.disabled"},
        "vips": [{"vip": "10.0.0.1:80/tcp", "address": "10.0.0.1", "port": 80, "protocol": "tcp",
                  "healthy": 2, "in_ring": 2, "packets": 0, "bytes": 0,
                  "backends": [_backend("10.1.0.1", 1), _backend("10.1.0.2", 1)]}]})
    log: list[Doc] = field(default_factory=list)
    reload_problems: list[str] = field(default_factory=list)

    def status(self) -> Doc:
        return copy.deepcopy(self.doc)

    def events(self, limit: int = 100) -> list[Doc]:
        return self.log[-limit:]

    async def reload(self) -> Doc:
        if self.reload_problems:
            return {"ok": False, "config": self.doc["config"], "problems": list(self.reload_problems)}
        return {"ok": True, "config": self.doc["config"], "changes": {}}

    async def set_weight(self, vip: str, backend: str, weight: int | None) -> Doc:
        target = next((v for v in self.doc["vips"] if v["vip"] == vip), None)
        if target is None:
            raise KeyError(f"no VIP {vip}")
        row = next((b for b in target["backends"] if b["address"] == backend), None)
        if row is None:
            raise KeyError(f"no backend {backend} in VIP {vip}")
        row["weight"] = row["config_weight"] if weight is None else weight
        row["state"] = "drained" if row["weight"] == 0 else "up"
        self.log.append({"time": time.time(), "event": "weight", "vip": vip, "backend": backend,
                         "weight": row["weight"]})
        return {"vip": vip, "backend": backend, "weight": row["weight"]}

    async def set_disabled(self, disabled: bool) -> Doc:
        self.doc["bgp"]["disabled"] = disabled
        self.doc["bgp"]["announced"] = [] if disabled else ["10.0.0.1/32"]
        return {"disabled": disabled}

    def counters(self) -> Doc:
        return {"reasons": {"STAT_TX": 10, "STAT_CT_HIT": 7, "STAT_CT_MISS": 3}}
