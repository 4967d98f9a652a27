"""The BGP controller with the fake speaker: health, the disable switch and shutdown drive announcements."""

from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path
from typing import Any

import pytest

from edge_lb import cli
from edge_lb.bgp.controller import BgpController
from edge_lb.bgp.policy import FakeSpeaker
from edge_lb.config import Config, parse_config
from edge_lb.control.nodestate import NodeState
from edge_lb.control.reconciler import Reconciler
from edge_lb.dataplane.desired import VipKey
from edge_lb.dataplane.mapio import FakeMapIO
from edge_lb.dataplane.node import Link, NodeMaps
from edge_lb.errors import BgpError
from healthchecks.fake import FakeChecker

B1 = ipaddress.ip_address("10.0.0.1")


def config(tmp_path: Path) -> Config:
    return parse_config({
        "node": {"interface": "eth0"},
        "bgp": {"local_as": 65001, "disable_file": str(tmp_path / "off"), "drain_time": 0.05,
                "peer": [{"address": "10.9.0.1", "as": 65000}]},
        "vip": [{"address": "10.200.1.1", "port": 80, "protocol": "tcp", "backend": [{"address": str(B1)}]}]})


def test_health_disable_and_shutdown(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    key = (VipKey.of(cfg.vips[0]), B1)
    health = {key: True}
    speaker = FakeSpeaker()
    attached = [True]

    class Source:
        config = cfg

        def serving(self) -> dict[Any, bool]:
            return health

    ctl = BgpController(Source(), lambda restarted: speaker, lambda: attached[0])
    announce = "announce route 10.200.1.1/32 next-hop self"
    withdraw = announce.replace("announce", "withdraw")

    async def until(n: int) -> None:
        for _ in range(300):
            if len(speaker.commands) >= n:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"only {speaker.commands}")

    async def main() -> None:
        task = asyncio.create_task(ctl.run())
        ctl.poke()
        await until(1)
        health[key] = False
        ctl.poke()
        await until(2)
        health[key] = True
        ctl.poke()
        await until(3)
        (tmp_path / "off").touch()  # nobody pokes: the switch is polled
        await until(4)
        assert ctl.status()["disabled"] is True
        (tmp_path / "off").unlink()
        await until(5)
        attached[0] = False  # detached behind the supervisor's back (`ip link set xdp off`)
        await until(6)
        attached[0] = True
        await until(7)
        task.cancel()
        await ctl.drain()
        assert await ctl.sync("late") == 0, "nothing is announced once shutdown began"

    asyncio.run(main())
    assert speaker.commands == [announce, withdraw, announce, withdraw, announce, withdraw, announce,
                                withdraw, "<stopped>"]


def test_cli_disable_and_enable_flip_the_file(tmp_path: Path, capsys: Any) -> None:
    path = tmp_path / "lb.toml"
    path.write_text(f'[node]\ninterface = "eth0"\n[bgp]\nlocal_as = 65001\n'
                    f'disable_file = "{tmp_path}/x/off"\n[[bgp.peer]]\naddress = "10.9.0.1"\nas = 65000\n')
    assert cli.main(["disable", "-c", str(path)]) == 0
    assert (tmp_path / "x" / "off").exists()
    assert cli.main(["enable", "-c", str(path)]) == 0
    assert not (tmp_path / "x" / "off").exists()
    path.write_text('[node]\ninterface = "eth0"\n')
    assert cli.main(["disable", "-c", str(path)]) == 2
    assert "has no [bgp] table" in capsys.readouterr().err
    # A config broken elsewhere does not block maintenance.
    path.write_text(f'[node]\ninterface = 7\n[bgp]\ndisable_file = "{tmp_path}/y"\n')
    assert cli.main(["disable", "-c", str(path)]) == 0
    assert (tmp_path / "y").exists()


