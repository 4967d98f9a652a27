"""Local faults are not backend faults: the errno table, the machine, the monitor, the node's judgment, and
BGP withdrawing with "local fault: ..." (and announcing again with the backends' states as they were)."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import os
import resource
from pathlib import Path

import pytest

from edge_lb.api.metrics import Metrics
from edge_lb.bgp.policy import desired_routes, withheld
from edge_lb.config import load_config
from edge_lb.control import status
from edge_lb.control.linkwatch import LinkWatch, down_during, link_fault
from edge_lb.control.localfaults import LocalFaults, Verdict, judge
from healthchecks import local
from healthchecks.base import Result, Target
from healthchecks.machine import Health, step
from healthchecks.monitor import CheckKey, HealthMonitor, Observation
from healthchecks.spec import CheckSpec

from .memnode import BACKENDS, running
from .tcpcheck import HOWS, first_result

LOOPBACK = Target(ipaddress.ip_address("127.0.0.1"), 9)

CAUSES = [
    # (errno, this node has a route to the target, local cause)
    (errno.EMFILE, None, "EMFILE"),
    (errno.ENFILE, True, "ENFILE"),
    (errno.ENOBUFS, None, "ENOBUFS"),
    (errno.ENOMEM, None, "ENOMEM"),
    (errno.EADDRNOTAVAIL, None, "EADDRNOTAVAIL"),
    (errno.ENETDOWN, True, "ENETDOWN"),
    (errno.EPERM, None, "EPERM"),
    (errno.ENETUNREACH, False, "ENETUNREACH"),  # this node has no route: its own routing table said so
    (errno.ENETUNREACH, True, None),  # it has one: a router's ICMP net unreachable, about the backend's path
    (errno.ENETUNREACH, None, None),  # not known: not blamed on the node
    (errno.EHOSTUNREACH, False, "EHOSTUNREACH"),  # an unreachable route here
    (errno.EHOSTUNREACH, True, None),  # ARP got no answer: the backend is gone
    (errno.ECONNREFUSED, None, None),
    (errno.ECONNRESET, False, None),
    (errno.ETIMEDOUT, None, None),
    (None, None, None),
]


@pytest.mark.parametrize(("err", "routed", "want"), CAUSES, ids=[str(c) for c in CAUSES])
def test_which_errors_are_this_nodes(err: int | None, routed: bool | None, want: str | None) -> None:
    assert local.cause(err, routed) == want


def test_the_route_is_asked_only_when_it_decides(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[Target] = []
    monkeypatch.setattr(local, "routed", lambda t: asked.append(t) or False)
    refused = local.failed("connect", ConnectionRefusedError(errno.ECONNREFUSED, "x"), LOOPBACK)
    assert refused == Result(False, "connect: refused") and asked == []
    unreachable = local.failed("connect", OSError(errno.ENETUNREACH, "x"), LOOPBACK)
    assert unreachable == Result(False, "connect: network unreachable", "ENETUNREACH") and asked == [LOOPBACK]


def test_a_routed_target_is_routed() -> None:
    assert local.routed(LOOPBACK) is True


def test_describe_names_the_errno() -> None:
    assert local.describe("EMFILE") == "EMFILE (too many open files)"
    assert local.describe("link down") == "link down"


@pytest.mark.parametrize("how", HOWS)
def test_a_tcp_check_out_of_descriptors_is_a_local_fault(how: str) -> None:
    """The real check (a prober's TcpChecker, or the tcp engine) with the process at its RLIMIT_NOFILE:
    EMFILE, blamed on this node."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    held: list[int] = []

    def exhaust() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 16, hard))
        with pytest.raises(OSError):
            for _ in range(64):  # bounded: the limit is 16 above what is open
                held.append(os.open("/dev/null", os.O_RDONLY))

    try:
        result = asyncio.run(first_result(how, CheckSpec(via="direct"), LOOPBACK, started=exhaust))
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert result == Result(False, "socket: too many open files", "EMFILE")


UP, DOWN = Health(up=True), Health(up=False)
STEPS = [
    # (state, ok, local, expected up, expected streak)
    (UP, False, "EMFILE", True, 0),  # a local failure starts no fall streak
    (Health(True, 1), False, "link down", True, 1),  # ... and does not end one
    (DOWN, False, "ENOBUFS", False, 0),
    (Health(False, 1), False, "EMFILE", False, 1),  # a rise streak is kept, not reset
    (UP, False, None, False, 0),  # fall=1: a real failure takes it down
    (DOWN, True, "EMFILE", True, 0),  # a success is a success (a local cause on it is ignored)
]


