"""What this node should serve, held in one place: the config file's content, the runtime weights over it,
the link facts and the health of every (VIP, backend).

The change path (control/reconciler.py) turns it into map writes; BGP, status and the API read it. Nothing
here writes a map or announces a route.
"""

from __future__ import annotations

import asyncio
import functools
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from edge_lb import events
from edge_lb.config import Config, IPAddress
from edge_lb.control import overrides
from edge_lb.control.linkwatch import LinkWatch
from edge_lb.control.localfaults import LocalFaults
from edge_lb.dataplane.checkencap import mark_of
from edge_lb.dataplane.desired import VipKey
from edge_lb.dataplane.node import Link, NodeMaps
from healthchecks.base import Checker, Result, Target
from healthchecks.machine import ADOPTED, NEW, Health
from healthchecks.monitor import CheckKey, HealthMonitor, Observation
from healthchecks.spec import CheckSpec

Pair = tuple[VipKey, IPAddress]


@dataclass(frozen=True)
class BackendView:
    """One (VIP, backend) as status shows it."""

    address: IPAddress
    weight: int
    state: str  # "up", "down", "drained" (weight 0, keeps its flows), "unchecked" (type none)
    reason: str
    checked_at: float | None
    index: int | None  # backend slot in the data plane
    latency: float | None = None  # seconds the last check took


def check_keys(config: Config) -> dict[Pair, CheckKey | None]:
    """Which prober decides each (VIP, backend); None: not checked (type "none"), always healthy. A direct
    check is one prober per backend address (shared by its VIPs); a tunnel check one per (VIP address,
    backend, encap): a backend may hold one VIP on its lo and miss another, or take IPIP and not GUE."""
    keys: dict[Pair, CheckKey | None] = {}
    for vip in config.vips:
        for b in vip.backends:
            spec = b.healthcheck
            port = spec.port or vip.port
            if spec.tunnelled:
                target = Target(vip.address, port, backend=b.address, vip=vip.address, gue=b.encap == "gue")
            else:  # the VIP only where exec's {vip} may use it: other direct checks stay shared
                target = Target(b.address, port, vip=vip.address if spec.kind == "exec" else None)
            keys[(VipKey.of(vip), b.address)] = CheckKey(target, spec) if spec.checked else None
    return keys


def initial_health(keys: Mapping[Pair, CheckKey | None], known: Mapping[Pair, Health],
                   adopted_up: Mapping[Pair, bool]) -> dict[CheckKey, Health]:
    """Where each new prober starts: the pair's health under its previous check (a changed check does not
    take a backend down), else up if the running data plane has it up (a restart keeps flows), else down."""
    start: dict[CheckKey, Health] = {}
    for pair, key in keys.items():
        if key is None or key in start:
            continue
        if pair in known:
            start[key] = Health(up=known[pair].up, reason=known[pair].reason)
        else:
            start[key] = ADOPTED if adopted_up.get(pair) else NEW
    return start


@dataclass(frozen=True)
class Candidate:
    """One whole desired configuration, built once per change: the file's config, the runtime weights of
    backends it still has, and what the maps serve (the two together)."""

    base: Config
    weights: overrides.Overrides
    config: Config
    keys: dict[Pair, CheckKey | None]

    @classmethod
    def of(cls, base: Config, weights: Mapping[tuple[str, str], int]) -> Candidate:
        kept = overrides.prune(base, weights)
        config = overrides.apply(base, kept)
        return cls(base, kept, config, check_keys(config))

    @functools.cached_property
    def pairs_of(self) -> dict[CheckKey, list[Pair]]:
        """The reverse of `keys`: the (VIP, backend) pairs each check serves (a backend in several VIPs
        shares one). Built once per candidate: a flip looked up by scanning every key cost O(backends)
        each, O(backends^2) for a start-up's first flips (24 s at 500 VIPs x 10)."""
        pairs: dict[CheckKey, list[Pair]] = {}
        for pair, key in self.keys.items():
            if key is not None:
                pairs.setdefault(key, []).append(pair)
        return pairs

    def with_weight(self, vip_name: str, address: str, weight: int | None) -> Candidate:
        """This candidate with one runtime weight set (None: the config's again). KeyError names an unknown
        VIP or backend."""
        vip = next((v for v in self.base.vips if v.name == vip_name), None)
        if vip is None:
            raise KeyError(f"no VIP {vip_name}")
        if not any(str(b.address) == address for b in vip.backends):
            raise KeyError(f"no backend {address} in VIP {vip_name}")
        wanted = dict(self.weights)
        if weight is None:
            wanted.pop((vip_name, address), None)
        else:
            wanted[(vip_name, address)] = weight
        return Candidate.of(self.base, wanted)


