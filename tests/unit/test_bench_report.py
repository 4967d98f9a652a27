"""`edge-lb bench`'s report without measuring: the targets block assembled from fake figures (met, not met,
reported, not measured), the table text, and the command line's refusals. The real measurement of the
reaction part: tests/dataplane/test_bench_reaction.py."""

from __future__ import annotations

from typing import Any

import pytest

from edge_lb import cli
from edge_lb.bench import command, targets
from edge_lb.bench.reaction import Sizes


def spread(median: float, worst: float | None = None) -> dict[str, Any]:
    return {"median": median, "min": median, "max": median if worst is None else worst, "runs": [median]}


def per_packet_doc() -> dict[str, Any]:
    """What edge_lb/dataplane/bench.py's report() hands over, reduced to its targets."""
    return {"method": "fake", "targets": {
        "tcp_established": {"ratio_to": "floor", "max": 1.75, "value": 2.0, "met": False},
        "non_vip": {"ratio_to": "pass", "max": 1.3, "value": 1.2, "met": True},
        "maglev_1000": {"max_ms": 5.0, "value": 3.0, "met": True}}}


REACTION = {"sizes": {"flip_vips": 1, "pool_vips": 50, "big_vips": 500, "backends": 10, "ring_size": 65537},
            "flip_ms": spread(7.5), "pool_dead_ms": spread(80.0), "pool_loop_lag_ms": spread(3.0, 12.5),
            "big_first_apply_s": spread(4.2), "big_reload_ms": spread(150.0)}
API = {"vips": 500, "backends": 10, "runs": 10, "metrics_loop_ms": {"median": 30.0, "max": 40.0},
       "api_node_ms": {"median": 3.0, "max": 4.0}}
RESTART = {"runs": [], "status_s": 0.7, "checking_s": 1.2, "rss_mb": 53.0, "origins": ["adopted"]}
CHECKS = {"http1k": {"cpu_pct_of_one_core": 24.0, "checks_per_s": 990.0},
          "tcp10k": {"checks_per_s": 3600.0, "stale": 9000, "rss_mib": 288.0}}


def test_default_run_measures_reaction_and_api_and_marks_the_rest_not_measured() -> None:
    doc = targets.assemble(per_packet_doc(), {"reaction": REACTION, "api": API},
                           {"per_packet": 10.0, "reaction": 40.0})
    t = doc["targets"]
    assert t["reaction_flip"] == {"item": 3, "unit": "ms", "max": 10.0, "value": 7.5, "met": True,
                                  "what": "health flip, 1 VIP x 10 backends -> changed slots written"}
    assert t["reaction_pool_death"]["met"] is False and t["reaction_pool_death"]["value"] == 80.0
    assert t["reaction_loop_stall"]["value"] == 12.5, "the longest stall of the runs, not their median"
    assert t["reaction_first_apply"]["unit"] == "s" and t["reaction_first_apply"]["met"] is True
    assert t["reaction_reload"]["met"] is False
    assert t["api_metrics"]["met"] is False and t["api_node"]["met"] is True
    for name in ("restart_checking", "restart_rss", "checks_http1k_cpu", "checks_tcp10k_stale"):
        assert t[name]["value"] is None and t[name]["met"] is None, name
    assert t["restart_checking"]["measured_by"] == "edge-lb bench --restart"
    assert t["checks_tcp10k_stale"]["measured_by"] == "edge-lb bench --checks"
    assert doc["parts"]["restart"] is None and doc["parts"]["reaction"] is REACTION
    assert doc["durations_s"] == {"per_packet": 10.0, "reaction": 40.0}


def test_every_part_measured() -> None:
    doc = targets.assemble(per_packet_doc(), {"reaction": REACTION, "api": API, "restart": RESTART,
                                              "checks": CHECKS}, {})
    t = doc["targets"]
    assert all(t[name]["value"] is not None and "measured_by" not in t[name] for name in targets.TARGETS)
    assert t["restart_checking"]["value"] == 1.2 and t["restart_checking"]["met"] is False
    assert t["restart_rss"] == {"item": 5, "what": "supervisor RSS after the restart (median)", "unit": "MiB",
                                "max": None, "value": 53.0, "met": None}, "reported, no limit: met is None"
    assert t["checks_http1k_cpu"]["met"] is True
    assert t["checks_tcp10k_stale"]["value"] == 9000 and t["checks_tcp10k_stale"]["met"] is False


