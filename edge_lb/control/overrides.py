"""Runtime weights set through the API (drain, undrain, weight), layered over the config's weights.

They are kept in a small JSON file so a restart keeps a drained backend drained; a reload keeps them for
backends that still exist. Undrain removes the override: the config's weight applies again.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

from edge_lb import events
from edge_lb.config import Backend, Config, Vip
from edge_lb.errors import SupervisorError

Overrides = dict[tuple[str, str], int]  # (VIP name "10.0.0.1:80/tcp", backend address) -> weight


def apply(config: Config, overrides: Mapping[tuple[str, str], int]) -> Config:
    """The config with the overridden weights."""
    if not overrides:
        return config
    def weight(vip: Vip, backend: Backend) -> int:
        return overrides.get((vip.name, str(backend.address)), backend.weight)

    vips = tuple(replace(v, backends=tuple(replace(b, weight=weight(v, b)) for b in v.backends))
                 for v in config.vips)
    return replace(config, vips=vips)


def prune(config: Config, overrides: Mapping[tuple[str, str], int]) -> Overrides:
    """Only the overrides of backends the config still has."""
    present = {(v.name, str(b.address)) for v in config.vips for b in v.backends}
    return {k: w for k, w in overrides.items() if k in present}


def load(path: Path | None) -> Overrides:
    if path is None or not path.exists():
        return {}
    try:
        rows = json.loads(path.read_text())
        return {(str(r["vip"]), str(r["backend"])): int(r["weight"]) for r in rows}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        events.emit("overrides", logging.WARNING, file=path, result="unreadable, ignored", error=exc)
        return {}


class Pending:
    """New weights written beside the file, not yet in its place: commit() renames them in (atomic, and
    it does not fail where the write succeeded), discard() drops them. What the change path prepares
    before it touches a route or a map, so a weight that cannot be kept changes nothing."""

    def __init__(self, path: Path | None, tmp: Path | None) -> None:
        self.path, self.tmp = path, tmp

    def commit(self) -> None:
        if self.path is None or self.tmp is None:
            return
        try:
            os.replace(self.tmp, self.path)
        except OSError as exc:
            raise SupervisorError(f"runtime weights file {self.path}: {exc.strerror or exc}") from exc

    def discard(self) -> None:
        if self.tmp is not None:
            self.tmp.unlink(missing_ok=True)


def prepare(path: Path | None, overrides: Mapping[tuple[str, str], int]) -> Pending:
    """Write the weights beside `path`; SupervisorError saying which file when that fails."""
    if path is None or (not overrides and not path.exists()):
        return Pending(None, None)  # nothing to keep and nothing to correct: no file
    rows = [{"vip": v, "backend": b, "weight": w} for (v, b), w in sorted(overrides.items())]
    tmp = path.with_suffix(".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tmp.open("w") as out:
            out.write(json.dumps(rows, indent=1) + "\n")
            out.flush()
            os.fsync(out.fileno())  # on disk before the rename: a power cut must not leave an empty file
    except OSError as exc:
        raise SupervisorError(f"runtime weights file {path}: {exc.strerror or exc}") from exc
    return Pending(path, tmp)


def save(path: Path | None, overrides: Mapping[tuple[str, str], int]) -> None:
    """Atomically: a crash mid-write leaves the previous file."""
    prepare(path, overrides).commit()
