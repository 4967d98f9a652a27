"""The change path (Reconciler over NodeState) with an in-memory map writer and scripted checkers: each
health change or reload must write exactly the ring slots that differ, and flip exactly the backend flags
it should."""

from __future__ import annotations

import asyncio
import ipaddress
import threading
import tomllib
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from edge_lb.config import Config, parse_config
from edge_lb.control import overrides, status
from edge_lb.control.nodestate import NodeState
from edge_lb.control.reconciler import NoRoutes, Reconciler, Routes
from edge_lb.dataplane.counters import CounterSampler
from edge_lb.dataplane.desired import VipKey, ring_for
from edge_lb.dataplane.mapio import FakeMapIO
from edge_lb.dataplane.node import Link, NodeMaps
from edge_lb.errors import DataplaneError
from healthchecks.base import Checker
from healthchecks.fake import FakeChecker
from healthchecks.spec import CheckSpec
from healthchecks.tunnel import TunnelChecker

RING = 1009
B1, B2, B3, B4 = (ipaddress.ip_address(f"10.1.0.{i}") for i in range(1, 5))
LINK = Link("02:00:00:00:00:01", "02:00:00:00:00:02", 1500)


def config(*backends: tuple[str, int], check: str = "") -> Config:
    rows = "".join(f'[[vip.backend]]\naddress = "{a}"\nweight = {w}\n' for a, w in backends)
    text = (f'[node]\ninterface = "eth0"\n[dataplane]\nring_size = {RING}\nmax_backends = 16\n'
            f'[healthcheck]\ninterval = 0.05\nfast_interval = 0.05\njitter = 0\nrise = 2\nfall = 2\n'
            f'{check or "timeout = 0.05"}\n'
            f'[[vip]]\naddress = "10.0.0.1"\nport = 80\nprotocol = "tcp"\n{rows}')
    return parse_config(tomllib.loads(text))


BASE = config((str(B1), 1), (str(B2), 1), (str(B3), 1))
VIP = VipKey.of(BASE.vips[0])



def changed(old: tuple[int, ...], new: tuple[int, ...]) -> int:
    """How many slots differ: what one batch of the diff writes."""
    return sum(a != b for a, b in zip(old, new, strict=True))

class Harness:
    def __init__(self, cfg: Config, io: FakeMapIO | None = None, routes: Routes | None = None) -> None:
        self.io = io or FakeMapIO(RING)
        self.results: dict[Any, bool] = {}
        self.checkers: list[FakeChecker] = []
        self.maps = NodeMaps(self.io, cfg, LINK, adopt=True)
        self.state = NodeState(self.maps, cfg, {}, self._checker)
        self.rec = Reconciler(self.state, routes or NoRoutes())
        self.task: asyncio.Task[None] | None = None

    def _checker(self, spec: CheckSpec) -> Checker:
        checker = FakeChecker()
        checker.results = self.results  # one script for every spec's checker
        self.checkers.append(checker)
        return TunnelChecker(checker) if spec.tunnelled else checker  # as make_checker wraps it

    def set(self, address: Any, ok: bool) -> None:
        self.results[address] = ok

    def ring(self) -> tuple[int, ...]:
        num = self.maps.vip_number(VIP)
        return (0,) * RING if num is None else tuple(self.io.read_ring(num).tolist())

    def expected_ring(self, cfg: Config, healthy: set[Any]) -> tuple[int, ...]:
        vip = cfg.vips[0]
        num = self.maps.programmer.vips[VIP]
        indexes = {b.address: self.maps.alloc.backend_idx[(num, b.address)] for b in vip.backends}
        return tuple(ring_for(vip, indexes, RING, {a: a in healthy for a in indexes}).tolist())

    def index(self, address: Any) -> int:
        return self.maps.alloc.backend_idx[(self.maps.programmer.vips[VIP], address)]

    async def until(self, cond: Callable[[], bool], what: str, timeout: float = 3.0) -> None:
        for _ in range(int(timeout / 0.01)):
            if cond():
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"not within {timeout}s: {what}")

    async def start(self) -> None:
        await self.rec.change("startup")
        self.task = asyncio.create_task(self.rec.run())

    async def reload(self, cfg: Config) -> Any:
        return await self.rec.change("reload", base=cfg)

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
        await self.state.stop()


