"""edge_lb.dataplane.bench without root: its argument check and the reference copies it measures against.
The measurement itself: tests/dataplane/test_bench_smoke.py."""

from __future__ import annotations

import hashlib

import pytest

from edge_lb.dataplane import bench


def test_packets_out_of_range() -> None:
    with pytest.raises(bench.BenchError):
        bench.main(json_out=True, packets=0)


def test_references_are_unchanged() -> None:
    """The copies must stay byte-identical to ../shared/bench (recorded in SHA256SUMS when copied)."""
    sums = (bench.REFERENCE_DIR / "SHA256SUMS").read_text().split("\n")
    for line in filter(None, sums):
        digest, name = line.split()
        assert hashlib.sha256((bench.REFERENCE_DIR / name).read_bytes()).hexdigest() == digest, name
