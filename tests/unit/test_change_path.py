"""The one change path, driven by every trigger with the in-memory map writer and the fake speaker behind the
real BgpController: withdraw -> write -> announce, in that order, and one rollback when the write (or saving
the runtime weights) fails half-way."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from edge_lb.bgp.controller import BgpController
from edge_lb.bgp.policy import FakeSpeaker
from edge_lb.config import Config, parse_config
from edge_lb.control import overrides
from edge_lb.control.nodestate import NodeState
from edge_lb.control.reconciler import Reconciler
from edge_lb.dataplane.desired import BackendSlot, VipKey
from edge_lb.dataplane.mapio import Ctl, FakeMapIO
from edge_lb.dataplane.node import Link, NodeMaps
from edge_lb.errors import DataplaneError, SupervisorError
from healthchecks.fake import FakeChecker

RING = 1009
B1, B2 = (ipaddress.ip_address(f"10.1.0.{i}") for i in (1, 2))
VIP1, VIP2 = "10.200.1.1:80/tcp", "10.200.1.2:80/tcp"
LINK = Link("02:00:00:00:00:01", "02:00:00:00:00:02", 1500)


def config(tmp_path: Path, vips: Mapping[str, Sequence[tuple[Any, int]]]) -> Config:
    return parse_config({
        "node": {"interface": "eth0"}, "dataplane": {"ring_size": RING, "max_backends": 8},
        "healthcheck": {"interval": 0.05, "fast_interval": 0.05, "timeout": 0.05, "jitter": 0, "rise": 1,
                        "fall": 1},
        "bgp": {"local_as": 65001, "disable_file": str(tmp_path / "off"), "drain_time": 0,
                "peer": [{"address": "10.9.0.1", "as": 65000}]},
        "vip": [{"address": address, "port": 80, "protocol": "tcp",
                 "backend": [{"address": str(b), "weight": w} for b, w in backends]}
                for address, backends in vips.items()]})


class Log:
    """One timeline of map writes and BGP commands."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def since(self, mark: int) -> list[str]:
        return self.lines[mark:]

    def kinds(self, mark: int) -> list[str]:
        """The timeline from mark, each run of map writes folded into one "write"."""
        out: list[str] = []
        for line in self.lines[mark:]:
            kind = "write" if line.startswith("map ") else line.split()[0]
            if not out or out[-1] != kind or kind != "write":
                out.append(kind)
        return out


class RecordingMapIO(FakeMapIO):
    """FakeMapIO that logs every write. Told to refuse, it fails VIP writes (after backends and rings) or
    writes half of a ring batch and then fails."""

    def __init__(self, log: Log) -> None:
        super().__init__(RING)
        self.log = log
        self.refuse = False
        self.refuse_ring = False

    def write_ctl(self, ctl: Ctl) -> None:
        self.log.lines.append("map ctl")
        super().write_ctl(ctl)

    def put_backends(self, backends: Mapping[int, BackendSlot]) -> None:
        self.log.lines.append("map backends")
        super().put_backends(backends)

    def write_ring_slots(self, vip_num: int, slots: Any, values: Any) -> None:
        self.log.lines.append("map ring")
        if self.refuse_ring:
            half = len(slots) // 2
            super().write_ring_slots(vip_num, slots[:half], values[:half])
            raise DataplaneError("rings: batch update failed half-way")
        super().write_ring_slots(vip_num, slots, values)

    def put_vips(self, vips: Mapping[VipKey, int], flags: Mapping[VipKey, int]) -> None:
        if self.refuse:
            raise DataplaneError("vips: map full")
        self.log.lines.append("map vips")
        super().put_vips(vips, flags)

    def delete_vips(self, keys: Iterable[VipKey]) -> None:
        self.log.lines.append("map vips deleted")
        super().delete_vips(keys)


