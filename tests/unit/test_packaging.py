"""A wheel (not only the source tree) carries the C sources, the ExaBGP templates, the benchmark
references and the compiled Maglev fill, and edge_lb finds them inside itself."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TREE = ["pyproject.toml", "setup.py", "README.md", "edge_lb", "healthchecks", "bpf", "exabgp_conf",
        "benchmarks/reference"]


def test_a_wheel_install_finds_its_assets(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for part in TREE:
        if (ROOT / part).is_dir():
            shutil.copytree(ROOT / part, src / part, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
        else:
            src.mkdir(exist_ok=True)
            shutil.copy(ROOT / part, src / part)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "--no-index", "--disable-pip-version-check", "-w", str(tmp_path / "dist"), str(src)],
                   check=True, capture_output=True, timeout=120)
    (wheel,) = (tmp_path / "dist").glob("edge_lb-*.whl")
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    # Every subpackage comes from the wheel, not from the tree's editable install (which a missing one
    # would silently fall through to): each imported module's file is checked to be under site/.
    packages = sorted(".".join(init.parent.relative_to(ROOT).parts)
                      for top in ("edge_lb", "healthchecks") for init in (ROOT / top).rglob("__init__.py"))
    probe = (f"import sys, importlib; [importlib.import_module(p) for p in {packages!r}];"
             "from edge_lb import assets; from edge_lb.bgp import exabgp_config;"
             "from edge_lb.dataplane import counters, decap, loader, maglev;"
             "assert maglev.compiled(), 'the wheel carries the compiled Maglev fill';"
             "print(*[m.__file__ for n, m in sorted(sys.modules.items())"
             "        if n.split('.')[0] in ('edge_lb', 'healthchecks')],"
             "      file=sys.stderr);"
             "print(loader.BPF_DIR, decap.SOURCE, exabgp_config.TEMPLATES,"
             "      assets.asset_dir('benchmarks/reference'), counters.CONSTS_H,"
             "      len(counters.reason_names()))")
    run = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env={"PYTHONPATH": str(site)},
                         check=True, capture_output=True, text=True, timeout=60)
    out = run.stdout.split()
    site = site.resolve()
    files = [Path(f).resolve() for f in run.stderr.split()]
    assert len(files) > 10 and all(f.is_relative_to(site) for f in files), files
    assert [Path(p) for p in out[:-1]] == [
        site / "edge_lb/bpf", site / "edge_lb/bpf/decap.c", site / "edge_lb/exabgp_conf",
        site / "edge_lb/benchmarks/reference", site / "edge_lb/bpf/balancer_consts.h"]
    assert int(out[-1]) > 10, "the counter names are read from the installed header"
    assert (site / "edge_lb/bpf/balancer.c").is_file() and (site / "edge_lb/bpf/balancer_consts.h").is_file()
    assert (site / "edge_lb/exabgp_conf/exabgp.conf.tmpl").is_file()
    assert (site / "edge_lb/benchmarks/reference/floor.c").is_file()
