"""Backend death -> out of the ring, and back: `python benchmarks/failover_bench.py [--json] [--runs N]`.

Needs root. For each check profile it builds the data-plane lab (edge_lb.lab.labs: client, router, LB, b1-b3),
runs the real supervisor, and then, `--runs` times: kills b2's HTTP server and times until the supervisor's
status shows b2 "down" with 0 ring slots; restarts the server and times until b2 is "up" with slots again;
pauses a random 0..interval so that the next kill lands at a random phase of the check cycle.

Times are taken from the moment the killed server has been reaped (or the new one spawned) to the end of
the first status request that shows the change; status is polled every POLL seconds, so each figure is an
upper bound with about one poll period (plus one request) of resolution. Figures are reported, never
asserted.
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from killbench import BenchError, parse_args, spread

from edge_lb.errors import EdgeLbError
from edge_lb.lab.labs import DataplaneLab
from edge_lb.lab.netns import Lab
from healthchecks.spec import CheckSpec

VICTIM = "b2"
POLL = 0.015  # seconds between two status requests while waiting for a change
STATE_BOUND = 30.0  # seconds any one wait may take before the benchmark gives up
UP_BOUND = 60.0  # seconds for every backend to come up after the supervisor starts


@dataclass(frozen=True)
class Profile:
    name: str
    spec: CheckSpec


PROFILES = (
    Profile("default", CheckSpec(kind="http")),
    Profile("fast", CheckSpec(kind="http", interval=0.5, fast_interval=0.1, timeout=0.25, fall=2, rise=2)),
)


def check_lines(spec: CheckSpec) -> str:
    """The spec as TOML lines for [vip.healthcheck]."""
    return (f'  type = "{spec.kind}"\n  interval = {spec.interval}\n  fast_interval = {spec.fast_interval}\n'
            f"  timeout = {spec.timeout}\n  rise = {spec.rise}\n  fall = {spec.fall}\n"
            f"  jitter = {spec.jitter}\n")


def bounds(spec: CheckSpec) -> dict[str, float]:
    """Worst cases from the check settings alone (no poll, apply or server start-up time).

    out: the next steady check is at most `interval` away, then fall-1 more at `fast_interval`. A killed
    server refuses at once, so no timeout is added; a silent (blackholed) backend would add fall x timeout.
    back: the same with rise, a down backend being checked at `interval` too.
    """
    out = spec.interval + (spec.fall - 1) * spec.fast_interval
    back = spec.interval + (spec.rise - 1) * spec.fast_interval
    return {"out_bound_s": out, "out_bound_jitter_s": out * (1 + spec.jitter),
            "out_bound_silent_s": (out + spec.fall * spec.timeout) * (1 + spec.jitter),
            "back_bound_s": back, "back_bound_jitter_s": back * (1 + spec.jitter)}


def wait_until(cond: Callable[[], bool], bound: float, what: str) -> float:
    """Seconds from now until cond() first holds (polled every POLL s); BenchError past `bound`."""
    start = time.monotonic()
    while True:
        if cond():
            return time.monotonic() - start
        if time.monotonic() - start > bound:
            raise BenchError(f"not within {bound:g} s: {what}")
        time.sleep(POLL)


def victim_is(d: DataplaneLab, state: str, in_ring: bool) -> Callable[[], bool]:
    def cond() -> bool:
        got, slots = d.backend_states()[VICTIM]
        return got == state and (slots > 0) == in_ring

    return cond


def start(d: DataplaneLab, spec: CheckSpec) -> None:
    d.build()
    d.prepare_lb()
    d.config_path.write_text(d.config_text(check=check_lines(spec)))
    d.start_supervisor()
    wait_until(lambda: all(s == "up" for s, _ in d.backend_states().values()), UP_BOUND,
               "every backend up after start")


def cycle(d: DataplaneLab, spec: CheckSpec, rng: random.Random) -> tuple[float, float]:
    """One kill and restart of the victim: (seconds out of the ring, seconds back in)."""
    d.stop_http(VICTIM)
    out = wait_until(victim_is(d, "down", in_ring=False), STATE_BOUND, f"{VICTIM} down with 0 ring slots")
    d.start_http(VICTIM)
    back = wait_until(victim_is(d, "up", in_ring=True), STATE_BOUND, f"{VICTIM} up with ring slots")
    time.sleep(rng.uniform(0, spec.interval))
    return out, back


def measure(profile: Profile, runs: int, rng: random.Random) -> dict[str, Any]:
    with Lab(prefix="fbench") as lab:
        d = DataplaneLab(lab)
        try:
            start(d, profile.spec)
            time.sleep(rng.uniform(0, profile.spec.interval))
            pairs = [cycle(d, profile.spec, rng) for _ in range(runs)]
        except (EdgeLbError, BenchError) as exc:
            tail = d.supervisor_log()[-3000:] if d.supervisor is not None else ""
            raise BenchError(f"profile {profile.name}: {exc}\n--- supervisor.log (tail) ---\n{tail}") from exc
        finally:
            d.close()
    outs, backs = [p[0] for p in pairs], [p[1] for p in pairs]
    spec = profile.spec
    return {"profile": profile.name, "runs": runs,
            "check": {"type": spec.kind, "interval": spec.interval, "fast_interval": spec.fast_interval,
                      "timeout": spec.timeout, "fall": spec.fall, "rise": spec.rise, "jitter": spec.jitter},
            "out": spread(outs, "s"), "back": spread(backs, "s"),
            "bounds": bounds(spec)}


def render(results: list[dict[str, Any]]) -> str:
    head = (f"{'profile':<8} {'interval':>8} {'fast':>5} {'tmo':>5} {'fall':>4} {'rise':>4} | "
            f"{'out med':>7} {'min':>5} {'max':>5} {'bound':>5} {'+jit':>5} | "
            f"{'back med':>8} {'min':>5} {'max':>5} {'bound':>5}")
    lines = [head, "-" * len(head)]
    for r in results:
        c, o, b, k = r["check"], r["out"], r["back"], r["bounds"]
        lines.append(
            f"{r['profile']:<8} {c['interval']:>8.2f} {c['fast_interval']:>5.2f} {c['timeout']:>5.2f} "
            f"{c['fall']:>4} {c['rise']:>4} | {o['median_s']:>7.3f} {o['min_s']:>5.2f} {o['max_s']:>5.2f} "
            f"{k['out_bound_s']:>5.2f} {k['out_bound_jitter_s']:>5.2f} | "
            f"{b['median_s']:>8.3f} {b['min_s']:>5.2f} {b['max_s']:>5.2f} {k['back_bound_s']:>5.2f}")
    lines.append(f"seconds; median/min/max of {results[0]['runs']} kills of {VICTIM}'s HTTP server "
                 f"(status polled every {POLL * 1000:.0f} ms). out = killed -> down with 0 ring slots; "
                 "back = restarted -> up with ring slots.")
    lines.append("bound = interval + (fall-1)*fast_interval (back: rise); +jit = x (1 + jitter). "
                 "Refused connections fail at once: no timeout in the bound.")
    return "\n".join(lines)


def main() -> int:
    args = parse_args(__doc__.splitlines()[0], "kills per profile")
    rng = random.Random(args.seed)
    try:
        results = [measure(profile, args.runs, rng) for profile in PROFILES]
    except BenchError as exc:
        print(f"failover_bench: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"victim": VICTIM, "poll_s": POLL, "profiles": results}, indent=2) if args.json
          else render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
