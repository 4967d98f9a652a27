"""An in-memory node: the real RunningNode and NodeOperations over FakeMapIO, FakeChecker and FakeSpeaker,
wired as the supervisor wires them (NodeState, Reconciler, BgpController, CounterSampler), with one VIP
(10.0.0.1:80/tcp) and two backends read from a real config file. The API's, the control socket's, the
dashboard's and the metrics' tests drive it through the real operations and look at the maps.

    async with running(tmp_path) as node:
        app = rest.make_app(node.ops, token=...)
        node.send("10.1.0.1", 100)            # traffic in the counter maps, sampled at once
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import random
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from edge_lb.bgp.controller import BgpController, disable_path
from edge_lb.bgp.policy import FakeSpeaker
from edge_lb.config import load_config
from edge_lb.control import overrides
from edge_lb.control.attachment import Attachment
from edge_lb.control.nodestate import NodeState
from edge_lb.control.operations import NodeOperations, RunningNode
from edge_lb.control.reconciler import NoRoutes, Reconciler
from edge_lb.dataplane.counters import CounterSampler, reason_names
from edge_lb.dataplane.desired import BackendSlot, VipKey
from edge_lb.dataplane.mapio import FakeMapIO
from edge_lb.dataplane.node import Link, NodeMaps
from edge_lb.errors import DataplaneError
from healthchecks.fake import FakeChecker

RING = 1009
INSTANCE = "mem"
VIP = "10.0.0.1:80/tcp"
BACKENDS = ("10.1.0.1", "10.1.0.2")
PEER = "10.9.0.1"
LINK = Link("02:00:00:00:00:01", "02:00:00:00:00:02", 1500)
IPV6_VIP = "[fd00::1]:443/tcp"


def config_text(tmp_path: Path, *, bgp: bool = True, ipv6: bool = False) -> str:
    text = (f'[node]\ninterface = "eth0"\n[dataplane]\ninstance = "{INSTANCE}"\nring_size = {RING}\n'
            'max_backends = 16\n'
            '[healthcheck]\ninterval = 0.05\nfast_interval = 0.05\ntimeout = 0.05\njitter = 0\n'
            'rise = 1\nfall = 1\n'
            '[[vip]]\naddress = "10.0.0.1"\nport = 80\nprotocol = "tcp"\n'
            + "".join(f'[[vip.backend]]\naddress = "{b}"\n' for b in BACKENDS))
    if ipv6:
        text += ('[[vip]]\naddress = "fd00::1"\nport = 443\nprotocol = "tcp"\n'
                 '[[vip.backend]]\naddress = "fd00:1::7"\n')
    if bgp:
        text += (f'[bgp]\nlocal_as = 65001\ndisable_file = "{tmp_path / "disabled"}"\ndrain_time = 0\n'
                 f'[[bgp.peer]]\naddress = "{PEER}"\nas = 65000\n'
                 + ('[[bgp.peer]]\naddress = "fd00:9::1"\nas = 65000\n' if ipv6 else ""))
    return text


class RefusingMapIO(FakeMapIO):
    """FakeMapIO that, told to refuse, fails every backend and ring write (as a full or broken map would)."""

    def __init__(self) -> None:
        super().__init__(RING)
        self.refuse = False

    def put_backends(self, backends: Mapping[int, BackendSlot]) -> None:
        if self.refuse:
            raise DataplaneError("cannot write backends to the maps: No space left on device")
        super().put_backends(backends)

    def write_ring_slots(self, vip_num: int, slots: Any, values: Any) -> None:
        if self.refuse:
            raise DataplaneError("cannot write the ring: No space left on device")
        super().write_ring_slots(vip_num, slots, values)

    def clear_backends(self, indexes: Iterable[int]) -> None:
        if self.refuse:
            raise DataplaneError("cannot clear backends: No space left on device")
        super().clear_backends(indexes)


class MemNode:
    def __init__(self, tmp_path: Path, *, bgp: bool = True, ipv6: bool = False) -> None:
        self.config_path = tmp_path / "edge-lb.toml"
        self.config_path.write_text(config_text(tmp_path, bgp=bgp, ipv6=ipv6))
        self.weights_file = tmp_path / "weights.json"
        config = load_config(self.config_path)
        self.io = RefusingMapIO()
        self.maps = NodeMaps(self.io, config, LINK, adopt=True)
        self.checker = FakeChecker()
        self.state = NodeState(self.maps, config, overrides.load(self.weights_file),
                               lambda spec: self.checker)
        # Its own random source: the global one is hypothesis' (schemathesis drives the API while checks run).
        self.state.monitor._rand = random.Random(7).random
        self.attachment = Attachment("eth0")
        self.attachment.prog_id, self.attachment.on_interface = 1, True  # as startup's record() finds it
        self.speaker = FakeSpeaker(sessions={PEER: "up"})
        self.bgp = (BgpController(self.state, lambda restarted: self.speaker,
                                  lambda: self.attachment.on_interface, local_fault=self.state.local_fault)
                    if bgp else None)
        self.reconciler = Reconciler(self.state, self.bgp or NoRoutes(), weights_file=self.weights_file)
        self.counters = CounterSampler(self.io)
        self.ops = NodeOperations(str(self.config_path))
        self.node: RunningNode | None = None
        self._tasks: list[asyncio.Task[Any]] = []

    async def start(self) -> None:
        """The supervisor's startup, in memory: first change, every backend up, BGP announcing, served."""
        await self.reconciler.change("startup")
        await self.until(lambda: all(self.state.health().values()), "every backend up")
        self.state.take_triggers()  # the rises are written by this change, not again by the loop
        await self.reconciler.change("health")
        if self.bgp is not None:
            await self.bgp.start()
            self._tasks.append(asyncio.create_task(self.bgp.run(), name="bgp"))
        self._tasks.append(asyncio.create_task(self.reconciler.run(), name="reconciler"))
        self.node = RunningNode(str(self.config_path), self.state, self.reconciler, self.counters,
                                self.attachment, self.bgp)
        self.ops.serve(self.node)
        self.counters.refresh()
        if self.bgp is not None:
            await self.until(lambda: "10.0.0.1/32" in self.announced(), "the VIP announced")

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.state.stop()

    async def until(self, cond: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while not cond():
                await asyncio.sleep(0.01)

    # -- what the maps and the speaker hold
    def key(self, vip: str = VIP) -> VipKey:
        return next(VipKey.of(v) for v in self.state.config.vips if v.name == vip)

    def index(self, backend: str, vip: str = VIP) -> int:
        index = self.maps.backend_index(self.key(vip), ipaddress.ip_address(backend))
        assert index is not None, f"{backend} has no slot"
        return index

    def ring_slots(self, backend: str, vip: str = VIP) -> int:
        """Slots `backend` holds in the VIP's ring as written to the maps."""
        index = self.index(backend, vip)
        return sum(1 for slot in self.maps.ring(self.key(vip)) if slot == index)

    def bgp_disabled(self) -> bool:
        """The maintenance switch's file is there."""
        return self.bgp is not None and disable_path(self.state.config).exists()

    def announced(self) -> list[str]:
        return self.bgp.status()["announced"] if self.bgp is not None else []

    # -- traffic
    def send(self, backend: str, packets: int, size: int = 1500, vip: str = VIP) -> None:
        """`packets` more to `backend` in the counter maps (and its VIP's, and STAT_TX), then sampled."""
        num = self.maps.vip_number(self.key(vip))
        assert num is not None
        for name, index in (("backend_stats", self.index(backend, vip)), ("vip_stats", num),
                            ("reason_stats", reason_names().index("STAT_TX"))):
            counts = self.io.counters.setdefault(name, {})
            old = counts.get(index, (0, 0))
            counts[index] = (old[0] + packets, old[1] + packets * size)
        self.counters.refresh()


@contextlib.asynccontextmanager
async def running(tmp_path: Path, **options: Any) -> AsyncIterator[MemNode]:
    node = MemNode(tmp_path, **options)
    try:
        await node.start()
        yield node
    finally:
        await node.stop()