class Node:
    """NodeState + Reconciler + BgpController over the recording fakes, wired as the supervisor wires them."""

    def __init__(self, tmp_path: Path, cfg: Config, weights_file: Path | None = None) -> None:
        self.log = Log()
        self.io = RecordingMapIO(self.log)
        self.results: dict[Any, bool] = {}
        self.maps = NodeMaps(self.io, cfg, LINK, adopt=True)
        self.state = NodeState(self.maps, cfg, overrides.load(weights_file), self._checker)
        self.speaker = FakeSpeaker()
        self.speaker.commands = _Logged(self.log)
        self.bgp = BgpController(self.state, lambda restarted: self.speaker)
        self.rec = Reconciler(self.state, self.bgp, weights_file=weights_file or tmp_path / "weights.json")
        self.tasks: list[asyncio.Task[None]] = []

    def _checker(self, spec: Any) -> FakeChecker:
        checker = FakeChecker()
        checker.results = self.results
        return checker

    def ring(self, vip: str) -> tuple[int, ...]:
        key = next(VipKey.of(v) for v in self.state.config.vips if v.name == vip)
        return tuple(self.maps.ring(key).tolist())

    async def start(self) -> None:
        await self.rec.change("startup")
        await self.until(lambda: all(self.state.health().values()), "every backend up")
        self.state.take_triggers()  # the rises are written by this change, not again by the loop
        await self.rec.change("health")
        await self.bgp.start()
        self.tasks = [asyncio.create_task(self.rec.run()), asyncio.create_task(self.bgp.run())]

    async def until(self, cond: Callable[[], bool], what: str, timeout: float = 3.0) -> None:
        for _ in range(int(timeout / 0.01)):
            if cond():
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"not within {timeout}s: {what}: {self.log.lines[-12:]}")

    async def announced(self, prefix: str) -> None:
        await self.until(lambda: any(line == f"announce route {prefix} next-hop self"
                                     for line in self.log.lines), f"{prefix} announced")

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.state.stop()


class _Logged(list[str]):
    def __init__(self, log: Log) -> None:
        super().__init__()
        self.log = log

    def append(self, command: str) -> None:
        self.log.lines.append(command)
        super().append(command)


def run(tmp_path: Path, cfg: Config, body: Callable[[Node], Coroutine[Any, Any, None]],
        weights_file: Path | None = None) -> None:
    async def main() -> None:
        node = Node(tmp_path, cfg, weights_file)
        try:
            await body(node)
        finally:
            await node.stop()
    asyncio.run(main())


def test_startup_writes_the_maps_before_anything_is_announced(tmp_path: Path) -> None:
    cfg = config(tmp_path, {"10.200.1.1": [(B1, 1)]})

    async def body(node: Node) -> None:
        await node.start()
        assert node.log.kinds(0)[:2] == ["write", "<started>"]
        await node.announced("10.200.1.1/32")
    run(tmp_path, cfg, body)


def test_a_health_flip_withdraws_before_the_write_and_announces_after(tmp_path: Path) -> None:
    cfg = config(tmp_path, {"10.200.1.1": [(B1, 1)]})

    async def body(node: Node) -> None:
        await node.start()
        await node.announced("10.200.1.1/32")
        mark = len(node.log.lines)
        node.results[B1] = False
        await node.until(lambda: not any(node.ring(VIP1)), "b1 out of the ring")
        assert node.log.kinds(mark) == ["withdraw", "write"]
        mark = len(node.log.lines)
        node.results[B1] = True
        await node.until(lambda: "announce" in node.log.kinds(mark), "announced again")
        assert node.log.kinds(mark) == ["write", "announce"]
    run(tmp_path, cfg, body)


def test_a_reload_withdraws_a_removed_vip_first_and_announces_an_added_one_last(tmp_path: Path) -> None:
    two = config(tmp_path, {"10.200.1.1": [(B1, 1)], "10.200.1.2": [(B2, 1)]})
    one = config(tmp_path, {"10.200.1.1": [(B1, 1)]})

    async def body(node: Node) -> None:
        await node.start()
        await node.announced("10.200.1.2/32")
        mark = len(node.log.lines)
        await node.rec.change("reload", base=one)
        assert node.log.since(mark)[0] == "withdraw route 10.200.1.2/32 next-hop self"
        assert node.log.kinds(mark) == ["withdraw", "write"]
        mark = len(node.log.lines)
        node.results[B2] = True
        await node.rec.change("reload", base=two)  # b2's check starts from down: rises, then announced
        await node.until(lambda: "announce" in node.log.kinds(mark), "10.200.1.2 announced again")
        assert node.log.kinds(mark)[0] == "write" and node.log.kinds(mark)[-1] == "announce"
    run(tmp_path, two, body)


