"""The same benchmark for two versions of bpf/, interleaved in one run:
`sudo .venv/bin/python benchmarks/dataplane_ab.py --base main [--also REV ...] [--repeats 5]`.

`base` is bpf/ as of a git revision (read with `git show`), `tree` the working tree's. Each run is
`edge-lb bench`'s own measure (bpf_stats, repeat=1 loop, pinned CPU, pass.c and floor.c in the same run);
every figure is taken as a multiple of floor.c's cost in its own run, and the table shows the medians of those
ratios.
Separate `edge-lb bench` runs on a shared VM move the VIP cases by more than 0.1x floor; interleaving the two
versions in one process is what makes a difference that small visible."""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

from dataplane_breakdown import interleaved

from edge_lb.dataplane import bench, loader

SHOWN = ["tcp_established", "tcp_syn_new_flow", "tcp_syn_flood", "tcp_ipv6_vip", "udp_vip", "non_vip", "pass"]


def export(rev: str, where: Path) -> Path:
    """bpf/ as of `rev` in `where`."""
    repo = loader.BPF_DIR.parent
    names = subprocess.run(["git", "-C", str(repo), "ls-tree", "--name-only", rev, "bpf/"], check=True,
                           capture_output=True, text=True).stdout.split()
    where.mkdir()
    for name in names:
        blob = subprocess.run(["git", "-C", str(repo), "show", f"{rev}:{name}"], check=True,
                              capture_output=True).stdout
        (where / Path(name).name).write_bytes(blob)
    return where


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="main", help="git revision of the base bpf/")
    parser.add_argument("--also", action="append", default=[], metavar="REV",
                        help="another git revision of bpf/ benched in the same rounds (repeatable)")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each version, interleaved")
    parser.add_argument("--packets", type=int, default=3000, help="test runs per case and round")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="edge-lb-ab-") as tmp:
        dirs = {"base": export(args.base, Path(tmp) / "base")}
        dirs.update({rev: export(rev, Path(tmp) / f"also{n}") for n, rev in enumerate(args.also)})
        dirs["tree"] = loader.BPF_DIR
        med = interleaved(dirs, args.repeats, args.packets)  # the breakdown's method, every version
    print(f"cost as a multiple of floor.c's in the same run, median of {args.repeats} runs per version "
          f"({args.packets} packets x {bench.ROUNDS} rounds each); base = bpf/ at {args.base}")
    width = max(8, *(len(name) + 1 for name in dirs))
    print(f"{'version':<{width}}" + "".join(f"{c:>18}" for c in SHOWN))
    for name in dirs:
        cells = []
        for case in SHOWN:
            value, delta = med[name][case], med[name][case] - med["base"][case]
            cells.append(f"{value:.2f}" + (f" ({delta:+.2f})" if name != "base" else " " * 8))
        print(f"{name:<{width}}" + "".join(f"{c:>18}" for c in cells))


if __name__ == "__main__":
    main()
