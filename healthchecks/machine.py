"""The rise/fall state machine: pure, so a table of cases can test every transition.

A backend changes state only after `rise` consecutive good results (down -> up) or `fall` consecutive bad ones
(up -> down). A result that agrees with the current state resets the streak, so a backend that alternates
good and bad never changes state: a flapping server does not flap the Maglev ring. A result that failed for a
reason on this node (`local`: no file descriptors, its own link down) is not a result about the backend: it
changes neither the state nor the streak, only the reason shown.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Health:
    up: bool  # may receive new flows (and keep its existing ones)
    streak: int = 0  # consecutive results against `up` so far
    reason: str = ""  # the last result's reason

    @property
    def changing(self) -> bool:
        """A streak is under way: check at the fast interval to decide quickly."""
        return self.streak > 0


NEW = Health(up=False, reason="not checked yet")  # a backend the data plane does not carry yet
ADOPTED = Health(up=True, reason="up in the running data plane")  # kept serving across a restart


def step(state: Health, ok: bool, reason: str, rise: int, fall: int, local: str | None = None) -> Health:
    """The state after one check result (`local`: the cause when it failed for a reason on this node)."""
    if local is not None and not ok:
        return Health(up=state.up, streak=state.streak, reason=f"{reason} (local fault {local}: not counted)")
    if ok == state.up:
        return Health(up=state.up, streak=0, reason=reason)
    streak = state.streak + 1
    if streak >= (rise if ok else fall):
        return Health(up=ok, streak=0, reason=reason)
    return Health(up=state.up, streak=streak, reason=reason)
