"""The `edge-lb` command line. Each subcommand is a small function; errors print clearly and exit non-zero."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_lb.errors import ConfigError, EdgeLbError

if TYPE_CHECKING:
    from edge_lb.config import Config
    from edge_lb.control.instance import InstanceLock

EXIT_CONFIG = 2
EXIT_ERROR = 1




def cmd_check(args: argparse.Namespace) -> int:
    from edge_lb.config import load_config

    cfg = load_config(args.config)
    backends = sum(len(v.backends) for v in cfg.vips)
    print(f"{args.config}: valid ({len(cfg.vips)} VIPs, {backends} backends)")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from edge_lb.config import load_config
    from edge_lb.dataplane.simulate import simulate

    cfg = load_config(args.config)
    simulate(cfg, Path(args.pcap_in), Path(args.pcap_out) if args.pcap_out else None, sys.stdout)
    return 0


def cmd_load(args: argparse.Namespace) -> int:
    from edge_lb.dataplane.node import load_node

    cfg, lock = _config_without_supervisor(
        args.config, "load", "it owns the maps (change the config and `edge-lb reload` instead)")
    try:
        dp, report = load_node(cfg, attach=not args.no_attach)
        dp.close()
    finally:
        lock.release()
    where = ("not attached" if args.no_attach
             else f"attached to {cfg.node.interface} ({cfg.dataplane.xdp_mode})")
    print(f"data plane {cfg.dataplane.instance}: {where}; {len(cfg.vips)} VIPs; "
          f"ring slots written {sum(report.ring_slots.values())}")
    return 0


def cmd_unload(args: argparse.Namespace) -> int:
    from edge_lb.dataplane.checkencap import CheckEncap
    from edge_lb.dataplane.loader import Dataplane, remove_pins

    cfg, lock = _config_without_supervisor(
        args.config, "unload", "stop it first (it withdraws the VIPs before anything is detached)")
    try:
        Dataplane.detach(cfg.node.interface, cfg.dataplane.xdp_mode)
        CheckEncap.detach(cfg.node.interface, cfg.dataplane.check_mark_base)
        removed = remove_pins(cfg.dataplane.instance)
    finally:
        lock.release()
    print(f"detached (XDP, tunnel checks' tc filter) from {cfg.node.interface}; "
          f"unpinned {len(removed)} maps of {cfg.dataplane.instance}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from edge_lb.control.supervisor import run

    return run(args.config)


def _socket(args: argparse.Namespace) -> Path:
    from edge_lb import paths
    from edge_lb.config import instance_of

    if getattr(args, "socket", None):
        return Path(args.socket)
    return paths.socket(instance_of(args.config))


def _call(args: argparse.Namespace, method: str, url: str, body: dict[str, Any] | None = None
          ) -> tuple[int, Any]:
    """The running supervisor's REST API, over its Unix socket."""
    import asyncio

    from edge_lb.api import sockets

    try:
        return asyncio.run(sockets.request(_socket(args), method, url, body))
    except EdgeLbError as exc:
        raise _unreachable(args, exc) from exc


def _check(code: int, doc: Any, what: str) -> Any:
    if code >= 400:
        field = f" ({doc['field']})" if isinstance(doc, dict) and doc.get("field") else ""
        message = doc.get("error", doc) if isinstance(doc, dict) else doc
        raise EdgeLbError(f"{what}: {message}{field}")
    return doc