def test_reload_withdraws_a_removed_vip_before_the_maps_change(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    bgp = {"local_as": 65001, "disable_file": str(tmp_path / "off"),
           "peer": [{"address": "10.9.0.1", "as": 65000}]}
    smaller = parse_config({"node": {"interface": "eth0"}, "bgp": bgp})

    class Source:
        config = cfg

        def serving(self) -> dict[Any, bool]:
            return {(VipKey.of(cfg.vips[0]), B1): True}

    speaker = FakeSpeaker()
    ctl = BgpController(Source(), lambda restarted: speaker)

    async def main() -> None:
        await ctl.sync("startup")
        await ctl.withdraw_first(cfg)  # nothing removed: nothing sent
        await ctl.withdraw_first(smaller)

    asyncio.run(main())
    assert speaker.commands == ["announce route 10.200.1.1/32 next-hop self",
                                "withdraw route 10.200.1.1/32 next-hop self"]


def test_a_refused_announce_is_tracked_and_sent_again(tmp_path: Path) -> None:
    cfg = config(tmp_path)

    class Source:
        config = cfg

        def serving(self) -> dict[Any, bool]:
            return {(VipKey.of(cfg.vips[0]), B1): True}

    speaker = FakeSpeaker(refuse=True)
    ctl = BgpController(Source(), lambda restarted: speaker)

    async def main() -> None:
        with pytest.raises(BgpError):
            await ctl.sync("startup")
        assert ctl.announcer.announced, "maybe announced: a later withdraw will be sent"
        speaker.refuse = False
        assert await ctl.sync("retry") == 1

    asyncio.run(main())
    assert speaker.commands == ["announce route 10.200.1.1/32 next-hop self"]


def test_withdraw_first_only_withdraws(tmp_path: Path) -> None:
    """Before a rewrite: withdrawals only. A VIP that became servable, or a route left unsure by a speaker
    restart, waits for the controller's sync after the rewrite."""
    two = parse_config({
        "node": {"interface": "eth0"},
        "bgp": {"local_as": 65001, "disable_file": str(tmp_path / "off"), "drain_time": 0.05,
                "peer": [{"address": "10.9.0.1", "as": 65000}]},
        "vip": [{"address": f"10.200.1.{n}", "port": 80, "protocol": "tcp", "backend": [{"address": str(B1)}]}
                for n in (1, 2)]})
    one, other = ((VipKey.of(v), B1) for v in two.vips)
    health = {one: True, other: False}

    class Source:
        config = two

        def serving(self) -> dict[Any, bool]:
            return health

    speaker = FakeSpeaker()
    ctl = BgpController(Source(), lambda restarted: speaker)

    async def main() -> None:
        await ctl.withdraw_first(two)
        assert speaker.commands == [], "a servable VIP is announced after the ring rewrite, not before"
        health[other] = True
        await ctl.sync("after apply")
        ctl.restarted()  # both routes unsure now: a sync would send both again
        health[one] = False
        await ctl.withdraw_first(two)

    asyncio.run(main())
    assert speaker.commands == ["announce route 10.200.1.1/32 next-hop self",
                                "announce route 10.200.1.2/32 next-hop self",
                                "withdraw route 10.200.1.1/32 next-hop self"]


def test_a_hung_speaker_does_not_hold_the_ring_rewrite(tmp_path: Path) -> None:
    """The withdraw-first is waited for a bounded time; it completes in the background."""
    cfg = config(tmp_path)
    key = (VipKey.of(cfg.vips[0]), B1)
    health = {key: True}
    release = asyncio.Event()

    class Source:
        config = cfg

        def serving(self) -> dict[Any, bool]:
            return health

    class Slow(FakeSpeaker):
        async def send(self, command: str) -> None:
            if command.startswith("withdraw"):
                await release.wait()
            await super().send(command)

    speaker = Slow()
    ctl = BgpController(Source(), lambda restarted: speaker)

    async def main() -> list[str]:
        await ctl.sync("startup")
        health[key] = False
        async with asyncio.timeout(5):  # a regression fails here instead of hanging
            await ctl.withdraw_first(cfg)
        before_release = list(speaker.commands)
        release.set()
        for _ in range(100):
            if len(speaker.commands) == 2:
                break
            await asyncio.sleep(0.01)
        return before_release

    before_release = asyncio.run(main())
    assert before_release == ["announce route 10.200.1.1/32 next-hop self"], \
        "withdraw_first returned while the speaker still held the withdraw"
    assert speaker.commands[-1] == "withdraw route 10.200.1.1/32 next-hop self", "and it went out later"


def test_draining_the_last_backend_withdraws_before_the_ring_empties(tmp_path: Path) -> None:
    """A drain through the API: routers stop sending before the node's ring has nobody left."""
    cfg = parse_config({
        "node": {"interface": "eth0"}, "dataplane": {"ring_size": 1009, "max_backends": 4},
        "bgp": {"local_as": 65001, "disable_file": str(tmp_path / "off"), "drain_time": 0.05,
                "peer": [{"address": "10.9.0.1", "as": 65000}]},
        "vip": [{"address": "10.200.1.1", "port": 80, "protocol": "tcp",
                 "backend": [{"address": str(B1), "healthcheck": {"type": "none"}}]}]})
    io = FakeMapIO(1009)
    seen: list[tuple[str, bool]] = []

    class Watching(FakeSpeaker):
        async def send(self, command: str) -> None:
            seen.append((command.split()[0], any(io.rings.get(0, []))))
            await super().send(command)

    async def main() -> None:
        maps = NodeMaps(io, cfg, Link("02:00:00:00:00:01", "02:00:00:00:00:02", 1500), adopt=True)
        state = NodeState(maps, cfg, {}, lambda spec: FakeChecker())
        bgp = BgpController(state, lambda restarted: Watching())
        rec = Reconciler(state, bgp, weights_file=tmp_path / "w.json")
        await rec.change("startup")
        await bgp.sync("startup")
        await rec.set_weight("10.200.1.1:80/tcp", str(B1), 0)
        await state.stop()

    asyncio.run(main())
    assert seen == [("announce", True), ("withdraw", True)], "the withdraw left while the ring still served"
    assert not any(io.rings[0]), "then the ring was emptied"
