"""What `edge-lb backend setup` changed, kept so `teardown` undoes exactly that.

One JSON file per network namespace, default /run/edge-lb/backend.json (or backend-netns-INODE.json inside
another network namespace than init's): under /run because everything setup changes (addresses, sysctls,
XDP, devices, route metrics) is gone after a reboot too. It holds the VIPs set up and, for every change, its
undo with the value from before the FIRST setup that touched it: a later setup that fixes the same thing again
keeps that original, so teardown restores the host as it was before edge-lb.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edge_lb import paths
from edge_lb.backend.model import (
    AddAddress,
    Change,
    DeleteLink,
    DetachDecap,
    RemoveAddress,
    RouteKey,
    SetAdvmss,
    SetSysctl,
    undo,
)
from edge_lb.errors import BackendError

VERSION = 1


def default_path() -> Path:
    """The state file of this process's network namespace."""
    try:
        ours, init = _netns("/proc/self/ns/net"), _netns("/proc/1/ns/net")
    except OSError:  # /proc/1 unreadable: treat as the init namespace
        ours = init = 0
    name = "backend.json" if ours == init else f"backend-netns-{ours}.json"
    return paths.RUN_DIR / name


def _netns(link: str) -> int:
    """The inode of a network namespace link: equal inodes, the same namespace."""
    return os.stat(link).st_ino


@dataclass(frozen=True, kw_only=True)
class State:
    vips: tuple[str, ...]  # VIPs set up, as text
    undos: tuple[Change, ...]  # in the order the changes were made; teardown applies them in reverse

    def record(self, vips: list[str], applied: list[Change]) -> State:
        """This state after a setup of `vips` that applied `applied`; an undo already held is kept (it has
        the older value)."""
        held = {identity(u) for u in self.undos}
        new = [u for c in applied if (u := undo(c)) is not None and identity(u) not in held]
        return State(vips=tuple(dict.fromkeys([*self.vips, *vips])), undos=(*self.undos, *new))


def identity(change: Change) -> tuple[str, str]:
    """What an undo acts on: two undos with the same identity restore the same thing."""
    match change:
        case RemoveAddress(cidr=cidr):
            return ("address", cidr)
        case SetSysctl(key=key):
            return ("sysctl", key)
        case DetachDecap(interface=interface):
            return ("decap", interface)
        case DeleteLink(name=name):
            return ("link", name)
        case SetAdvmss(route=route):
            return ("advmss", json.dumps(asdict(route), sort_keys=True))
    return (change.op, str(change))


def load(path: Path) -> State:
    """The recorded state; an empty one when there is no file."""
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return State(vips=(), undos=())
    except (OSError, ValueError) as exc:
        raise BackendError(f"state file {path}: unreadable: {exc}") from exc
    try:
        if doc.get("version") != VERSION:
            raise ValueError(f"version {doc.get('version')!r}, this edge-lb writes {VERSION}")
        return State(vips=tuple(str(v) for v in doc["vips"]),
                     undos=tuple(_change(u) for u in doc["undo"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise BackendError(f"state file {path}: not one edge-lb backend setup wrote: {exc}") from exc


def save(path: Path, state: State) -> None:
    """Written atomically (a temporary file renamed over it); removed when nothing is recorded."""
    if not state.vips and not state.undos:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return
    doc = {"version": VERSION, "vips": list(state.vips), "undo": [asdict(u) for u in state.undos]}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
        tmp.replace(path)
    except OSError as exc:
        raise BackendError(f"state file {path}: cannot write it: {exc}") from exc


def _change(doc: dict[str, Any]) -> Change:
    fields = {k: v for k, v in doc.items() if k != "op"}
    match doc.get("op"):
        case "remove_address":
            return RemoveAddress(**fields)
        case "sysctl":
            return SetSysctl(**fields)
        case "detach_decap":
            return DetachDecap(**fields)
        case "delete_link":
            return DeleteLink(**fields)
        case "advmss":
            return SetAdvmss(**{**fields, "route": RouteKey(**fields["route"])})
        case "address":
            return AddAddress(**fields)
    raise ValueError(f"unknown undo {doc.get('op')!r}")
