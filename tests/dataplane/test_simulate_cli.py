"""`edge-lb simulate` end to end: pcap in, one JSON line per frame, pcap out; state carries across frames."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import ARP, Ether
from scapy.utils import rdpcap, wrpcap

from edge_lb.cli import main

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