def cmd_reload(args: argparse.Namespace) -> int:
    code, result = _call(args, "POST", "/api/v1/reload")
    source = result.get("config", args.config)  # the file the supervisor runs from, which it re-read
    if code == 422:
        for problem in result.get("problems", []):
            print(f"{source}: {problem}", file=sys.stderr)
        print("edge-lb reload: rejected; the running configuration is unchanged", file=sys.stderr)
        return EXIT_CONFIG
    _check(code, result, "reload")
    changes = ", ".join(f"{k} {v}" for k, v in result.get("changes", {}).items())
    print(f"reloaded {source}: {changes}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    import asyncio

    from edge_lb.api import sockets
    from edge_lb.control import status

    try:
        doc = asyncio.run(sockets.status_doc(_socket(args)))
    except EdgeLbError as exc:
        raise _unreachable(args, exc) from exc
    print(json.dumps(doc, indent=2) if args.json else status.render(doc), end="" if not args.json else "\n")
    return 0


def _backend_url(vip: str, backend: str) -> str:
    """/api/v1/vips/ADDRESS/PORT/PROTOCOL/backends/BACKEND from "10.0.0.1:80/tcp" or "[fd00::1]:80/tcp"."""
    host, sep, rest = vip.rpartition(":")
    port, _, protocol = rest.partition("/")
    if not sep or not port.isdigit() or protocol not in ("tcp", "udp"):
        raise EdgeLbError(f"--vip {vip!r}: want ADDRESS:PORT/PROTOCOL, like 10.0.0.1:80/tcp or "
                          "[fd00::1]:80/tcp")
    from urllib.parse import quote

    return f"/api/v1/vips/{quote(host.strip('[]'))}/{port}/{protocol}/backends/{quote(backend)}"


def cmd_weight(args: argparse.Namespace) -> int:
    """drain, undrain, weight: a runtime weight over the config's, kept across restarts."""
    url = _backend_url(args.vip, args.backend)
    if args.command == "weight":
        code, doc = _call(args, "PUT", f"{url}/weight", {"weight": args.weight})
    else:
        code, doc = _call(args, "POST", f"{url}/{args.command}")
    doc = _check(code, doc, args.command)
    print(f"{args.vip} backend {args.backend}: weight {doc['weight']}"
          + (" (drained: keeps its flows, gets no new ones)" if doc["weight"] == 0 else ""))
    return 0


def cmd_disable(args: argparse.Namespace) -> int:
    """Maintenance. Through the running supervisor when there is one; otherwise the switch file directly
    (it works either way, and survives a restart of either)."""
    from edge_lb.bgp.controller import set_switch, switch_path
    from edge_lb.config import disable_file_of, instance_of

    path = switch_path(disable_file_of(args.config), instance_of(args.config))
    if _supervisor_running(instance_of(args.config)):
        _check(*_call(args, "POST", f"/api/v1/node/{args.command}"), args.command)
    else:
        set_switch(path, args.command == "disable", "by edge-lb disable")
    if args.command == "disable":
        print(f"disabled: {path} exists; the supervisor withdraws every VIP of this node within a second "
              "(the data plane keeps serving flows that still arrive)")
    else:
        print(f"enabled: {path} removed; VIPs are announced again as their health allows")
    return 0


def _config_without_supervisor(path: str, command: str, why: str) -> tuple[Config, InstanceLock]:
    """The config and its instance held for `command` (release the lock when done), when no supervisor (or
    other load/unload) holds it; else EdgeLbError naming the holder and why that matters. The instance lock
    decides, not the control socket: a running supervisor whose socket was deleted still holds it."""
    from edge_lb.config import load_config
    from edge_lb.control.instance import InstanceLock

    cfg = load_config(path)
    lock = InstanceLock.take(cfg.dataplane.instance, f"edge-lb {command}", why)
    if _supervisor_running(cfg.dataplane.instance):  # a second guard: its lock file deleted under it
        lock.release()
        raise EdgeLbError(f"a supervisor is running for instance {cfg.dataplane.instance}: {why}")
    return cfg, lock


def _supervisor_running(instance: str) -> bool:
    """Its API answers (disable/enable go through it then; else they write the switch file directly)."""
    from edge_lb import paths
    from edge_lb.api import sockets

    return sockets.listening(paths.socket(instance))


def _unreachable(args: argparse.Namespace, exc: EdgeLbError) -> EdgeLbError:
    """The API did not answer: say who holds the instance, if anyone (its socket may have been deleted)."""
    from edge_lb.config import instance_of
    from edge_lb.control.instance import holder

    instance = instance_of(args.config)
    who = holder(instance)
    if who is None:
        return exc
    return EdgeLbError(f"{exc}. Instance {instance} is held by {who}: it runs but its control socket "
                       f"{_socket(args)} does not answer (deleted?); restart it to get its API back")


def cmd_bench(args: argparse.Namespace) -> int:
    from edge_lb.bench import command

    return command.main(command.Options(
        json_out=args.json, packets=args.packets, restart=args.restart or args.all,
        checks=args.checks or args.all, restart_runs=args.restart_runs, check_seconds=args.check_seconds))


def cmd_demo(args: argparse.Namespace) -> int:
    from edge_lb.lab.demo import main as demo_main

    return demo_main()


def cmd_decap(args: argparse.Namespace) -> int:
    from edge_lb.dataplane import decap

    return decap.main(args.decap_args)


def cmd_backend(args: argparse.Namespace) -> int:
    from edge_lb.backend import command

    return command.run(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-lb", description="Edge L4 load balancer (XDP + Maglev + BGP).")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Callable[[argparse.Namespace], int], help: str, config: bool = True
            ) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        if config:
            sp.add_argument("-c", "--config", required=True, metavar="FILE", help="TOML config file")
        sp.set_defaults(func=fn)
        return sp

    add("check", cmd_check, "validate a config: exit 0 if valid, 2 with every problem on stderr")
    add("run", cmd_run, "run the supervisor in the foreground: health checks, live reload, map updates")
    reload_help = "make the running supervisor re-read its config (a diff; an invalid one is rejected whole)"
    status_help = "VIPs and backends: health, last reason, weight, ring share, packets and bytes"
    for name, fn, text in (("reload", cmd_reload, reload_help), ("status", cmd_status, status_help)):
        sp = add(name, fn, text)
        sp.add_argument("--socket", metavar="PATH", help="control socket (default /run/edge-lb/NAME.sock)")
    sp.add_argument("--json", action="store_true", help="the status document as JSON")
    for name, text in (("drain", "a backend keeps its flows and gets no new ones (runtime weight 0)"),
                       ("undrain", "back to the config's weight"),
                       ("weight", "set a backend's runtime weight (kept across restarts until undrain)")):
        sp = add(name, cmd_weight, text)
        sp.add_argument("--vip", required=True, metavar="ADDRESS:PORT/PROTO", help="like 10.0.0.1:80/tcp")
        sp.add_argument("--backend", required=True, metavar="ADDRESS")
        sp.add_argument("--socket", metavar="PATH", help="control socket (default /run/edge-lb/NAME.sock)")
        if name == "weight":
            sp.add_argument("weight", type=int, help="0..1000")
    add("disable", cmd_disable, "maintenance: withdraw every VIP of this node (creates [bgp].disable_file)")
    add("enable", cmd_disable, "end maintenance: announce again as health allows (removes the disable file)")
    sp = add("simulate", cmd_simulate, "run a pcap through the real XDP program (not attached)")
    sp.add_argument("pcap_in", metavar="IN.pcap")
    sp.add_argument("pcap_out", metavar="OUT.pcap", nargs="?")
    sp = add("load", cmd_load, "load or adopt the data plane, write the maps, attach it, and exit")
    sp.add_argument("--no-attach", action="store_true", help="program the pinned maps only")
    add("unload", cmd_unload, "detach the program and unpin every map of the instance (uninstall)")
    sp = add("bench", cmd_bench, "measure the data plane per packet beside pass.c and floor.c, the control "
             "plane's reaction and API cost, and on request restart and health checks at scale", config=False)
    sp.add_argument("--json", action="store_true", help="one JSON document instead of a table")
    sp.add_argument("--packets", type=int, default=20000, help="test runs per case (default 20000)")
    sp.add_argument("--restart", action="store_true",
                    help="also kill -9 -> checking again, in a namespace lab (~1 min)")
    sp.add_argument("--checks", action="store_true",
                    help="also health checks at scale (1,000 http, 10,000 tcp backends), in labs (~4 min)")
    sp.add_argument("--all", action="store_true", help="--restart and --checks")
    sp.add_argument("--restart-runs", type=int, metavar="N", help="kill -9 and restarts (default 3)")
    sp.add_argument("--check-seconds", type=float, metavar="S",
                    help="measurement window of each --checks profile (default 20)")
    add("demo", cmd_demo, "build the namespace lab, show balancing and direct return, tear down",
        config=False)
    sp = add("decap", cmd_decap,
             "backend side: attach|detach --interface IF [--address A] [--mode M] [--gue-port P]",
             config=False)
    sp.add_argument("decap_args", nargs=argparse.REMAINDER,
                    help="see `python -m edge_lb.dataplane.decap --help`")
    from edge_lb.backend import command as backend_command

    backend_command.configure(add("backend", cmd_backend, "backend side: setup|check|teardown --vip ADDRESS "
                                  "(VIPs on lo, ARP, rp_filter, decapsulation, MSS)", config=False))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"{exc.source}: {problem}" if exc.source != "config" else problem, file=sys.stderr)
        return EXIT_CONFIG
    except EdgeLbError as exc:
        print(f"edge-lb {args.command}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
