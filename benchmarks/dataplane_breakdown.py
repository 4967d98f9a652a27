"""Where bpf/balancer.c's time goes: `sudo .venv/bin/python benchmarks/dataplane_breakdown.py [--repeats 3]`.

A lookup's marginal cost is measured by doing it twice: each variant is a copy of bpf/ with one patch,
benched by `edge-lb bench`'s own method (edge_lb.dataplane.bench.measure: bpf_stats, repeat=1 loop, pinned
CPU, pass.c and floor.c in the same run). Variants run interleaved, `--repeats` times each.
A shared VM's load moves
absolute figures by tens of percent between runs, so each figure is taken as a ratio to floor.c's cost in its
own run; the table shows the medians of those ratios and their difference to base.

    base        the program as it is
    no_stats    every counter update removed (what the per-CPU counters cost)
    vip_twice   the VIP hash lookup done a second time (a miss: a key no VIP has)
    ct_twice    the connection-table lookup done a second time (a miss: a key no flow has)
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from pathlib import Path

from edge_lb.dataplane import bench, loader

COUNT = "static __always_inline void count(__u32 idx, __u64 bytes) {"
COUNT_IN = "static __always_inline void count_in(void *map_lookup_result, __u64 bytes) {"
VIP = "  struct vip_meta *vip = vips.lookup(&k);\n"
CT = "    struct conn *c = conn_table.lookup(&p->flow);\n"
VARIANTS: dict[str, list[tuple[str, str]]] = {
    "base": [],
    "no_stats": [(COUNT, COUNT + " return;"), (COUNT_IN, COUNT_IN + " return;")],
    "vip_twice": [(VIP, VIP + "  k.port ^= 1;\n  if (vips.lookup(&k))\n    return 0;\n  k.port ^= 1;\n")],
    "ct_twice": [(CT, CT + "    p->flow.pad = 1;\n    if (conn_table.lookup(&p->flow))\n      return 0;\n"
                          "    p->flow.pad = 0;\n")],
}
SHOWN = ["tcp_established", "tcp_syn_new_flow", "tcp_ipv6_vip", "udp_vip", "non_vip", "pass"]


def variant_dir(root: Path, name: str) -> Path:
    """A copy of bpf/ with the variant's patches; each patch must apply exactly once."""
    where = root / name
    shutil.copytree(loader.BPF_DIR, where)
    source = where / "balancer.c"
    text = source.read_text()
    for old, new in VARIANTS[name]:
        if text.count(old) != 1:
            raise SystemExit(f"variant {name}: the patch no longer applies to balancer.c (source changed)")
        text = text.replace(old, new)
    source.write_text(text)
    return where


def interleaved(dirs: dict[str, Path], repeats: int, packets: int) -> dict[str, dict[str, float]]:
    """Each version of bpf/ in `dirs` benched in turn, `repeats` rounds: per version and case, the median of
    its cost as a multiple of floor.c's in the same run (a shared VM's load moves absolute figures)."""
    original = loader.BPF_DIR
    samples: dict[str, dict[str, list[float]]] = {name: {} for name in dirs}
    try:
        for _ in range(repeats):
            for name, where in dirs.items():
                loader.BPF_DIR = where
                cases, _cpu = bench.measure(packets)
                floor = cases["floor"]["ns_per_packet"]
                for case, figures in cases.items():
                    samples[name].setdefault(case, []).append(figures["ns_per_packet"] / floor)
    finally:
        loader.BPF_DIR = original
    return {n: {c: statistics.median(v) for c, v in cases.items()} for n, cases in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each variant, interleaved")
    parser.add_argument("--packets", type=int, default=5000, help="test runs per case and round")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="edge-lb-breakdown-") as tmp:
        dirs = {name: variant_dir(Path(tmp), name) for name in VARIANTS}
        med = interleaved(dirs, args.repeats, args.packets)
    print(f"cost as a multiple of floor.c's in the same run, median of {args.repeats} runs per variant "
          f"({args.packets} packets x {bench.ROUNDS} rounds each); in brackets: the difference to base")
    print(f"{'variant':<10}" + "".join(f"{c:>18}" for c in SHOWN))
    for name in VARIANTS:
        cells = []
        for case in SHOWN:
            value, delta = med[name][case], med[name][case] - med["base"][case]
            cells.append(f"{value:.2f}" + (f" ({delta:+.2f})" if name != "base" else " " * 8))
        print(f"{name:<10}" + "".join(f"{c:>18}" for c in cells))


if __name__ == "__main__":
    main()
