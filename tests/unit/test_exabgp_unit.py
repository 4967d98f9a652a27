"""edge_lb.bgp.exabgp, exabgp_config and exabgp_bridge without root:
the config, the notification parser, the API channel
against a fake bridge, the real bridge against a fake supervisor, and the speaker running a fake ExaBGP."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, ClassVar

import pytest

from edge_lb.bgp import exabgp
from edge_lb.bgp.exabgp import ExaBgpSpeaker
from edge_lb.bgp.exabgp_api import ApiChannel, PeerChange, parse_notification
from edge_lb.bgp.exabgp_bridge import HEARTBEAT
from edge_lb.bgp.exabgp_config import default_router_id, exabgp_environment, render_config
from edge_lb.configbgp import Bgp, Peer
from edge_lb.errors import BgpError

PEER4, PEER6 = "10.81.1.1", "fd81:1::1"
LOCAL = {PEER4: "10.81.1.2", PEER6: "fd81:1::2"}
BRIDGE = ["/usr/bin/python3", "-m", "edge_lb.bgp.exabgp_bridge", "--socket", "/run/edge-lb/t.bgp/api.sock"]


def _bgp(*peers: Peer, router_id: str | None = None) -> Bgp:
    rid = ipaddress.IPv4Address(router_id) if router_id else None
    return Bgp(local_as=65001, router_id=rid, peers=peers or (
        Peer(address=ipaddress.ip_address(PEER4), asn=65000),
        Peer(address=ipaddress.ip_address(PEER6), asn=65002, hold_time=9)))


def _run(coro: Coroutine[Any, Any, None], timeout: float = 20.0) -> None:
    asyncio.run(asyncio.wait_for(coro, timeout))


# --- render_config ------------------------------------------------------------------------------------------


def _block(conf: str, peer: str) -> list[str]:
    """The neighbor's block, from its first line to its unindented closing brace, lines stripped."""
    lines = conf.splitlines()
    start = lines.index(f"neighbor {peer} {{")
    return [line.strip() for line in lines[start:lines.index("}", start) + 1]]


def test_render_config_has_the_process_and_a_neighbor_per_peer() -> None:
    conf = render_config(_bgp(), "10.81.1.2", LOCAL, BRIDGE)
    assert "process edge-lb {" in conf
    assert f"run {' '.join(BRIDGE)};" in conf
    assert "encoder text;" in conf
    assert _block(conf, PEER4) == [
        "neighbor 10.81.1.1 {", "router-id 10.81.1.2;", "local-address 10.81.1.2;", "local-as 65001;",
        "peer-as 65000;", "hold-time 3;", "family {", "ipv4 unicast;", "}", "api {",
        "processes [ edge-lb ];", "neighbor-changes;", "}", "}"]
    assert _block(conf, PEER6) == [
        "neighbor fd81:1::1 {", "router-id 10.81.1.2;", "local-address fd81:1::2;", "local-as 65001;",
        "peer-as 65002;", "hold-time 9;", "family {", "ipv6 unicast;", "}", "api {",
        "processes [ edge-lb ];", "neighbor-changes;", "}", "}"]
    assert "$" not in conf


@pytest.mark.parametrize("bad", ["10.81.1.2\n", "10.81.1.2;", "10.81.1.2 }", "{", "10.81.1.2\x00", ""])
def test_render_config_refuses_values_that_would_rewrite_the_config(bad: str) -> None:
    with pytest.raises(BgpError, match="refusing local address"):
        render_config(_bgp(), "10.81.1.2", {**LOCAL, PEER4: bad}, BRIDGE)
    with pytest.raises(BgpError, match="refusing bridge command word"):
        render_config(_bgp(), "10.81.1.2", LOCAL, [*BRIDGE, bad])
    with pytest.raises(BgpError, match="router id"):
        render_config(_bgp(), bad, LOCAL, BRIDGE)


