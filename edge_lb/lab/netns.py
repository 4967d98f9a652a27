"""Network-namespace lab primitives for integration tests and `edge-lb demo`.

    with Lab() as lab:
        client, backend = lab.netns("cl"), lab.netns("be")
        lab.veth(client, "c0", backend, "b0")
        client.addr("c0", "10.0.0.1/24")
        server = backend.spawn([sys.executable, "-m", "edge_lb.lab.labhttp", ...], lab.tmpdir / "http.log")

Every name carries a per-run id, so concurrent or crashed runs never clash. Closing the lab (always, also
on exceptions and Ctrl-C) stops what it spawned and deletes its namespaces; deleting a namespace removes its
veths and their XDP programs with it. Nothing here touches the host's own namespace beyond creating the
namespaces.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from edge_lb.errors import LabError

log = logging.getLogger(__name__)

IFNAMSIZ = 15  # longest interface name the kernel accepts (IFNAMSIZ - 1)
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_SYSCTL_KEY_RE = re.compile(r"^[A-Za-z0-9_./-]+$")
_IP_TIMEOUT = 10.0  # seconds for any one `ip` command
_STOP_GRACE = 3.0  # seconds a spawned process gets between SIGTERM and SIGKILL
_REAP_TIMEOUT = 5.0


def _ip(argv: Sequence[str], timeout: float = _IP_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run `ip ...`; LabError with the command and its stderr when it fails."""
    cmd = ["ip", *argv]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LabError(f"{' '.join(cmd)}: {exc}") from exc
    if proc.returncode != 0:
        raise LabError(f"{' '.join(cmd)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc


def _check_name(kind: str, name: str, limit: int | None = None) -> None:
    if not _NAME_RE.match(name) or (limit is not None and len(name) > limit):
        bound = f", at most {limit} characters" if limit else ""
        raise LabError(f"{kind} name {name!r}: letters, digits, '_', '.', '-' only{bound}")


class Netns:
    """One network namespace of a Lab. Create with Lab.netns()."""

    def __init__(self, lab: Lab, name: str) -> None:
        self.lab = lab
        self.name = name

    def __repr__(self) -> str:
        return f"Netns({self.name!r})"

    def ip(self, *argv: str) -> subprocess.CompletedProcess[str]:
        """Run `ip -n NAME ARGV...`."""
        return _ip(["-n", self.name, *argv])

    def addr(self, ifname: str, cidr: str) -> None:
        iface = ipaddress.ip_interface(cidr)
        # nodad: an IPv6 address is otherwise unusable ("tentative") for about a second after it is added.
        extra = ["nodad"] if iface.version == 6 else []
        self.ip("addr", "add", str(iface), "dev", ifname, *extra)

    def up(self, ifname: str) -> None:
        self.ip("link", "set", ifname, "up")

    def route(self, dst: str, via: str | None = None, dev: str | None = None) -> None:
        """Add (or replace) a route; `dst` may be "default". The family follows `via`, else `dst`."""
        probe = via if via is not None else (None if dst == "default" else dst)
        version = ipaddress.ip_network(probe, strict=False).version if probe is not None else 4
        argv = [f"-{version}", "route", "replace", dst]
        if via is not None:
            argv += ["via", via]
        if dev is not None:
            argv += ["dev", dev]
        _ip(["-n", self.name, *argv])

    def sysctl(self, key: str, value: str | int) -> None:
        if not _SYSCTL_KEY_RE.match(key):
            raise LabError(f"sysctl key {key!r}: unexpected characters")
        self.run(["sysctl", "-q", "-w", f"{key}={value}"])

    def prefix(self, host_mounts: bool = False) -> list[str]:
        """How to run a command in this namespace. `ip netns exec` remounts /sys, hiding the host's bpffs at
        /sys/fs/bpf; with host_mounts the command enters only the network namespace and keeps the pins."""
        if host_mounts:
            return ["nsenter", f"--net=/run/netns/{self.name}"]
        return ["ip", "netns", "exec", self.name]

    def run(
        self, argv: Sequence[str], check: bool = True, timeout: float = 30.0, host_mounts: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside the namespace and wait for it (bounded by `timeout`)."""
        cmd = [*self.prefix(host_mounts), *argv]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired as exc:  # subprocess.run has already killed the child
            raise LabError(f"{' '.join(cmd)}: no exit within {timeout} s") from exc
        except OSError as exc:
            raise LabError(f"{' '.join(cmd)}: {exc}") from exc
        if check and proc.returncode != 0:
            raise LabError(
                f"{' '.join(cmd)}: exit {proc.returncode}: {proc.stderr.strip() or proc.stdout.strip()}"
            )
        return proc

    def spawn(
        self, argv: Sequence[str], log_path: Path | str, host_mounts: bool = False,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start a long-running command in the namespace, output to `log_path`; the Lab stops it on close.
        `env`: variables added to (or replacing some of) this process's environment."""
        # `ip netns exec` execs the command, so the PID we get is the command's own. A new session gives it
        # its own process group, so its children can be stopped with it and Ctrl-C does not reach it twice.
        with open(log_path, "ab") as out:
            try:
                proc = subprocess.Popen(
                    [*self.prefix(host_mounts), *argv],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    env=None if env is None else {**os.environ, **env},
                )
            except OSError as exc:
                raise LabError(f"starting {argv[0]!r} in {self.name}: {exc}") from exc
        self.lab._processes.append(proc)
        return proc

    def interactive(self, argv: Sequence[str], log_path: Path | str) -> subprocess.Popen[str]:
        """Start a command with stdin/stdout pipes (stderr to `log_path`); the Lab stops it on close."""
        with open(log_path, "ab") as err:
            try:
                proc = subprocess.Popen([*self.prefix(), *argv], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True)
            except OSError as exc:
                raise LabError(f"starting {argv[0]!r} in {self.name}: {exc}") from exc
        self.lab._processes.append(proc)
        return proc


class Lab:
    """A set of namespaces, veths and processes with one unique run id; torn down whole by close()."""

    def __init__(self, prefix: str = "elb") -> None:
        _check_name("lab prefix", prefix, limit=8)
        self.id = f"{prefix}{secrets.token_hex(3)}"
        self.tmpdir = Path(tempfile.mkdtemp(prefix=f"{self.id}-"))
        self._namespaces: list[Netns] = []
        self._processes: list[subprocess.Popen[Any]] = []
        self._cleanups: list[Callable[[], object]] = []
        self._closed = False
        # Belt and braces: an interpreter exit without close() (a forgotten `with`) still tears down.
        atexit.register(self.close)

    def __enter__(self) -> Lab:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def netns(self, role: str) -> Netns:
        """Create namespace "{id}-{role}" with lo up."""
        _check_name("namespace role", role)
        ns = Netns(self, f"{self.id}-{role}")
        if any(existing.name == ns.name for existing in self._namespaces):
            raise LabError(f"namespace {ns.name}: already created by this lab")
        self._namespaces.append(ns)  # recorded first: a half-made namespace is still deleted by close()
        _ip(["netns", "add", ns.name])
        ns.up("lo")
        return ns

    def add_cleanup(self, fn: Callable[[], object]) -> None:
        """Run `fn` on close, after the spawned processes are stopped and before the namespaces go (latest
        added first). For what lives outside the namespaces: pinned maps, control sockets."""
        self._cleanups.append(fn)

    def veth(self, a: Netns, a_if: str, b: Netns, b_if: str) -> None:
        """A veth pair with end `a_if` in `a` and `b_if` in `b`, both up."""
        _check_name("interface", a_if, IFNAMSIZ)
        _check_name("interface", b_if, IFNAMSIZ)
        # Created directly inside `a` with its peer moved to `b`: no name ever exists in the host namespace.
        a.ip("link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", b.name)
        a.up(a_if)
        b.up(b_if)

    def close(self) -> None:
        """Stop spawned processes, run cleanups, delete namespaces, remove tmpdir. Idempotent; logs, never
        raises."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        for proc in reversed(self._processes):
            try:
                _stop_process(proc)
            except Exception:
                log.exception("lab %s: stopping pid %d failed", self.id, proc.pid)
        for fn in reversed(self._cleanups):
            try:
                fn()
            except Exception:
                log.exception("lab %s: cleanup %r failed", self.id, fn)
        for ns in reversed(self._namespaces):
            try:
                _delete_netns(ns.name)
            except Exception:
                log.exception("lab %s: deleting namespace %s failed", self.id, ns.name)
        shutil.rmtree(self.tmpdir, ignore_errors=True)


def _stop_process(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM, bounded wait, then SIGKILL to the whole process group; always reaped."""
    if proc.returncode is not None:
        _close_pipes(proc)
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + _STOP_GRACE
    while time.monotonic() < deadline:
        # WNOWAIT: look without reaping. While unreaped, the PID (and so the group id) cannot be reused, so
        # the killpg below can only reach processes this lab started.
        try:
            if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                break
        except ChildProcessError:
            # Reaped elsewhere: the PID may already belong to someone else, so no killpg.
            proc.poll()
            return
        time.sleep(0.05)
    # Leftover children of the group (and the leader itself, if SIGTERM was not enough).
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    try:
        proc.wait(timeout=_REAP_TIMEOUT)
    except subprocess.TimeoutExpired:
        log.error("pid %d did not exit after SIGKILL within %.0f s", proc.pid, _REAP_TIMEOUT)
    _close_pipes(proc)


def _close_pipes(proc: subprocess.Popen[Any]) -> None:
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()


def _delete_netns(name: str) -> None:
    # A process still inside keeps the namespace (and its addresses) alive after `ip netns del`. Anything in a
    # namespace with this run's unique name was started by this run, so it is killed by PID.
    try:
        pids = _ip(["netns", "pids", name]).stdout.split()
    except LabError:
        pids = []  # the namespace does not exist (creation failed): nothing inside
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    try:
        _ip(["netns", "del", name])
    except LabError as exc:
        if "No such file" not in str(exc):
            raise
