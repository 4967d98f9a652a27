"""Peers added, removed or changed on a running ExaBGP (a reload of edge-lb's config), without a restart.

ExaBGP 5.0.15 re-reads exabgp.conf on the API command `reload` (as on SIGUSR1), and then only touches the
peers whose definition changed (exabgp/reactor/loop.py, Reactor.reload): a new peer is started, a removed
one stopped, a changed one re-established; the others keep their sessions and their routes (the API's
routes live in a RIB cached per peer across reloads). Two things it does not do:
  - it answers "done" before the reload happens (the command only raises the reload signal), and it drops
    the signal when it still had updates queued for a peer at that moment. So the peer set it runs is read
    back with `show neighbor summary`, and the reload is asked again until it matches (bounded).
  - a new peer's RIB starts empty: the caller announces everything again (idempotent for the others).
"""

from __future__ import annotations

import asyncio
import ipaddress
import time

from edge_lb.bgp.exabgp_api import ApiChannel
from edge_lb.errors import BgpError

RELOAD_BOUND = 5.0  # s for ExaBGP to run the new peer list
_LOOK = 0.1  # s between looks at the peers it runs
_ASK_AGAIN = 1.0  # s after which an unanswered reload is asked again


def summary_peers(lines: list[str]) -> set[str]:
    """The peers in `show neighbor summary`'s answer (its first column; the header is not an address)."""
    peers = set()
    for line in lines:
        words = line.split()
        try:
            peers.add(str(ipaddress.ip_address(words[0])))
        except (IndexError, ValueError):
            continue
    return peers


async def running_peers(channel: ApiChannel) -> set[str]:
    lines: list[str] = []
    await channel.send("show neighbor summary", lines)
    return summary_peers(lines)


async def reload_peers(channel: ApiChannel, wanted: set[str], bound: float = RELOAD_BOUND) -> None:
    """Have ExaBGP re-read its (already rewritten) config and run exactly `wanted`; BgpError past `bound`.
    A change that keeps the peer set (a new key, hold time) cannot be read back: one reload is asked."""
    deadline = time.monotonic() + bound
    asked = 0.0
    while True:
        now = time.monotonic()
        if now - asked >= _ASK_AGAIN:
            await channel.send("reload")
            asked = now
        await asyncio.sleep(_LOOK)
        running = await running_peers(channel)
        if running == wanted:
            return
        if time.monotonic() > deadline:
            raise BgpError(f"ExaBGP did not take the new peer list within {bound:g} s: it runs "
                           f"{sorted(running)}, the config has {sorted(wanted)}")
