"""The REST API in-process (aiohttp's TestServer/TestClient) over an in-memory node (tests/unit/memnode.py):
the real NodeOperations, whose changes are checked in the maps, the speaker and the status document."""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from edge_lb.api import openapi, rest

from .memnode import IPV6_VIP, MemNode

TOKEN = "t0ken-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
VIP = "/api/v1/vips/10.0.0.1/80/tcp"
BACKEND = VIP + "/backends/10.1.0.2"
Client = TestClient[web.Request, web.Application]
Body = Callable[[Client, MemNode], Awaitable[None]]

MUTATIONS = [
    ("POST", BACKEND + "/drain", None),
    ("POST", BACKEND + "/undrain", None),
    ("PUT", BACKEND + "/weight", {"weight": 3}),
    ("POST", "/api/v1/node/disable", None),
    ("POST", "/api/v1/node/enable", None),
    ("POST", "/api/v1/reload", None),
]


def run(body: Body, *, ipv6: bool = False, started: bool = True, **options: Any) -> None:
    """body(client, node) against make_app(node.ops, token=TOKEN, **options) served in-process, over an
    in-memory node (with an IPv6 VIP too: ipv6; not started yet: started=False)."""
    options.setdefault("token", TOKEN)

    async def main(tmp: Path) -> None:
        node = MemNode(tmp, ipv6=ipv6)
        try:
            if started:
                await node.start()
            async with TestClient(TestServer(rest.make_app(node.ops, **options))) as client:
                await body(client, node)
        finally:
            await node.stop()

    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(main(Path(tmp)))


async def answer(client: Client, method: str, path: str, status: int, **kwargs: Any) -> Any:
    """The JSON of one answer, after checking its status."""
    resp = await client.request(method, path, **kwargs)
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json"
    return await resp.json()


async def eventually(node: MemNode, cond: Callable[[], bool], what: str) -> None:
    """BGP follows a change in its own loop: wait for it."""
    await node.until(cond, what)


def unchanged(node: MemNode) -> bool:
    """No runtime weight, nothing saved, not disabled: what a refused mutation leaves."""
    return node.state.weights == {} and not node.weights_file.exists() and not node.bgp_disabled()


# -- reads


def test_node_reports_phase_data_plane_and_bgp() -> None:
    async def body(client: Client, mem: MemNode) -> None:
        from edge_lb.dataplane.bpfsys import possible_cpus
        from edge_lb.dataplane.counters import reason_names
        from edge_lb.dataplane.desired import new_flow_rate

        reasons = mem.io.counters.setdefault("reason_stats", {})
        for name, packets in (("STAT_CT_HIT", 50), ("STAT_CT_MISS", 9), ("STAT_CT_FLOOD_NO_INSERT", 7)):
            reasons[reason_names().index(name)] = (packets, 0)
        mem.counters.refresh()
        node = await answer(client, "GET", "/api/v1/node", 200)
        limit = new_flow_rate(mem.state.config.dataplane.conn_table_size, None, possible_cpus())
        assert node.pop("conntable") == {"new_flow_rate_limit": limit, "hits": 50, "misses": 9,
                                         "flood_no_insert": 7, "stateless": 0}
        assert node.pop("notices") == [f"connection table: 50 hits, 9 from the ring, 7 new flows not "
                                       f"inserted (over {limit} per CPU per second), 0 stateless"]
        assert 0 <= node.pop("uptime") < 60
        assert node.pop("api") == {}, "no API sites around the in-memory node's operations"
        assert node.pop("watchdog") is None, "the in-memory node runs no watchdog"
        assert node.pop("program") is None, "the in-memory node has no XDP program"
        assert node.pop("check_tunnel") is None, "nor a tunnel checks' encapsulator"
        assert node["bgp"].pop("speaker") == {"state": "up", "pid": None, "restarts": 0, "reason": None,
                                              "last_answer": None}
        assert node.pop("local_faults") == {
            "cannot_judge": None, "since": None, "withdrawn": False, "bound": 0.1, "link": "unknown",
            "checks": 2, "faulty": {}, "counts": {}}
        assert node == {"phase": "running", "instance": "mem", "interface": "eth0", "attached": True,
                        "pid": os.getpid(), "config": str(mem.config_path),
                        "gateway_mac": "02:00:00:00:00:02", "mtu": 1500,
                        "bgp": {"peers": {"10.9.0.1": "up"}, "announced": ["10.0.0.1/32"], "withheld": {},
                                "disabled": False, "disable_file": str(mem.config_path.parent / "disabled")}}

    run(body)