@pytest.mark.parametrize(("state", "ok", "cause", "up", "streak"), STEPS, ids=[str(s) for s in STEPS])
def test_a_local_result_leaves_the_state_as_it_was(state: Health, ok: bool, cause: str | None, up: bool,
                                                    streak: int) -> None:
    new = step(state, ok, "r", rise=1, fall=1, local=cause)
    assert (new.up, new.streak) == (up, streak)
    if cause and not ok:
        assert new.reason == f"r (local fault {cause}: not counted)"


def test_blamed_only_failures_without_their_own_cause() -> None:
    assert local.blamed(Result(False, "timeout"), "link down") == Result(False, "timeout", "link down")
    assert local.blamed(Result(False, "x", "EMFILE"), "link down").local == "EMFILE"
    assert local.blamed(Result(True, "ok"), "link down") == Result(True, "ok")
    assert local.blamed(Result(False, "timeout"), None) == Result(False, "timeout")


def test_link_fault_and_down_during() -> None:
    assert link_fault("eth0", True, "UP") is None
    assert link_fault("eth0", True, "UNKNOWN") is None
    assert link_fault("eth0", True, "LOWERLAYERDOWN") == "eth0 operstate LOWERLAYERDOWN"
    assert link_fault("eth0", False, "DOWN") == "eth0 administratively down"
    assert down_during(10, 11, down_since=10.5, up_at=None)  # went down during the check
    assert not down_during(10, 11, down_since=11.5, up_at=None)  # after it
    assert down_during(10, 11, down_since=None, up_at=9.5, after_up=1.0)  # just came back
    assert not down_during(10, 11, down_since=None, up_at=8.0, after_up=1.0)


def test_the_link_watch_times_its_changes(caplog: pytest.LogCaptureFixture) -> None:
    clock = iter([100.0, 103.0])
    watch = LinkWatch("eth0", clock=lambda: next(clock))
    with caplog.at_level(logging.INFO, "edge_lb"):
        watch.set("eth0 operstate DOWN")
        assert watch.during(99, 101) == local.LINK_DOWN and watch.down_since == 100.0
        watch.set(None)
    assert watch.fault is None and watch.up_at == 103.0
    assert "state=down" in caplog.text and "down_for=3.0s" in caplog.text


def key(i: int, spec: CheckSpec) -> CheckKey:
    return CheckKey(Target(ipaddress.ip_address(f"10.9.0.{i}"), 80), spec)


class Scripted:
    """A checker answering from a list of results, then the last one forever."""

    def __init__(self, results: list[Result]) -> None:
        self.results = results

    async def check(self, target: Target) -> Result:
        return self.results.pop(0) if len(self.results) > 1 else self.results[0]

    async def aclose(self) -> None:
        pass


def test_the_monitor_records_local_faults_and_blames_its_link() -> None:
    spec = CheckSpec(interval=0.01, fast_interval=0.01, jitter=0, rise=1, fall=1)
    emfile = Result(False, "socket: too many open files", "EMFILE")
    checker = Scripted([emfile] * 3 + [Result(False, "timeout")])
    seen: list[tuple[Result, Observation]] = []
    flips: list[object] = []
    link_down = True

    async def main() -> None:
        monitor = HealthMonitor(lambda s: checker, lambda *a: flips.append(a),
                                node_fault=lambda start, end: local.LINK_DOWN if link_down else None,
                                on_result=lambda k, r, o: seen.append((r, o)))
        monitor.start({key(1, spec): UP})
        async with asyncio.timeout(5):
            while len(seen) < 6:
                await asyncio.sleep(0.01)
        assert monitor.observation(key(1, spec)) is not None
        await monitor.stop()

    asyncio.run(main())
    assert flips == [], "neither EMFILE nor a timeout while the link was down took the backend down"
    assert [r.local for r, _ in seen[:4]] == ["EMFILE", "EMFILE", "EMFILE", "link down"]
    first, later = seen[0][1], seen[3][1]
    assert first.local_since is not None and later.local_since == first.local_since, "one run of local faults"
    assert later.health.up and later.local == "link down"


