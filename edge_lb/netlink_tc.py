"""Netlink for the tunnel health checks (edge_lb/dataplane/checkencap.py): a tc egress BPF filter and fwmark
policy routing out of a link. The second half of netlink.py (split to keep each module small): pyroute2
through that module's socket helpers, nowhere else.

    attach_tc_egress / detach_tc_egress / tc_egress_name     a direct-action BPF filter on clsact egress
    mark_routes / remove_mark_routes                         a fwmark rule and its table's default routes
    local_under_mark                                         addresses a marked packet to would stay local

Blocking (pyroute2's sync IPRoute): from async code, run them in a thread.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from typing import Any

from edge_lb.errors import NetlinkError
from edge_lb.netlink import _index, _ipr

_EGRESS = "ffff:fff3"  # a clsact qdisc's egress hook (TC_H_CLSACT:TC_H_MIN_EGRESS)
_EGRESS_PARENT = 0xFFFFFFF3


def attach_tc_egress(ifname: str, fd: int, name: str, prio: int) -> None:
    """A direct-action BPF filter on ifname's egress (a clsact qdisc added if missing), replacing the filter
    of the same priority atomically."""
    try:
        with _ipr() as ipr:
            idx = _index(ipr, ifname)
            try:
                ipr.tc("add", "clsact", idx)
            except Exception as exc:
                if getattr(exc, "code", None) != errno.EEXIST:
                    raise
            ipr.tc("replace-filter", "bpf", idx, ":1", fd=fd, name=name, parent=_EGRESS, classid=1,
                   direct_action=True, prio=prio)
    except NetlinkError:
        raise
    except Exception as exc:
        raise NetlinkError(f"attach tc egress filter {name} to {ifname}: {exc}") from exc


def detach_tc_egress(ifname: str, prio: int) -> None:
    """Remove ifname's egress filter of that priority; none there is not an error (nor is the clsact qdisc,
    which stays: other filters may use it)."""
    try:
        with _ipr() as ipr:
            ipr.tc("del-filter", "bpf", _index(ipr, ifname), ":1", parent=_EGRESS, prio=prio)
    except NetlinkError:
        raise
    except Exception as exc:
        if getattr(exc, "code", None) not in (errno.ENOENT, errno.EINVAL):
            raise NetlinkError(f"detach tc egress filter {prio} from {ifname}: {exc}") from exc


def tc_egress_name(ifname: str, prio: int) -> str | None:
    """The BPF name of ifname's egress filter of that priority, or None when there is none."""
    with _ipr() as ipr:
        for f in ipr.get_filters(_index(ipr, ifname), parent=_EGRESS_PARENT):
            options = f.get_attr("TCA_OPTIONS")
            if f["info"] >> 16 == prio and options is not None and options.get_attr("TCA_BPF_NAME"):
                return str(options.get_attr("TCA_BPF_NAME"))
    return None


def mark_routes(ifname: str, mark: int, mask: int, table: int, prio: int) -> tuple[list[str], int]:
    """Policy routing: packets whose fwmark & mask == mark leave through ifname's default gateway (table
    `table`, looked up by a rule of priority `prio`), for each family ifname has a default gateway in. Returns
    the gateways used and how many rules it had to add (0 when they were all in place). Idempotent."""
    used: list[str] = []
    added = 0
    try:
        with _ipr() as ipr:
            oif = _index(ipr, ifname)
            for family in (socket.AF_INET, socket.AF_INET6):
                gw = next((str(r.get_attr("RTA_GATEWAY")) for r in ipr.get_default_routes(family=family)
                           if r.get_attr("RTA_GATEWAY") and r.get_attr("RTA_OIF") == oif), None)
                if gw is None:
                    continue
                ipr.route("replace", family=family, dst_len=0, table=table, gateway=gw, oif=oif)
                added += _replace_rule(ipr, family, mark, mask, table, prio)
                used.append(gw)
    except Exception as exc:
        raise NetlinkError(f"policy routing for marks {mark:#x}/{mask:#x} via {ifname}: {exc}") from exc
    return used, added


_RTN_LOCAL = 2  # a route lookup's answer type: delivered to this host


def local_under_mark(addresses: list[str], mark: int) -> list[str]:
    """Those of `addresses` a packet with this fwmark to them is delivered locally (the local table answers
    before any fwmark rule: an address on lo or a dummy); an address with no route at all is not local."""
    local: list[str] = []
    with _ipr() as ipr:
        for address in addresses:
            try:
                answer = ipr.route("get", dst=address, mark=mark)
            except Exception:
                continue
            if answer and answer[0]["type"] == _RTN_LOCAL:
                local.append(address)
    return local


def remove_mark_routes(mark: int, mask: int, table: int, prio: int) -> None:
    """Undo mark_routes: its rules and its table's routes (gone already is not an error)."""
    with _ipr() as ipr:
        for family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(Exception):
                ipr.rule("del", family=family, table=table, priority=prio, fwmark=mark, fwmask=mask)
            with contextlib.suppress(Exception):
                ipr.route("del", family=family, dst_len=0, table=table)


def _replace_rule(ipr: Any, family: int, mark: int, mask: int, table: int, prio: int) -> bool:
    """The rule at `prio` made to match: kept when it already does (an earlier run's: False), else replaced
    (True)."""
    for rule in ipr.get_rules(family=family):
        if rule.get_attr("FRA_PRIORITY") != prio:
            continue
        if (rule.get_attr("FRA_FWMARK"), rule.get_attr("FRA_FWMASK"), rule.get_attr("FRA_TABLE")) == (
                mark, mask, table):
            return False
        ipr.rule("del", family=family, priority=prio)
    ipr.rule("add", family=family, table=table, priority=prio, fwmark=mark, fwmask=mask)
    return True
