"""The README's main-job command works end to end and leaves nothing behind."""

from __future__ import annotations

import re
import subprocess

import pytest

from edge_lb.lab.labs import PY

pytestmark = pytest.mark.root


def test_demo_runs_clean(require_root: None) -> None:
    out = subprocess.run([PY, "-m", "edge_lb", "demo"], capture_output=True, text=True, timeout=240)
    print(out.stdout[-6000:], out.stderr[-3000:])
    assert out.returncode == 0
    lab_id = re.search(r"building lab (\S+):", out.stdout)
    assert lab_id is not None
    traffic = re.findall(r"(\d+) requests, (\d+) failed", out.stdout)
    assert len(traffic) == 5 and all(failed == "0" for _, failed in traffic)
    # b3 with its decapsulation detached: out by its tunnel check, its own address still answering
    assert re.search(r"b3's http check via tunnel .* reason: 'direct OK, via tunnel: ", out.stdout)
    assert "-> answered by b3" in out.stdout and "b3 back in the ring on both nodes" in out.stdout
    assert "nexthop via 10.88.11.2" in out.stdout and "nexthop via 10.88.12.2" in out.stdout
    assert "through lb2: 20/20" in out.stdout
    assert "lab torn down" in out.stdout
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert lab_id.group(1) not in namespaces
