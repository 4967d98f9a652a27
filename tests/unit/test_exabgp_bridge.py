"""The two hang layers of BGP without root: the bridge withdraws every route when the supervisor's heartbeat
stops (pure Routes, then the real bridge process between a fake supervisor and a fake ExaBGP), and the
supervisor's liveness judgement kills and restarts an ExaBGP that stops answering."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge_lb.bgp.exabgp_bridge import HEARTBEAT, WITHDREW, Routes, route_of
from edge_lb.bgp.exabgp_liveness import PROBE, Liveness
from edge_lb.config import parse_config
from edge_lb.configbgp import Bgp
from edge_lb.errors import ConfigError

from .test_config import base
from .test_exabgp_unit import FAKE_EXABGP, PEER4, FakeBridge, _channel, _run, _speaker, _until

A1 = "announce route 10.81.100.1/32 next-hop self med 10"
A2 = "neighbor 10.81.1.1 announce route 10.81.100.2/32 next-hop self"


def test_route_of_keys_by_selector_and_prefix_and_builds_the_withdraw() -> None:
    assert route_of(A1) == ("announce", "10.81.100.1/32",
                            "withdraw route 10.81.100.1/32 next-hop self med 10")
    assert route_of(A2) == ("announce", "neighbor 10.81.1.1 10.81.100.2/32",
                            "neighbor 10.81.1.1 withdraw route 10.81.100.2/32 next-hop self")
    assert route_of("withdraw route 10.81.100.1/32 next-hop self")[:2] == ("withdraw", "10.81.100.1/32")
    assert route_of("version") is None and route_of("announce route") is None


class Clock:
    def __init__(self) -> None:
        self.now = 10.0

    def __call__(self) -> float:
        return self.now


def test_routes_expire_once_after_the_first_heartbeat_and_own_the_withdraws_acks() -> None:
    clock = Clock()
    routes = Routes(2.0, clock)
    assert routes.relayed(A1) and routes.relayed(A2)
    assert routes.relayed("withdraw route 10.81.100.1/32 next-hop self med 10")
    assert routes.relayed(A1)
    clock.now += 60
    assert routes.take_expired() is None, "no heartbeat yet: nothing is watched (an old supervisor)"
    assert routes.beat() == []
    clock.now += 2.0
    assert routes.take_expired() is None
    clock.now += 0.1
    assert routes.take_expired() == ["neighbor 10.81.1.1 withdraw route 10.81.100.2/32 next-hop self",
                                     "withdraw route 10.81.100.1/32 next-hop self med 10"]
    assert routes.take_expired() is None
    # The supervisor's four commands are answered first (relayed), then the bridge's two (swallowed).
    assert [routes.answer_is_ours() for _ in range(7)] == [False] * 4 + [True] * 2 + [False]
    # Expired: an announce is held (not for ExaBGP), a withdraw goes through and is forgotten.
    a3 = "announce route 10.81.100.3/32 next-hop self"
    assert not routes.relayed(a3) and not routes.owed
    assert routes.relayed("neighbor 10.81.1.1 withdraw route 10.81.100.2/32 next-hop self")
    assert routes.relayed("version")
    # The heartbeat is back: what the supervisor now wants is announced again, its acks the bridge's.
    assert routes.beat() == [A1, a3]
    assert list(routes.owed) == [False, False, True, True]
    assert routes.beat() == []
    clock.now += 3
    assert routes.take_expired() == ["withdraw route 10.81.100.1/32 next-hop self med 10",
                                     "withdraw route 10.81.100.3/32 next-hop self"]


def _bridge(path: Path, timeout: float) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "edge_lb.bgp.exabgp_bridge", "--socket", str(path),
            "--heartbeat-timeout", str(timeout)]
    return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=path.parent)


def test_the_bridge_withdraws_everything_when_heartbeats_stop_and_says_so(tmp_path: Path) -> None:
    path = tmp_path / "api.sock"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        server.listen(1)
        server.settimeout(10)
        with _bridge(path, 0.5) as proc:
            assert proc.stdin is not None and proc.stdout is not None
            try:
                conn, _ = server.accept()
                with conn, conn.makefile("rb") as received:
                    received.readline()  # bridge <pid>
                    began = time.monotonic()  # the last heartbeat
                    conn.sendall(f"{HEARTBEAT}\n{A1}\n".encode())
                    assert proc.stdout.readline() == f"{A1}\n".encode(), "heartbeats are not relayed"
                    proc.stdin.write(b"done\n")
                    proc.stdin.flush()
                    assert received.readline() == b"done\n"
                    line = proc.stdout.readline()
                    took = time.monotonic() - began
                    assert line == b"withdraw route 10.81.100.1/32 next-hop self med 10\n"
                    assert 0.45 <= took <= 3.0, took
                    assert received.readline() == f"{WITHDREW} 1\n".encode()
                    proc.stdin.write(b"done\nneighbor 10.81.1.1 up\n")  # its own ack: swallowed
                    proc.stdin.flush()
                    assert received.readline() == b"neighbor 10.81.1.1 up\n"
                    conn.sendall(f"{A2}\n".encode())  # no heartbeat yet: held, answered by the bridge
                    assert received.readline() == b"done\n"
                    conn.sendall(f"{HEARTBEAT}\nversion\n".encode())  # the supervisor runs again
                    sent = [proc.stdout.readline() for _ in range(3)]
                    assert sent == [f"{A1}\n".encode(), f"{A2}\n".encode(), b"version\n"]
                    proc.stdin.write(b"done\ndone\nexabgp 5.0.15\ndone\n")
                    proc.stdin.flush()
                    assert received.readline() == b"exabgp 5.0.15\n"
                    assert received.readline() == b"done\n", "the supervisor's own acks are relayed again"
                assert proc.wait(timeout=5) == 0
            finally:
                proc.kill()


def test_the_channel_beats_and_reports_the_bridges_withdraw(tmp_path: Path) -> None:
    withdrawn: list[bool] = []

    async def run() -> None:
        async with _channel(tmp_path, on_withdrawn=lambda: withdrawn.append(True)) as channel:
            channel.heartbeat()  # no bridge yet: nothing to do
            bridge = await FakeBridge.connect(channel)
            await asyncio.wait_for(channel.connected.wait(), 5)
            assert await bridge.line() == HEARTBEAT, "one at once: the bridge watches from its connect"
            channel.heartbeat()
            assert await bridge.line() == HEARTBEAT
            await bridge.say(f"{WITHDREW} 2")
            await _until(lambda: withdrawn)

    _run(run())


def test_liveness_probes_an_idle_exabgp_and_kills_one_that_does_not_answer(tmp_path: Path) -> None:
    killed: list[bool] = []

    async def run() -> None:
        async with _channel(tmp_path) as channel:
            liveness = Liveness(channel, lambda: killed.append(True), interval=0.1, wedged_after=0.4)
            watching = asyncio.create_task(liveness.run())
            bridge = await FakeBridge.connect(channel)
            liveness.connected()
            assert await bridge.expect() == PROBE
            await bridge.say("exabgp 5.0.15", "done")
            await _until(lambda: liveness.status(1)["last_answer"] is not None)
            assert liveness.status(1)["state"] == "up" and not killed
            assert await bridge.expect() == PROBE  # the next one: left unanswered
            assert not killed
            began = time.monotonic()
            await _until(lambda: killed)
            assert time.monotonic() - began <= 2.0
            status = liveness.status(1)
            assert status["state"] == "wedged" and "no answer" in str(status["reason"])
            assert channel.peers() == {p: "unknown" for p in channel.peers()}
            liveness.died(-9)
            assert liveness.status(None)["restarts"] == 1 and liveness.state == "wedged"
            liveness.connected()
            assert liveness.state == "up"
            watching.cancel()

    _run(run())


@pytest.fixture
def stalling_exabgp(tmp_path: Path) -> str:
    """test_exabgp_unit's fake ExaBGP, which also stops answering (and reading) on "stall"."""
    path = tmp_path / "fake-exabgp"
    die = '    if command == "die":'
    text = FAKE_EXABGP.replace(die, f'    if command == "stall":\n        time.sleep(60)\n{die}')
    assert text != FAKE_EXABGP
    path.write_text(f"#!{sys.executable}\n{text}")
    path.chmod(0o755)
    return str(path)


