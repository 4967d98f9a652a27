"""Where the non-Python parts live: bpf/ (C sources compiled at load), exabgp_conf/ (templates) and
benchmarks/reference/ (pass.c, floor.c). In the source tree (and an editable install) they sit beside the
package; a wheel carries them inside it (pyproject.toml maps them), so both layouts are looked at."""

from __future__ import annotations

from pathlib import Path

from edge_lb.errors import EdgeLbError

_PACKAGE = Path(__file__).resolve().parent


def asset_dir(name: str) -> Path:
    """The directory `name` ("bpf", "exabgp_conf", "benchmarks/reference"): in the package, or beside it."""
    for where in (_PACKAGE / name, _PACKAGE.parent / name):
        if where.is_dir():
            return where
    raise EdgeLbError(f"{name}/ is missing: looked in {_PACKAGE} and {_PACKAGE.parent} (a broken install?)")
