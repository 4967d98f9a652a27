"""Throughput on a real interface (issue 13, item 2): frames pushed through a veth into the program attached
in native mode, on one CPU, in Mpps, for edge-lb and floor.c in the same run.

    sudo .venv/bin/python benchmarks/live_frames.py [--frames 1000000] [--rounds 5] [--json]

Two namespaces of a Lab(prefix="lfb"): `lb` holds lfb0, where the measured program is attached (XDP native);
`peer` holds its veth peer lfp0. From `peer`, BPF_PROG_RUN in live-frames mode (BPF_F_TEST_XDP_LIVE_FRAMES,
kernel >= 5.18) runs live_gen.c's `gen` `--frames` times on lfp0's ingress: each XDP_TX really leaves lfp0 and
arrives on lfb0, where the measured program runs in the veth's NAPI. What it sends back (XDP_TX) reaches lfp0
only because `sink` (XDP_DROP) is attached there (notes/environment.md: the veth XDP_TX peer trap). The
process is pinned to one CPU and the veths' NAPI runs in its softirqs: generator, measured program and sink
share that one core, as they would share a core's budget on a NIC queue.

Cases, interleaved round by round (median reported): `edge_lb_established` (TCP ACKs of 1,000 flows opened
before each round, the connection table's hit path), `edge_lb_new_flows` (a SYN of a never-seen flow per
frame: ring + insert), `floor` (floor.c, the same ACKs), `reflect` (XDP_TX and nothing else: the harness's
ceiling). Mpps = frames the measured program ran (bpf_stats run_cnt) / the wall time of the live run;
`ns_in_prog` is its own run_time_ns / run_cnt there (native mode, not a test run). Figures, never asserted.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import socket
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from edge_lb.config import parse_config
from edge_lb.dataplane import bench, loader
from edge_lb.dataplane.bpfsys import BPF_PROG_TEST_RUN, sys_bpf
from edge_lb.dataplane.simulate import Simulator
from edge_lb.dataplane.testrun import _TestAttr, _XdpMd
from edge_lb.lab.netns import Lab

HERE = Path(__file__).resolve().parent
BPF_F_TEST_XDP_LIVE_FRAMES = 1 << 1
CLONE_NEWNET = 0x40000000
LB_IF, PEER_IF = "lfb0", "lfp0"
_libc = ctypes.CDLL(None, use_errno=True)


@contextmanager
def netns(name: str) -> Iterator[None]:
    """This thread in network namespace `name` (/run/netns) inside the block, back in its own after."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {name}")
        try:
            yield
        finally:
            if _libc.setns(own, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back")
    finally:
        os.close(target)
        os.close(own)


class Programs:
    """Compiled once: the balancer (programmed as `edge-lb bench` programs it), floor.c, live_gen.c."""

    def __init__(self) -> None:
        self.loaded: list[Any] = []
        self.sim = Simulator(parse_config(bench.CONFIG))
        self.fns: dict[str, Any] = {}
        floor, self.fns["floor"] = loader.load_xdp(bench.REFERENCE_DIR / "floor.c", "floor_lb",
                                                   ["-DFLOOR_BCC"])
        self.loaded.append(floor)
        bench._fill_ring(floor)
        for name in ("gen", "sink", "reflect"):
            bpf, self.fns[name] = loader.load_xdp(HERE / "live_gen.c", name)
            self.loaded.append(bpf)
        self.gen_state = self.loaded[1][b"gen_state"]

    def fd(self, name: str) -> int:
        return self.sim.dp.prog_fd if name == "edge_lb" else int(self.fns[name].fd)

    def attach(self, name: str) -> None:
        """Program `name` on lfb0 in native mode (call inside lb's namespace), replacing the one there."""
        if name == "edge_lb":
            self.sim.dp.attach(LB_IF, "native")
        else:
            loader.attach_xdp(LB_IF, self.fns[name], "native")

    def set_gen(self, mode: int, flows: int) -> None:
        """gen's state on every CPU: mode 0 cycles `flows` established flows, 1 numbers new ones from it."""
        leaf = self.gen_state.Leaf()
        for cpu in range(len(leaf)):
            leaf[cpu].sent, leaf[cpu].mode, leaf[cpu].flows = 0, mode, flows
        self.gen_state[self.gen_state.Key(0)] = leaf

    def open_flows(self) -> None:
        """The established flows opened (unmeasured SYN test runs), again before each of their rounds: a
        new-flow round may have evicted some from the LRU."""
        for flow in range(bench.FLOWS):
            if self.sim.run(bench.tcp4(flow, bench.SYN))[0] != "XDP_TX":
                raise SystemExit(f"opening flow {flow}: the balancer did not return XDP_TX")

    def close(self) -> None:
        for bpf in self.loaded:
            bpf.cleanup()
        self.sim.close()


def live_run(gen_fd: int, frame: bytes, ifindex: int, frames: int) -> float:
    """`frames` runs of gen in live-frames mode on ifindex's ingress (call in its namespace): wall s."""
    data = ctypes.create_string_buffer(frame, len(frame))
    ctx = _XdpMd(data=0, data_end=len(frame), ingress_ifindex=ifindex, rx_queue_index=0)
    attr = _TestAttr(prog_fd=gen_fd, data_size_in=len(frame), data_in=ctypes.addressof(data), repeat=frames,
                     ctx_size_in=ctypes.sizeof(ctx), ctx_in=ctypes.addressof(ctx),
                     flags=BPF_F_TEST_XDP_LIVE_FRAMES, batch_size=64)
    start = time.perf_counter()
    sys_bpf(BPF_PROG_TEST_RUN, attr, "BPF_PROG_RUN live frames of gen")
    return time.perf_counter() - start


CASES: dict[str, tuple[str, int, Callable[[], bytes]]] = {  # case -> (program on lfb0, gen mode, template)
    "edge_lb_established": ("edge_lb", 0, lambda: bench.tcp4(0, bench.ACK)),
    "edge_lb_new_flows": ("edge_lb", 1, lambda: bench.tcp4(0, bench.SYN)),
    "floor": ("floor", 0, lambda: bench.tcp4(0, bench.ACK)),
    "reflect": ("reflect", 0, lambda: bench.tcp4(0, bench.ACK)),
}


def one_round(progs: Programs, lab: Lab, case: str, frames: int, new_from: int) -> dict[str, float]:
    prog, mode, template = CASES[case]
    with netns(f"{lab.id}-lb"):
        progs.attach(prog)
    if case == "edge_lb_established":
        progs.open_flows()
    progs.set_gen(mode, new_from if mode else bench.FLOWS)
    t0, c0 = bench.prog_stats(progs.fd(prog))
    _, s0 = bench.prog_stats(progs.fd("sink"))
    with netns(f"{lab.id}-peer"):
        wall = live_run(progs.fd("gen"), template(), socket.if_nametoindex(PEER_IF), frames)
    t1, c1 = bench.prog_stats(progs.fd(prog))
    _, s1 = bench.prog_stats(progs.fd("sink"))
    ran = c1 - c0
    return {"mpps": ran / wall / 1e6, "ran": ran, "returned": s1 - s0,
            "ns_in_prog": (t1 - t0) / ran if ran else 0.0}


def measure(frames: int, rounds: int) -> dict[str, Any]:
    results: dict[str, list[dict[str, float]]] = {case: [] for case in CASES}
    with Lab(prefix="lfb") as lab:
        lb, peer = lab.netns("lb"), lab.netns("peer")
        lab.veth(lb, LB_IF, peer, PEER_IF)
        progs = Programs()
        try:
            with netns(peer.name):
                loader.attach_xdp(PEER_IF, progs.fns["sink"], "native")
            with bench.pinned_cpu() as cpu, bench.bpf_stats_enabled():
                for r in range(rounds + 1):  # round 0: warm-up, not counted
                    for case in CASES:
                        figures = one_round(progs, lab, case, frames, (1 << 22) + r * frames)
                        if r:
                            results[case].append(figures)
        finally:
            progs.close()
    return {"cpu": cpu, "frames": frames, "rounds": rounds, "cases": {
        case: {"mpps": round(statistics.median(f["mpps"] for f in runs), 3),
               "ns_in_prog": round(statistics.median(f["ns_in_prog"] for f in runs), 1),
               "ran_of_sent": round(statistics.median(f["ran"] / frames for f in runs), 3),
               "returned_of_ran": round(statistics.median(f["returned"] / max(f["ran"], 1) for f in runs), 3),
               "mpps_rounds": [round(f["mpps"], 3) for f in runs]}
        for case, runs in results.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=1_000_000, help="frames sent per case and round")
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds (after one warm-up round)")
    parser.add_argument("--json", action="store_true", help="one JSON document")
    args = parser.parse_args()
    doc = measure(args.frames, args.rounds)
    floor = doc["cases"]["floor"]["mpps"]
    for case in doc["cases"].values():
        case["x_floor_mpps"] = round(case["mpps"] / floor, 2) if floor else None
    if args.json:
        print(json.dumps(doc, indent=2))
        return
    print(f"veth, XDP native, one CPU ({doc['cpu']}), {args.frames} frames x {args.rounds} rounds, medians")
    print(f"{'case':<22}{'Mpps':>8}{'/ floor':>9}{'ns in prog':>12}{'ran/sent':>10}{'back/ran':>10}")
    for name, c in doc["cases"].items():
        print(f"{name:<22}{c['mpps']:>8.3f}{c['x_floor_mpps']:>9.2f}{c['ns_in_prog']:>12.1f}"
              f"{c['ran_of_sent']:>10.3f}{c['returned_of_ran']:>10.3f}")


if __name__ == "__main__":
    main()
