"""Instance ownership (issue 12, item 7): a flock held for the owner's life decides, not the socket."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edge_lb import paths
from edge_lb.cli import main
from edge_lb.control.instance import InstanceLock, holder
from edge_lb.errors import SupervisorError

from .test_cli import GOOD as CONFIG  # the CLI tests' minimal valid config


@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(paths, "RUN_DIR", tmp_path / "run")
    return tmp_path / "run"


def test_a_second_owner_is_refused_with_the_holder_named(run_dir: Path) -> None:
    assert holder("default") is None  # no file yet
    lock = InstanceLock.take("default", "edge-lb run", "stop it first")
    try:
        assert holder("default") == f"pid {os.getpid()} edge-lb run"
        held = rf"instance default is held by pid {os.getpid()} edge-lb run \(lock .*default.lock\): stop it"
        with pytest.raises(SupervisorError, match=held):
            InstanceLock.take("default", "edge-lb run", "stop it first")
        assert InstanceLock.take("other", "edge-lb run", "-").instance == "other"  # per instance
    finally:
        lock.release()
    assert holder("default") is None  # the file stays, the lock is gone
    InstanceLock.take("default", "edge-lb load", "-").release()


def test_deleting_the_socket_does_not_free_the_instance(run_dir: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "lb.toml"
    config.write_text(CONFIG)
    lock = InstanceLock.take("default", "edge-lb run", "-")
    try:
        assert not paths.socket("default").exists()  # as if deleted under a running supervisor
        for command in ("load", "unload"):
            assert main([command, "-c", str(config)]) == 1
            assert f"instance default is held by pid {os.getpid()} edge-lb run" in capsys.readouterr().err
        drain = ["drain", "--vip", "10.200.1.1:80/tcp", "--backend", "10.0.0.1"]
        for command in (["status"], ["reload"], drain):
            assert main([*command, "-c", str(config)]) == 1
            err = capsys.readouterr().err
            assert "does not exist" in err and f"held by pid {os.getpid()} edge-lb run" in err, err
    finally:
        lock.release()


def test_status_without_an_owner_says_none_runs(run_dir: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "lb.toml"
    config.write_text(CONFIG)
    assert main(["status", "-c", str(config)]) == 1
    err = capsys.readouterr().err
    assert "no supervisor is running" in err and "held by" not in err, err


def test_an_unwritable_run_dir_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setattr(paths, "RUN_DIR", blocker / "run")  # a file where the directory should be
    with pytest.raises(SupervisorError, match=r"cannot open the instance lock .*run/default\.lock"):
        InstanceLock.take("default", "edge-lb run", "-")


def test_the_lock_file_is_root_only_and_an_old_0644_one_is_mended(run_dir: Path) -> None:
    """flock needs only a readable descriptor: a lock file others can read lets any user hold a shared lock
    on it and keep every `edge-lb run` out."""
    path = paths.lock("default")
    path.parent.mkdir(parents=True)
    path.write_text("")
    path.chmod(0o644)  # as the first version made it
    lock = InstanceLock.take("default", "edge-lb run", "test")
    try:
        assert path.stat().st_mode & 0o777 == 0o600
    finally:
        lock.release()
