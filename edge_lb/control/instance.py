"""Who owns an instance: an exclusive flock on paths.lock(instance), held by `edge-lb run` for its whole life
(and by `edge-lb load` and `unload` while they work), so two programs never drive the same maps, interface
and BGP sessions. The kernel drops the lock when its holder exits, however it exits: a stale file is no
owner. The file names the holder ("pid 4242 edge-lb run") for the messages of whoever is refused.

The control socket is not the guard: deleting it (or the lock file's directory entry) leaves the running
supervisor unreachable, not gone, and `run`, `load` and `unload` still find its lock. A lock file deleted
while held is the one way round it; do not delete files under /run/edge-lb by hand.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from edge_lb import paths
from edge_lb.errors import SupervisorError

_TRIES = 30  # x 10 ms
SECOND_RUN = ("a second supervisor would fight it for the maps, the interface and the BGP sessions; "
              "stop it first")


class InstanceLock:
    """The instance held by this process until release() (or its exit)."""

    def __init__(self, instance: str, fd: int, path: Path) -> None:
        self.instance = instance
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def take(cls, instance: str, what: str, why: str) -> InstanceLock:
        """Hold the instance for `what` ("edge-lb run"); SupervisorError naming the holder and `why` that
        matters if another holds it."""
        path = paths.lock(instance)
        try:
            path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            # Readable by root alone: flock needs only a readable descriptor, so any user who could open the
            # file could hold a shared lock on it and keep every `run` out. fchmod mends older 0644 files.
            os.fchmod(fd, 0o600)
        except OSError as exc:
            raise SupervisorError(f"cannot open the instance lock {path}: {exc.strerror or exc}") from exc
        try:
            held = _lock(fd)
        except OSError as exc:
            os.close(fd)
            raise SupervisorError(f"cannot lock {path}: {exc.strerror or exc}") from exc
        if not held:
            os.close(fd)
            raise SupervisorError(f"instance {instance} is held by {_holder_text(path)} (lock {path}): {why}")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} {what}\n".encode(), 0)
        return cls(instance, fd, path)

    def release(self) -> None:
        """Give the instance up. The file stays: removing it could let a newcomer lock a fresh file while a
        third process still waits on the old one."""
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None


def _lock(fd: int) -> bool:
    """The exclusive lock, or False while another holds it. A few tries: holder() takes a shared lock for
    microseconds, which must not refuse a start."""
    for _ in range(_TRIES):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            time.sleep(0.01)
    return False


def holder(instance: str) -> str | None:
    """Who holds the instance ("pid 4242 edge-lb run"), or None when no one does."""
    path = paths.lock(instance)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, PermissionError):  # none, or not ours to test (not root): cannot tell
        return None
    except OSError as exc:
        raise SupervisorError(f"cannot read the instance lock {path}: {exc.strerror or exc}") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _holder_text(path)
        except OSError as exc:
            raise SupervisorError(f"cannot test the instance lock {path}: {exc.strerror or exc}") from exc
        return None  # we got it: no one holds it (ours drops with the close below)
    finally:
        os.close(fd)


def _holder_text(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        text = ""
    return text or "another process"