def test_a_starting_node_answers_with_nulls_for_what_is_not_known_yet() -> None:
    async def body(client: Client, mem: MemNode) -> None:
        node = await answer(client, "GET", "/api/v1/node", 200)
        assert node["phase"] == "starting" and node["pid"] == os.getpid()
        assert node["interface"] is None and node["attached"] is None and node["bgp"] is None
        assert await answer(client, "GET", "/api/v1/vips", 200) == []
        error = await answer(client, "POST", BACKEND + "/drain", 503, headers=AUTH)
        assert "still starting" in error["error"] and unchanged(mem)

    run(body, started=False)


def test_vips_list_their_backends_with_health_weight_ring_share_and_traffic() -> None:
    async def body(client: Client, node: MemNode) -> None:
        node.send("10.1.0.2", 10, 100)
        vips = await answer(client, "GET", "/api/v1/vips", 200)
        assert [(v["vip"], v["address"], v["port"], v["protocol"]) for v in vips] == [
            ("10.0.0.1:80/tcp", "10.0.0.1", 80, "tcp")]
        assert vips[0]["healthy"] == 2 and vips[0]["in_ring"] == 2
        assert (vips[0]["packets"], vips[0]["bytes"]) == (10, 1000)
        row = vips[0]["backends"][1]
        assert row["address"] == "10.1.0.2" and row["state"] == "up" and row["reason"] == "fake ok"
        assert row["latency"] >= 0 and row["weight"] == row["config_weight"] == 1 and row["check"] == "tcp"
        assert row["encap"] == "ipip"
        assert row["ring_slots"] == node.ring_slots("10.1.0.2") > 0
        assert row["ring_share"] == pytest.approx(row["ring_slots"] / 1009)
        assert (row["packets"], row["bytes"]) == (10, 1000) and row["last_check"] > 0
        assert await answer(client, "GET", VIP, 200) == vips[0]
        assert await answer(client, "GET", BACKEND, 200) == row

    run(body)


def test_ipv6_vips_are_addressed_without_brackets_in_any_spelling() -> None:
    async def body(client: Client, node: MemNode) -> None:
        vip = await answer(client, "GET", "/api/v1/vips/fd00::1/443/tcp", 200)
        assert (vip["vip"], vip["address"], vip["port"]) == ("[fd00::1]:443/tcp", "fd00::1", 443)
        row = await answer(client, "GET", "/api/v1/vips/FD00:0:0::1/443/tcp/backends/fd00:1:0::7", 200)
        assert row["address"] == "fd00:1::7"
        await answer(client, "POST", "/api/v1/vips/fd00::1/443/tcp/backends/fd00:1::7/drain", 200,
                     headers=AUTH)
        assert node.ops.status()["vips"][1]["backends"][0]["state"] == "drained"
        assert node.ring_slots("fd00:1::7", IPV6_VIP) == 0
        assert node.state.weights == {(IPV6_VIP, "fd00:1::7"): 0}

    run(body, ipv6=True)


def test_the_openapi_document_is_served() -> None:
    async def body(client: Client, node: MemNode) -> None:
        assert await answer(client, "GET", "/api/v1/openapi.json", 200) == openapi.document()

    run(body)


def test_events_newest_last_and_limited() -> None:
    async def body(client: Client, node: MemNode) -> None:
        for weight in (3, 4, 5):
            await answer(client, "PUT", BACKEND + "/weight", 200, json={"weight": weight}, headers=AUTH)
        events = await answer(client, "GET", "/api/v1/events?limit=1000", 200)
        assert [e["weight"] for e in events if e["event"] == "weight"][-3:] == [3, 4, 5]
        assert [e["time"] for e in events] == sorted(e["time"] for e in events), "newest last"
        last = await answer(client, "GET", "/api/v1/events?limit=1", 200)
        assert len(last) == 1 and last[0]["time"] >= events[-1]["time"]
        assert len(await answer(client, "GET", "/api/v1/events", 200)) == min(100, len(events))
        for bad in ("0", "1001", "-1", "x", "1.5", "", "%C2%B2"):
            error = await answer(client, "GET", f"/api/v1/events?limit={bad}", 400)
            assert error["field"] == "limit", bad
        error = await answer(client, "GET", "/api/v1/events?limit=1&limit=2", 400)
        assert error["field"] == "limit" and "more than once" in error["error"]

    run(body)


# -- mutations