def test_per_packet_targets_keep_their_fields_and_get_item_and_unit() -> None:
    doc = targets.assemble(per_packet_doc(), {}, {})
    assert doc["targets"]["tcp_established"] == {"ratio_to": "floor", "max": 1.75, "value": 2.0, "met": False,
                                                 "item": 1, "unit": "x floor"}
    assert doc["targets"]["non_vip"]["unit"] == "x pass"
    assert doc["targets"]["maglev_1000"]["unit"] == "ms" and doc["targets"]["maglev_1000"]["max_ms"] == 5.0
    assert per_packet_doc()["targets"]["non_vip"].keys() == {"ratio_to", "max", "value", "met"}


def test_the_sizes_in_the_text_follow_the_figures() -> None:
    small = dict(REACTION, sizes={"flip_vips": 1, "pool_vips": 3, "big_vips": 5, "backends": 2,
                                  "ring_size": 1009})
    doc = targets.assemble({}, {"reaction": small}, {})
    assert doc["targets"]["reaction_pool_death"]["what"] == "one pool backend dead behind 3 VIPs: apply"
    assert doc["targets"]["api_node"]["what"] == "GET /api/v1/node at 500 VIPs x 10: event-loop time"


def test_defaults_named_in_the_text_are_the_run_defaults() -> None:
    sizes = Sizes()
    defaults = {"flip_vips": sizes.flip_vips, "pool_vips": sizes.pool_vips, "big_vips": sizes.big_vips,
                "backends": sizes.backends, "vips": command.API_VIPS}
    assert defaults == targets.DEFAULT_SIZES
    assert sizes.backends == command.API_BACKENDS


def test_table_text() -> None:
    doc = targets.assemble(per_packet_doc(), {"reaction": REACTION, "api": API, "checks": CHECKS},
                           {"per_packet": 10.04, "reaction": 40.0})
    lines = targets.format_targets(doc).splitlines()
    assert lines[0].split() == ["item", "target", "(issue", "13)", "value", "limit", "verdict"]
    flip = next(line for line in lines if "health flip" in line)
    assert flip.startswith("3 ") and flip.split()[-6:] == ["7.5", "ms", "<=", "10", "ms", "met"]
    assert next(line for line in lines if "behind 50 VIPs" in line).endswith("NOT MET")
    rss = next(line for line in lines if "supervisor RSS" in line and "10,000" in line)
    assert "288 MiB" in rss and rss.endswith("reported")
    restart = next(line for line in lines if "checking again" in line)
    assert restart.startswith("5 ") and restart.endswith("not measured (edge-lb bench --restart)")
    assert "<= 1 s" in restart
    assert lines[-1] == "took: per_packet 10 s, reaction 40 s"
    assert len(lines) == len(targets.TARGETS) + 2


@pytest.mark.parametrize("argv, message", [
    (["--packets", "0"], "--packets must be between 1 and 100000, got 0"),
    (["--restart-runs", "2"], "--restart-runs needs --restart (or --all)"),
    (["--all", "--restart-runs", "0"], "--restart-runs must be between 1 and 20, got 0"),
    (["--check-seconds", "5"], "--check-seconds needs --checks (or --all)"),
    (["--checks", "--check-seconds", "0.5"], "--check-seconds must be between 1 and 600, got 0.5"),
])
def test_bad_arguments_are_refused_before_measuring(argv: list[str], message: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["bench", *argv]) == 1
    assert capsys.readouterr().err.strip() == f"edge-lb bench: {message}"


def test_a_non_number_is_argparses_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--restart-runs", "many"])
    assert exc.value.code == 2
    assert "--restart-runs: invalid int value: 'many'" in capsys.readouterr().err


def test_all_means_restart_and_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[command.Options] = []
    monkeypatch.setattr(command, "main", lambda opts: seen.append(opts) or 0)
    assert cli.main(["bench", "--all", "--json", "--check-seconds", "30"]) == 0
    assert seen == [command.Options(json_out=True, restart=True, checks=True, check_seconds=30.0)]


def test_table_values_have_four_significant_digits() -> None:
    reaction = dict(REACTION, big_first_apply_s=spread(15.9362), flip_ms=spread(0.0213))
    lines = targets.format_targets(targets.assemble({}, {"reaction": reaction}, {})).splitlines()
    assert "15.94 s" in next(line for line in lines if "first apply" in line)
    assert "0.0213 ms" in next(line for line in lines if "health flip" in line)
