"""The BGP controller with the fake speaker: health, the disable switch and shutdown drive announcements."""

from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path
from typing import Any

from edge_lb import cli
from edge_lb.bgp import FakeSpeaker
from edge_lb.bgpctl import BgpController, drain
from edge_lb.config import Config, parse_config
from edge_lb.state import VipKey

B1 = ipaddress.ip_address("10.0.0.1")


def config(tmp_path: Path) -> Config:
    return parse_config({
        "node": {"interface": "eth0"},
        "bgp": {"local_as": 65001, "disable_file": str(tmp_path / "off"),
                "peer": [{"address": "10.9.0.1", "as": 65000}]},
        "vip": [{"address": "10.200.1.1", "port": 80, "protocol": "tcp", "backend": [{"address": str(B1)}]}]})


def test_health_disable_and_shutdown(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    key = (VipKey.of(cfg.vips[0]), B1)
    health = {key: True}
    speaker = FakeSpeaker()
    ctl = BgpController(cfg, speaker, lambda: health)
    ctl.attached = True
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
        task.cancel()
        await drain(ctl, speaker, 0.05)
        assert await ctl.sync("late") == 0, "nothing is announced once shutdown began"

    asyncio.run(main())
    assert speaker.commands == [announce, withdraw, announce, withdraw, announce, withdraw, "<stopped>"]


def test_cli_disable_and_enable_flip_the_file(tmp_path: Path, capsys: Any) -> None:
    path = tmp_path / "lb.toml"
    path.write_text(f'[node]\ninterface = "eth0"\n[bgp]\nlocal_as = 65001\n'
                    f'disable_file = "{tmp_path}/x/off"\n[[bgp.peer]]\naddress = "10.9.0.1"\nas = 65000\n')
    assert cli.main(["disable", "-c", str(path)]) == 0
    assert (tmp_path / "x" / "off").exists()
    assert cli.main(["enable", "-c", str(path)]) == 0
    assert not (tmp_path / "x" / "off").exists()
    path.write_text('[node]\ninterface = "eth0"\n')
    assert cli.main(["disable", "-c", str(path)]) == 1
    assert "has no [bgp] table" in capsys.readouterr().err