def run(body: Callable[[Harness], Coroutine[Any, Any, None]], cfg: Config = BASE,
        io: FakeMapIO | None = None, routes: Routes | None = None) -> None:
    async def main() -> None:
        h = Harness(cfg, io, routes)
        try:
            await body(h)
        finally:
            await h.stop()
    asyncio.run(main())


def test_new_backends_wait_for_rise_then_fill_the_ring() -> None:
    async def body(h: Harness) -> None:
        await h.start()
        assert h.ring() == (0,) * RING, "nothing serves before its checks pass"
        assert not any(s.up for s in h.io.backends.values())
        await h.until(lambda: h.ring() == h.expected_ring(BASE, {B1, B2, B3}), "all three in the ring")
        assert all(s.up for s in h.io.backends.values())
    run(body)


def test_a_failing_backend_leaves_with_exactly_its_slots_rewritten() -> None:
    async def body(h: Harness) -> None:
        await h.start()
        full = h.expected_ring(BASE, {B1, B2, B3})
        await h.until(lambda: h.ring() == full, "all up")
        batches = len(h.io.ring_batches)
        h.set(B2, False)
        without = h.expected_ring(BASE, {B1, B3})
        await h.until(lambda: h.ring() == without, "b2 out of the ring")
        assert h.io.ring_batches[batches:] == [(0, changed(full, without))], "one batch, diff only"
        moved = {s for s, (o, n) in enumerate(zip(full, without, strict=True)) if o != n}
        assert {s for s, i in enumerate(full) if i == h.index(B2)} <= moved, "every slot of b2 moved"
        assert not h.io.backends[h.index(B2)].up, "its connection-table entries are bypassed"
        assert h.io.backends[h.index(B1)].up
        h.set(B2, True)
        await h.until(lambda: h.ring() == full, "b2 back after rise")
    run(body)


def test_a_health_rewrite_waits_for_the_withdraw_first() -> None:
    """BGP's withdraw-first runs, and is awaited, while the ring still holds the failed backend."""
    seen: list[bool] = []
    armed = [False]
    harness: list[Harness] = []

    class SlowRoutes(NoRoutes):
        async def withdraw_first(self, candidate: Config) -> None:
            if not armed[0]:
                return
            await asyncio.sleep(0.05)  # a withdraw on the wire: the rewrite must not start meanwhile
            seen.append(harness[0].index(B2) in harness[0].ring())

    async def body(h: Harness) -> None:
        harness.append(h)
        await h.start()
        full = h.expected_ring(BASE, {B1, B2, B3})
        await h.until(lambda: h.ring() == full, "all up")
        armed[0] = True
        h.set(B2, False)
        await h.until(lambda: h.ring() == h.expected_ring(BASE, {B1, B3}), "b2 out of the ring")
        assert seen and seen[0] is True, "the hook ran before b2 left the ring"
    run(body, routes=SlowRoutes())


def test_serving_means_healthy_and_written_into_the_maps() -> None:
    """What BGP announces on: a rise the maps have not taken yet does not count."""
    async def main() -> None:
        h = Harness(BASE)
        try:
            await h.rec.change("startup")  # no health loop: nothing applies the rise
            pair = (VIP, B1)
            await h.until(lambda: h.state.health()[pair], "b1 up by its checks")
            assert h.state.serving()[pair] is False, "up, but its ring slots are not written yet"
            await h.rec.change("test")
            assert h.state.serving()[pair] is True
            h.set(B1, False)
            await h.until(lambda: not h.state.health()[pair], "b1 down by its checks")
            assert h.state.serving()[pair] is False, "down counts at once, before the rewrite"
        finally:
            await h.stop()
    asyncio.run(main())


def test_flapping_backend_does_not_flap_the_ring() -> None:
    async def body(h: Harness) -> None:
        await h.start()
        full = h.expected_ring(BASE, {B1, B2, B3})
        await h.until(lambda: h.ring() == full, "all up")
        batches = len(h.io.ring_batches)
        checker = h.checkers[0]
        for i in range(20):  # alternate good/bad on every check of b2: never two bad in a row
            seen = checker.calls_for(B2)
            h.set(B2, i % 2 == 1)
            await h.until(lambda seen=seen: checker.calls_for(B2) > seen, "b2 checked again")
        assert h.io.ring_batches[batches:] == []
        assert h.state.health_of((VIP, B2)).up
    run(body)


