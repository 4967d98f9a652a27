"""The netlink side of control/checktunnel.py against a real kernel, in two namespaces (about a second): the
fwmark rule's "rules added" count that tells a restore, and the route lookup with the check mark that finds a
VIP which is a local address on the node (the local table answers before the fwmark rule)."""

from __future__ import annotations

import json
import os

import pytest

from edge_lb.lab.labs import PY
from edge_lb.lab.netns import Lab

pytestmark = pytest.mark.root

PROBE = """
import json, subprocess, sys
from edge_lb import netlink_tc as t
mark, mask, table, prio = 0x4C500000, 0xFFF00000, 0x104C5, 24901
out = {"first": t.mark_routes("eth0", mark, mask, table, prio)}
out["again"] = t.mark_routes("eth0", mark, mask, table, prio)
subprocess.run(["ip", "rule", "del", "priority", str(prio)], check=True)
out["after_del"] = t.mark_routes("eth0", mark, mask, table, prio)
out["local"] = t.local_under_mark(["10.203.0.1", "10.203.0.2", "10.204.0.9"], mark | 1)
t.remove_mark_routes(mark, mask, table, prio)
print(json.dumps(out))
"""


def test_rules_added_and_local_vips_on_a_real_kernel() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces")
    with Lab(prefix="elbct") as lab:
        ns, router = lab.netns("lb"), lab.netns("rt")
        lab.veth(ns, "eth0", router, "eth0")
        ns.addr("eth0", "10.202.0.2/24")
        router.addr("eth0", "10.202.0.1/24")
        ns.route("default", via="10.202.0.1")
        ns.addr("lo", "10.203.0.1/32")  # a VIP on the LB's lo, as some BIRD setups have it
        ns.route("10.203.0.0/24", via="10.202.0.1")
        got = json.loads(ns.run([PY, "-c", PROBE], timeout=25).stdout)
    assert got["first"] == [["10.202.0.1"], 1]
    assert got["again"] == [["10.202.0.1"], 0]  # in place: not a restore
    assert got["after_del"] == [["10.202.0.1"], 1]  # deleted from outside: put back, and said so
    assert got["local"] == ["10.203.0.1"]  # 10.203.0.2 goes out by the mark's table; 10.204.0.9 unrouted
