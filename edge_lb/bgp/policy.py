"""BGP, the pure part: which VIP routes this node should announce, and the ExaBGP API commands for them.

    desired_routes(config, serving, attached, disabled, local_fault) -> {prefix: Route}      (policy)
    render("announce" | "withdraw", route) -> "announce route 10.0.0.1/32 next-hop self med 10
                                               as-path [65001 65001] large-community [65001:1:2]"
    Announcer(speaker).sync(desired)                                               (diff -> commands)

The speaker (edge_lb.bgp.exabgp.ExaBgpSpeaker, or FakeSpeaker in tests) carries the commands to the routers.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from edge_lb import events
from edge_lb.config import Config, IPAddress
from edge_lb.configbgp import Bgp, RouteAttrs
from edge_lb.control.document import SpeakerStatus
from edge_lb.dataplane.desired import VipKey
from edge_lb.errors import BgpError

Prefix = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Route:
    prefix: Prefix
    attrs: RouteAttrs = field(default_factory=RouteAttrs)
    as_path: tuple[int, ...] = ()  # () lets ExaBGP send its default (our AS); else the whole path, ours first
    down: bool = False  # announced with attrs.down_med although health would withdraw it (down = "med")

    @property
    def med(self) -> int | None:
        return self.attrs.down_med if self.down else self.attrs.med


class _AllHealthy(Mapping[tuple[VipKey, IPAddress], bool]):
    """Every backend healthy: `withheld` with it says what withholds a prefix besides health."""

    def __getitem__(self, key: tuple[VipKey, IPAddress]) -> bool:
        return True

    def get(self, key: object, default: object = None) -> bool:
        return True

    def __iter__(self) -> Iterator[tuple[VipKey, IPAddress]]:
        return iter(())

    def __len__(self) -> int:
        return 0


def host_prefix(address: IPAddress) -> Prefix:
    return ipaddress.ip_network(f"{address}/{address.max_prefixlen}")


def withheld(config: Config, healthy: Mapping[tuple[VipKey, IPAddress], bool], attached: bool,
             disabled: bool, local_fault: str | None = None) -> dict[Prefix, str | None]:
    """Each VIP address's prefix -> None when it is to be announced, else why not. An address is announced
    while the program is attached, the node is not disabled, it can judge its backends (`local_fault`:
    "local fault: ..." while it cannot), and every VIP on that address has at least min_healthy backends
    that can take new flows (healthy and weight > 0)."""
    node = "the node is disabled for maintenance" if disabled else (
        None if attached else "the XDP program is not attached") or local_fault
    why: dict[Prefix, str | None] = {}
    for vip in config.vips:
        prefix = host_prefix(vip.address)
        key = VipKey.of(vip)
        count = sum(1 for b in vip.backends if b.weight > 0 and healthy.get((key, b.address), False))
        short = None if count >= vip.min_healthy else (
            f"{vip.name}: {count} backends take new flows, min_healthy is {vip.min_healthy}")
        why[prefix] = node or why.get(prefix) or short
    return why


def desired_routes(config: Config, healthy: Mapping[tuple[VipKey, IPAddress], bool], attached: bool,
                   disabled: bool, local_fault: str | None = None) -> dict[Prefix, Route]:
    """The routes to announce: every VIP address nothing withholds (see `withheld`), and, with
    down = "med", one that only health withholds, announced with its worse down_med."""
    why = withheld(config, healthy, attached, disabled, local_fault)
    if any(v.route.down == "med" for v in config.vips):
        beside_health = withheld(config, _AllHealthy(), attached, disabled, local_fault)
    local_as = config.bgp.local_as if config.bgp is not None else 0
    routes = {}
    for vip in config.vips:
        prefix = host_prefix(vip.address)
        down = why[prefix] is not None
        if down and not (vip.route.down == "med" and beside_health[prefix] is None):
            continue
        routes[prefix] = Route(prefix, vip.route, vip.route.as_path(local_as), down)
    return routes


def render(action: str, route: Route) -> str:
    """One ExaBGP 5 API command. Anything that could end a line early or inject a second command is
    refused, whatever its source."""
    if action not in ("announce", "withdraw"):
        raise ValueError(f"unknown BGP action {action!r}")
    parts = [action, "route", str(route.prefix), "next-hop", route.attrs.next_hop]
    if route.med is not None:
        parts += ["med", str(route.med)]
    if route.as_path:
        parts += ["as-path", "[" + " ".join(map(str, route.as_path)) + "]"]
    if route.attrs.communities:
        parts += ["community", "[" + " ".join(route.attrs.communities) + "]"]
    if route.attrs.large_communities:
        parts += ["large-community", "[" + " ".join(route.attrs.large_communities) + "]"]
    command = " ".join(parts)
    if not command.isprintable() or ";" in command:
        raise ValueError(f"refusing a BGP command with control characters: {command!r}")
    return command


class Speaker(Protocol):
    """Carries API commands to a BGP daemon. send() has one command in flight and returns once the daemon
    acknowledged it; BgpError when it answered "error" or is not running."""

    async def start(self) -> None: ...

    async def send(self, command: str) -> None: ...

    async def reconfigure(self, bgp: Bgp) -> None:
        """A reload's new peer list, taken live (the other sessions and their routes stay)."""
        ...

    def peers(self) -> dict[str, str]:
        """Peer address -> session state ("up", "down", "connected", ...), as last reported."""
        ...

    def heartbeat(self) -> None:
        """The supervisor makes progress (its watchdog says): routes stay (edge_lb.bgp.exabgp_bridge)."""
        ...

    def liveness_status(self) -> SpeakerStatus:
        """Does the daemon answer (edge_lb.bgp.exabgp_liveness)."""
        ...

    async def stop(self) -> None: ...


