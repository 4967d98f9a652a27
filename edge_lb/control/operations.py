"""What the operator's interface (REST API, dashboard, metrics, CLI) may read and do on a running node.

NodeOperations implements it over the running node (RunningNode, built by the supervisor's startup);
FakeOperations is the in-memory twin the API's tests run against. Documents are plain JSON-ready dicts so
the API only serialises them.

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
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from edge_lb import events
from edge_lb.bgp.controller import BgpController, disable_path, set_switch
from edge_lb.config import Config, load_config
from edge_lb.control import status
from edge_lb.control.attachment import Attachment
from edge_lb.control.nodestate import NodeState
from edge_lb.control.reconciler import Reconciler
from edge_lb.dataplane.counters import reason_names
from edge_lb.errors import ConfigError, EdgeLbError, SupervisorError

Doc = dict[str, Any]


class Operations(Protocol):
    def status(self) -> Doc: ...

    def events(self, limit: int = 100) -> list[Doc]: ...

    async def reload(self) -> Doc: ...

    async def set_weight(self, vip: str, backend: str, weight: int | None) -> Doc: ...

    async def set_disabled(self, disabled: bool) -> Doc: ...

    def counters(self) -> Doc: ...


@dataclass(frozen=True)
class RunningNode:
    """Everything that exists once startup has finished: the operations read and change the node here."""

    config_path: str
    state: NodeState
    reconciler: Reconciler
    counters: status.Counters
    attachment: Attachment
    bgp: BgpController | None
    started: float = field(default_factory=time.time)


def restart_only(old: Config, new: Config) -> list[str]:
    """Changes a reload cannot apply live: map sizes and the interface are fixed while the program runs."""
    problems = []
    if new.dataplane != old.dataplane:
        problems.append("dataplane: changed; map sizes, instance and XDP mode need a restart "
                        "(`edge-lb run` adopts the pinned maps, established flows survive)")
    if new.node != old.node:
        problems.append("node: changed; interface, MACs and MTU need a restart")
    if new.api != old.api:
        problems.append("api: changed; the listen address and token need a restart")
    if new.bgp != old.bgp:
        problems.append("bgp: changed; peers and session settings need a restart (routes follow health "
                        "and [vip.bgp] live)")
    return problems


class NodeOperations:
    """The operator's interface over the running node. Before startup has finished there is no node:
    reads say "starting" and changes are refused (serve() is called once, when it exists)."""

    def __init__(self, config_path: str) -> None:
        self.config_path = config_path
        self.stopping = False
        self._node: RunningNode | None = None

    def serve(self, node: RunningNode) -> None:
        self._node = node

    def _running(self) -> RunningNode:
        if self._node is None:
            raise SupervisorError("still starting: try again once the node is running")
        return self._node

    # -- reads
    def events(self, limit: int = 100) -> list[Doc]:
        return events.recent(limit)

    def counters(self) -> Doc:
        if self._node is None:
            return {"reasons": {}}
        counts = self._node.counters.reasons
        return {"reasons": {name: counts.get(i, (0, 0))[0] for i, name in enumerate(reason_names())}}

    def status(self) -> Doc:
        node = self._node
        if node is None:
            return {"phase": "starting", "pid": os.getpid(), "config": self.config_path, "vips": []}
        config, state = node.state.config, node.state
        doc = status.document(state, node.counters)
        doc.update(phase="stopping" if self.stopping else "running", instance=config.dataplane.instance,
                   interface=config.node.interface, pid=os.getpid(), uptime=time.time() - node.started,
                   config=self.config_path, gateway_mac=state.maps.link.gw_mac, applies=state.applies,
                   bgp=node.bgp.status() if node.bgp is not None else None,
                   attached=node.attachment.on_interface)
        return doc

    # -- changes, each through the one change path (Reconciler)
    async def reload(self) -> Doc:
        """SIGHUP or POST /v1/reload: a valid config is applied as a diff; anything else changes nothing."""
        node = self._running()
        try:
            config = load_config(self.config_path)
        except ConfigError as exc:
            return self._rejected(exc.problems)
        problems = restart_only(node.state.base, config)
        if problems:
            return self._rejected(problems)
        try:
            report = await node.reconciler.change("reload", base=config)
        except EdgeLbError as exc:
            return self._rejected([f"the change was not applied (rolled back): {exc}"])
        changes = {"vips_added": report.vips_added, "vips_removed": report.vips_removed,
                   "backends_written": report.backends_written, "backends_cleared": report.backends_cleared,
                   "ring_slots": sum(report.ring_slots.values())}
        events.emit("reload", result="applied", config=self.config_path, **changes)
        return {"ok": True, "config": self.config_path, "changes": changes}

    def _rejected(self, problems: list[str]) -> Doc:
        events.emit("reload", logging.ERROR, result="rejected", config=self.config_path,
                    problems=len(problems), detail="; ".join(problems))
        return {"ok": False, "config": self.config_path, "problems": problems}

    async def set_weight(self, vip: str, backend: str, weight: int | None) -> Doc:
        """Drain (0), set, or clear (None) a backend's runtime weight. KeyError for an unknown one."""
        node = self._running()
        await node.reconciler.set_weight(vip, backend, weight)
        events.emit("weight", vip=vip, backend=backend, weight=weight, source="api",
                    result="config weight again" if weight is None else "set")
        now = next(b.weight for v in node.state.config.vips if v.name == vip
                   for b in v.backends if str(b.address) == backend)
        return {"vip": vip, "backend": backend, "weight": now, "override": weight is not None}

    async def set_disabled(self, disabled: bool) -> Doc:
        """The maintenance switch, as `edge-lb disable|enable` sets it: a file, so it outlives a restart."""
        node = self._running()
        if node.bgp is None:
            raise SupervisorError("this node has no [bgp] table: nothing is announced, nothing to disable")
        path = disable_path(node.state.config)
        set_switch(path, disabled, "through the API")
        node.bgp.poke()
        return {"disabled": disabled, "disable_file": str(path)}


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
