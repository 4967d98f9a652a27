"""ExaBGP's config and environment: exabgp.conf rendered from exabgp_conf/*.tmpl, the local addresses and
router id it is rendered with, and the environment ExaBGP runs in. The process is edge_lb.bgp.exabgp's.
"""

from __future__ import annotations

import base64
import functools
import ipaddress
import os
import pwd
import re
import socket
import string
import struct
from collections.abc import Mapping
from pathlib import Path

from edge_lb import netlink
from edge_lb.assets import asset_dir
from edge_lb.configbgp import Bgp
from edge_lb.errors import BgpError, NetlinkError
from healthchecks.base import IPAddress

TEMPLATES = asset_dir("exabgp_conf")
PROCESS = "edge-lb"  # the bridge's process name in exabgp.conf
ENV_FILE = "exabgp.env"
TCP_MD5SIG = 14  # from <linux/tcp.h>
_TOKEN = re.compile(r"[A-Za-z0-9_./:+=@%-]+")


@functools.cache
def _template(name: str) -> string.Template:
    try:
        return string.Template((TEMPLATES / name).read_text())
    except OSError as exc:
        raise BgpError(f"ExaBGP config template {TEMPLATES / name}: {exc}") from exc


def _token(what: str, value: object) -> str:
    """One word of the config. ExaBGP's tokeniser ends a statement at ';', '{' or '}', a line at a newline,
    and splits on spaces, ',' and '[]': a value holding any of them would rewrite the config: refused."""
    text = str(value)
    if not _TOKEN.fullmatch(text):
        raise BgpError(f"refusing {what} {text!r} in the ExaBGP config: only letters, digits and _./:+=@%- "
                       "are allowed (no spaces, control characters, ';', '{', '}')")
    return text


def render_config(bgp: Bgp, router_id: str, local_addresses: Mapping[str, str],
                  bridge_argv: list[str]) -> str:
    """exabgp.conf: the bridge process and one neighbor per peer. local_addresses maps each peer's address
    (as str(peer.address)) to the local address of its session. A peer's family follows its address: IPv4
    VIPs go to IPv4 peers, IPv6 VIPs to IPv6 peers (next-hop self needs an address of the VIP's family)."""
    try:
        ipaddress.IPv4Address(_token("router id", router_id))
    except ValueError:
        raise BgpError(f"router id {router_id!r}: not an IPv4 address") from None
    blocks = []
    for peer in bgp.peers:
        address = str(peer.address)
        if address not in local_addresses:
            raise BgpError(f"peer {address}: no local address to render")
        blocks.append(_template("neighbor.conf.tmpl").substitute(
            process=PROCESS,
            peer_address=_token("peer address", address),
            router_id=router_id,
            local_address=_token(f"local address of peer {address}", local_addresses[address]),
            local_as=_token("local AS", bgp.local_as),
            peer_as=_token(f"AS of peer {address}", peer.asn),
            hold_time=_token(f"hold time of peer {address}", peer.hold_time),
            afi="ipv4" if peer.address.version == 4 else "ipv6",
            md5=_md5(peer.md5_password),
        ))
    bridge = " ".join(_token("bridge command word", word) for word in bridge_argv)
    neighbors = "\n".join(blocks)
    return _template("exabgp.conf.tmpl").substitute(process=PROCESS, bridge=bridge, neighbors=neighbors)


def _md5(password: str | None) -> str:
    """The neighbor's TCP MD5 statements: the key base64-encoded, so any printable key is one safe token."""
    if password is None:
        return ""
    encoded = base64.b64encode(password.encode()).decode()
    return f"\n    md5-password {_token('md5 key', encoded)};\n    md5-base64 true;"


def check_md5(bgp: Bgp) -> None:
    """BgpError when a peer has a TCP MD5 key and the kernel cannot sign TCP segments (no CONFIG_TCP_MD5SIG):
    ExaBGP would otherwise fail each connect with a less clear error, and the session never come up."""
    for peer in bgp.peers:
        if peer.md5_password is None:
            continue
        family = socket.AF_INET if peer.address.version == 4 else socket.AF_INET6
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, TCP_MD5SIG, _md5sig(peer.address, b"probe"))
            except OSError as exc:
                raise BgpError(f"peer {peer.address}: md5_password needs TCP MD5 signatures (TCP_MD5SIG), "
                               f"which this kernel refuses ({exc.strerror or exc}); build it with "
                               "CONFIG_TCP_MD5SIG=y, or remove the peer's md5_password") from None


def _md5sig(address: IPAddress, key: bytes) -> bytes:
    """struct tcp_md5sig: a sockaddr_storage (128 bytes) for the peer, flags, prefix length, key length,
    ifindex, then the key in 80 bytes."""
    if address.version == 4:
        sockaddr = struct.pack("=HH4s", socket.AF_INET, 0, address.packed)
    else:
        sockaddr = struct.pack("=HHI16sI", socket.AF_INET6, 0, 0, address.packed, 0)
    return sockaddr.ljust(128, b"\0") + struct.pack("=BBHI80s", 0, 0, len(key), 0, key)


def source_address(peer: str) -> str:
    """The kernel's source address towards `peer` (netlink.source_address), BgpError if it has none. Blocking:
    run it in a thread, pyroute2's sync IPRoute runs its own event loop."""
    try:
        src = netlink.source_address(peer)
    except NetlinkError as exc:  # no route
        raise BgpError(f"peer {peer}: no route to it to take the local address from ({exc}); "
                       "set bgp.peer.local_address") from exc
    if src is not None:
        return src
    raise BgpError(f"peer {peer}: the kernel has no source address towards it; set bgp.peer.local_address")


def default_router_id(bgp: Bgp, local_addresses: Mapping[str, str]) -> str:
    """bgp.router_id, else the first IPv4 local address in peer order."""
    if bgp.router_id is not None:
        return str(bgp.router_id)
    for peer in bgp.peers:
        local = local_addresses[str(peer.address)]
        if ipaddress.ip_address(local).version == 4:
            return local
    raise BgpError("no IPv4 local address to take the BGP router id from: set bgp.router_id")


def exabgp_environment(base: Mapping[str, str], run_dir: Path, instance: str) -> dict[str, str]:
    """ExaBGP's environment: ours without any exabgp* variable (a stray exabgp_cli_pipe turns ExaBGP into a
    CLI client), plus the settings it must run with. ExaBGP reads `exabgp.section.option` before its env
    file."""
    env = {k: v for k, v in base.items() if not k.lower().startswith("exabgp")}
    env.update({
        # ExaBGP setuid()s to daemon.user even with drop=false (bgp-lab gotcha 1); as nobody it could not talk
        # to the bridge. Staying our own user also keeps PR_SET_PDEATHSIG: a credential change clears it.
        "exabgp.daemon.user": _user(),
        "exabgp.daemon.drop": "false",
        "exabgp.daemon.daemonize": "false",
        "exabgp.daemon.pid": "",
        "exabgp.api.ack": "true",  # every command answered "done" or "error": send() waits for it
        "exabgp.api.cli": "false",  # no named pipes: several instances share /run (gotcha 4)
        "exabgp.api.pipename": f"edge-lb-{_token('instance', instance)}",
        "exabgp.log.destination": "stdout",  # our stdout is exabgp.log
        "exabgp.log.short": "false",  # timestamps in exabgp.log
        "EXABGP_ENVFILE": str(run_dir / ENV_FILE),  # ours, not a host-wide one
    })
    return env


def _user() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return "root" if os.getuid() == 0 else "nobody"  # ExaBGP only switches users when it runs as root