def test_render_config_needs_every_local_address_and_an_ipv4_router_id() -> None:
    with pytest.raises(BgpError, match=f"peer {PEER6}: no local address"):
        render_config(_bgp(), "10.81.1.2", {PEER4: LOCAL[PEER4]}, BRIDGE)
    with pytest.raises(BgpError, match="not an IPv4 address"):
        render_config(_bgp(), "fd81:1::2", LOCAL, BRIDGE)


def test_default_router_id() -> None:
    v6_first = _bgp(Peer(address=ipaddress.ip_address(PEER6), asn=1),
                    Peer(address=ipaddress.ip_address(PEER4), asn=1))
    assert default_router_id(v6_first, LOCAL) == "10.81.1.2"
    assert default_router_id(_bgp(router_id="192.0.2.7"), LOCAL) == "192.0.2.7"
    with pytest.raises(BgpError, match=r"set bgp\.router_id"):
        default_router_id(_bgp(Peer(address=ipaddress.ip_address(PEER6), asn=1)), LOCAL)


def test_environment_drops_inherited_exabgp_settings_and_sets_ours(tmp_path: Path) -> None:
    base = {"PATH": "/usr/bin", "exabgp_cli_pipe": "/run/", "exabgp.api.ack": "false", "EXABGP_ROOT": "/x",
            "exabgp_daemon_user": "nobody"}
    env = exabgp_environment(base, tmp_path, "default")
    assert env["PATH"] == "/usr/bin"
    assert {"exabgp_cli_pipe", "EXABGP_ROOT", "exabgp_daemon_user"}.isdisjoint(env)
    assert env["exabgp.api.ack"] == "true" and env["exabgp.api.cli"] == "false"
    assert env["exabgp.daemon.drop"] == "false" and env["exabgp.daemon.daemonize"] == "false"
    assert env["exabgp.api.pipename"] == "edge-lb-default"
    assert env["EXABGP_ENVFILE"] == str(tmp_path / "exabgp.env")
    with pytest.raises(BgpError):
        exabgp_environment(base, tmp_path, "a b")


# --- the notification parser --------------------------------------------------------------------------------


@pytest.mark.parametrize(("line", "change"), [
    ("neighbor 10.81.1.1 up", PeerChange("10.81.1.1", "up")),
    ("neighbor 10.81.1.1 connected\n", PeerChange("10.81.1.1", "connected")),
    ("neighbor 10.81.1.1 down - stop, message [shutting down]",
     PeerChange("10.81.1.1", "down", "stop, message [shutting down]")),
    ("neighbor 10.81.1.1 down - ", PeerChange("10.81.1.1", "down")),
    ("neighbor 10.81.1.1 down -", PeerChange("10.81.1.1", "down")),
    ("neighbor fd81:0:0::1 up", PeerChange("fd81::1", "up")),
    ("done", None),
    ("error", None),
    ("", None),
    ("shutdown 1234 1200", None),
    ("neighbor 10.81.1.1 receive update start", None),
    ("neighbor 10.81.1.1 up extra", None),
    ("neighbor not-an-ip up", None),
])
def test_parse_notification(line: str, change: PeerChange | None) -> None:
    assert parse_notification(line) == change


# --- ApiChannel against a fake bridge -----------------------------------------------------------------------


class FakeBridge:
    """The bridge's side of api.sock, played by the test: reads commands, writes ExaBGP's lines."""

    opened: ClassVar[list[FakeBridge]] = []  # closed by _channel() when the test ends

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, channel: ApiChannel, hello: str = "bridge 4242") -> FakeBridge:
        reader, writer = await asyncio.open_unix_connection(channel.path)
        bridge = cls(reader, writer)
        cls.opened.append(bridge)
        await bridge.say(hello)
        return bridge

    async def say(self, *lines: str) -> None:
        self.writer.write("".join(f"{line}\n" for line in lines).encode())
        await self.writer.drain()

    async def expect(self) -> str:
        """The next command (the channel's heartbeats, for the real bridge alone, are skipped)."""
        while (line := await self.line()) == HEARTBEAT:
            pass
        return line

    async def line(self) -> str:
        return (await asyncio.wait_for(self.reader.readline(), 5)).decode().rstrip("\n")

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


