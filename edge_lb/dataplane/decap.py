"""Loader of bpf/decap.c, the backends' XDP decapsulator (IPIP, IP6IP6, 4in6, and each of them in GUE ->
inner packet, XDP_PASS).

A backend behind edge-lb needs the balancer's outer header removed before its kernel sees the packet. A kernel
`ipip`/`ip6tnl` device does that on ordinary hosts; this program does it where those modules are missing (the
lab machines) or where a tunnel device per address family is unwanted.

    attach("eth0")                   # decapsulate packets to any address of eth0, native XDP
    attach("eth0", gue_port=7000)    # GUE on UDP port 7000 (the balancer's gue_port; default 6080)
    detach("eth0")

The program stays attached after this process exits (netlink attachment, no bpf_link), together with its
address map: to change the addresses, attach again (it replaces the old program).

Run inside a namespace:
`ip netns exec NS python -m edge_lb.dataplane.decap attach --interface IF [--address A ...] [--gue-port P]`.
"""

from __future__ import annotations

import argparse
import ctypes
import ipaddress
import logging
import socket
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from edge_lb import netlink
from edge_lb.assets import asset_dir
from edge_lb.dataplane import bpfsys, gue, loader
from edge_lb.errors import DataplaneError, NetlinkError
from healthchecks.base import IPAddress

log = logging.getLogger(__name__)

Mode = Literal["native", "generic"]

SOURCE = asset_dir("bpf") / "decap.c"  # its maps, structs and constants: bpf/decap_*.h
PROGRAM = "xdp_decap"
DEFAULT_MAX_ADDRS = 64  # the only default of DECAP_MAX_ADDRS: decap_consts.h requires it with -D
_MAX_ADDRS_LIMIT = 4096  # a host with more addresses than this is not a plausible backend


class DecapProgram(NamedTuple):
    """A loaded (not attached) decap program: the bcc module and its XDP function. Unpacks as (bpf, fn)."""

    bpf: Any
    fn: Any

    @property
    def prog_fd(self) -> int:
        return int(self.fn.fd)

    def close(self) -> None:
        """Release this process's file descriptors (an attached program stays attached)."""
        self.bpf.cleanup()


@dataclass(frozen=True, kw_only=True)
class DecapStats:
    """Counters of struct decap_stats, summed over CPUs."""

    decap_v4: int  # decapsulated, outer IPv4 (IPIP)
    decap_v6: int  # decapsulated, outer IPv6 (IP6IP6, 4in6)
    passed: int  # passed untouched
    gue: int  # of the decapsulated ones, those in GUE


def load(max_addrs: int = DEFAULT_MAX_ADDRS, gue_port: int = gue.DEFAULT_PORT) -> DecapProgram:
    """Compile bpf/decap.c and load its XDP function into the kernel (nothing attached)."""
    # Validated here because they are pasted into the compiler's command line (-D).
    if type(max_addrs) is not int or not 1 <= max_addrs <= _MAX_ADDRS_LIMIT:
        raise DataplaneError(
            f"{PROGRAM}: max_addrs must be an integer in 1..{_MAX_ADDRS_LIMIT}: {max_addrs!r}"
        )
    if type(gue_port) is not int or not 1 <= gue_port <= 65535:
        raise DataplaneError(f"{PROGRAM}: gue_port must be an integer in 1..65535: {gue_port!r}")
    bpf, fn = loader.load_xdp(SOURCE, PROGRAM, [f"-DDECAP_MAX_ADDRS={max_addrs}",
                                                f"-DDECAP_GUE_PORT={gue_port}", f"-I{SOURCE.parent}"])
    return DecapProgram(bpf=bpf, fn=fn)


def load_for_test(addresses: Iterable[IPAddress] = (), max_addrs: int = DEFAULT_MAX_ADDRS,
                  gue_port: int = gue.DEFAULT_PORT) -> DecapProgram:
    """Load the program and fill its address map, for BPF_PROG_TEST_RUN (see edge_lb.dataplane.testrun)."""
    program = load(max_addrs, gue_port)
    set_addresses(program.bpf, addresses)
    return program


def set_addresses(bpf: Any, addresses: Iterable[IPAddress]) -> None:
    """Replace the contents of decap_addrs with `addresses`."""
    table = bpf["decap_addrs"]
    wanted = {ipaddress.ip_address(a) for a in addresses}
    if len(wanted) > table.max_entries:
        raise DataplaneError(f"{PROGRAM}: {len(wanted)} addresses, decap_addrs holds {table.max_entries}")
    try:
        table.clear()
        for address in sorted(wanted, key=lambda a: (a.version, a.packed)):
            table[_address_key(table, address)] = table.Leaf(1)
    except Exception as exc:
        raise DataplaneError(f"{PROGRAM}: writing decap_addrs failed: {exc}") from exc


