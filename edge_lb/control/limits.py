"""The open-file budget: raised at start, and split so the API can never take what the health checks need.

systemd starts services with a soft RLIMIT_NOFILE of 1,024 unless the unit says otherwise; 1,100 idle API
connections then made every check fail with EMFILE, every backend went down and the VIP was withdrawn. So:

- the soft limit is raised to the hard one at start (the unit sets LimitNOFILE=65536 for both);
- each API site holds at most api_limit(nofile) connections: 256 on TCP and 64 on the Unix socket with the
  unit's limit, never more than nofile // 16 each. Over its limit a site closes its longest-idle connection
  to make room (or refuses the new one when all are busy): it never queues and never takes more;
- the rest is the checks' budget. With the unit's limit: 65,536 - 2 x 2 (listeners) - 256 - 64 (API)
  - ~100 (maps, ExaBGP's pipes, netlink, the log) > 65,000 sockets, each prober holds at most one at a time
  (and an exec check one pipe), and 500 VIPs x 10 backends are 5,000 probers. Under a hard limit of 1,024
  (a hand-run `edge-lb run`) the API takes at most 2 x 64 and the checks keep ~800.
"""

from __future__ import annotations

import logging
import resource

from edge_lb import events

API_TCP = 256  # connections, on [api].listen (anyone who can reach it: every local user on loopback)
API_UNIX = 64  # connections, on the control socket (root: the CLI)
API_SHARE = 16  # each site holds at most 1/API_SHARE of the open-file limit
LOW = 4096  # below this many open files, say so at start


def raise_nofile() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit; the limit now in force (an event says both)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (OSError, ValueError) as exc:
            events.emit("limits", logging.WARNING, nofile=soft, hard=hard, result=f"not raised: {exc}")
    low = "raise LimitNOFILE: health checks need a socket per prober" if soft < LOW else None
    events.emit("limits", logging.WARNING if low else logging.INFO, nofile=soft, hard=hard,
                api_tcp=api_limit(API_TCP, soft), api_unix=api_limit(API_UNIX, soft), low=low)
    return soft


def nofile() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def api_limit(wanted: int, open_files: int | None = None) -> int:
    """A site's connection limit: `wanted`, at most 1/API_SHARE of the open-file limit (at least 4)."""
    limit = nofile() if open_files is None else open_files
    if limit == resource.RLIM_INFINITY:
        return wanted
    return max(4, min(wanted, limit // API_SHARE))
