"""edge_lb.control.watchdog: sd_notify over a fake NOTIFY_SOCKET, WatchdogSec from the environment, and the
progress judgement (loop lag, check scheduler) that gates systemd's ping and the BGP bridge's heartbeat."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from edge_lb.bgp.policy import FakeSpeaker
from edge_lb.control import watchdog
from edge_lb.control.watchdog import LAG_BOUND, Scheduler, Watchdog, notify, watchdog_interval
from healthchecks.base import Target
from healthchecks.fake import FakeChecker
from healthchecks.machine import Health
from healthchecks.monitor import CheckKey, HealthMonitor, Observation
from healthchecks.spec import CheckSpec


def receiver(path: Path | str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    return sock


def test_notify_sends_one_datagram_to_the_notify_socket(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    with receiver(path) as sock:
        assert notify("READY=1", {"NOTIFY_SOCKET": str(path)})
        assert sock.recv(4096) == b"READY=1"


def test_notify_reaches_an_abstract_socket() -> None:
    name = f"edge-lb-test-{os.getpid()}"
    with receiver("\0" + name) as sock:
        assert notify("WATCHDOG=1", {"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(4096) == b"WATCHDOG=1"


def test_notify_without_systemd_or_with_a_dead_socket_says_false(tmp_path: Path) -> None:
    assert notify("READY=1", {}) is False
    assert notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "gone.sock")}) is False


def test_watchdog_interval_is_for_our_pid_only() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "20000000"}, pid=7) == 20.0
    assert watchdog_interval({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": "7"}, pid=7) == 20.0
    assert watchdog_interval({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": "8"}, pid=7) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "x"}) is None
    assert watchdog_interval({}) is None


# --- the judgement ------------------------------------------------------------------------------------------

SPEC = CheckSpec(kind="tcp", port=80, interval=1.0, timeout=0.5, jitter=0.0)


@dataclass
class FakeMonitor:
    """What Scheduler reads of a HealthMonitor: the running probers, how many checks each completed, when the
    last one did (epoch) and the streak under way."""

    checks: dict[CheckKey, int] = field(default_factory=dict)
    began_at: dict[CheckKey, float] = field(default_factory=dict)
    streak: dict[CheckKey, int] = field(default_factory=dict)

    def running(self) -> set[CheckKey]:
        return set(self.checks)

    def observation(self, key: CheckKey) -> Observation | None:
        if key not in self.checks:
            return None
        began = self.began_at.get(key)
        return Observation(Health(up=True, streak=self.streak.get(key, 0)), began, self.checks[key],
                           began_at=began)


@dataclass
class Clock:
    now: float = 100.0

    def __call__(self) -> float:
        return self.now


def _key(address: str = "10.0.0.1") -> CheckKey:
    return CheckKey(Target(ipaddress.ip_address(address), 80), SPEC)


def _watchdog(clock: Clock, **env: str) -> tuple[Watchdog, list[str]]:
    sent: list[str] = []
    dog = Watchdog({"WATCHDOG_USEC": "4000000", **env}, clock,
                   notify_to=lambda message: sent.append(message) or True)
    return dog, sent


def test_pings_and_beats_while_checks_complete_and_stops_both_when_they_stall() -> None:
    clock, monitor, speaker = Clock(), FakeMonitor({_key(): 0}), FakeSpeaker()
    dog, sent = _watchdog(clock)
    scheduler = Scheduler(monitor, clock)  # type: ignore[arg-type]
    for _ in range(8):  # 4 s of ticks, a check completing every second
        clock.now += 0.5
        monitor.checks[_key()] += 1
        dog.tick(scheduler, 0.0, clock.now, speaker.heartbeat)
    assert dog.ok and dog.status()["systemd"] is True
    assert sent.count("WATCHDOG=1") == 4  # every interval / 4 = 1 s
    assert speaker.beats == 8
    # The checks stop completing: past the slowest check's period + slack, no ping and no heartbeat.
    bound = SPEC.interval + SPEC.budget + 1.0 + watchdog._SLACK  # budget: a tunnel check and its direct one
    stalled_at = None
    for _ in range(20):
        clock.now += 0.5
        dog.tick(scheduler, 0.0, clock.now, speaker.heartbeat)
        if not dog.ok and stalled_at is None:
            stalled_at, beats, pings = clock.now, speaker.beats, sent.count("WATCHDOG=1")
    assert stalled_at is not None and bound <= stalled_at - 104.0 <= bound + 1.5
    assert speaker.beats == beats and sent.count("WATCHDOG=1") == pings
    assert dog.status()["reason"] is not None and "no health check completed" in str(dog.status()["reason"])
    monitor.checks[_key()] += 1  # they resume
    clock.now += 1.0
    dog.tick(scheduler, 0.0, clock.now, speaker.heartbeat)
    assert dog.ok and speaker.beats == beats + 1 and sent.count("WATCHDOG=1") == pings + 1


def test_a_lagging_loop_is_not_pinged_but_still_beats_and_no_checks_is_progress() -> None:
    clock, speaker = Clock(), FakeSpeaker()
    dog, sent = _watchdog(clock)
    scheduler = Scheduler(FakeMonitor(), clock)  # type: ignore[arg-type]
    clock.now += 2.0
    dog.tick(scheduler, LAG_BOUND + 0.5, clock.now, speaker.heartbeat)
    assert not dog.ok and "late" in str(dog.reason) and sent == []
    assert speaker.beats == 1, "a loop that ticks shows progress by ticking: the bridge keeps the routes"
    clock.now += 0.25
    dog.tick(scheduler, 0.0, clock.now, speaker.heartbeat)
    assert dog.ok and sent == ["WATCHDOG=1"] and dog.status()["checks_age"] is None


def test_without_watchdogsec_nothing_is_sent_to_systemd() -> None:
    clock = Clock()
    sent: list[str] = []
    dog = Watchdog({}, clock, notify_to=lambda message: sent.append(message) or True)
    dog.tick(Scheduler(FakeMonitor(), clock), 0.0, clock.now, None)  # type: ignore[arg-type]
    assert dog.ok and sent == [] and dog.status()["systemd"] is False


def test_run_pings_a_real_notify_socket_while_real_checks_complete(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(watchdog, "TICK", 0.05)
    path = tmp_path / "notify.sock"
    env = {"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "200000"}

    async def run() -> list[bytes]:
        monitor = HealthMonitor(lambda spec: FakeChecker(), lambda *args: None)
        fast = CheckSpec(kind="tcp", port=80, interval=0.05, fast_interval=0.05, timeout=0.05)
        monitor.start({CheckKey(Target(ipaddress.ip_address("10.0.0.1"), 80), fast): Health(up=True)})
        dog = Watchdog(env)
        with receiver(path) as sock:
            sock.setblocking(False)
            task = asyncio.create_task(dog.run(monitor, None))
            await asyncio.sleep(0.6)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await monitor.stop()
            got: list[bytes] = []
            while True:
                try:
                    got.append(sock.recv(64))
                except BlockingIOError:
                    return got

    got = asyncio.run(run())
    assert got and set(got) == {b"WATCHDOG=1"}, got


def test_status_says_when_the_watchdog_or_the_speaker_is_not_well() -> None:
    from edge_lb.control.status import render

    doc: dict[str, Any] = {"phase": "running", "vips": [], "bgp": {
        "peers": {}, "announced": [], "withheld": {}, "disabled": False, "disable_file": "/x",
        "speaker": {"state": "up", "pid": 7, "restarts": 0, "reason": None, "last_answer": 0.5}},
        "watchdog": {"ok": True, "reason": None, "loop_lag": 0.0, "checks_age": 0.1, "systemd": False}}
    assert "WATCHDOG" not in render(doc) and "speaker" not in render(doc)
    doc["watchdog"]["ok"], doc["watchdog"]["reason"] = False, "the main loop ran 4.90 s late"
    doc["bgp"]["speaker"].update(state="wedged", reason="no answer to a command within 3 s", restarts=1)
    text = render(doc)
    assert "WATCHDOG: no progress (the main loop ran 4.90 s late)" in text
    assert "BGP speaker (ExaBGP) WEDGED: no answer to a command within 3 s (1 restarts)" in text


def test_after_a_long_stall_the_heartbeat_waits_for_checks_newer_than_the_stall() -> None:
    clock, speaker = Clock(), FakeSpeaker()
    wall = Clock(1000.0)
    one, two = _key("10.0.0.1"), _key("10.0.0.2")
    monitor = FakeMonitor({one: 5, two: 5}, {one: 990.0, two: 990.0})
    dog = Watchdog({}, clock, wall=wall)
    dog.resync_after = 2.0
    scheduler = Scheduler(monitor, clock)  # type: ignore[arg-type]

    def step(lag: float = 0.0, seconds: float = 1.0) -> int:
        clock.now += seconds
        wall.now += seconds
        monitor.checks[one] += 1  # the scheduler runs throughout (judged once a second)
        dog.tick(scheduler, lag, clock.now, speaker.heartbeat)
        return speaker.beats

    assert step() == 1
    assert step(lag=4.0, seconds=5.0) == 1, "no heartbeat (it would announce again) on health from before"
    monitor.began_at[one] = wall.now + 0.1  # one prober checked since the stall; the other has not
    assert step() == 1
    monitor.began_at[two], monitor.streak[two] = wall.now + 0.1, 1  # checked, half-way through a fall
    assert step() == 1
    monitor.began_at[two], monitor.streak[two] = wall.now + 0.1, 0  # its fall completed: health as it is
    assert step() == 2
    # A prober that never reports again does not keep the node withdrawn for longer than RESYNC_MAX.
    assert step(lag=4.0, seconds=5.0) == 2
    for _ in range(int(watchdog.RESYNC_MAX)):
        step()
    assert step() > 2
    beats = speaker.beats
    assert step(lag=1.5) == beats + 1, "a lag below heartbeat_timeout: beats on"


def test_a_stall_before_the_first_tick_also_waits_for_fresh_checks() -> None:
    """The bridge's first heartbeat comes from the channel at connect, before the worker runs: a supervisor
    stopped right after startup must not announce again on health from before the stall (it did: the
    first tick after the stall beat at once, with no heartbeat of its own to measure the gap from)."""
    clock, speaker, wall = Clock(), FakeSpeaker(), Clock(1000.0)
    one = _key("10.0.0.1")
    monitor = FakeMonitor({one: 5}, {one: 999.0})
    dog = Watchdog({}, clock, wall=wall)
    dog.resync_after = 2.0
    scheduler = Scheduler(monitor, clock)  # type: ignore[arg-type]
    dog.started(clock.now)
    clock.now += 5.0
    wall.now += 5.0
    dog.tick(scheduler, 4.75, clock.now, speaker.heartbeat)
    assert speaker.beats == 0, "no heartbeat on health from before the stall"
    monitor.began_at[one], monitor.checks[one] = wall.now + 0.1, 6
    clock.now += 1.0
    dog.tick(scheduler, 0.0, clock.now, speaker.heartbeat)
    assert speaker.beats == 1, "fresh health: announced again"


def test_a_check_scheduler_stall_also_waits_for_fresh_checks() -> None:
    """The bridge expires on the time since the last heartbeat, whatever stopped it. A stall of the checks
    (the loop ticking on time) withholds heartbeats too: when checks resume, the heartbeat must wait for
    health newer than the stall, as after a loop stall (it used to beat at once on pre-stall health)."""
    clock, speaker, wall = Clock(), FakeSpeaker(), Clock(1000.0)
    one, two = _key("10.0.0.1"), _key("10.0.0.2")
    monitor = FakeMonitor({one: 5, two: 5}, {one: 999.0, two: 999.0})
    dog = Watchdog({}, clock, wall=wall)
    dog.resync_after = 2.0
    scheduler = Scheduler(monitor, clock)  # type: ignore[arg-type]

    def step(checks: bool) -> int:
        clock.now += 0.5
        wall.now += 0.5
        if checks:
            monitor.checks[one] += 1
        dog.tick(scheduler, 0.0, clock.now, speaker.heartbeat)  # never any loop lag
        return speaker.beats

    assert step(checks=True) == 1
    for _ in range(16):  # 8 s without a completed check: past the scheduler's bound
        step(checks=False)
    assert not dog.ok
    stalled = speaker.beats
    for _ in range(6):  # 3 s of checks running again (judged once a second), two's health still old
        assert step(checks=True) == stalled, "no heartbeat on health from before the stall"
    assert dog.ok, "the scheduler is judged to make progress again"
    monitor.began_at[one] = monitor.began_at[two] = wall.now + 0.1
    assert step(checks=True) == stalled + 1, "fresh health everywhere: announced again"


def test_a_check_begun_before_the_stall_ended_is_not_fresh_even_if_it_completed_after() -> None:
    """A reply read on SIGCONT was sent before the stall: the backend may have died since (CI saw b1 'up'
    and announced again on such a reply). Only a check begun after the stall was seen to end counts."""
    clock, speaker, wall = Clock(), FakeSpeaker(), Clock(1000.0)
    one = _key("10.0.0.1")
    monitor = FakeMonitor({one: 5}, {one: 999.0})
    dog = Watchdog({}, clock, wall=wall)
    dog.resync_after = 2.0
    scheduler = Scheduler(monitor, clock)  # type: ignore[arg-type]
    dog.started(clock.now)
    clock.now += 5.0
    wall.now += 5.0
    dog.tick(scheduler, 4.75, clock.now, speaker.heartbeat)
    assert speaker.beats == 0
    monitor.began_at[one], monitor.checks[one] = wall.now - 4.0, 6  # began before the stop, read after it
    clock.now += 1.0
    wall.now += 1.0
    dog.tick(scheduler, 0.0, clock.now, speaker.heartbeat)
    assert speaker.beats == 0, "no heartbeat on an answer from before the stall"
    monitor.began_at[one], monitor.checks[one] = wall.now - 0.5, 7  # began after the stall was seen to end
    clock.now += 1.0
    wall.now += 1.0
    dog.tick(scheduler, 0.0, clock.now, speaker.heartbeat)
    assert speaker.beats == 1