def test_drain_then_undrain() -> None:
    async def body(client: Client, node: MemNode) -> None:
        drained = await answer(client, "POST", BACKEND + "/drain", 200, headers=AUTH)
        assert drained == {"vip": "10.0.0.1:80/tcp", "backend": "10.1.0.2", "weight": 0}
        row = await answer(client, "GET", BACKEND, 200)
        assert (row["state"], row["weight"], row["config_weight"], row["ring_slots"]) == ("drained", 0, 1, 0)
        assert node.ring_slots("10.1.0.2") == 0 and node.ring_slots("10.1.0.1") == 1009, "in the maps"
        assert '"weight": 0' in node.weights_file.read_text(), "kept across restarts"
        assert (await answer(client, "POST", BACKEND + "/undrain", 200, headers=AUTH))["weight"] == 1
        row = await answer(client, "GET", BACKEND, 200)
        assert (row["state"], row["weight"]) == ("up", 1)
        assert row["ring_slots"] == node.ring_slots("10.1.0.2") > 0 and node.state.weights == {}

    run(body)


def test_set_weight() -> None:
    async def body(client: Client, node: MemNode) -> None:
        done = await answer(client, "PUT", BACKEND + "/weight", 200, json={"weight": 1000}, headers=AUTH)
        assert done == {"vip": "10.0.0.1:80/tcp", "backend": "10.1.0.2", "weight": 1000}
        assert node.ring_slots("10.1.0.2") > 900 > node.ring_slots("10.1.0.1") > 0, "in the maps"
        # JSON has one number type: 7.0 is the integer 7 (as JSON Schema says)
        await answer(client, "PUT", BACKEND + "/weight", 200, data=b'{"weight": 7.0}', headers=AUTH)
        assert (await answer(client, "GET", BACKEND, 200))["weight"] == 7
        await answer(client, "PUT", BACKEND + "/weight", 200, json={"weight": 0}, headers=AUTH)
        assert (await answer(client, "GET", BACKEND, 200))["state"] == "drained"
        assert node.ring_slots("10.1.0.2") == 0

    run(body)


@pytest.mark.parametrize(("data", "field"), [
    (b"", "weight"),
    (b"weight=3", "weight"),
    (b"[1, 2]", "weight"),
    (b'"3"', "weight"),
    (b"{}", "weight"),
    (b'{"weight": 1001}', "weight"),
    (b'{"weight": -1}', "weight"),
    (b'{"weight": "x"}', "weight"),
    (b'{"weight": "3"}', "weight"),
    (b'{"weight": 2.5}', "weight"),
    (b'{"weight": true}', "weight"),
    (b'{"weight": null}', "weight"),
    (b'{"weight": NaN}', "weight"),
    (b"[" * 50_000, "weight"),  # RecursionError in json.loads
    (b'{"weight": 3, "force": true}', "force"),
    (b'{"wieght": 3, "force": true}', "force,wieght"),
])
def test_bad_weight_bodies_get_400_naming_the_field(data: bytes, field: str) -> None:
    async def body(client: Client, node: MemNode) -> None:
        error = await answer(client, "PUT", BACKEND + "/weight", 400, data=data,
                             headers={**AUTH, "Content-Type": "application/json"})
        assert error["field"] == field and error["error"]
        assert unchanged(node), "nothing changed"

    run(body)


def test_disable_and_enable_show_in_node() -> None:
    async def body(client: Client, node: MemNode) -> None:
        assert await answer(client, "POST", "/api/v1/node/disable", 200, headers=AUTH) == {"disabled": True}
        await eventually(node, lambda: node.announced() == [], "withdrawn")
        assert "withdraw route 10.0.0.1/32 next-hop self" in node.speaker.commands
        bgp = (await answer(client, "GET", "/api/v1/node", 200))["bgp"]
        assert bgp["disabled"] is True and bgp["announced"] == [] and "10.0.0.1/32" in bgp["withheld"]
        assert await answer(client, "POST", "/api/v1/node/enable", 200, headers=AUTH) == {"disabled": False}
        await eventually(node, lambda: node.announced() == ["10.0.0.1/32"], "announced again")
        bgp = (await answer(client, "GET", "/api/v1/node", 200))["bgp"]
        assert bgp["disabled"] is False and bgp["announced"] == ["10.0.0.1/32"]

    run(body)


