"""FRR (Debian 12's frr 8.4) as a lab's router: zebra and bgpd in the router's namespace, in the foreground,
asked through vtysh on their own vty sockets. The same role as lab/bird.py, for the same address plan.

    frr = Frr(router, lab.tmpdir)
    frr.start(frr_conf(...))      # returns once bgpd answers vtysh (LabError after FRR_TIMEOUT)
    frr.sessions()                # {"10.88.11.2": "up", ...}
    frr.vtysh("show bgp ipv4 unicast 10.88.100.1/32 json")

FRR needs these to run beside other labs and to behave like the BIRD router (each cost time):
  1. Its own paths: the packaged daemons share /var/run/frr (zserv.api, vty sockets, pid files) and read
     /etc/frr; every daemon gets -z, --vty_socket, -i and -f in a directory of the lab's tmpdir owned by
     the frr user (as root they refuse to start: root is not in the frrvty group), and -P 0 (no vty TCP
     port to clash on).
  2. eBGP needs a policy (`bgp ebgp-requires-policy` is on by default): without an import route-map FRR
     takes no route and sends none. The lab's route-maps say what BIRD's filters say.
  3. ECMP over nodes of different ASes: `bgp bestpath as-path multipath-relax` and `maximum-paths`,
     else only one next hop is installed (BIRD merges paths of equal length whatever their first AS).
  4. Fast timers are per neighbor (`timers 1 3`, `timers connect 1`) and an `update-source`, as BIRD's
     template; zebra installs the route as a nexthop group (`nhid`), which `ip -j route` still expands into
     its next hops (checked by the lab's tests).
Its files are in tmpdir/frr: zebra.conf, bgpd.conf, the sockets and pid files, zebra.log, bgpd.log.
"""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_lb.errors import LabError
from edge_lb.lab.netns import Netns

FRR_TIMEOUT = 15.0  # seconds for bgpd to answer vtysh, and for any vtysh command
DAEMONS = Path("/usr/lib/frr")


@dataclass(frozen=True)
class FrrPeer:
    address: str
    asn: int
    source: str  # the router's own address towards it


def frr_conf(router_id: str, asn: int, peers: list[FrrPeer], accept: str, hold: int = 3) -> str:
    """bgpd.conf: eBGP to every peer, routes inside `accept` (a prefix, /32 or /128 routes of it) taken,
    nothing sent back, ECMP across peers of different ASes."""
    v6 = ":" in accept
    family = "ipv6" if v6 else "ipv4"
    host = 128 if v6 else 32
    lines = ["frr defaults traditional", "hostname rt", "log stdout informational", "!",
             f"{'ipv6' if v6 else 'ip'} prefix-list vips seq 5 permit {accept} ge {host}",
             "route-map vip_in permit 10", f" match {'ipv6' if v6 else 'ip'} address prefix-list vips", "!",
             "route-map send_none deny 10", "!",
             f"router bgp {asn}", f" bgp router-id {router_id}", " no bgp ebgp-requires-policy",
             " bgp bestpath as-path multipath-relax", " no bgp default ipv4-unicast"]
    for peer in peers:
        lines += [f" neighbor {peer.address} remote-as {peer.asn}",
                  f" neighbor {peer.address} timers 1 {hold}", f" neighbor {peer.address} timers connect 1",
                  f" neighbor {peer.address} update-source {peer.source}"]
    lines += [f" address-family {family} unicast", "  maximum-paths 16"]
    for peer in peers:
        lines += [f"  neighbor {peer.address} activate", f"  neighbor {peer.address} route-map vip_in in",
                  f"  neighbor {peer.address} route-map send_none out"]
    lines += [" exit-address-family", "!"]
    return "\n".join(lines) + "\n"


@dataclass
class Frr:
    router: Netns
    tmpdir: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def dir(self) -> Path:
        return self.tmpdir / "frr"

    def _daemon(self, name: str, conf: str) -> None:
        (self.dir / f"{name}.conf").write_text(conf)
        argv = [str(DAEMONS / name), "-f", str(self.dir / f"{name}.conf"),
                "-i", str(self.dir / f"{name}.pid"), "-z", str(self.dir / "zserv.api"),
                "--vty_socket", str(self.dir), "-u", "frr", "-g", "frr", "-P", "0", "--log", "stdout"]
        self.procs.append(self.router.spawn(argv, self.dir / f"{name}.log"))

    def start(self, bgpd_conf: str) -> None:
        """zebra first (bgpd installs routes through it), then bgpd; both in the foreground (the Lab stops
        them by PID)."""
        # The daemons drop to the frr user (as root they refuse to start: root is not in the frrvty group);
        # it must reach its files: the lab's private tmpdir gets search permission, the frr dir is its own.
        self.tmpdir.chmod(self.tmpdir.stat().st_mode | 0o011)
        self.dir.mkdir(mode=0o755, exist_ok=True)
        user = pwd.getpwnam("frr")
        os.chown(self.dir, user.pw_uid, user.pw_gid)
        self._daemon("zebra", "hostname rt\nlog stdout informational\n!\n")
        self._wait(lambda: (self.dir / "zserv.api").exists(), "zebra's zserv.api")
        self._daemon("bgpd", bgpd_conf)
        self._wait(lambda: self._vtysh("show bgp summary json", check=False).returncode == 0, "bgpd on vtysh")

    def _wait(self, ready: Any, what: str) -> None:
        deadline = time.monotonic() + FRR_TIMEOUT
        while time.monotonic() < deadline:
            for proc in self.procs:
                if proc.poll() is not None:
                    raise LabError(f"FRR: a daemon (pid {proc.pid}) exited with {proc.returncode}: "
                                   f"{self.log()[-2000:]}")
            if ready():
                return
            time.sleep(0.1)
        raise LabError(f"FRR: no {what} within {FRR_TIMEOUT} s: {self.log()[-2000:]}")

    def _vtysh(self, command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [*self.router.prefix(), "vtysh", "--vty_socket", str(self.dir), "-c", command]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=FRR_TIMEOUT, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise LabError(f"vtysh -c {command!r}: {exc}") from exc
        if check and out.returncode != 0:
            raise LabError(f"vtysh -c {command!r}: exit {out.returncode}: {out.stderr.strip() or out.stdout}")
        return out

    def vtysh(self, command: str) -> str:
        return self._vtysh(command).stdout

    def sessions(self) -> dict[str, str]:
        """Peer address -> "up" when Established, else FRR's state in lower case ("active", "connect")."""
        summary = json.loads(self.vtysh("show bgp summary json") or "{}")
        peers: dict[str, str] = {}
        for family in summary.values():
            for address, peer in family.get("peers", {}).items():
                state = str(peer.get("state", "")).lower()
                peers[address] = "up" if state == "established" else state
        return peers

    def log(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.dir.glob("*.log")))
