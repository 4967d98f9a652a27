"""Every per-instance path edge-lb uses, and the roots they hang from. One function per path:

    socket(instance)          RUN_DIR/<instance>.sock             the supervisor's control socket (REST API)
    lock(instance)            RUN_DIR/<instance>.lock             flock()ed by whoever owns the instance
    exabgp_run(instance)      RUN_DIR/<instance>.bgp/             ExaBGP's config, API socket and log
    weights(instance)         STATE_DIR/<instance>.weights.json   runtime weights set through the API
    disable_switch(instance)  STATE_DIR/<instance>.disabled       default BGP maintenance switch
    pins(instance)            PIN_ROOT/<instance>/                the balancer's pinned maps

RUN_DIR (/run/edge-lb) holds what dies with a reboot, STATE_DIR (/var/lib/edge-lb) what outlives one, and
PIN_ROOT (/sys/fs/bpf/edge_lb) lives in bpffs.
The functions read the roots at call time, so a test moves a root with
`monkeypatch.setattr(paths, "RUN_DIR", tmp_path)`.
"""

from __future__ import annotations

from pathlib import Path

RUN_DIR = Path("/run/edge-lb")
STATE_DIR = Path("/var/lib/edge-lb")
PIN_ROOT = Path("/sys/fs/bpf/edge_lb")


def socket(instance: str) -> Path:
    """The supervisor's Unix control socket: the CLI's way in."""
    return RUN_DIR / f"{instance}.sock"


def lock(instance: str) -> Path:
    """The instance's lock file: `edge-lb run` holds an exclusive flock on it for its whole life (load and
    unload for theirs); it names the holder's PID. Deleting it does not release the lock held on it."""
    return RUN_DIR / f"{instance}.lock"


def exabgp_run(instance: str) -> Path:
    """ExaBGP's run directory: exabgp.conf, exabgp.env, api.sock, exabgp.log."""
    return RUN_DIR / f"{instance}.bgp"


def weights(instance: str) -> Path:
    """Runtime weight overrides set through the API, kept across restarts."""
    return STATE_DIR / f"{instance}.weights.json"


def disable_switch(instance: str) -> Path:
    """The default BGP maintenance switch (bgp.disable_file replaces it): while it exists, nothing is
    announced."""
    return STATE_DIR / f"{instance}.disabled"


def pins(instance: str) -> Path:
    """The bpffs directory holding the balancer's pinned maps."""
    return PIN_ROOT / instance