def test_the_speaker_restarts_an_exabgp_that_stops_answering(tmp_path: Path, stalling_exabgp: str,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from edge_lb.bgp import exabgp

    monkeypatch.setattr(exabgp, "RESTART_DELAYS", (0.05,))
    restarted: list[bool] = []

    async def run() -> None:
        speaker = _speaker(tmp_path, stalling_exabgp, lambda: restarted.append(True))
        speaker.liveness.interval, speaker.liveness.wedged_after = 0.2, 0.5
        await speaker.start()
        try:
            first = speaker.pid
            assert speaker.liveness_status()["state"] == "up"
            assert "--heartbeat-timeout 2" in speaker.config_path.read_text()
            stall = asyncio.create_task(speaker.send("stall"))  # the fake ExaBGP stops reading
            await _until(lambda: speaker.liveness_status()["state"] == "wedged", 5)
            await _until(lambda: restarted and speaker.liveness_status()["state"] == "up", 10)
            assert speaker.pid != first and speaker.liveness_status()["restarts"] == 1
            with pytest.raises(Exception, match=r"bridge lost|ExaBGP"):
                await stall
            await speaker.send("announce route 10.81.100.1/32 next-hop self")
            await _until(lambda: speaker.peers() == {PEER4: "up"})
        finally:
            await speaker.stop()
        assert speaker.liveness_status()["state"] == "stopped"

    _run(run(), timeout=30)


def test_heartbeat_timeout_is_checked_against_the_hold_time() -> None:
    def problems(heartbeat: float) -> list[str]:
        data = base()
        data["bgp"] = {"local_as": 65001, "heartbeat_timeout": heartbeat,
                       "peer": [{"address": "10.81.1.1", "as": 65000, "hold_time": 3}]}
        data["vip"] = data["vip"][:1]
        try:
            config = parse_config(data)
        except ConfigError as exc:
            return exc.problems
        assert config.bgp is not None and config.bgp.heartbeat_timeout == heartbeat
        return []

    assert problems(2.5) == []
    assert problems(3) == ["bgp.heartbeat_timeout: 3 s must be below the smallest [[bgp.peer]] hold_time "
                           "(3 s): a hung supervisor would keep its routes longer than a dead node"]
    assert len(problems(0.2)) == 1 and problems(0.2)[0].startswith("bgp.heartbeat_timeout:")
    assert Bgp(local_as=1, peers=()).heartbeat_timeout == 2.0
