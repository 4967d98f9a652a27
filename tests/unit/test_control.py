"""The control socket in-process over an in-memory node (tests/unit/memnode.py), the status table, and the
structured log lines."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import pytest

from edge_lb import cli, events
from edge_lb.api import sockets
from edge_lb.config import Api, Config
from edge_lb.control import status
from edge_lb.control.operations import NodeOperations
from edge_lb.errors import SupervisorError

from .memnode import MemNode, running


def serve(path: Path, body: Any) -> None:
    """Run body(server, node) against a ControlServer on path serving an in-memory node."""

    async def main() -> None:
        async with running(path.parent) as node:
            server = sockets.ControlServer(node.ops, [])
            await server.start(path)
            try:
                await body(server, node)
            finally:
                await server.stop()
        assert not path.exists(), "the socket is removed on stop"

    asyncio.run(main())


def test_the_cli_socket_serves_the_api_without_a_token(tmp_path: Path) -> None:
    path = tmp_path / "lb.sock"

    async def body(server: sockets.ControlServer, node: MemNode) -> None:
        doc = await sockets.status_doc(path)
        assert doc["instance"] == "mem" and doc["vips"][0]["vip"] == "10.0.0.1:80/tcp"
        node.config_path.write_text(node.config_path.read_text().replace("port = 80", "port = 70000"))
        code, rejected = await sockets.request(path, "POST", "/api/v1/reload")
        assert code == 422 and len(rejected["problems"]) == 1
        assert rejected["problems"][0].startswith("vip[0].port: ")
        url = "/api/v1/vips/10.0.0.1/80/tcp/backends/10.1.0.1/drain"
        code, drained = await sockets.request(path, "POST", url)
        assert (code, drained["weight"]) == (200, 0), "the Unix socket's permissions are its authentication"
        assert node.ring_slots("10.1.0.1") == 0, "drained in the maps"
        doc = await sockets.status_doc(path)
        assert doc["vips"][0]["backends"][0]["state"] == "drained"
        assert "10.1.0.1" in status.render(doc).split("drained")[0].splitlines()[-1]
        assert oct(path.stat().st_mode & 0o777) == "0o660"

    serve(path, body)


def test_a_second_supervisor_is_refused_and_a_stale_socket_replaced(tmp_path: Path) -> None:
    path = tmp_path / "lb.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))  # left behind by a killed supervisor: nobody listens
    stale.close()

    async def body(server: sockets.ControlServer, node: MemNode) -> None:
        second = sockets.ControlServer(NodeOperations("/etc/edge-lb.toml"), [])
        with pytest.raises(SupervisorError, match="another supervisor is running"):
            await second.start(path)

    serve(path, body)


def test_token_file_is_read_and_checked(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("0123456789abcdef-token\n")
    assert sockets.read_token(Api(token_file=str(tmp_path / "token"))) == "0123456789abcdef-token"
    (tmp_path / "short").write_text("x\n")
    with pytest.raises(SupervisorError, match="16 characters"):
        sockets.read_token(Api(token_file=str(tmp_path / "short")))
    (tmp_path / "spaced").write_text("0123456789 abcdef token\n")
    with pytest.raises(SupervisorError, match="without spaces"):  # the same rule as an inline token
        sockets.read_token(Api(token_file=str(tmp_path / "spaced")))
    with pytest.raises(SupervisorError, match=r"api\.token_file"):
        sockets.read_token(Api(token_file=str(tmp_path / "missing")))


def test_cli_without_a_supervisor_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "lb.toml"
    config.write_text('[node]\ninterface = "eth0"\n')
    code = cli.main(["status", "-c", str(config), "--socket", str(tmp_path / "none.sock")])
    assert code == 1
    assert "no supervisor is running for this instance" in capsys.readouterr().err


def test_status_table_shows_every_column() -> None:
    doc = {"instance": "default", "interface": "eth0", "pid": 7, "gateway_mac": "02:00:00:00:00:02",
           "uptime": 12.0, "config": "/etc/edge-lb.toml", "phase": "running",
           "vips": [{"vip": "10.0.0.1:80/tcp", "healthy": 1, "in_ring": 1, "packets": 10, "bytes": 900,
                     "backends": [
               {"address": "10.1.0.1", "state": "up", "weight": 1, "ring_share": 1.0, "packets": 10,
                "bytes": 900, "last_check": 99.5, "reason": "HTTP 200", "via": "tunnel"},
               {"address": "10.1.0.2", "state": "down", "weight": 1, "ring_share": 0.0, "packets": 0,
                "bytes": 0, "last_check": None, "reason": "connect: refused", "encap": "gue"}]}]}
    text = status.render(doc, now=100.0)
    assert "VIP 10.0.0.1:80/tcp  1/2 healthy, 1 in the ring  10 packets  900 bytes" in text
    row = next(line for line in text.splitlines() if "10.1.0.1" in line).split()
    assert row == ["10.1.0.1", "up", "1", "100.0%", "10", "900", "0.5s", "ago", "tunnel", "HTTP", "200"]
    assert "never" in text and "connect: refused" in text
    assert "10.1.0.2 (gue)" in text and "10.1.0.1 (" not in text, "a GUE backend is marked, IPIP is not"
    assert "NOT ATTACHED" not in text
    assert "route " not in text, "no [bgp]: no route line"
    assert "XDP program NOT ATTACHED to eth0" in status.render({**doc, "attached": False}, now=100.0)
    assert "connection table" not in text
    table = {"new_flow_rate_limit": 4369, "hits": 50, "misses": 9, "flood_no_insert": 7, "stateless": 3}
    assert ("connection table: 50 hits, 9 from the ring, 7 new flows not inserted (over 4369 per CPU per "
            "second), 3 stateless") in status.render({**doc, "conntable": table}, now=100.0)


@pytest.mark.parametrize(("bgp", "line"), [
    ({"announced": ["10.0.0.1/32"]}, "route 10.0.0.1/32 announced"),
    ({"announced": [], "withheld": {"10.0.0.1/32": "the XDP program is not attached"}},
     "route 10.0.0.1/32 NOT announced: the XDP program is not attached"),
    ({"announced": []},
     "route 10.0.0.1/32 NOT announced: BGP has not caught up yet (it retries every second)"),
])
def test_status_says_why_a_route_is_not_announced(bgp: dict[str, Any], line: str) -> None:
    vip = {"vip": "10.0.0.1:80/tcp", "address": "10.0.0.1", "healthy": 2, "in_ring": 1, "packets": 0,
           "bytes": 0, "backends": []}
    bgp = {"peers": {"10.9.0.1": "up"}, "disable_file": "/x", "disabled": False, **bgp}
    doc = {"instance": "default", "interface": "eth0", "phase": "running", "bgp": bgp, "vips": [vip]}
    route = next(x for x in status.render(doc, now=0.0).splitlines() if x.startswith("  route "))
    assert route == f"  {line}"


def test_log_lines_quote_what_needs_it() -> None:
    line = events.render("health", vip="[fd00::1]:80/tcp", reason='HTTP 200 but body lacks "ok"', n=3,
                         skipped=None)
    assert line == 'event=health vip=[fd00::1]:80/tcp reason="HTTP 200 but body lacks \\"ok\\"" n=3'
    assert events.render("x", detail="a\nb") == 'event=x detail="a\\nb"', "one event, one line"


def test_reload_refuses_api_changes_that_need_a_restart() -> None:
    from edge_lb.config import parse_config
    from edge_lb.control.operations import restart_only

    old = parse_config({"node": {"interface": "eth0"}, "api": {"token": "0123456789abcdef-old"}})
    new = parse_config({"node": {"interface": "eth0"}, "api": {"token": "0123456789abcdef-new"}})
    assert restart_only(old, new) == ["api: changed; the listen address and token need a restart"]
    assert restart_only(old, old) == []


def test_reload_applies_the_new_flow_rate_limit_live() -> None:
    """[dataplane] new_flow_rate_limit is written into ctl by every apply: a reload takes it; the other
    [dataplane] keys still need a restart."""
    from edge_lb.config import parse_config
    from edge_lb.control.operations import restart_only

    def config(**dataplane: object) -> Config:
        return parse_config({"node": {"interface": "eth0"}, "dataplane": dataplane})
    assert restart_only(config(), config(new_flow_rate_limit=5000)) == []
    assert restart_only(config(new_flow_rate_limit=5000), config(new_flow_rate_limit=9)) == []
    [problem] = restart_only(config(), config(new_flow_rate_limit=5000, conn_table_size=4096))
    assert problem.startswith("dataplane: changed;") and "new_flow_rate_limit reloads live" in problem


class BrokenOperations(NodeOperations):
    """Not started yet (reload: "still starting"), and with a bug in set_disabled."""

    async def set_disabled(self, disabled: bool) -> dict[str, Any]:
        raise RuntimeError("a bug")


def test_failures_are_json_with_the_right_status(tmp_path: Path) -> None:
    path = tmp_path / "lb.sock"

    async def main() -> None:
        server = sockets.ControlServer(BrokenOperations("/etc/edge-lb.toml"), [])
        await server.start(path)
        try:
            code, doc = await sockets.request(path, "POST", "/api/v1/node/disable")
            assert (code, doc) == (500, {"error": "internal error: RuntimeError"})
            code, doc = await sockets.request(path, "POST", "/api/v1/reload")
            assert code == 503 and "still starting" in doc["error"]
        finally:
            await server.stop()

    asyncio.run(main())
