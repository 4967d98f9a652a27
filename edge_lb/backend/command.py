"""`edge-lb backend setup | check | teardown`: a Linux host made (and verified as) a backend of edge-lb.

    setup     --vip A [--vip B ...] [--mode xdp|ipip] [--interface IF] [--overhead N] [--state FILE]
    check     --vip A [--vip B ...] [--interface IF] [--overhead N] [--json]
    teardown  [--vip A ...] [--state FILE]

setup changes only what `check` finds wrong (plan.py), records each change's undo in the state file
(state.py), then checks again; teardown applies the recorded undos in reverse. Exit 0 when the backend would
serve (check, setup) or everything recorded was undone (teardown); 1 otherwise; 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
from pathlib import Path
from typing import TextIO

from edge_lb.backend import judge, plan, state
from edge_lb.backend.model import DEFAULT_OVERHEAD, IPAddress, Item, RemoveAddress, Wanted
from edge_lb.backend.system import LinuxSystem, System
from edge_lb.dataplane import gue
from edge_lb.errors import BackendError


def vip_argument(text: str) -> IPAddress:
    """argparse type of --vip: one unicast address, no prefix."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an IP address (one address, like 10.0.0.1 or fd00::1, without a prefix)"
        ) from None
    if address.is_multicast or address.is_unspecified or address.is_loopback or address.is_link_local:
        raise argparse.ArgumentTypeError(f"{text}: a VIP must be a unicast address (not multicast, "
                                         "unspecified, loopback or link-local)")
    return address


def overhead_argument(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 200:
        raise argparse.ArgumentTypeError(f"{text!r}: bytes of encapsulation, an integer 0..200")
    return value


def port_argument(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: a UDP port, 1..65535")
    return int(text)


def configure(parser: argparse.ArgumentParser) -> None:
    """The backend subcommands, on the `edge-lb backend` parser."""
    sub = parser.add_subparsers(dest="backend_command", required=True, metavar="setup|check|teardown")
    for name, text in (("setup", "make this host a backend: VIPs on lo, ARP, rp_filter, decapsulation, MSS"),
                       ("check", "say what keeps this host from serving the VIPs; exit 0 only if nothing"),
                       ("teardown", "undo what setup changed (as recorded in its state file)")):
        sp = sub.add_parser(name, help=text, description=text)
        sp.add_argument("--vip", action="append", type=vip_argument, required=name != "teardown",
                        metavar="ADDRESS", help="a VIP address (repeatable)"
                        + ("; default: every VIP set up" if name == "teardown" else ""))
        if name != "teardown":
            sp.add_argument("--interface", metavar="IF",
                            help="where the encapsulated packets arrive (default: the default route's)")
            sp.add_argument("--overhead", type=overhead_argument, default=DEFAULT_OVERHEAD, metavar="BYTES",
                            help=f"encapsulation the LB adds, taken off the MSS (default {DEFAULT_OVERHEAD}: "
                            "GUE over IPv6, the most; IPIP 20, GUE/IPv4 28, IP6IP6 and 4in6 40)")
        if name == "setup":
            sp.add_argument("--mode", choices=("xdp", "ipip"), default=None,
                            help="decapsulate with bpf/decap.c (xdp) or the kernel's tunnel devices (ipip); "
                            "default ipip when the kernel has the modules, else xdp")
            sp.add_argument("--gue-port", type=port_argument, default=gue.DEFAULT_PORT, metavar="PORT",
                            help=f"xdp: the UDP port decap.c takes GUE on, the LB's [dataplane] gue_port "
                            f"(default {gue.DEFAULT_PORT})")
        if name == "check":
            sp.add_argument("--json", action="store_true", help="one JSON document")
        if name != "check":
            sp.add_argument("--state", type=Path, default=None, metavar="FILE",
                            help=f"where setup records its changes (default {state.default_path()})")


def run(args: argparse.Namespace, system: System | None = None, out: TextIO = sys.stdout) -> int:
    system = system or LinuxSystem()
    if args.backend_command == "teardown":
        vips = None if args.vip is None else list(dict.fromkeys(args.vip))
        return teardown(system, vips, args.state or state.default_path(), out)
    wanted = Wanted(vips=tuple(dict.fromkeys(args.vip)),
                    interface=args.interface or system.default_interface(),
                    mode=getattr(args, "mode", None), overhead=args.overhead,
                    gue_port=getattr(args, "gue_port", gue.DEFAULT_PORT))
    if args.backend_command == "check":
        return check(system, wanted, args.json, out)
    return setup(system, wanted, args.state or state.default_path(), out)


def check(system: System, wanted: Wanted, as_json: bool, out: TextIO) -> int:
    found = judge.items(system.gather(wanted), wanted)
    ok = all(i.ok for i in found)
    if as_json:
        doc = {"ok": ok, "interface": wanted.interface, "vips": [str(v) for v in wanted.vips],
               "items": [{"item": i.name, "ok": i.ok, "detail": i.detail} for i in found]}
        print(json.dumps(doc, indent=2), file=out)
    else:
        _print_items(found, out)
        print("the backend would serve" if ok else "the backend would NOT serve", file=out)
    return 0 if ok else 1


def _print_items(found: list[Item], out: TextIO) -> None:
    for item in found:
        print(f"{'ok' if item.ok else 'FAIL':<4} {item.name:<12} {item.detail}", file=out)


def setup(system: System, wanted: Wanted, path: Path, out: TextIO) -> int:
    the_plan = plan.plan(system.gather(wanted), wanted)
    for note in the_plan.notes:
        print(note, file=out)
    recorded = state.load(path)
    applied = []
    try:
        for change in the_plan.changes:
            system.apply(change)
            applied.append(change)
            print(f"changed: {change}", file=out)
    finally:
        new = recorded.record([str(v) for v in wanted.vips], applied)
        if new != recorded:
            state.save(path, new)
    if applied:
        print(f"recorded in {path} (`edge-lb backend teardown` undoes it)", file=out)
    else:
        print("nothing to change: the backend was already set up", file=out)
    found = judge.items(system.gather(wanted), wanted)
    bad = [i for i in found if not i.ok]
    _print_items(bad, out)
    return 0 if not bad else 1


def teardown(system: System, vips: list[IPAddress] | None, path: Path, out: TextIO) -> int:
    recorded = state.load(path)
    if not recorded.vips and not recorded.undos:
        print(f"nothing recorded in {path}: nothing to undo", file=out)
        return 0
    leaving = set(recorded.vips) if vips is None else {str(v) for v in vips}
    if unknown := sorted(leaving - set(recorded.vips)):
        raise BackendError(f"--vip {', '.join(unknown)}: not set up by edge-lb backend setup (per {path})")
    staying = tuple(v for v in recorded.vips if v not in leaving)
    # The shared settings (ARP, rp_filter, decap, MSS) go with the last VIP; a VIP's address goes with it.
    undos = [u for u in recorded.undos if not staying
             or (isinstance(u, RemoveAddress) and str(ipaddress.ip_interface(u.cidr).ip) in leaving)]
    failed = []
    for change in reversed(undos):
        try:
            system.apply(change)
            print(f"restored: {change}", file=out)
        except BackendError as exc:
            failed.append(change)
            print(f"could not undo: {exc}", file=out)
    kept = tuple(u for u in recorded.undos if u not in undos or u in failed)
    state.save(path, state.State(vips=staying if not failed else recorded.vips, undos=kept))
    print(f"{path}: {'removed' if not kept and not staying else 'updated'}", file=out)
    return 1 if failed else 0
