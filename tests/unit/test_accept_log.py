"""A listener out of file descriptors is logged once a minute (issue 12, item 9: 129 MB of log a minute)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from edge_lb.api import accept_log

# A Unix listener in a process at its file limit with connections waiting: every accept fails with EMFILE.
SCRIPT = textwrap.dedent("""
    import asyncio, logging, resource, socket, sys
    from edge_lb import events
    from edge_lb.api import accept_log
    events.setup()
    async def main(path, limited):
        loop = asyncio.get_running_loop()
        if limited:
            accept_log.install(loop)
        server = await asyncio.start_unix_server(lambda r, w: w.close(), path=path)
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        clients = []
        try:
            while True:  # bounded by the limit of 64
                clients.append(socket.socket(socket.AF_UNIX))
                clients[-1].connect(path)
        except OSError:
            pass
        await asyncio.sleep(1.2)
        server.close()
    asyncio.run(main(sys.argv[1], sys.argv[2] == "limited"))
""")


def run(tmp_path: Path, mode: str) -> str:
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / f"{mode}.sock"), mode],
                          capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stderr


def test_emfile_on_accept_is_logged_once_not_per_try(tmp_path: Path) -> None:
    flood = run(tmp_path, "plain").count("socket.accept() out of system resource")
    limited = run(tmp_path, "limited")
    print(f"1.2 s at EMFILE: {flood} lines from asyncio alone, {limited.count('accept failed')} limited")
    assert flood >= 100  # asyncio alone: a line with a traceback per failed try
    assert limited.count("accept failed") == 1 and "Too many open files" in limited, limited[-2000:]
    assert "socket.accept() out of system resource" not in limited


def test_other_contexts_go_to_the_handler_before() -> None:
    seen: list[dict[str, Any]] = []
    now = [0.0]
    handler = accept_log.AcceptErrors(lambda loop, ctx: seen.append(ctx), clock=lambda: now[0])
    loop = asyncio.new_event_loop()
    try:
        handler(loop, {"message": "something else"})
        for t in (0.0, 1.0, 59.0, 61.0):
            now[0] = t
            handler(loop, {"message": accept_log._MESSAGE, "exception": OSError(24, "x")})
    finally:
        loop.close()
    assert seen == [{"message": "something else"}]
    assert (handler.total, handler.left_out, handler.last) == (4, 0, 61.0)
