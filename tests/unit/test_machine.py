"""The rise/fall machine, case by case, and the no-flap property."""

from __future__ import annotations

import pytest

from healthchecks.machine import Health, step

UP, DOWN = Health(up=True), Health(up=False)

CASES = [
    # (description, state, ok, rise, fall, expected)
    ("up stays up on success", UP, True, 2, 3, Health(True, 0, "r")),
    ("first failure starts a fall streak", UP, False, 2, 3, Health(True, 1, "r")),
    ("second failure of three continues it", Health(True, 1), False, 2, 3, Health(True, 2, "r")),
    ("third failure takes it down", Health(True, 2), False, 2, 3, Health(False, 0, "r")),
    ("a success resets the fall streak", Health(True, 2), True, 2, 3, Health(True, 0, "r")),
    ("fall=1 goes down at once", UP, False, 2, 1, Health(False, 0, "r")),
    ("down stays down on failure", DOWN, False, 2, 3, Health(False, 0, "r")),
    ("first success starts a rise streak", DOWN, True, 2, 3, Health(False, 1, "r")),
    ("second success brings it up", Health(False, 1), True, 2, 3, Health(True, 0, "r")),
    ("a failure resets the rise streak", Health(False, 1), False, 2, 3, Health(False, 0, "r")),
    ("rise=1 comes up at once", DOWN, True, 1, 3, Health(True, 0, "r")),
]


@pytest.mark.parametrize(("state", "ok", "rise", "fall", "expected"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_step(state: Health, ok: bool, rise: int, fall: int, expected: Health) -> None:
    assert step(state, ok, "r", rise, fall) == expected


def test_changing_means_a_streak_is_under_way() -> None:
    assert not Health(True).changing
    assert Health(True, 1).changing


@pytest.mark.parametrize("start", [UP, DOWN])
def test_alternating_results_never_flip_the_state(start: Health) -> None:
    state = start
    for i in range(100):
        state = step(state, i % 2 == 0, "r", rise=2, fall=2)
        assert state.up == start.up


def test_reason_is_the_last_result() -> None:
    assert step(UP, False, "connect: refused", 2, 2).reason == "connect: refused"