def test_reload_applied_and_rejected() -> None:
    async def body(client: Client, node: MemNode) -> None:
        config = str(node.config_path)
        applied = await answer(client, "POST", "/api/v1/reload", 200, headers=AUTH)
        assert applied == {"ok": True, "config": config, "changes": {"vips_added": 0, "vips_removed": 0,
                           "vips_rewritten": 0, "backends_written": 0, "backends_cleared": 0,
                           "ring_slots": 0}}
        text = node.config_path.read_text()
        node.config_path.write_text(text.replace('address = "10.1.0.2"\n', 'address = "10.1.0.3"\n'))
        applied = await answer(client, "POST", "/api/v1/reload", 200, headers=AUTH)
        assert applied["changes"]["backends_written"] == 1 and applied["changes"]["ring_slots"] > 0
        vips = await answer(client, "GET", "/api/v1/vips", 200)
        assert [b["address"] for b in vips[0]["backends"]] == ["10.1.0.1", "10.1.0.3"]
        node.config_path.write_text(text.replace("port = 80", "port = 70000"))
        rejected = await answer(client, "POST", "/api/v1/reload", 422, headers=AUTH)
        assert rejected["ok"] is False and rejected["config"] == config
        assert len(rejected["problems"]) == 1 and rejected["problems"][0].startswith("vip[0].port: ")
        assert [v.port for v in node.state.config.vips] == [80], "the running config stays"

    run(body)


# -- the token


@pytest.mark.parametrize(("method", "path", "json"), MUTATIONS)
def test_every_mutation_needs_the_token(method: str, path: str, json: Any) -> None:
    async def body(client: Client, node: MemNode) -> None:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                        {"Authorization": TOKEN}, {"Authorization": "Bearer "},
                        {"Authorization": "Bearer tökén"}):
            resp = await client.request(method, path, json=json, headers=headers)
            assert resp.status == 401, headers
            assert resp.headers["WWW-Authenticate"].startswith("Bearer")
            assert "bearer token" in (await resp.json())["error"]
        assert unchanged(node) and node.state.applies == 2, "nothing changed"
        await answer(client, method, path, 200, json=json, headers=AUTH)
        await answer(client, method, path, 200, json=json, headers={"Authorization": f"bearer  {TOKEN}"})

    run(body)


@pytest.mark.parametrize(("method", "path", "json"), MUTATIONS)
def test_no_configured_token_refuses_every_mutation(method: str, path: str, json: Any) -> None:
    async def body(client: Client, node: MemNode) -> None:
        error = await answer(client, method, path, 401, json=json, headers=AUTH)
        assert "no API token is configured" in error["error"]
        await answer(client, "GET", "/api/v1/node", 200)  # reads stay open

    run(body, token=None)
    run(body, token="")  # or "Bearer " would pass


@pytest.mark.parametrize(("method", "path", "json"), MUTATIONS)
def test_the_unix_socket_app_needs_no_token(method: str, path: str, json: Any) -> None:
    async def body(client: Client, node: MemNode) -> None:
        await answer(client, method, path, 200, json=json)

    run(body, token=None, require_token=False)


def test_the_token_is_checked_before_the_path_and_body() -> None:
    async def body(client: Client, node: MemNode) -> None:
        await answer(client, "PUT", "/api/v1/vips/10.0.0.9/80/tcp/backends/x/weight", 401, data=b"junk")

    run(body)


# -- 404s


@pytest.mark.parametrize(("path", "field", "message"), [
    ("/api/v1/vips/10.0.0.9/80/tcp", None, "no VIP 10.0.0.9:80/tcp"),
    ("/api/v1/vips/10.0.0.1/81/tcp", None, "no VIP 10.0.0.1:81/tcp"),
    ("/api/v1/vips/10.0.0.1/80/udp", None, "no VIP 10.0.0.1:80/udp"),
    ("/api/v1/vips/10.0.0.1.2/80/tcp", "address", "not an IP address"),
    ("/api/v1/vips/[fd00::1]/80/tcp", "address", "not an IP address"),
    ("/api/v1/vips/fe80::1%25eth0/80/tcp", "address", "not an IP address"),
    ("/api/v1/vips/10.0.0.1/65536/tcp", "port", "0..65535"),
    ("/api/v1/vips/10.0.0.1/-1/tcp", "port", "0..65535"),
    ("/api/v1/vips/10.0.0.1/http/tcp", "port", "0..65535"),
    ("/api/v1/vips/10.0.0.1/80/TCP", "protocol", "tcp or udp"),
    (VIP + "/backends/10.1.0.9", "backend", "no backend 10.1.0.9 in VIP 10.0.0.1:80/tcp"),
    (VIP + "/backends/web-1", "backend", "not an IP address"),
    ("/api/v1/vips/10.0.0.9/80/tcp/backends/10.1.0.1", None, "no VIP 10.0.0.9:80/tcp"),
])
def test_unknown_or_malformed_vips_and_backends_are_404(path: str, field: str | None, message: str) -> None:
    async def body(client: Client, node: MemNode) -> None:
        error = await answer(client, "GET", path, 404)
        assert error.get("field") == field and message in error["error"], error

    run(body)


@pytest.mark.parametrize(("method", "suffix", "json"), [
    ("POST", "/drain", None), ("POST", "/undrain", None), ("PUT", "/weight", {"weight": 3})])