def test_adopted_backends_keep_serving_and_nothing_is_rewritten() -> None:
    io = FakeMapIO(RING)
    first = NodeMaps(io, BASE, LINK, adopt=False)
    first.apply(BASE)  # what a previous supervisor left in the pinned maps (all up)
    before = len(io.ring_batches)

    async def body(h: Harness) -> None:
        await h.start()
        assert io.ring_batches[before:] == [], "a restart with the same config writes no ring slot"
        assert all(s.up for s in io.backends.values())
    run(body, io=io)


def test_reload_adds_a_backend_only_after_its_checks_pass() -> None:
    bigger = config((str(B1), 1), (str(B2), 1), (str(B3), 1), (str(B4), 1))

    async def body(h: Harness) -> None:
        await h.start()
        full = h.expected_ring(BASE, {B1, B2, B3})
        await h.until(lambda: h.ring() == full, "all up")
        h.set(B4, False)
        await h.reload(bigger)
        assert h.ring() == full, "b4 is not checked yet: the ring is unchanged"
        assert not h.io.backends[h.index(B4)].up
        batches = len(h.io.ring_batches)
        h.set(B4, True)
        four = h.expected_ring(bigger, {B1, B2, B3, B4})
        await h.until(lambda: h.ring() == four, "b4 in")
        assert h.io.ring_batches[batches:] == [(0, changed(full, four))]
    run(body)


def test_reload_drain_keeps_flows_and_check_change_keeps_health() -> None:
    drained = config((str(B1), 1), (str(B2), 0), (str(B3), 1))
    new_check = config((str(B1), 1), (str(B2), 1), (str(B3), 1), check="timeout = 0.04")

    async def body(h: Harness) -> None:
        await h.start()
        await h.until(lambda: h.ring() == h.expected_ring(BASE, {B1, B2, B3}), "all up")
        await h.reload(drained)
        assert h.index(B2) not in h.ring(), "drained: no new flows"
        assert h.io.backends[h.index(B2)].up, "drained: existing flows stay"
        batches = len(h.io.ring_batches)
        await h.reload(new_check)
        assert h.ring() == h.expected_ring(new_check, {B1, B2, B3}), "b2 is back at weight 1 at once"
        assert len(h.io.ring_batches) == batches + 1
        assert all(h.state.health_of((VIP, b)).up for b in (B1, B2, B3)), "a new check keeps the state"
    run(body)


def test_reload_removing_a_backend_clears_its_slot() -> None:
    smaller = config((str(B1), 1), (str(B3), 1))

    async def body(h: Harness) -> None:
        await h.start()
        await h.until(lambda: h.ring() == h.expected_ring(BASE, {B1, B2, B3}), "all up")
        idx = h.index(B2)
        report = await h.reload(smaller)
        assert report.backends_cleared == 1 and idx not in h.io.backends
        assert h.ring() == h.expected_ring(smaller, {B1, B3})
        assert not [k for k in h.state.monitor.running() if k.target.address == B2], "no prober left for b2"
        calls = h.checkers[0].calls_for(B2)
        await asyncio.sleep(0.2)
        assert h.checkers[0].calls_for(B2) == calls, "b2 is not checked any more"
    run(body)


def test_a_reload_during_health_activity_never_writes_a_backend_down() -> None:
    new_check = config((str(B1), 1), (str(B2), 1), (str(B3), 1), check="timeout = 0.04")

    async def body(h: Harness) -> None:
        await h.start()
        await h.until(lambda: h.ring() == h.expected_ring(BASE, {B1, B2, B3}), "all up")
        written: list[bool] = []
        put = h.io.put_backends
        h.io.put_backends = lambda b: (written.extend(s.up for s in b.values()), put(b))[1]  # type: ignore
        h.state.poke("health")  # an apply is due while the reload swaps every prober
        await h.reload(new_check)
        await asyncio.sleep(0.2)
        assert all(written), "no backend was ever written down"
        assert h.ring() == h.expected_ring(BASE, {B1, B2, B3})
    run(body)