def test_a_crashing_checker_is_a_local_fault() -> None:
    class Crashing:
        async def check(self, target: Target) -> Result:
            raise RuntimeError("bug")

        async def aclose(self) -> None:
            pass

    spec = CheckSpec(interval=0.01, fast_interval=0.01, jitter=0, fall=1)

    async def main() -> Observation | None:
        monitor = HealthMonitor(lambda s: Crashing(), lambda *a: None)
        monitor.start({key(1, spec): UP})
        await asyncio.sleep(0.1)
        seen = monitor.observation(key(1, spec))
        await monitor.stop()
        return seen

    seen = asyncio.run(main())
    assert seen is not None and seen.health.up and seen.local == local.CHECKER_ERROR


JUDGE = [
    # (probes, link, expected cause, expected since, withdraw); now = 100, bound = 8
    ([], None, None, None, False),
    ([("EMFILE", 99.0), (None, None), (None, None)], None, None, None, False),  # a minority: judged
    ([("EMFILE", 99.0), ("EMFILE", 95.0), (None, None)], None,
     "EMFILE (too many open files) on 2 of 3 checks", 99.0, False),
    ([("EMFILE", 91.0), ("EMFILE", 92.0), (None, None)], None,
     "EMFILE (too many open files) on 2 of 3 checks", 92.0, True),
    ([("EMFILE", 90.0), ("ENOBUFS", 91.0), ("EMFILE", 99.0)], None,
     "EMFILE (too many open files) on 2 of 3 checks (+1 other)", 91.0, True),
    ([("EMFILE", 90.0), (None, None)], None, None, None, False),  # half is not most
    ([], ("eth0 operstate DOWN", 95.0), "link down (eth0 operstate DOWN)", 95.0, False),
    ([(None, None)], ("eth0 operstate DOWN", 90.0), "link down (eth0 operstate DOWN)", 90.0, True),
]


@pytest.mark.parametrize(("probes", "link", "cause", "since", "withdraw"), JUDGE, ids=[str(j) for j in JUDGE])
def test_judge(probes: list[tuple[str | None, float | None]], link: tuple[str, float] | None,
               cause: str | None, since: float | None, withdraw: bool) -> None:
    verdict = judge(probes, link, now=100.0, bound=8.0)
    assert (verdict.cause, verdict.since, verdict.withdraw) == (cause, since, withdraw)
    assert verdict.checks == len(probes)


def test_policy_withholds_every_vip_on_a_local_fault(tmp_path: Path) -> None:
    from .memnode import config_text

    path = tmp_path / "c.toml"
    path.write_text(config_text(tmp_path))
    config = load_config(path)
    healthy = {(k, a): True for k, a in _pairs(config)}
    assert desired_routes(config, healthy, True, False, None)
    assert desired_routes(config, healthy, True, False, "local fault: EMFILE") == {}
    why = withheld(config, healthy, True, False, "local fault: EMFILE")
    assert set(why.values()) == {"local fault: EMFILE"}
    assert set(withheld(config, healthy, True, True, "local fault: EMFILE").values()) == {
        "the node is disabled for maintenance"}, "the operator's switch is named first"


def _pairs(config: object) -> list[tuple[object, object]]:
    from edge_lb.dataplane.desired import VipKey

    return [(VipKey.of(v), b.address) for v in config.vips for b in v.backends]  # type: ignore[attr-defined]


