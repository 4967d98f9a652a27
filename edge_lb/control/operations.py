"""What the operator's interface (REST API, dashboard, metrics, CLI) may read and do on a running node.

NodeOperations implements it over the running node (RunningNode, built by the supervisor's startup; the
unit tests build one in memory: tests/unit/memnode.py). Documents are plain JSON-ready dicts, typed in
edge_lb.control.document, so the API only serialises them.

    status()            the node document (document.NodeDocument: status.document + node fields + "bgp")
    events(limit)       the most recent structured events, newest last: {"time": epoch, "event": name, ...}
    reload()            re-read the config file: {"ok": true, "changes": {...}}
                        or {"ok": false, "problems": [...]}
    set_weight(vip, backend, weight)
                        a runtime weight for one backend of one VIP (0 = drain; None = back to the config's
                        weight); kept across restarts. KeyError names an unknown VIP or backend.
    set_disabled(flag)  the maintenance switch (withdraw every VIP / announce again)
    counters()          the counter sampler's latest snapshot (dataplane.counters.CounterSnapshot: the
                        per-CPU maps summed, and when); status() reads the same one
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from edge_lb import events
from edge_lb.bgp.controller import BgpController, disable_path, set_switch
from edge_lb.config import Config, load_config
from edge_lb.control import status
from edge_lb.control.attachment import Attachment
from edge_lb.control.checktunnel import TunnelKeeper
from edge_lb.control.document import ApiSite, NodeDocument, ProgramStatus
from edge_lb.control.nodestate import NodeState
from edge_lb.control.reconciler import Reconciler
from edge_lb.control.watchdog import Watchdog
from edge_lb.dataplane.counters import CounterSampler, CounterSnapshot
from edge_lb.errors import ConfigError, EdgeLbError, SupervisorError

Doc = dict[str, Any]


class Operations(Protocol):
    def status(self, *, vips: bool = True) -> NodeDocument: ...

    def events(self, limit: int = 100) -> list[Doc]: ...

    async def reload(self) -> Doc: ...

    async def set_weight(self, vip: str, backend: str, weight: int | None) -> Doc: ...

    async def set_disabled(self, disabled: bool) -> Doc: ...

    def counters(self) -> CounterSnapshot: ...


@dataclass(frozen=True)
class RunningNode:
    """Everything that exists once startup has finished: the operations read and change the node here."""

    config_path: str
    state: NodeState
    reconciler: Reconciler
    counters: CounterSampler
    attachment: Attachment
    bgp: BgpController | None
    started: float = field(default_factory=time.time)
    program: ProgramStatus | None = None  # how startup got the XDP program (None in unit tests' nodes)
    tunnel: TunnelKeeper | None = None  # the tunnel checks' encapsulator (None in unit tests' nodes)


def restart_only(old: Config, new: Config) -> list[str]:
    """Changes a reload cannot apply live: map sizes and the interface are fixed while the program runs."""
    problems = []
    # new_flow_rate_limit is written into the ctl map by every apply: a reload takes it.
    if replace(new.dataplane, new_flow_rate_limit=None) != replace(old.dataplane, new_flow_rate_limit=None):
        problems.append("dataplane: changed; map sizes, instance and XDP mode need a restart "
                        "(`edge-lb run` adopts the pinned maps, established flows survive; "
                        "new_flow_rate_limit reloads live)")
    if new.node != old.node:
        problems.append("node: changed; interface, MACs and MTU need a restart")
    if new.api != old.api:
        problems.append("api: changed; the listen address and token need a restart")
    problems += _bgp_restart_only(old, new)
    return problems


def _bgp_restart_only(old: Config, new: Config) -> list[str]:
    """Peers are added, removed or changed live (ExaBGP reloads its config: only those sessions move);
    what every session carries needs a restart."""
    if (old.bgp is None) != (new.bgp is None):
        return ["bgp: added or removed; the BGP speaker starts and stops with the node (restart it)"]
    if old.bgp is None or new.bgp is None:
        return []
    return [f"bgp.{key}: changed; ExaBGP takes it only when it starts, with every session (restart the "
            "node; peers, drain_time and disable_file reload live)"
            for key in ("local_as", "router_id", "heartbeat_timeout")  # the bridge's: set when ExaBGP starts
            if getattr(old.bgp, key, None) != getattr(new.bgp, key, None)]


class NodeOperations:
    """The operator's interface over the running node. Before startup has finished there is no node:
    reads say "starting" and changes are refused (serve() is called once, when it exists)."""

    def __init__(self, config_path: str) -> None:
        self.config_path = config_path
        self.stopping = False
        self._node: RunningNode | None = None
        self._nothing_read = CounterSnapshot.empty()  # until the node (and its sampler) exists
        self.api: Callable[[], dict[str, ApiSite]] = dict  # the API sites' connections (ControlServer's)
        self.watchdog: Watchdog | None = None  # the supervisor's: shown in status

    def serve(self, node: RunningNode) -> None:
        self._node = node

    def _running(self) -> RunningNode:
        if self._node is None:
            raise SupervisorError("still starting: try again once the node is running")
        return self._node

    # -- reads
    def events(self, limit: int = 100) -> list[Doc]:
        return events.recent(limit)

    def counters(self) -> CounterSnapshot:
        """The sampler's snapshot (an empty one, as old as these operations, before the node exists)."""
        return self._nothing_read if self._node is None else self._node.counters.snapshot

    def status(self, *, vips: bool = True) -> NodeDocument:
        """The node document; vips=False leaves the VIPs out without building them (GET /node: the
        VIP rows are most of the cost, ~50 ms at 500 VIPs x 10)."""
        doc = self._status(vips)
        if self.watchdog is not None and self._node is not None:
            doc["watchdog"] = self.watchdog.status()
        if self._node is not None and self._node.program is not None:
            doc["program"] = self._node.program
        if self._node is not None and self._node.tunnel is not None:
            doc["check_tunnel"] = self._node.tunnel.status()
        return doc

    def _status(self, vips: bool) -> NodeDocument:
        node = self._node
        if node is None:
            return {"phase": "starting", "pid": os.getpid(), "config": self.config_path, "vips": [],
                    "api": self.api()}
        config, state = node.state.config, node.state
        served = (status.document(state, node.counters.snapshot) if vips
                  else {"vips": [], "ring_size": state.maps.ring_size})
        return {"vips": served["vips"], "ring_size": served["ring_size"],
                "phase": "stopping" if self.stopping else "running", "instance": config.dataplane.instance,
                "interface": config.node.interface, "pid": os.getpid(), "uptime": time.time() - node.started,
                "config": self.config_path, "gateway_mac": state.maps.link.gw_mac, "mtu": state.maps.link.mtu,
                "applies": state.applies,
                "bgp": node.bgp.status() if node.bgp is not None else None,
                "api": self.api(),
                "attached": node.attachment.on_interface, "local_faults": state.faults.status(),
                "conntable": status.conntable(node.counters.snapshot, state.maps.new_flow_rate)}

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
                   "vips_rewritten": report.vips_rewritten,
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