class RefusingMapIO(FakeMapIO):
    refuse = False

    def put_vips(self, vips: Any, flags: Any) -> None:
        if self.refuse:
            raise DataplaneError("map full")
        super().put_vips(vips, flags)


def test_a_reload_the_maps_refuse_is_rolled_back() -> None:
    io = RefusingMapIO(RING)
    heavier = parse_config(tomllib.loads(
        f'[node]\ninterface = "eth0"\n[dataplane]\nring_size = {RING}\nmax_backends = 16\n'
        '[healthcheck]\ninterval = 0.05\nfast_interval = 0.05\ntimeout = 0.05\n'
        '[[vip]]\naddress = "10.0.0.1"\nport = 80\nprotocol = "tcp"\n'
        '[[vip.backend]]\naddress = "10.1.0.1"\nweight = 5\n[[vip.backend]]\naddress = "10.1.0.2"\n'
        '[[vip.backend]]\naddress = "10.1.0.3"\n'
        '[[vip]]\naddress = "10.0.0.2"\nport = 80\nprotocol = "tcp"\n'
        '[[vip.backend]]\naddress = "10.1.0.4"\n'))

    async def body(h: Harness) -> None:
        await h.start()
        full = h.expected_ring(BASE, {B1, B2, B3})
        await h.until(lambda: h.ring() == full, "all up")
        io.refuse = True
        with pytest.raises(DataplaneError):
            await h.reload(heavier)
        assert h.ring() == full, "the old weights are written back"
        assert h.state.config is BASE
        assert not [k for k in h.state.monitor.running() if k.target.address == B4]
        assert [s.address for s in io.backends.values()] == [B1, B2, B3]
    run(body, io=io)


def test_status_document_from_the_reconciler() -> None:
    drained = config((str(B1), 1), (str(B2), 0), (str(B3), 1))

    async def body(h: Harness) -> None:
        await h.start()
        await h.until(lambda: h.ring() == h.expected_ring(BASE, {B1, B2, B3}), "all up")
        h.set(B3, False)
        await h.until(lambda: not h.state.health_of((VIP, B3)).up, "b3 down")
        await h.reload(drained)
        h.io.counters = {"vip_stats": {0: (30, 2700)}, "backend_stats": {h.index(B1): (30, 2700)}}
        doc = status.document(h.state, CounterSampler(h.io).refresh())
        vip = doc["vips"][0]
        rows = {b["address"]: b for b in vip["backends"]}
        assert [rows[str(b)]["state"] for b in (B1, B2, B3)] == ["up", "drained", "down"]
        assert rows[str(B1)]["ring_slots"] == RING and rows[str(B1)]["ring_share"] == 1.0
        assert rows[str(B1)]["packets"] == 30 and rows[str(B2)]["packets"] == 0
        assert rows[str(B3)]["reason"] == "fake fail; direct: fake fail", "dead both ways"
        assert {r["via"] for r in rows.values()} == {"tunnel"}
        assert (vip["healthy"], vip["in_ring"], vip["packets"]) == (2, 1, 30)
    run(body)


def test_runtime_weights_drain_and_undrain_and_survive_a_restart(tmp_path: Any) -> None:
    state = tmp_path / "weights.json"
    io = FakeMapIO(RING)

    async def first() -> None:
        maps = NodeMaps(io, BASE, LINK, adopt=True)
        node = NodeState(maps, BASE, overrides.load(state), lambda spec: FakeChecker())
        rec = Reconciler(node, NoRoutes(), weights_file=state)
        await rec.change("startup")
        task = asyncio.create_task(rec.run())
        try:
            for _ in range(300):
                if all(node.health().values()):
                    break
                await asyncio.sleep(0.01)
            await rec.set_weight("10.0.0.1:80/tcp", str(B2), 0)
            index = maps.alloc.backend_idx[(0, B2)]
            assert index not in io.rings[0] and io.backends[index].up, "drained: no new flows, old ones kept"
            with pytest.raises(KeyError, match=r"no backend 10\.9\.9\.9"):
                await rec.set_weight("10.0.0.1:80/tcp", "10.9.9.9", 0)
            with pytest.raises(KeyError, match="no VIP"):
                await rec.set_weight("10.0.0.9:80/tcp", str(B2), 0)
        finally:
            task.cancel()
            await node.stop()

    async def restarted() -> None:
        maps = NodeMaps(io, BASE, LINK, adopt=True)
        node = NodeState(maps, BASE, overrides.load(state), lambda spec: FakeChecker())
        rec = Reconciler(node, NoRoutes(), weights_file=state)
        assert node.config.vips[0].backends[1].weight == 0, "the drain is kept across a restart"
        assert node.base.vips[0].backends[1].weight == 1
        await rec.change("startup")
        await rec.set_weight("10.0.0.1:80/tcp", str(B2), None)
        assert maps.alloc.backend_idx[(0, B2)] in io.rings[0], "undrained: back in the ring"
        await node.stop()

    asyncio.run(first())
    assert '"weight": 0' in state.read_text()
    asyncio.run(restarted())
    assert state.read_text().strip() == "[]"