def test_mutating_an_unknown_vip_or_backend_is_404(method: str, suffix: str, json: Any) -> None:
    async def body(client: Client, node: MemNode) -> None:
        error = await answer(client, method, VIP + "/backends/10.1.0.9" + suffix, 404, json=json,
                             headers=AUTH)
        assert error == {"error": "no backend 10.1.0.9 in VIP 10.0.0.1:80/tcp"}
        error = await answer(client, method, "/api/v1/vips/10.0.0.9/80/tcp/backends/10.1.0.1" + suffix, 404,
                             json=json, headers=AUTH)
        assert error == {"error": "no VIP 10.0.0.9:80/tcp"}
        error = await answer(client, method, "/api/v1/vips/10.0.0.1/80/sctp/backends/10.1.0.1" + suffix, 404,
                             data=b"junk", headers=AUTH)
        assert error["field"] == "protocol", "a malformed path is reported before a bad body"
        assert unchanged(node) and node.state.applies == 2

    run(body)


# -- the rest of HTTP


def test_unknown_routes_and_methods_answer_json() -> None:
    async def body(client: Client, node: MemNode) -> None:
        assert (await answer(client, "GET", "/api/v1/nothing", 404))["error"] == "Not Found"
        resp = await client.request("DELETE", "/api/v1/node")
        assert resp.status == 405 and "GET" in resp.headers["Allow"]
        assert (await resp.json())["error"] == "Method Not Allowed"
        resp = await client.request("GET", "/api/v1/reload")
        assert resp.status == 405 and resp.headers["Allow"] == "POST"
        error = await answer(client, "PUT", BACKEND + "/weight", 413, data=b" " * (1 << 17), headers=AUTH)
        assert error["error"] == "Request Entity Too Large"

    run(body)


def test_extra_routes_are_served_and_see_the_operations() -> None:
    async def metrics(request: web.Request) -> web.Response:
        reasons = request.app[rest.OPS].counters().reason_packets()
        return web.Response(text="".join(f'packets{{reason="{k}"}} {v}\n' for k, v in reasons.items()))

    def add_metrics(app: web.Application) -> None:
        app.router.add_get("/metrics", metrics)

    async def body(client: Client, node: MemNode) -> None:
        node.send("10.1.0.1", 10)
        resp = await client.get("/metrics")
        assert resp.status == 200 and 'packets{reason="STAT_TX"} 10\n' in await resp.text()

    run(body, extra=[add_metrics])


@pytest.mark.parametrize(("host", "literal"), [
    ("127.0.0.1:9100", True), ("127.0.0.1", True), ("[::1]:9100", True), ("[::1]", True),
    ("localhost:9100", True), ("LOCALHOST", True), ("10.0.0.5:9100", True),
    ("evil.example:9100", False), ("evil.example", False), ("127.0.0.1.nip.io:9100", False),
    ("[evil]:9100", False), ("", False),
])
def test_host_is_literal(host: str, literal: bool) -> None:
    assert rest.host_is_literal(host) is literal


def test_on_loopback_a_dns_name_in_host_is_refused() -> None:
    """DNS rebinding: a page served as evil.example, re-pointed at 127.0.0.1, still sends its own name."""
    async def body(client: Client, node: MemNode) -> None:
        refused = await answer(client, "GET", "/api/v1/node", 403, headers={"Host": "evil.example:9100"})
        assert refused["field"] == "Host" and "DNS rebinding" in refused["error"]
        await answer(client, "POST", "/api/v1/node/disable", 403, headers={"Host": "evil.example"})
        assert unchanged(node), "nothing changed"
        await answer(client, "GET", "/api/v1/node", 200, headers={"Host": "127.0.0.1:9100"})
        await answer(client, "GET", "/api/v1/node", 200, headers={"Host": "localhost:9100"})

    run(body, literal_hosts_only=True)
    run(lambda client, node: answer(client, "GET", "/api/v1/node", 200, headers={"Host": "lb1.example"}))


def test_get_node_does_not_build_the_vip_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """GET /node leaves the VIPs out, so it must not pay for them (~50 ms of event loop at 500 VIPs x 10)."""
    from edge_lb.control import status

    def no(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("GET /node built the VIP rows")

    async def body(client: Client, node: MemNode) -> None:
        monkeypatch.setattr(status, "document", no)
        doc = await answer(client, "GET", "/api/v1/node", 200)
        assert doc["phase"] == "running" and doc["mtu"] == 1500
        with pytest.raises(AssertionError, match="built the VIP rows"):
            node.ops.status()
    run(body)
