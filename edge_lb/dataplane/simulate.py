"""`edge-lb simulate`: run every frame of a pcap through the real, unattached program, in order."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from edge_lb.config import Config
from edge_lb.dataplane.loader import Dataplane
from edge_lb.dataplane.node import NodeMaps, link_for
from edge_lb.dataplane.pcap import read_frames, write_frames
from edge_lb.dataplane.testrun import ETH_HLEN, max_linear_frame, run_xdp
from edge_lb.errors import DataplaneError

VERDICTS = {0: "XDP_ABORTED", 1: "XDP_DROP", 2: "XDP_PASS", 3: "XDP_TX", 4: "XDP_REDIRECT"}
_WITH_FRAME = {"XDP_TX", "XDP_PASS"}


class Simulator:
    """A private (unpinned) data plane programmed from config; connection state carries across frames."""

    def __init__(self, config: Config) -> None:
        link = link_for(config.node, read_kernel=False)
        self.dp = Dataplane.load(config.dataplane, pin=False)
        self.maps = NodeMaps(self.dp.io, config, link, adopt=False)
        self.maps.apply(config)

    def reprogram(self, config: Config) -> None:
        """Apply another config to the same maps, as a reload would (the connection table stays)."""
        self.maps.apply(config)

    def run(self, frame: bytes) -> tuple[str, bytes]:
        """(verdict, output frame) of one frame. Raises DataplaneError for a frame the kernel refuses or would
        not hand to the program whole (its verdict would be about the first part only)."""
        if len(frame) < ETH_HLEN:
            raise DataplaneError(f"frame of {len(frame)} bytes is shorter than an Ethernet header "
                                 f"({ETH_HLEN}): BPF_PROG_TEST_RUN refuses it")
        if len(frame) > 2048 and len(frame) > max_linear_frame(self.dp.prog_fd):
            raise DataplaneError(
                f"frame of {len(frame)} bytes is longer than the {max_linear_frame(self.dp.prog_fd)} bytes "
                "BPF_PROG_TEST_RUN hands an XDP program in one piece on this kernel (one page less headroom "
                "and tailroom; the rest would go into fragments the program does not read): not simulated")
        code, out = run_xdp(self.dp.prog_fd, frame, len(frame) + 256)
        return VERDICTS.get(code, f"XDP_{code}"), out

    def result(self, index: int, frame: bytes) -> dict[str, object]:
        """One frame's line: {"index", "verdict"[, "frame"]}, or {"index", "error"} when it cannot be run."""
        try:
            verdict, out = self.run(frame)
        except DataplaneError as exc:
            return {"index": index, "error": str(exc)}
        line: dict[str, object] = {"index": index, "verdict": verdict}
        if verdict in _WITH_FRAME:
            line["frame"] = out.hex()
        return line

    def results(self, frames: Iterator[bytes]) -> Iterator[dict[str, object]]:
        for index, frame in enumerate(frames):
            yield self.result(index, frame)

    def close(self) -> None:
        self.dp.close()


def simulate(config: Config, pcap_in: Path, pcap_out: Path | None, out: TextIO) -> int:
    """Print one JSON object a line per frame, `{"index", "error"}` for a frame that cannot be run (the run
    goes on); write XDP_TX / XDP_PASS frames to pcap_out.

    Returns frames seen."""
    frames = list(read_frames(pcap_in))  # read fully first: a bad file changes nothing and prints nothing
    sim = Simulator(config)
    written: list[bytes] = []
    try:
        for line in sim.results(iter(frames)):
            out.write(json.dumps(line) + "\n")
            if "frame" in line:
                written.append(bytes.fromhex(str(line["frame"])))
    finally:
        sim.close()
    if pcap_out is not None:
        write_frames(pcap_out, written)
    return len(frames)
