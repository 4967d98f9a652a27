"""Counter names, read from the C enum in bpf/balancer_consts.h (the single source of the indexes)."""

from __future__ import annotations

import functools
import re

from edge_lb.assets import asset_dir

CONSTS_H = asset_dir("bpf") / "balancer_consts.h"


@functools.cache
def reason_names() -> tuple[str, ...]:
    """Names of enum lb_stat in index order (STAT_MAX excluded)."""
    text = CONSTS_H.read_text(encoding="utf-8")
    body = re.search(r"enum lb_stat\s*\{(.*?)\};", text, re.S)
    if body is None:
        raise RuntimeError(f"enum lb_stat not found in {CONSTS_H}")
    names: list[str] = []
    for line in body.group(1).splitlines():
        m = re.match(r"\s*(STAT_[A-Z0-9_]+)\s*(?:=\s*(\d+))?\s*,?", line)
        if m:
            if m.group(2) is not None and int(m.group(2)) != len(names):
                raise RuntimeError(f"{CONSTS_H}: {m.group(1)} must stay in sequence")
            names.append(m.group(1))
    return tuple(n for n in names if n != "STAT_MAX")
