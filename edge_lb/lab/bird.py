"""BIRD 2 on a lab's router namespace: started in the foreground, asked through birdc on its control socket.

    bird = Bird(router, lab.tmpdir)
    bird.start(conf_text)          # returns once BIRD answers on bird.ctl (LabError after BIRD_TIMEOUT)
    bird.protocols()               # {"lb1": "up", ...}
    bird.routes("10.88.100.1/32")  # {"lb1": {"as_path": "65001 65001", "med": "500", ...}, ...}

Its files are in tmpdir: bird.conf, bird.ctl, bird.pid, bird.log.
"""

from __future__ import annotations

import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from edge_lb.errors import LabError
from edge_lb.lab.netns import Netns

_ROUTE_HEAD = re.compile(r"unicast \[(?P<proto>\S+) [^\]]*\](?P<best> \*)?")
BIRD_TIMEOUT = 10.0  # seconds for BIRD to answer on its control socket, and for any birdc command


@dataclass
class Bird:
    router: Netns
    tmpdir: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def ctl(self) -> Path:
        return self.tmpdir / "bird.ctl"

    def start(self, conf_text: str) -> None:
        conf = self.tmpdir / "bird.conf"
        conf.write_text(conf_text)
        # Foreground (-f): the PID is BIRD's own, so the Lab stops it by PID.
        self.proc = self.router.spawn(["bird", "-f", "-c", str(conf), "-s", str(self.ctl),
                                       "-P", str(self.tmpdir / "bird.pid")], self.tmpdir / "bird.log")
        deadline = time.monotonic() + BIRD_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise LabError(f"bird exited with {self.proc.returncode}: {self.log()[-2000:]}")
            if self.ctl.exists() and self._birdc("show", "status", check=False).returncode == 0:
                return
            time.sleep(0.1)
        raise LabError(f"bird did not answer within {BIRD_TIMEOUT} s: {self.log()[-2000:]}")

    def _birdc(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = ["birdc", "-s", str(self.ctl), *argv]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=BIRD_TIMEOUT, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise LabError(f"{' '.join(cmd)}: {exc}") from exc
        if check and out.returncode != 0:
            raise LabError(f"{' '.join(cmd)}: exit {out.returncode}: {out.stderr.strip() or out.stdout}")
        return out

    def birdc(self, *argv: str) -> str:
        """A birdc command's output, e.g. birdc("show", "route", "all")."""
        return self._birdc(*argv).stdout

    def routes(self, prefix: str) -> dict[str, dict[str, str]]:
        """Each protocol's route for `prefix` with its BGP attributes (route_attributes); {} for none."""
        out = self._birdc("show", "route", "for", prefix, "all", check=False)
        if "Network not found" in out.stdout:
            return {}
        if out.returncode != 0:
            raise LabError(f"birdc show route for {prefix} all: exit {out.returncode}: {out.stdout}")
        return route_attributes(out.stdout)

    def protocols(self) -> dict[str, str]:
        """name -> state ("up", "start", "down") of every BIRD protocol; BGP is "up" when Established."""
        rows = self.birdc("show", "protocols").splitlines()
        start = next((i for i, line in enumerate(rows) if line.startswith("Name")), len(rows))
        return {cols[0]: cols[3] for cols in (r.split() for r in rows[start + 1:]) if len(cols) >= 4}

    def log(self) -> str:
        return (self.tmpdir / "bird.log").read_text(errors="replace")


def since(show_protocols: str, protocol: str) -> float:
    """`birdc show protocols` -> when `protocol`'s state last changed, in seconds of the day. A reset session
    changes it; BIRD derives it from the clock each time it prints it, so two reads of an untouched session
    can differ by a millisecond (compare with SAME_SINCE, not ==)."""
    for row in show_protocols.splitlines():
        cols = row.split()
        if cols and cols[0] == protocol and len(cols) >= 5:
            hours, minutes, seconds = cols[4].split(":")
            return int(hours) * 3600 + int(minutes) * 60 + float(seconds)
    raise LabError(f"no BIRD protocol {protocol} in: {show_protocols}")


SAME_SINCE = 0.02  # seconds: the print jitter above; a reset and its re-establishment take far longer


def route_attributes(show_route_all: str) -> dict[str, dict[str, str]]:
    """`birdc show route for PREFIX all` -> {protocol: {"as_path": "65001 65001", "med": "500",
    "large_community": "(65001, 1, 2)", "best": "yes"|"no", ...}}: each route's BGP.* attributes."""
    routes: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for line in show_route_all.splitlines():
        match = _ROUTE_HEAD.search(line)
        if match:
            current = routes.setdefault(match["proto"], {"best": "yes" if match["best"] else "no"})
        elif current is not None and line.strip().startswith("BGP."):
            key, _, value = line.strip()[4:].partition(":")
            current[key.strip()] = value.strip()
    return routes