@asynccontextmanager
async def _channel(tmp_path: Path, **kwargs: Any) -> AsyncIterator[ApiChannel]:
    channel = ApiChannel(tmp_path / "api.sock", [PEER4, PEER6], **kwargs)
    await channel.open()
    try:
        yield channel
    finally:
        while FakeBridge.opened:
            await FakeBridge.opened.pop().close()
        await channel.close()


async def _until(predicate: Callable[[], object], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def _answer(bridge: FakeBridge, *lines: str) -> str:
    command = await bridge.expect()
    await bridge.say(*lines)
    return command


def test_send_returns_on_done_and_raises_on_error(tmp_path: Path) -> None:
    async def run() -> None:
        async with _channel(tmp_path) as channel:
            bridge = await FakeBridge.connect(channel)
            await asyncio.wait_for(channel.connected.wait(), 5)
            answer = asyncio.create_task(_answer(bridge, "done"))
            await channel.send("announce route 10.81.100.1/32 next-hop self")
            assert await answer == "announce route 10.81.100.1/32 next-hop self"
            answer = asyncio.create_task(_answer(bridge, "error"))
            with pytest.raises(BgpError, match=r"'error' to 'announce route 10\.81\.100\.2/32 next-hop"):
                await channel.send("announce route 10.81.100.2/32 next-hop self")
            await answer

    _run(run())


def test_notifications_before_the_ack_update_peers_and_are_not_the_ack(tmp_path: Path) -> None:
    async def run() -> None:
        async with _channel(tmp_path) as channel:
            assert channel.peers() == {PEER4: "down", PEER6: "down"}
            bridge = await FakeBridge.connect(channel)
            await asyncio.wait_for(channel.connected.wait(), 5)
            answer = asyncio.create_task(_answer(
                bridge, "neighbor 10.81.1.1 connected", "", "neighbor 10.81.1.1 up", "",
                "neighbor fd81:1:0::1 down - peer reset", "", "done"))
            await channel.send("withdraw route 10.81.100.1/32 next-hop self")
            await answer
            assert channel.peers() == {PEER4: "up", PEER6: "down"}
            await bridge.say("neighbor 10.81.1.1 down - hold timer expired")  # with no command in flight
            await _until(lambda: channel.peers()[PEER4] == "down")

    _run(run())


def test_a_timed_out_command_resets_the_bridge_so_no_late_ack_is_misread(tmp_path: Path) -> None:
    async def run() -> None:
        async with _channel(tmp_path, ack_timeout=0.2) as channel:
            bridge = await FakeBridge.connect(channel)
            await asyncio.wait_for(channel.connected.wait(), 5)
            began = time.monotonic()
            late = r"did not answer 'announce route 10\.81\.100\.1/32 next-hop self' within 0\.2 s"
            with pytest.raises(BgpError, match=late):
                await channel.send("announce route 10.81.100.1/32 next-hop self")
            assert time.monotonic() - began < 1.0
            with pytest.raises(BgpError, match="not connected"):
                await channel.send("announce route 10.81.100.2/32 next-hop self")
            fresh = await FakeBridge.connect(channel)  # what ExaBGP does when its bridge exits
            await _until(lambda: channel.connected.is_set())
            second = asyncio.create_task(channel.send("announce route 10.81.100.2/32 next-hop self"))
            assert await fresh.expect() == "announce route 10.81.100.2/32 next-hop self"
            await fresh.say("done")
            await asyncio.wait_for(second, 5)
            del bridge

    _run(run())


def test_a_cancelled_command_s_ack_is_not_taken_for_the_next(tmp_path: Path) -> None:
    async def run() -> None:
        async with _channel(tmp_path) as channel:
            bridge = await FakeBridge.connect(channel)
            await asyncio.wait_for(channel.connected.wait(), 5)
            first = asyncio.create_task(channel.send("announce route 10.81.100.1/32 next-hop self"))
            assert await bridge.expect() == "announce route 10.81.100.1/32 next-hop self"
            first.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await first
            second = asyncio.create_task(channel.send("withdraw route 10.81.100.1/32 next-hop self"))
            assert await bridge.expect() == "withdraw route 10.81.100.1/32 next-hop self"
            await bridge.say("error")  # the cancelled command's late answer
            await asyncio.sleep(0.05)
            assert not second.done()
            await bridge.say("done")
            await asyncio.wait_for(second, 5)

    _run(run())


def test_send_fails_fast_without_a_bridge_and_when_the_bridge_goes(tmp_path: Path) -> None:
    async def run() -> None:
        async with _channel(tmp_path, accept=lambda pid: pid == 4242) as channel:
            with pytest.raises(BgpError, match="not connected: cannot send 'announce"):
                await channel.send("announce route 10.81.100.1/32 next-hop self")
            stranger = await FakeBridge.connect(channel, hello="bridge 1")
            assert await stranger.reader.read() == b""  # refused: closed at once
            assert not channel.connected.is_set()
            with pytest.raises(BgpError, match="control characters"):
                await channel.send("announce route 10.81.100.1/32 next-hop self\nshutdown")

            bridge = await FakeBridge.connect(channel)
            await asyncio.wait_for(channel.connected.wait(), 5)
            await bridge.say("neighbor 10.81.1.1 up")
            await _until(lambda: channel.peers()[PEER4] == "up")
            sending = asyncio.create_task(channel.send("withdraw route 10.81.100.1/32 next-hop self"))
            await bridge.expect()
            await bridge.close()
            with pytest.raises(BgpError, match="bridge lost before the answer"):
                await asyncio.wait_for(sending, 5)
            assert channel.peers() == {PEER4: "unknown", PEER6: "unknown"}
            with pytest.raises(BgpError, match="not connected"):
                await channel.send("withdraw route 10.81.100.1/32 next-hop self")

    _run(run())


# --- the real bridge against a fake supervisor --------------------------------------------------------------


@pytest.mark.parametrize("closing", ["supervisor", "exabgp"])
def test_bridge_relays_both_ways_and_exits_when_either_side_closes(tmp_path: Path, closing: str) -> None:
    path = tmp_path / "api.sock"
    argv = [sys.executable, "-m", "edge_lb.bgp.exabgp_bridge", "--socket", str(path)]
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        server.listen(1)
        server.settimeout(10)
        # The with closes the pipes and reaps; kill() first, in case an assertion failed with it running.
        with subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=tmp_path) as proc:
            assert proc.stdin is not None and proc.stdout is not None
            try:
                conn, _ = server.accept()
                with conn, conn.makefile("rb") as received:  # both: the fd closes with the last of them
                    assert received.readline() == f"bridge {os.getpid()}\n".encode()  # its parent: "ExaBGP"
                    conn.sendall(b"announce route 10.81.100.1/32 next-hop self\n")
                    assert proc.stdout.readline() == b"announce route 10.81.100.1/32 next-hop self\n"
                    proc.stdin.write(b"neighbor 10.81.1.1 up\n\ndone\n")
                    proc.stdin.flush()
                    lines = [received.readline() for _ in range(3)]
                    assert lines == [b"neighbor 10.81.1.1 up\n", b"\n", b"done\n"]
                    if closing == "exabgp":
                        proc.stdin.close()
                        assert received.readline() == b""
                assert proc.wait(timeout=5) == 0
            finally:
                proc.kill()


