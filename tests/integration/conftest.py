"""Fixtures for tests that build real network namespaces (root only; CI runs as root)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from edge_lb.lab.labs import DataplaneLab
from edge_lb.lab.netns import Lab

_LOG_TAIL = 4000  # characters of each lab log shown with a failure


@pytest.fixture
def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces, veths and XDP")


@pytest.fixture
def lab(require_root: None) -> Iterator[Lab]:
    """A Lab closed after the test whatever happened; its logs are printed (shown by pytest on failure)."""
    with Lab(prefix="elbt") as the_lab:
        try:
            yield the_lab
        finally:
            for path in sorted(the_lab.tmpdir.glob("*.log")):
                print(f"--- {path.name} ---\n{path.read_text(errors='replace')[-_LOG_TAIL:]}")


def ready_lab(lab: Lab, prepare: Callable[[DataplaneLab], object], **options: Any
              ) -> Iterator[DataplaneLab]:
    """The data-plane lab built (DataplaneLab(lab, **options)), its LB prepared by `prepare`, backends
    answering; closed afterwards, with its supervisor's log shown if one ran."""
    d = DataplaneLab(lab, **options)
    try:
        d.build()
        prepare(d)
        d.wait_ready()
        yield d
    finally:
        if d.supervisor is not None:
            print(f"--- supervisor.log ---\n{d.supervisor_log()[-6000:]}")
        d.close()


@pytest.fixture
def dlab(lab: Lab) -> Iterator[DataplaneLab]:
    """Ready for `edge-lb run`: the router-side XDP peer and neighbour entry in place, no balancer yet."""
    yield from ready_lab(lab, DataplaneLab.prepare_lb)
