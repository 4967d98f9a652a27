"""A static ExaBGP on a BGP lab's LB node: a test scaffold announcing the lab's VIP without a supervisor
(what a second site or an older node would send), stopped by the Lab by PID.

    proc = start_static_exabgp(bl, 2)                 # lb2 announces VIP/32, next hop self
    withdraw_static(bl, 2, proc)                      # the same session, the route withdrawn (SIGUSR1 reload)
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from edge_lb.lab.bgplab import ROUTER_AS, VIP, BgpLab

EXABGP = Path(sys.executable).parent / "exabgp"


def exabgp_conf(bl: BgpLab, node: int, announce: bool = True) -> str:
    """A process-less ExaBGP config announcing the VIP to the router (a bare `route` inside `neighbor` is
    rejected by ExaBGP 4.2 and 5: it goes in `static`); announce=False: the same session, no route."""
    lb = bl.node(node)
    route = f"    static {{ route {VIP}/32 next-hop self; }}\n" if announce else ""
    return (f"neighbor {lb.router_address} {{\n"
            f"    router-id {lb.address};\n    local-address {lb.address};\n"
            f"    local-as {lb.asn};\n    peer-as {ROUTER_AS};\n    hold-time 3;\n"
            f"    family {{ ipv4 unicast; }}\n{route}"
            "}\n")


def conf_path(bl: BgpLab, node: int) -> Path:
    return bl.lab.tmpdir / f"exabgp-lb{node}.conf"


def start_static_exabgp(bl: BgpLab, node: int) -> subprocess.Popen[bytes]:
    """ExaBGP in the node's namespace, as root (no privilege drop), without its named-pipe CLI (the pipe
    directory is shared by every namespace)."""
    conf_path(bl, node).write_text(exabgp_conf(bl, node))
    env = {"exabgp_daemon_user": "root", "exabgp_daemon_drop": "false", "exabgp_api_cli": "false",
           "exabgp_daemon_daemonize": "false"}
    return bl.node(node).ns.spawn([str(EXABGP), "server", str(conf_path(bl, node))],
                                  bl.lab.tmpdir / f"exabgp-lb{node}.log", env=env)


def set_static_route(bl: BgpLab, node: int, proc: subprocess.Popen[bytes], announce: bool) -> None:
    """Announce or withdraw the VIP on the running session: ExaBGP re-reads its config on SIGUSR1."""
    conf_path(bl, node).write_text(exabgp_conf(bl, node, announce))
    proc.send_signal(signal.SIGUSR1)