def test_logged_once_per_cause_per_minute(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    faults = LocalFaults(lambda: [], lambda: 8.0, clock=lambda: now[0])
    spec = CheckSpec()
    bad = Result(False, "socket: too many open files", "EMFILE")
    with caplog.at_level(logging.INFO, "edge_lb"):
        for i in range(100):
            now[0] = i * 0.5  # 50 s of failures
            faults.observe(key(1, spec), bad, Observation(UP, local="EMFILE", local_since=0.0))
        faults.observe(key(1, spec), Result(False, "x", "ENOBUFS"), Observation(UP))
        now[0] = 61.0
        faults.observe(key(1, spec), bad, Observation(UP))
    lines = [r.getMessage() for r in caplog.records if "cause=EMFILE" in r.getMessage()]
    assert len(lines) == 2 and "not_logged=99" in lines[1], lines
    assert faults.counts == {"EMFILE": 101, "ENOBUFS": 1}


def test_a_node_that_cannot_judge_withdraws_and_announces_again_as_it_was(tmp_path: Path) -> None:
    """The in-memory node (real NodeState, BgpController, FakeSpeaker): every check failing with EMFILE
    keeps both backends up and in the ring; past the bound (0.1 s here) BGP withdraws with "local fault";
    when the checks answer again the route is announced again, the ring never having changed."""

    async def main() -> None:
        async with running(tmp_path) as node:
            ring = list(node.maps.ring(node.key()))
            for backend in BACKENDS:
                node.checker.set_local(backend, "EMFILE")
            await node.until(lambda: "10.0.0.1/32" not in node.announced(), "withdrawn on the local fault")
            assert node.state.health() == {p: True for p in node.state.health()}, "no backend marked down"
            assert list(node.maps.ring(node.key())) == ring
            assert node.bgp is not None
            why = node.bgp.status()["withheld"]["10.0.0.1/32"]
            assert why == "local fault: EMFILE (too many open files) on 2 of 2 checks"
            doc = node.ops.status()
            faults = doc["local_faults"]
            assert faults["withdrawn"] and faults["faulty"] == {"EMFILE": 2}
            assert faults["counts"]["EMFILE"] >= 2
            text = status.render(doc)
            assert "LOCAL FAULT, this node cannot judge its backends: EMFILE" in text
            assert "every VIP withdrawn from BGP" in text
            metrics = Metrics(node.ops).render()[0].decode()
            assert 'edge_lb_local_faults_total{cause="EMFILE"}' in metrics
            assert "edge_lb_local_fault_withdrawn 1.0" in metrics
            commands = len(node.speaker.commands)
            for backend in BACKENDS:
                node.checker.set_local(backend, None)
            await node.until(lambda: "10.0.0.1/32" in node.announced(), "announced again")
            assert node.speaker.commands[commands:] == ["announce route 10.0.0.1/32 next-hop self"]
            assert list(node.maps.ring(node.key())) == ring, "the backends' states as they were"
            assert node.ops.status()["local_faults"]["cannot_judge"] is None

    asyncio.run(main())


def test_verdict_defaults() -> None:
    assert Verdict() == Verdict(None, None, False, {}, 0)


def test_status_text_names_a_minority_of_local_faults_and_the_link() -> None:
    doc = {"vips": [], "local_faults": {
        "cannot_judge": None, "since": None, "withdrawn": False, "bound": 8.0,
        "link": "down (eth0 operstate DOWN)", "checks": 3, "faulty": {"ENETUNREACH": 1},
        "counts": {"ENETUNREACH": 4}}}
    text = status.render(doc, now=0.0)
    assert "link down (eth0 operstate DOWN)" in text
    assert "local faults (not counted against backends): ENETUNREACH on 1 of 3 checks" in text
    doc["local_faults"] = {**doc["local_faults"], "since": 0.0, "link": "up",
                           "cannot_judge": "EMFILE (too many open files) on 2 of 3 checks"}
    text = status.render(doc, now=3.0)
    assert ("LOCAL FAULT, this node cannot judge its backends: EMFILE (too many open files) on 2 of 3 checks "
            "(since 3.0s ago): BGP withdraws once it lasts 8s") in text
    assert "link up" not in text


def test_the_link_watch_reads_the_kernel_and_keeps_its_word_when_it_cannot() -> None:
    from edge_lb.errors import NetlinkError

    answers: list[object] = [(True, "UP", 1500), (True, "LOWERLAYERDOWN", 1500),
                             OSError(24, "Too many open files"), NetlinkError("interface 'eth0' not found"),
                             (True, "UP", 1500)]

    def read(ifname: str) -> tuple[bool, str, int]:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        assert isinstance(answer, tuple)
        return answer

    async def main() -> list[str | None]:
        watch = LinkWatch("eth0", read=read)
        seen = []
        for _ in range(5):
            await watch._refresh()
            seen.append(watch.fault)
        return seen

    assert asyncio.run(main()) == [None, "eth0 operstate LOWERLAYERDOWN", "eth0 operstate LOWERLAYERDOWN",
                                   "eth0: interface 'eth0' not found", None]
