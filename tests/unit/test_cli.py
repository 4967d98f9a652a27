"""The CLI's contract: exit codes, problems on stderr with key paths, clear errors for bad input."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from edge_lb.cli import main

GOOD = """
[node]
interface = "eth0"
mac = "02:00:00:00:00:01"
gateway_mac = "00:00:de:ad:be:af"
mtu = 1500

[[vip]]
address = "10.200.1.1"
port = 80
protocol = "tcp"

  [[vip.backend]]
  address = "10.0.0.1"
  weight = 1
"""

BAD = """
[node]
interface = "eth0"
mac = "zz"

[[vip]]
address = "10.200.1.1"
port = 80
protocol = "tcp"

[[vip]]
address = "10.200.1.2"
port = 70000
protocol = "sctp"

  [[vip.backend]]
  address = "not-an-ip"
"""


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "edge-lb.toml"
    path.write_text(text)
    return str(path)


def test_check_valid_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "-c", write(tmp_path, GOOD)]) == 0
    assert "valid" in capsys.readouterr().out


def test_check_invalid_lists_every_problem_and_exits_2(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "-c", write(tmp_path, BAD)]) == 2
    err = capsys.readouterr().err
    for path in ("node.mac", "vip[1].port", "vip[1].protocol", "vip[1].backend[0].address"):
        assert path in err, f"{path} missing from:\n{err}"
    assert len(err.strip().splitlines()) == 4


def test_check_missing_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "-c", str(tmp_path / "nope.toml")]) == 2
    assert "nope.toml" in capsys.readouterr().err


def test_simulate_rejects_a_non_pcap_before_loading(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    junk = tmp_path / "in.pcap"
    junk.write_bytes(b"definitely not a pcap")
    assert main(["simulate", "-c", write(tmp_path, GOOD), str(junk)]) == 1
    captured = capsys.readouterr()
    assert "not a pcap file" in captured.err and captured.out == ""


def test_simulate_needs_macs_in_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from edge_lb.dataplane.pcap import write_frames

    pcap = tmp_path / "in.pcap"
    write_frames(pcap, [b"\x00" * 60])
    no_macs = (GOOD.replace('mac = "02:00:00:00:00:01"\n', "")
               .replace('gateway_mac = "00:00:de:ad:be:af"\n', ""))
    assert main(["simulate", "-c", write(tmp_path, no_macs), str(pcap)]) == 2
    err = capsys.readouterr().err
    assert "node.mac: required by simulate" in err and "node.gateway_mac: required by simulate" in err


def test_unknown_subcommand_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2


@pytest.mark.parametrize("command", ["load", "unload"])
def test_load_and_unload_refuse_while_a_supervisor_owns_the_instance(
        command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Two writers of one instance's maps would undo each other (the prefilter, rings, numbering)."""
    from edge_lb import paths

    monkeypatch.setattr(paths, "RUN_DIR", tmp_path)
    config = tmp_path / "lb.toml"
    config.write_text(GOOD)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as live:
        live.bind(str(paths.socket("default")))
        live.listen(1)
        assert main([command, "-c", str(config)]) == 1
    assert "a supervisor is running for instance default" in capsys.readouterr().err


def test_every_command_a_message_names_exists() -> None:
    """An error that advises `edge-lb X` must name a command the CLI has (one advised `edge-lb cleanup`)."""
    import re

    from edge_lb.cli import build_parser

    commands = set(build_parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    root = Path(__file__).resolve().parents[2]
    named = {(path.name, word) for path in [*root.glob("edge_lb/**/*.py"), *root.glob("healthchecks/*.py")]
             for word in re.findall(r"`edge-lb ([a-z-]+)", path.read_text())}
    assert len(named) > 5  # the search finds the advice it checks
    assert [(name, word) for name, word in sorted(named) if word not in commands] == []