def _address_key(table: Any, address: IPAddress) -> Any:
    # decap_addr_key: addr is the address in network order, IPv4 in the first 4 bytes; the rest stays zero.
    raw = address.packed.ljust(16, b"\0")
    family = socket.AF_INET if address.version == 4 else socket.AF_INET6
    return table.Key(addr=(ctypes.c_ubyte * 16)(*raw), family=family)


class AddrKey(ctypes.Structure):
    """struct decap_addr_key, for reading an attached program's map without bcc (edge-lb backend check);
    tests/dataplane/test_decap_fixtures.py checks it against bcc's layout of the struct."""

    _fields_ = [("addr", ctypes.c_ubyte * 16), ("family", ctypes.c_uint32)]


def attached_addresses(prog_id: int) -> set[IPAddress]:
    """The outer destinations the loaded decap program `prog_id` decapsulates for (its decap_addrs)."""
    maps = bpfsys.prog_maps(prog_id)
    if "decap_addrs" not in maps:
        raise DataplaneError(f"program id {prog_id} has no decap_addrs map: not {PROGRAM}")
    out: set[IPAddress] = set()
    for raw in bpfsys.map_keys(maps["decap_addrs"], ctypes.sizeof(AddrKey)):
        key = AddrKey.from_buffer_copy(raw)
        size = 4 if key.family == socket.AF_INET else 16
        out.add(ipaddress.ip_address(bytes(key.addr)[:size]))
    return out


def read_stats(bpf: Any) -> DecapStats:
    """Sum the per-CPU counters of a loaded program."""
    table = bpf["decap_stats"]
    per_cpu = table[table.Key(0)]
    return DecapStats(
        decap_v4=sum(c.decap_v4 for c in per_cpu),
        decap_v6=sum(c.decap_v6 for c in per_cpu),
        passed=sum(c.passed for c in per_cpu),
        gue=sum(c.gue for c in per_cpu),
    )


def attach(ifname: str, addresses: Iterable[IPAddress] | None = None, mode: Mode = "native",
           gue_port: int = gue.DEFAULT_PORT) -> None:
    """Load the program, fill its addresses (default: every address of `ifname`) and attach it to `ifname`;
    GUE is taken on UDP port `gue_port`.

    Replaces any XDP program already attached in the same mode.
    """
    loader.xdp_flags(mode)  # a bad mode fails before anything is compiled
    wanted = list(addresses) if addresses is not None else netlink.interface_addresses(ifname)
    if not wanted:
        raise DataplaneError(f"{PROGRAM} on {ifname}: no addresses to decapsulate for")
    program = load(max(DEFAULT_MAX_ADDRS, len(wanted)), gue_port)
    try:
        set_addresses(program.bpf, wanted)
        loader.attach_xdp(ifname, program.fn, mode)
    finally:
        # Closes our file descriptors only: the attachment keeps the program and its map alive.
        program.close()
    log.info(
        "%s attached to %s (%s), decapsulating for %s, GUE on UDP port %d",
        PROGRAM,
        ifname,
        mode,
        ", ".join(str(a) for a in wanted),
        gue_port,
    )


def detach(ifname: str, mode: Mode | None = None) -> None:
    """Remove the XDP program of `ifname` (of both modes when `mode` is None). No program is not an error."""
    modes: list[Mode] = [mode] if mode is not None else ["generic", "native"]
    for each in modes:
        loader.detach_xdp(ifname, each)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-lb decap", description="Backend-side XDP decapsulator.")
    sub = parser.add_subparsers(dest="command", required=True)
    att = sub.add_parser("attach", help="attach the decapsulator to an interface")
    att.add_argument("--interface", required=True)
    att.add_argument(
        "--address",
        action="append",
        type=ipaddress.ip_address,
        default=None,
        help="outer destination to decapsulate for (repeatable; default: every address of the interface)",
    )
    att.add_argument("--mode", choices=sorted(loader.XDP_FLAGS), default="native")
    att.add_argument("--gue-port", type=int, default=gue.DEFAULT_PORT,
                     help="UDP port of GUE: the balancer's [dataplane] gue_port (default %(default)s)")
    det = sub.add_parser("detach", help="remove the XDP program of an interface")
    det.add_argument("--interface", required=True)
    det.add_argument("--mode", choices=sorted(loader.XDP_FLAGS), default=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "attach":
            attach(args.interface, args.address, args.mode, args.gue_port)
        else:
            detach(args.interface, args.mode)
    except (DataplaneError, NetlinkError) as exc:
        print(f"edge-lb decap: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
