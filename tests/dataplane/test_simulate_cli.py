"""`edge-lb simulate` end to end: pcap in, one JSON line per frame, pcap out; state carries across frames."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Raw
from scapy.utils import rdpcap, wrpcap

from edge_lb.cli import main
from edge_lb.dataplane.pcap import write_frames

from .conftest import needs_root

pytestmark = [pytest.mark.root, needs_root]

CONFIG = """
[node]
interface = "eth0"
mac = "02:00:00:00:00:01"
gateway_mac = "00:00:de:ad:be:af"
[dataplane]
max_vips = 4
max_backends = 16
conn_table_size = 4096
[[vip]]
address = "10.200.1.1"
port = 80
protocol = "tcp"
  [[vip.backend]]
  address = "10.0.0.1"
  [[vip.backend]]
  address = "10.0.0.2"
"""


def test_simulate_pcap(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(CONFIG)
    client = Ether(src="02:00:00:00:00:99", dst="02:00:00:00:00:01") / IP(src="192.0.2.7", dst="10.200.1.1")
    frames = [client / TCP(sport=5555, dport=80, flags="S"), Ether() / ARP(),
              client / TCP(sport=5555, dport=80, flags="A"),
              Ether() / IP(src="192.0.2.7", dst="10.200.1.1", flags="MF") / TCP(dport=80)]
    wrpcap(str(tmp_path / "in.pcap"), frames)
    assert main(["simulate", "-c", str(cfg), str(tmp_path / "in.pcap"), str(tmp_path / "out.pcap")]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [x["index"] for x in lines] == [0, 1, 2, 3]
    assert [x["verdict"] for x in lines] == ["XDP_TX", "XDP_PASS", "XDP_TX", "XDP_DROP"]
    assert "frame" not in lines[3] and bytes.fromhex(lines[1]["frame"]) == bytes(frames[1])
    out = rdpcap(str(tmp_path / "out.pcap"))
    assert len(out) == 3
    # The SYN and the ACK of one flow went to the same backend.
    assert out[0][IP].dst == out[2][IP].dst and out[0][IP].proto == 4


def test_every_frame_gets_a_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A frame the kernel refuses (shorter than Ethernet) or cannot hand over whole (jumbo) gets an error
    line; the run goes on, and the frames after it keep their state (the ACK follows the SYN's backend)."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(CONFIG.replace('gateway_mac = "00:00:de:ad:be:af"',
                                  'gateway_mac = "00:00:de:ad:be:af"\nmtu = 9000'))
    client = Ether(src="02:00:00:00:00:99", dst="02:00:00:00:00:01") / IP(src="192.0.2.7", dst="10.200.1.1")
    syn, ack = client / TCP(sport=5556, dport=80, flags="S"), client / TCP(sport=5556, dport=80, flags="A")
    jumbo = bytes(client / TCP(sport=5557, dport=80, flags="A") / Raw(b"x" * (9000 - 40)))
    assert len(jumbo) == 9014
    write_frames(tmp_path / "in.pcap", [b"\x00" * 5, bytes(syn), jumbo, b"", bytes(ack)])
    assert main(["simulate", "-c", str(cfg), str(tmp_path / "in.pcap"), str(tmp_path / "out.pcap")]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [x["index"] for x in lines] == [0, 1, 2, 3, 4]
    assert "shorter than an Ethernet header" in lines[0]["error"] and "verdict" not in lines[0]
    assert "9014 bytes is longer than the" in lines[2]["error"] and "not simulated" in lines[2]["error"]
    assert "shorter than an Ethernet header" in lines[3]["error"]
    assert lines[1]["verdict"] == lines[4]["verdict"] == "XDP_TX"
    out = rdpcap(str(tmp_path / "out.pcap"))
    assert len(out) == 2 and out[0][IP].dst == out[1][IP].dst


def test_largest_whole_frame_is_simulated_right() -> None:
    """Up to the kernel's one-piece limit (about 3.5 KB) a big frame is balanced as a small one would be:
    whole inner packet, outer length right; one byte more is refused, not answered wrongly."""
    from edge_lb.dataplane.simulate import Simulator
    from edge_lb.dataplane.testrun import max_linear_frame
    from edge_lb.errors import DataplaneError

    from .conftest import make_config

    sim = Simulator(make_config(lambda d: d["node"].update(mtu=9000)))
    try:
        limit = max_linear_frame(sim.dp.prog_fd)
        assert 3000 < limit < 4096
        base = Ether(src="02:00:00:00:00:99", dst="02:00:00:00:00:01") / IP(src="192.0.2.8", dst="10.200.1.1")
        big = bytes(base / TCP(sport=5558, dport=80, flags="A") / Raw(b"y" * (limit - 54)))
        assert len(big) == limit
        verdict, out = sim.run(big)
        assert verdict == "XDP_TX"
        outer = Ether(out)[IP]
        assert outer.proto == 4 and outer.len == 20 + len(big) - 14 and bytes(outer.payload) == big[14:]
        with pytest.raises(DataplaneError, match="longer than the"):
            sim.run(big + b"z")
    finally:
        sim.close()