def test_bridge_gives_up_when_nobody_listens(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edge_lb.bgp import exabgp_bridge

    monkeypatch.setattr(exabgp_bridge, "CONNECT_WINDOW", 0.3)
    began = time.monotonic()
    assert exabgp_bridge.main(["--socket", str(tmp_path / "none.sock")]) == 1
    assert 0.3 <= time.monotonic() - began < 2.0


# --- the speaker running a fake ExaBGP ----------------------------------------------------------------------

# Starts the `run` command of the config like ExaBGP, reports every neighbor up, answers "done" (or "error" to
# commands starting with "bad"), exits with 7 on "die". FAKE_MODE=crash: fails at once; hang: never runs it.
FAKE_EXABGP = """\
import os, re, subprocess, sys, time
mode = os.environ.get("FAKE_MODE", "")
if mode == "crash":
    sys.exit("fake exabgp: boom")
if mode == "hang":
    time.sleep(60)
conf = open(sys.argv[1]).read()
run = re.search(r"run (.*);", conf)[1].split()
bridge = subprocess.Popen(run, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
for peer in re.findall(r"^neighbor (\\S+) \\{", conf, re.M):
    bridge.stdin.write(f"neighbor {peer} up\\n\\n".encode())
bridge.stdin.flush()
for line in bridge.stdout:
    command = line.decode().strip()
    if command == "die":
        os._exit(7)
    bridge.stdin.write(b"error\\n" if command.startswith("bad") else b"done\\n")
    bridge.stdin.flush()
"""


@pytest.fixture
def fake_exabgp(tmp_path: Path) -> str:
    path = tmp_path / "fake-exabgp"
    path.write_text(f"#!{sys.executable}\n{FAKE_EXABGP}")
    path.chmod(0o755)
    return str(path)


def _speaker(tmp_path: Path, fake: str, on_restart: Callable[[], None] = lambda: None,
             **kwargs: Any) -> ExaBgpSpeaker:
    bgp = _bgp(Peer(address=ipaddress.ip_address(PEER4), asn=65000,
                    local_address=ipaddress.ip_address(LOCAL[PEER4])))
    return ExaBgpSpeaker(bgp, "t", tmp_path / "run", on_restart, exabgp=fake, **kwargs)


def test_speaker_starts_sends_restarts_and_stops(tmp_path: Path, fake_exabgp: str,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(exabgp, "RESTART_DELAYS", (0.05,))
    restarts: list[int | None] = []

    async def run() -> None:
        speaker = _speaker(tmp_path, fake_exabgp, lambda: restarts.append(speaker.pid))
        with pytest.raises(BgpError, match="not connected"):
            await speaker.send("announce route 10.81.100.1/32 next-hop self")
        await speaker.start()
        assert (tmp_path / "run").stat().st_mode & 0o777 == 0o700
        assert "local-address 10.81.1.2;" in speaker.config_path.read_text()
        first = speaker.pid
        await speaker.send("announce route 10.81.100.1/32 next-hop self")
        with pytest.raises(BgpError, match="'error' to 'bad command'"):
            await speaker.send("bad command")
        await _until(lambda: speaker.peers() == {PEER4: "up"})

        with pytest.raises(BgpError, match="bridge lost"):
            await speaker.send("die")
        await _until(lambda: restarts)
        assert restarts[0] is not None and restarts[0] != first
        await speaker.send("announce route 10.81.100.1/32 next-hop self")
        await _until(lambda: speaker.peers() == {PEER4: "up"})

        pid = speaker.pid
        await speaker.stop()
        await speaker.stop()
        assert speaker.pid is None and pid is not None
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        assert not speaker.channel.path.exists()
        with pytest.raises(BgpError, match="not connected"):
            await speaker.send("announce route 10.81.100.1/32 next-hop self")

    with caplog.at_level(logging.INFO, logger="edge_lb"):
        _run(run())
    assert len(restarts) == 1
    messages = [r.getMessage() for r in caplog.records]
    assert any("phase=died code=7" in m for m in messages)
    assert any("phase=stopped" in m for m in messages)


@pytest.mark.parametrize(("mode", "error"), [
    ("crash", r"exited with code 1 before its bridge connected(.|\n)*fake exabgp: boom"),
    ("hang", r"its bridge did not connect within 0.5 s"),
])
def test_speaker_start_fails_with_the_log_tail(tmp_path: Path, fake_exabgp: str, mode: str, error: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_MODE", mode)

    async def run() -> None:
        speaker = _speaker(tmp_path, fake_exabgp, connect_timeout=0.5)
        with pytest.raises(BgpError, match=error):
            await speaker.start()
        assert speaker.pid is None
        assert not speaker.channel.path.exists()
        await speaker.stop()

    began = time.monotonic()
    _run(run())
    assert time.monotonic() - began < 5.0
