"""Can this node judge its backends? Local faults (healthchecks.local) counted, logged, and judged.

A check that failed for a reason on this node does not count against its backend (healthchecks.machine).
When more than half of the checks fail that way, or the node's own link is down, the node cannot judge its
backends; once that has lasted `bound` seconds, BGP withholds every VIP with the reason "local fault: ...",
and announces again as soon as it clears, with the backends' states as they were (none flipped meanwhile).

    judge(probes, link, now, bound) -> Verdict      pure: the table in tests/unit/test_local_faults.py
    LocalFaults                                     counts per cause, logs once per cause per minute, status
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from edge_lb import events
from edge_lb.control.document import LocalFaultStatus
from edge_lb.control.linkwatch import LinkWatch
from healthchecks.base import Result
from healthchecks.local import describe
from healthchecks.monitor import CheckKey, Observation

LOG_EVERY = 60.0  # seconds between two log lines about one cause (the rest are counted in `suppressed`)
_JUDGE_EVERY = 0.5  # seconds: check results re-judge the node at most this often

Probe = tuple[str | None, float | None]  # (local cause of the last result, monotonic since when)


@dataclass(frozen=True)
class Verdict:
    cause: str | None = None  # why the node cannot judge its backends now; None: it can
    since: float | None = None  # monotonic: since when
    withdraw: bool = False  # that has lasted `bound` seconds: every route is withheld
    faulty: dict[str, int] = field(default_factory=dict)  # cause -> checks whose last result was local
    checks: int = 0


def judge(probes: Sequence[Probe], link: tuple[str, float] | None, now: float, bound: float) -> Verdict:
    """The node cannot judge its backends while its link is down (`link`: why, since when) or while more than
    half of its checks' last results were local faults; `withdraw` once that has lasted `bound` seconds."""
    faulty = Counter(cause for cause, _ in probes if cause is not None)
    if link is not None:
        reason, since = link
        return Verdict(f"link down ({reason})", since, now - since >= bound, dict(faulty), len(probes))
    majority = len(probes) // 2 + 1
    if not probes or sum(faulty.values()) < majority:
        return Verdict(faulty=dict(faulty), checks=len(probes))
    # The majority has existed since its (majority)-th oldest local run began.
    since = sorted(s for c, s in probes if c is not None and s is not None)[majority - 1]
    top, count = faulty.most_common(1)[0]
    others = sum(faulty.values()) - count
    cause = f"{describe(top)} on {count} of {len(probes)} checks" + (f" (+{others} other)" if others else "")
    return Verdict(cause, since, now - since >= bound, dict(faulty), len(probes))


class LocalFaults:
    """The node's word on its local faults: fed every check result, read by BGP (`withheld`) and status."""

    def __init__(self, probes: Callable[[], Iterable[Observation]], bound: Callable[[], float],
                 link: LinkWatch | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.link = link
        self.counts: Counter[str] = Counter()  # cause -> local results since start (a Prometheus counter)
        self._probes = probes
        self._bound = bound
        self._clock = clock
        self._logged: dict[str, tuple[float, int]] = {}  # cause -> (last logged, results not logged since)
        self._verdict = Verdict()
        self._judged = float("-inf")

    def observe(self, key: CheckKey, result: Result, seen: Observation) -> None:
        """HealthMonitor's on_result: count and (rate-limited) log a local fault; re-judge now and then."""
        now = self._clock()
        if result.local is not None:
            self.counts[result.local] += 1
            self._log(key, result, now)
        if now - self._judged >= _JUDGE_EVERY:
            self.verdict()

    def _log(self, key: CheckKey, result: Result, now: float) -> None:
        cause = result.local
        assert cause is not None
        last, quiet = self._logged.get(cause, (float("-inf"), 0))
        if now - last < LOG_EVERY:
            self._logged[cause] = (last, quiet + 1)
            return
        self._logged[cause] = (now, 0)
        events.emit("local_fault", logging.WARNING, cause=cause, check=key.spec.kind,
                    target=f"{key.target.host}:{key.target.port}", reason=result.reason,
                    counted="no: not the backend's fault", not_logged=quiet or None,
                    next_line=f"within {LOG_EVERY:g}s at the earliest")

    def verdict(self) -> Verdict:
        """Judged now; a change is logged."""
        now = self._clock()
        link, down = self.link, None
        if link is not None and link.fault is not None and link.down_since is not None:
            down = (link.fault, link.down_since)
        new = judge([(o.local, o.local_since) for o in self._probes()], down, now, self._bound())
        self._transition(self._verdict, new, now)
        self._verdict, self._judged = new, now
        return new

    def _transition(self, old: Verdict, new: Verdict, now: float) -> None:
        if (old.cause is None) == (new.cause is None) and old.withdraw == new.withdraw:
            return
        if new.cause is None:
            lasted = now - old.since if old.since is not None else 0.0
            events.emit("local_fault", node="judges its backends again", lasted=f"{lasted:.1f}s",
                        bgp="announced as the backends' states allow" if old.withdraw else None)
        elif new.withdraw:
            events.emit("local_fault", logging.ERROR, node="cannot judge its backends", why=new.cause,
                        bgp="every route withheld", bound=f"{self._bound():g}s")
        elif old.cause is None:
            events.emit("local_fault", logging.WARNING, node="cannot judge its backends", why=new.cause,
                        withdraw_after=f"{self._bound():g}s")

    def withheld(self) -> str | None:
        """For BGP: why every route is withheld ("local fault: ..."), or None."""
        verdict = self.verdict()
        return f"local fault: {verdict.cause}" if verdict.withdraw else None

    def status(self, wall: Callable[[], float] = time.time) -> LocalFaultStatus:
        verdict = self.verdict()
        since = None if verdict.since is None else wall() - (self._clock() - verdict.since)
        link = "unknown" if self.link is None else "up" if self.link.fault is None else \
            f"down ({self.link.fault})"
        return {"cannot_judge": verdict.cause, "since": since, "withdrawn": verdict.withdraw,
                "bound": self._bound(), "link": link, "checks": verdict.checks, "faulty": verdict.faulty,
                "counts": dict(sorted(self.counts.items()))}