def test_a_drain_of_the_last_backend_withdraws_first_and_an_undrain_announces_last(tmp_path: Path) -> None:
    cfg = config(tmp_path, {"10.200.1.1": [(B1, 1)]})

    async def body(node: Node) -> None:
        await node.start()
        await node.announced("10.200.1.1/32")
        mark = len(node.log.lines)
        await node.rec.set_weight(VIP1, str(B1), 0)
        assert node.log.kinds(mark) == ["withdraw", "write"]
        assert not any(node.ring(VIP1))
        assert (tmp_path / "weights.json").read_text().count('"weight": 0') == 1
        mark = len(node.log.lines)
        await node.rec.set_weight(VIP1, str(B1), None)
        await node.until(lambda: "announce" in node.log.kinds(mark), "announced again")
        assert node.log.kinds(mark) == ["write", "announce"]
        assert (tmp_path / "weights.json").read_text().strip() == "[]"
    run(tmp_path, cfg, body)


def test_a_gateway_change_is_written_by_the_loop_and_touches_no_route(tmp_path: Path) -> None:
    cfg = config(tmp_path, {"10.200.1.1": [(B1, 1)]})

    async def body(node: Node) -> None:
        await node.start()
        await node.announced("10.200.1.1/32")
        mark = len(node.log.lines)
        node.state.follow_link(replace(LINK, gw_mac="02:00:00:00:00:99"), "gateway")
        new_mac = bytes.fromhex("020000000099")
        await node.until(lambda: node.io.ctl is not None and node.io.ctl.gw_mac == new_mac,
                         "the ctl map has the new MAC")
        await asyncio.sleep(0.1)
        assert node.log.kinds(mark) == ["write"], "no route was withdrawn or announced"
        assert node.maps.link.gw_mac == "02:00:00:00:00:99"
    run(tmp_path, cfg, body)


def test_a_reload_refused_half_way_is_rolled_back_whole(tmp_path: Path) -> None:
    cfg = config(tmp_path, {"10.200.1.1": [(B1, 1), (B2, 1)]})
    heavier = config(tmp_path, {"10.200.1.1": [(B1, 5), (B2, 1)], "10.200.1.2": [(B1, 1)]})

    async def body(node: Node) -> None:
        await node.start()
        full = node.ring(VIP1)
        node.io.refuse = True
        mark = len(node.log.lines)
        with pytest.raises(DataplaneError, match="map full"):
            await node.rec.change("reload", base=heavier)
        assert "map ring" in node.log.since(mark), "the failure came half-way: rings were written"
        assert node.ring(VIP1) == full, "the old weights are written back"
        assert node.state.base is cfg
        assert [v.name for v in node.state.config.vips] == [VIP1]
    run(tmp_path, cfg, body)


def test_a_drain_refused_half_way_is_rolled_back_and_not_saved(tmp_path: Path) -> None:
    cfg = config(tmp_path, {"10.200.1.1": [(B1, 1), (B2, 1)]})
    weights = tmp_path / "weights.json"

    async def body(node: Node) -> None:
        await node.start()
        full = node.ring(VIP1)
        node.io.refuse_ring = True
        with pytest.raises(DataplaneError, match="half-way"):
            await node.rec.set_weight(VIP1, str(B2), 0)
        assert node.ring(VIP1) != full, "half of b2's slots went to b1 before the failure"
        node.io.refuse_ring = False
        await node.until(lambda: node.ring(VIP1) == full, "the rollback, retried by the loop, puts b2 back")
        assert node.state.weights == {} and not weights.exists(), "a weight that is not live is not kept"
        await node.rec.set_weight(VIP1, str(B2), 0)  # the next one goes through
        assert node.state.weights == {(VIP1, str(B2)): 0} and weights.exists()
    run(tmp_path, cfg, body, weights)