class NodeState:
    """The running candidate, the kernel's link facts and the health monitor, with the views read from them.
    Health flips and link changes are recorded here as pending triggers; the change path takes them."""

    def __init__(self, maps: NodeMaps, config: Config, weights: Mapping[tuple[str, str], int],
                 make_checker: Callable[[CheckSpec], Checker], *, concurrency: int = 1000) -> None:
        self.maps = maps
        self.running = Candidate.of(config, weights)
        self.link: Link = maps.link  # the kernel's word; written by the next change
        self.monitor = HealthMonitor(make_checker, self._changed, concurrency=concurrency,
                                     node_fault=self._node_fault, on_result=self._observed,
                                     resolve=self._resolve)
        self.faults = LocalFaults(self.monitor.observations, self.local_fault_bound)
        self.dirty = asyncio.Event()
        self.applies = 0
        self._triggers: set[str] = set()
        self._adopted: Mapping[Pair, bool] | None = maps.adopted_up()  # until the first change is written
        self._ring_counts: dict[VipKey, tuple[int, Counter[int]]] = {}
        self._bound: tuple[Candidate | None, float] = (None, 0.0)  # local_fault_bound, per candidate
        self.tunnel_ready = True  # the tunnel checks' encapsulator is in place (the supervisor says when)

    @property
    def base(self) -> Config:
        return self.running.base

    @property
    def config(self) -> Config:
        return self.running.config

    @property
    def weights(self) -> overrides.Overrides:
        return self.running.weights

    # -- triggers
    def poke(self, trigger: str) -> None:
        self._triggers.add(trigger)
        self.dirty.set()

    def take_triggers(self) -> str:
        trigger = "+".join(sorted(self._triggers)) or "health"
        self._triggers.clear()
        self.dirty.clear()
        return trigger

    def follow_link(self, link: Link, trigger: str) -> None:
        """The kernel says the gateway MAC or the MTU changed: the next change writes it (a fact, like
        health: a failed write is retried with it, never rolled back to the old value)."""
        self.link = link
        self.poke(trigger)

    # -- local faults: checks failing for a reason on this node (healthchecks.local)
    def follow_own_link(self, watch: LinkWatch) -> None:
        """While `watch` says the node's link is (or just was) down, failed checks are the link's fault."""
        self.faults.link = watch

    def local_fault_bound(self) -> float:
        """[node].local_fault_after, else 2 x the longest interval x fall of the running checks."""
        configured = self.base.node.local_fault_after
        if configured is not None:
            return configured
        if self._bound[0] is not self.running:  # worked out once per candidate: asked on every BGP sync
            specs = {k.spec for k in self.running.keys.values() if k is not None} or {CheckSpec()}
            self._bound = (self.running, 2 * max(spec.interval * spec.fall for spec in specs))
        return self._bound[1]

    def local_fault(self) -> str | None:
        """For BGP: "local fault: ..." once the node has been unable to judge its backends for the bound."""
        return self.faults.withheld()

    def _node_fault(self, start: float, end: float) -> str | None:
        link = self.faults.link
        return link.during(start, end) if link is not None else None

    def _resolve(self, target: Target) -> Target | None:
        """A tunnel target with its socket mark: the base | its backend's index as last written (None before
        the slot is written or the encapsulator is in place: the check waits for it)."""
        if not target.tunnelled or target.backend is None:
            return target
        if not self.tunnel_ready:
            return None
        index = self.maps.index_of(target.address, target.backend, target.gue)
        if index is None:
            return None
        return replace(target, mark=mark_of(self.base.dataplane.check_mark_base, index))

    def _observed(self, key: CheckKey, result: Result, seen: Observation) -> None:
        self.faults.observe(key, result, seen)

    def _changed(self, key: CheckKey, old: Health, new: Health) -> None:
        for vip, address in self.running.pairs_of.get(key, ()):
            events.emit("health", vip=vip.name, backend=address, check=key.spec.kind,
                        to="up" if new.up else "down", reason=new.reason)
        self.poke("health")

    # -- candidates and probers
    def candidate(self, base: Config | None = None,
                  weights: Mapping[tuple[str, str], int] | None = None) -> Candidate:
        if base is None and weights is None:
            return self.running
        return Candidate.of(base or self.base, self.weights if weights is None else weights)

    def start_checks(self, candidate: Candidate) -> None:
        """Probers for the candidate's new checks, started before it is written: an apply never sees a backend
        without a prober (it would count as down). A changed check starts from the backend's health."""
        known = {} if self._adopted is not None else {p: self.health_of(p) for p in self.running.keys}
        self.monitor.start(initial_health(candidate.keys, known, self._adopted or {}))

    def commit(self, candidate: Candidate) -> Candidate:
        """Make `candidate` the running one; returns the one it replaces (for a rollback)."""
        previous, self.running = self.running, candidate
        return previous

    def written(self) -> None:
        """A change reached the maps: adopted health has served its purpose, ring counts are stale."""
        self._adopted = None
        self.applies += 1
        self._ring_counts.clear()  # stale now; and a removed VIP's entry would otherwise stay for ever

    async def prune_checks(self) -> None:
        await self.monitor.prune({k for k in self.running.keys.values() if k is not None})

    async def stop(self) -> None:
        await self.monitor.stop()

    # -- views
    def health_of(self, pair: Pair, candidate: Candidate | None = None) -> Health:
        key = (candidate or self.running).keys.get(pair)
        if key is None:
            return Health(up=True, reason="not checked (type none)")
        seen = self.monitor.observation(key)
        return seen.health if seen else NEW

    def health(self, candidate: Candidate | None = None) -> dict[Pair, bool]:
        """Up or down now of every (VIP, backend) of the running candidate, or of `candidate`."""
        return {pair: self.health_of(pair, candidate).up for pair in (candidate or self.running).keys}

    def serving(self) -> dict[Pair, bool]:
        """Up now and already in the maps: a backend whose rise was seen but not yet written is not serving
        (BGP announces on this, so a route never leads to a ring that is still empty)."""
        return {pair: up and self.maps.written_up(*pair) for pair, up in self.health().items()}

    def ring_counts(self, vip: VipKey) -> Counter[int]:
        """Backend index -> ring slots it holds, from what was last written; counted once per apply."""
        cached = self._ring_counts.get(vip)
        if cached is None or cached[0] != self.applies:
            cached = (self.applies, Counter(self.maps.slot_counts(vip)))
            self._ring_counts[vip] = cached
        return cached[1]

    def view(self, vip: VipKey, address: IPAddress, weight: int) -> BackendView:
        health = self.health_of((vip, address))
        key = self.running.keys.get((vip, address))
        seen = self.monitor.observation(key) if key else None
        state = ("down" if not health.up else "drained" if weight == 0 else "unchecked" if key is None
                 else "up")
        return BackendView(address, weight, state, health.reason, seen.checked_at if seen else None,
                           self.maps.backend_index(vip, address), seen.latency if seen else None)
