"""Issue 13's targets beyond the per-packet ones, and the report's assembly (pure: unit-tested with fake
figures in tests/unit/test_bench_report.py).

Every target is one entry of the document's "targets" block: {"item", "what", "unit", "max", "value", "met"}.
`max` is the issue's limit (None: a figure the issue asks to report, with no limit; `met` is None then). A
target whose part did not run has "value" None, "met" None and "measured_by": the command that measures it:
never met. Figures are reported, never asserted.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

Figures = Mapping[str, Any]  # one part's figures, as its module returns them


@dataclass(frozen=True)
class Target:
    item: int  # issue 13's numbered item
    what: str  # formatted with the part's sizes (reaction: flip_vips, pool_vips, ...; api: vips, backends)
    unit: str
    limit: float | None  # the most the value may be; None: reported only
    part: str  # "reaction", "api", "restart" or "checks": the figures it is read from
    pick: Callable[[Figures], float]


def _median(key: str) -> Callable[[Figures], float]:
    return lambda f: float(f[key]["median"])


def _profile(name: str, key: str) -> Callable[[Figures], float]:
    return lambda f: float(f[name][key])


TARGETS: dict[str, Target] = {
    "reaction_flip": Target(3, "health flip, {flip_vips} VIP x {backends} backends -> changed slots written",
                            "ms", 10.0, "reaction", _median("flip_ms")),
    "reaction_pool_death": Target(3, "one pool backend dead behind {pool_vips} VIPs: apply", "ms", 50.0,
                                  "reaction", _median("pool_dead_ms")),
    "reaction_loop_stall": Target(3, "longest event-loop stall during it (apply in a worker thread)", "ms",
                                  20.0, "reaction", lambda f: float(f["pool_loop_lag_ms"]["max"])),
    "reaction_first_apply": Target(3, "{big_vips} VIPs x {backends}: first apply (of start -> announced)",
                                   "s", 5.0, "reaction", _median("big_first_apply_s")),
    "reaction_reload": Target(3, "{big_vips} VIPs x {backends}: reload changing one backend", "ms", 100.0,
                              "reaction", _median("big_reload_ms")),
    "api_metrics": Target(3, "GET /metrics at {vips} VIPs x {backends}: event-loop time", "ms", 20.0, "api",
                          _median("metrics_loop_ms")),
    "api_node": Target(3, "GET /api/v1/node at {vips} VIPs x {backends}: event-loop time", "ms", 20.0, "api",
                       _median("api_node_ms")),
    "checks_http1k_cpu": Target(4, "1,000 http backends at 1 s: supervisor CPU", "% of a core", 25.0,
                                "checks", _profile("http1k", "cpu_pct_of_one_core")),
    "checks_http1k_per_s": Target(4, "1,000 http backends at 1 s: checks served (1,000 wanted)", "checks/s",
                                  None, "checks", _profile("http1k", "checks_per_s")),
    "checks_tcp10k_stale": Target(4, "10,000 tcp backends at 1 s: stale (last check > 2 s old)", "backends",
                                  0.0, "checks", _profile("tcp10k", "stale")),
    "checks_tcp10k_per_s": Target(4, "10,000 tcp backends at 1 s: checks served (10,000 wanted)", "checks/s",
                                  None, "checks", _profile("tcp10k", "checks_per_s")),
    "checks_tcp10k_rss": Target(4, "10,000 tcp backends: supervisor RSS", "MiB", None, "checks",
                                _profile("tcp10k", "rss_mib")),
    "restart_checking": Target(5, "kill -9 -> a new supervisor checking again (median)", "s", 1.0, "restart",
                               lambda f: float(f["checking_s"])),
    "restart_status": Target(5, "kill -9 -> status answers 'running' (median)", "s", None, "restart",
                             lambda f: float(f["status_s"])),
    "restart_rss": Target(5, "supervisor RSS after the restart (median)", "MiB", None, "restart",
                          lambda f: float(f["rss_mb"])),
}
# the part -> the command that measures it (the default run measures "reaction" and "api")
MEASURED_BY = {"reaction": "edge-lb bench", "api": "edge-lb bench", "restart": "edge-lb bench --restart",
               "checks": "edge-lb bench --checks"}
DEFAULT_SIZES = {"flip_vips": 1, "pool_vips": 50, "big_vips": 500, "backends": 10, "vips": 500}
PER_PACKET_UNITS = {"floor": "x floor", "pass": "x pass"}


def _sizes(part: str, figures: Figures | None) -> dict[str, Any]:
    if figures is None:
        return {}
    if part == "reaction":
        return dict(figures["sizes"])
    if part == "api":
        return {"vips": figures["vips"], "backends": figures["backends"]}
    return {}


def entry(target: Target, figures: Figures | None) -> dict[str, Any]:
    """The target's entry from its part's figures (None: the part did not run)."""
    what = target.what.format_map(_Sizes(_sizes(target.part, figures)))
    out: dict[str, Any] = {"item": target.item, "what": what, "unit": target.unit, "max": target.limit}
    if figures is None:
        return out | {"value": None, "met": None, "measured_by": MEASURED_BY[target.part]}
    value = round(target.pick(figures), 4)
    met = None if target.limit is None else value <= target.limit
    return out | {"value": value, "met": met}


class _Sizes(dict[str, Any]):
    """A part's sizes; for a part that did not run, the default run's."""

    def __missing__(self, key: str) -> Any:
        return DEFAULT_SIZES[key]


def _per_packet_units(targets: dict[str, dict[str, Any]]) -> None:
    """The per-packet targets (edge_lb/dataplane/bench.py) get their item and unit too."""
    for t in targets.values():
        if "ratio_to" in t:
            t.setdefault("item", 1)
            t.setdefault("unit", PER_PACKET_UNITS.get(t["ratio_to"], t["ratio_to"]))
        elif "max_ms" in t:
            t.setdefault("item", 3)
            t.setdefault("unit", "ms")


def assemble(doc: dict[str, Any], parts: Mapping[str, Figures | None],
             durations: Mapping[str, float]) -> dict[str, Any]:
    """The per-packet document with every target of TARGETS in "targets", each part's figures under its
    name (None: not run) and how long each part took."""
    out = dict(doc)
    targets = {name: dict(t) for name, t in doc.get("targets", {}).items()}
    _per_packet_units(targets)
    for name, target in TARGETS.items():
        targets[name] = entry(target, parts.get(target.part))
    out["targets"] = targets
    out["parts"] = {part: parts.get(part) for part in MEASURED_BY}
    out["durations_s"] = {name: round(seconds, 1) for name, seconds in durations.items()}
    return out


def _verdict(t: Mapping[str, Any]) -> str:
    if t["value"] is None:
        return f"not measured ({t['measured_by']})"
    if t["met"] is None:
        return "reported"
    return "met" if t["met"] else "NOT MET"


def format_targets(doc: Mapping[str, Any]) -> str:
    """The table of TARGETS' entries: item, what, value, limit, verdict."""
    row = "{:<4} {:<66} {:>16} {:>18}  {}"
    lines = [row.format("item", "target (issue 13)", "value", "limit", "verdict")]
    for name in TARGETS:
        t = doc["targets"][name]
        value = "-" if t["value"] is None else f"{t['value']:.4g} {t['unit']}"
        limit = "-" if t["max"] is None else f"<= {t['max']:g} {t['unit']}"
        lines.append(row.format(t["item"], t["what"], value, limit, _verdict(t)))
    durations = ", ".join(f"{name} {seconds:g} s" for name, seconds in doc.get("durations_s", {}).items())
    if durations:
        lines.append(f"took: {durations}")
    return "\n".join(line.rstrip() for line in lines)