def test_a_weight_that_cannot_be_kept_touches_no_route_and_no_map(tmp_path: Path) -> None:
    """Whole or not at all, and said before anything moved: a drain that would not survive a restart (the
    weights file cannot be written) is refused before the withdraw-first, so the route does not blink."""
    cfg = config(tmp_path, {"10.200.1.1": [(B1, 1)]})
    (tmp_path / "file").write_text("")
    unsaveable = tmp_path / "file" / "weights.json"  # its directory is a file: the write fails

    async def body(node: Node) -> None:
        await node.start()
        await node.announced("10.200.1.1/32")
        full = node.ring(VIP1)
        mark = len(node.log.lines)
        with pytest.raises(SupervisorError, match="runtime weights file"):
            await node.rec.set_weight(VIP1, str(B1), 0)  # its VIP's last backend: it would withdraw
        await asyncio.sleep(0.6)  # a controller loop poll: nothing is re-announced either
        assert node.log.since(mark) == [], "no withdraw, no write, no announce"
        assert node.ring(VIP1) == full and node.state.weights == {}
    run(tmp_path, cfg, body, unsaveable)


def test_a_reload_that_cannot_keep_the_pruned_weights_changes_nothing(tmp_path: Path) -> None:
    """A reload that drops a drained backend must rewrite the weights file; when it cannot, the reload is
    refused whole (it was reported "rejected" while it had been applied)."""
    cfg = config(tmp_path, {"10.200.1.1": [(B1, 1), (B2, 1)]})
    smaller = config(tmp_path, {"10.200.1.1": [(B1, 1)]})
    weights = tmp_path / "state" / "weights.json"

    async def body(node: Node) -> None:
        await node.start()
        await node.rec.set_weight(VIP1, str(B2), 0)
        weights.with_suffix(".tmp").mkdir()  # the new weights cannot be written
        try:
            mark = len(node.log.lines)
            with pytest.raises(SupervisorError, match="runtime weights file"):
                await node.rec.change("reload", base=smaller)
            assert node.log.since(mark) == []
            assert node.state.base is cfg and node.state.weights == {(VIP1, str(B2)): 0}
        finally:
            weights.with_suffix(".tmp").rmdir()
    run(tmp_path, cfg, body, weights)


def test_an_unknown_backend_changes_nothing(tmp_path: Path) -> None:
    cfg = config(tmp_path, {"10.200.1.1": [(B1, 1)]})

    async def body(node: Node) -> None:
        await node.start()
        mark = len(node.log.lines)
        with pytest.raises(KeyError, match=r"no backend 10\.9\.9\.9"):
            await node.rec.set_weight(VIP1, "10.9.9.9", 0)
        with pytest.raises(KeyError, match="no VIP"):
            await node.rec.set_weight(VIP2, str(B1), 0)
        assert node.log.since(mark) == []
    run(tmp_path, cfg, body)



def test_a_pending_change_of_a_vips_attributes_never_withdraws_it(tmp_path: Path) -> None:
    """While a change is between its withdraw-first and its write, the controller's own sync keeps a prefix
    both configs serve, with its running attributes: comparing whole routes withdrew a VIP whose prepend a
    reload changed, for as long as the change took."""
    cfg = config(tmp_path, {"10.200.1.1": [(B1, 1)]})
    prepended = parse_config({
        "node": {"interface": "eth0"}, "dataplane": {"ring_size": RING, "max_backends": 8},
        "bgp": {"local_as": 65001, "disable_file": str(tmp_path / "off"), "drain_time": 0,
                "peer": [{"address": "10.9.0.1", "as": 65000}]},
        "vip": [{"address": "10.200.1.1", "port": 80, "protocol": "tcp", "bgp": {"as_path_prepend": 2},
                 "backend": [{"address": str(B1)}]}]})

    async def body(node: Node) -> None:
        await node.start()
        await node.announced("10.200.1.1/32")
        mark = len(node.log.lines)
        await node.bgp.withdraw_first(prepended)  # the change path's first step; its write not done yet
        await node.bgp.sync("poll")  # the controller's loop runs meanwhile
        assert node.log.since(mark) == [], "nothing withdrawn, nothing re-announced before the write"
        node.bgp.changed()
    run(tmp_path, cfg, body)