def test_a_reload_that_drops_a_backend_drops_its_saved_weight(tmp_path: Any) -> None:
    state = tmp_path / "weights.json"
    smaller = config((str(B1), 1), (str(B3), 1))

    async def main() -> None:
        maps = NodeMaps(FakeMapIO(RING), BASE, LINK, adopt=True)
        node = NodeState(maps, BASE, overrides.load(state), lambda spec: FakeChecker())
        rec = Reconciler(node, NoRoutes(), weights_file=state)
        await rec.change("startup")
        await rec.set_weight("10.0.0.1:80/tcp", str(B2), 0)
        assert str(B2) in state.read_text()
        await rec.change("reload", base=smaller)
        assert state.read_text().strip() == "[]", "b2 coming back later is not drained by a stale file"
        await node.stop()

    asyncio.run(main())


class _LoopGatedIO(FakeMapIO):
    """Backend writes wait (bounded) until the event loop has run a callback queued after the apply began: an
    apply that ran on the loop itself could never see it."""

    def __init__(self) -> None:
        super().__init__(RING)
        self.gate = threading.Event()
        self.loop_ran_meanwhile: list[bool] = []

    def put_backends(self, backends: Any) -> None:
        self.loop_ran_meanwhile.append(self.gate.wait(timeout=2.0))
        super().put_backends(backends)


def test_an_apply_runs_off_the_event_loop() -> None:
    """Issue 13, item 3: the maps are written in a worker thread, so checks, BGP and the API keep running
    while Maglev and the slot diffs of many VIPs are computed."""
    io = _LoopGatedIO()

    async def body(h: Harness) -> None:
        asyncio.get_running_loop().call_later(0.05, io.gate.set)
        await h.rec.change("startup")
        assert io.loop_ran_meanwhile and all(io.loop_ran_meanwhile), io.loop_ran_meanwhile
        assert {s.address for s in io.backends.values()} == {B1, B2, B3}

    run(body, io=io)


def test_a_check_knows_the_pairs_it_serves() -> None:
    """A backend behind two VIPs with one direct check is one prober: its flip names both pairs, and a flip is
    looked up, not found by scanning every key (that was O(backends^2) at start-up)."""
    from edge_lb.control.nodestate import Candidate

    shared = {"address": "10.1.0.1"}
    check = {"type": "tcp", "via": "direct"}
    cfg = parse_config({"node": {"interface": "eth0"}, "healthcheck": check, "vip": [
        {"address": "10.0.0.1", "port": 80, "protocol": "tcp", "backend": [shared, {"address": "10.1.0.2"}]},
        {"address": "10.0.0.2", "port": 80, "protocol": "tcp", "backend": [shared]},
        {"address": "10.0.0.3", "port": 80, "protocol": "tcp", "healthcheck": {"type": "none"},
         "backend": [shared]}]})
    cand = Candidate.of(cfg, {})
    b1 = ipaddress.ip_address("10.1.0.1")
    v1, v2 = (VipKey.of(v) for v in cfg.vips[:2])
    key = cand.keys[(v1, b1)]
    assert key is not None and cand.pairs_of[key] == [(v1, b1), (v2, b1)]
    assert sorted(len(p) for p in cand.pairs_of.values()) == [1, 2], "the unchecked pair has no prober"