class Announcer:
    """Keeps what was announced equal to what should be; every step idempotent.

    `announced` errs on the side of "maybe announced": an announce counts from the moment it is sent (its ack
    may be lost while ExaBGP took it), and a withdraw only once acknowledged. What is `unsure` (a failed
    announce, or everything after the speaker reconnected) is sent again; ExaBGP answers "done" to a repeated
    announce and to withdrawing a route it does not have, so re-sending is safe.
    """

    def __init__(self, speaker: Speaker) -> None:
        self.speaker = speaker
        self.announced: dict[Prefix, Route] = {}
        self.unsure: set[Prefix] = set()

    def forget(self) -> None:
        """The speaker reconnected (maybe restarted with an empty RIB): re-send everything."""
        self.unsure = set(self.announced)

    async def sync(self, desired: Mapping[Prefix, Route], trigger: str) -> int:
        """Withdraw what should not be announced, then announce what is missing, changed or unsure. Each
        route is tried on its own; BgpError at the end if any was refused. Returns the commands acked."""
        failed: list[str] = []
        sent = await self._withdraw(desired, trigger, failed)
        for prefix, route in desired.items():
            if self.announced.get(prefix) != route or prefix in self.unsure:
                self.announced[prefix] = route
                if await self._send("announce", route, trigger, failed):
                    self.unsure.discard(prefix)
                    sent += 1
                else:
                    self.unsure.add(prefix)
        if failed:
            raise BgpError(f"{len(failed)} BGP command(s) failed, first: {failed[0]}")
        return sent

    async def withdraw(self, keep: Mapping[Prefix, Route], trigger: str) -> int:
        """Only the withdrawals of sync: what is announced and not in `keep` goes; nothing is announced."""
        failed: list[str] = []
        sent = await self._withdraw(keep, trigger, failed)
        if failed:
            raise BgpError(f"{len(failed)} BGP withdraw(s) failed, first: {failed[0]}")
        return sent

    async def _withdraw(self, keep: Mapping[Prefix, Route], trigger: str, failed: list[str]) -> int:
        sent = 0
        for prefix in [p for p in self.announced if p not in keep]:
            if await self._send("withdraw", self.announced[prefix], trigger, failed):
                self.announced.pop(prefix, None)
                self.unsure.discard(prefix)
                sent += 1
        return sent

    async def _send(self, action: str, route: Route, trigger: str, failed: list[str]) -> bool:
        try:
            await self.speaker.send(render(action, route))
        except BgpError as exc:
            events.emit("bgp", logging.ERROR, action=action, prefix=route.prefix, result="failed", error=exc)
            failed.append(str(exc))
            return False
        events.emit("bgp", action=action, prefix=route.prefix, trigger=trigger)
        return True


@dataclass
class FakeSpeaker:
    """In-memory twin: records every command; `refuse` makes the next sends fail."""

    commands: list[str] = field(default_factory=list)
    refuse: bool = False
    sessions: dict[str, str] = field(default_factory=dict)
    beats: int = 0

    async def start(self) -> None:
        self.commands.append("<started>")

    async def send(self, command: str) -> None:
        if self.refuse:
            raise BgpError(f"error: {command}")
        self.commands.append(command)

    async def reconfigure(self, bgp: Bgp) -> None:
        if self.refuse:
            raise BgpError("error: reload")
        self.commands.append(f"<peers {' '.join(str(p.address) for p in bgp.peers)}>")

    def peers(self) -> dict[str, str]:
        return dict(self.sessions)

    def heartbeat(self) -> None:
        self.beats += 1

    def liveness_status(self) -> SpeakerStatus:
        return {"state": "up", "pid": None, "restarts": 0, "reason": None, "last_answer": None}

    async def stop(self) -> None:
        self.commands.append("<stopped>")
