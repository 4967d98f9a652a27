"""The REST API in-process (aiohttp's TestServer/TestClient) over FakeOperations."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from edge_lb.api import openapi, rest
from edge_lb.control.operations import FakeOperations

TOKEN = "t0ken-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
VIP = "/api/v1/vips/10.0.0.1/80/tcp"
BACKEND = VIP + "/backends/10.1.0.2"
Client = TestClient[web.Request, web.Application]
Body = Callable[[Client, FakeOperations], Awaitable[None]]

MUTATIONS = [
    ("POST", BACKEND + "/drain", None),
    ("POST", BACKEND + "/undrain", None),
    ("PUT", BACKEND + "/weight", {"weight": 3}),
    ("POST", "/api/v1/node/disable", None),
    ("POST", "/api/v1/node/enable", None),
    ("POST", "/api/v1/reload", None),
]


def run(body: Body, ops: FakeOperations | None = None, **options: Any) -> None:
    """body(client, ops) against make_app(ops, token=TOKEN, **options) served in-process."""
    fake = FakeOperations() if ops is None else ops
    options.setdefault("token", TOKEN)

    async def main() -> None:
        async with TestClient(TestServer(rest.make_app(fake, **options))) as client:
            await body(client, fake)

    asyncio.run(main())


async def answer(client: Client, method: str, path: str, status: int, **kwargs: Any) -> Any:
    """The JSON of one answer, after checking its status."""
    resp = await client.request(method, path, **kwargs)
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json"
    return await resp.json()


def with_ipv6_vip() -> FakeOperations:
    ops = FakeOperations()
    vip = {**ops.doc["vips"][0], "vip": "[fd00::1]:443/tcp", "address": "fd00::1", "port": 443}
    vip["backends"] = [{**vip["backends"][0], "address": "fd00:1::7"}]
    ops.doc["vips"].append(vip)
    return ops


# -- reads


def test_node_reports_phase_data_plane_and_bgp() -> None:
    async def body(client: Client, ops: FakeOperations) -> None:
        node = await answer(client, "GET", "/api/v1/node", 200)
        assert node == {"phase": "running", "instance": "fake", "interface": "eth0", "attached": True,
                        "uptime": 1.0, "pid": 1, "config": "/etc/edge-lb.toml",
                        "gateway_mac": "02:00:00:00:00:02",
                        "bgp": {"peers": {"10.9.0.1": "up"}, "announced": ["10.0.0.1/32"], "withheld": {},
                                "disabled": False, "disable_file": "/var/lib/edge-lb/fake.disabled"}}

    run(body)


def test_a_starting_node_answers_with_nulls_for_what_is_not_known_yet() -> None:
    starting = FakeOperations(doc={"phase": "starting", "pid": 7, "config": "/etc/edge-lb.toml", "vips": []})

    async def body(client: Client, ops: FakeOperations) -> None:
        node = await answer(client, "GET", "/api/v1/node", 200)
        assert node["phase"] == "starting" and node["pid"] == 7
        assert node["interface"] is None and node["attached"] is None and node["bgp"] is None
        assert await answer(client, "GET", "/api/v1/vips", 200) == []

    run(body, starting)


def test_vips_list_their_backends_with_health_weight_ring_share_and_traffic() -> None:
    async def body(client: Client, ops: FakeOperations) -> None:
        vips = await answer(client, "GET", "/api/v1/vips", 200)
        assert [(v["vip"], v["address"], v["port"], v["protocol"]) for v in vips] == [
            ("10.0.0.1:80/tcp", "10.0.0.1", 80, "tcp")]
        assert vips[0]["healthy"] == 2 and vips[0]["in_ring"] == 2
        row = vips[0]["backends"][1]
        assert row["address"] == "10.1.0.2" and row["state"] == "up" and row["reason"] == "HTTP 200"
        assert row["latency"] == 0.002 and row["weight"] == row["config_weight"] == 1
        assert {"last_check", "check", "ring_slots", "ring_share", "packets", "bytes"} <= set(row)
        assert await answer(client, "GET", VIP, 200) == vips[0]
        assert await answer(client, "GET", BACKEND, 200) == row

    run(body)


def test_ipv6_vips_are_addressed_without_brackets_in_any_spelling() -> None:
    async def body(client: Client, ops: FakeOperations) -> None:
        vip = await answer(client, "GET", "/api/v1/vips/fd00::1/443/tcp", 200)
        assert (vip["vip"], vip["address"], vip["port"]) == ("[fd00::1]:443/tcp", "fd00::1", 443)
        row = await answer(client, "GET", "/api/v1/vips/FD00:0:0::1/443/tcp/backends/fd00:1:0::7", 200)
        assert row["address"] == "fd00:1::7"
        await answer(client, "POST", "/api/v1/vips/fd00::1/443/tcp/backends/fd00:1::7/drain", 200,
                     headers=AUTH)
        assert ops.doc["vips"][1]["backends"][0]["state"] == "drained"

    run(body, with_ipv6_vip())


def test_the_openapi_document_is_served() -> None:
    async def body(client: Client, ops: FakeOperations) -> None:
        assert await answer(client, "GET", "/api/v1/openapi.json", 200) == openapi.document()

    run(body)


def test_events_newest_last_and_limited() -> None:
    async def body(client: Client, ops: FakeOperations) -> None:
        assert await answer(client, "GET", "/api/v1/events", 200) == []
        for weight in (3, 4, 5):
            await answer(client, "PUT", BACKEND + "/weight", 200, json={"weight": weight}, headers=AUTH)
        events = await answer(client, "GET", "/api/v1/events", 200)
        assert [e["weight"] for e in events] == [3, 4, 5] and events[0]["event"] == "weight"
        assert [e["weight"] for e in await answer(client, "GET", "/api/v1/events?limit=1", 200)] == [5]
        assert len(await answer(client, "GET", "/api/v1/events?limit=1000", 200)) == 3
        for bad in ("0", "1001", "-1", "x", "1.5", "", "%C2%B2"):
            error = await answer(client, "GET", f"/api/v1/events?limit={bad}", 400)
            assert error["field"] == "limit", bad
        error = await answer(client, "GET", "/api/v1/events?limit=1&limit=2", 400)
        assert error["field"] == "limit" and "more than once" in error["error"]

    run(body)


# -- mutations


def test_drain_then_undrain() -> None:
    async def body(client: Client, ops: FakeOperations) -> None:
        drained = await answer(client, "POST", BACKEND + "/drain", 200, headers=AUTH)
        assert drained == {"vip": "10.0.0.1:80/tcp", "backend": "10.1.0.2", "weight": 0}
        row = await answer(client, "GET", BACKEND, 200)
        assert (row["state"], row["weight"], row["config_weight"]) == ("drained", 0, 1)
        assert (await answer(client, "POST", BACKEND + "/undrain", 200, headers=AUTH))["weight"] == 1
        row = await answer(client, "GET", BACKEND, 200)
        assert (row["state"], row["weight"]) == ("up", 1)

    run(body)


def test_set_weight() -> None:
    async def body(client: Client, ops: FakeOperations) -> None:
        done = await answer(client, "PUT", BACKEND + "/weight", 200, json={"weight": 1000}, headers=AUTH)
        assert done == {"vip": "10.0.0.1:80/tcp", "backend": "10.1.0.2", "weight": 1000}
        # JSON has one number type: 7.0 is the integer 7 (as JSON Schema says)
        await answer(client, "PUT", BACKEND + "/weight", 200, data=b'{"weight": 7.0}', headers=AUTH)
        assert (await answer(client, "GET", BACKEND, 200))["weight"] == 7
        await answer(client, "PUT", BACKEND + "/weight", 200, json={"weight": 0}, headers=AUTH)
        assert (await answer(client, "GET", BACKEND, 200))["state"] == "drained"

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
    async def body(client: Client, ops: FakeOperations) -> None:
        error = await answer(client, "PUT", BACKEND + "/weight", 400, data=data,
                             headers={**AUTH, "Content-Type": "application/json"})
        assert error["field"] == field and error["error"]
        assert ops.log == [], "nothing changed"

    run(body)


def test_disable_and_enable_show_in_node() -> None:
    async def body(client: Client, ops: FakeOperations) -> None:
        assert await answer(client, "POST", "/api/v1/node/disable", 200, headers=AUTH) == {"disabled": True}
        bgp = (await answer(client, "GET", "/api/v1/node", 200))["bgp"]
        assert bgp["disabled"] is True and bgp["announced"] == []
        assert await answer(client, "POST", "/api/v1/node/enable", 200, headers=AUTH) == {"disabled": False}
        bgp = (await answer(client, "GET", "/api/v1/node", 200))["bgp"]
        assert bgp["disabled"] is False and bgp["announced"] == ["10.0.0.1/32"]

    run(body)


def test_reload_applied_and_rejected() -> None:
    async def body(client: Client, ops: FakeOperations) -> None:
        applied = await answer(client, "POST", "/api/v1/reload", 200, headers=AUTH)
        assert applied == {"ok": True, "config": "/etc/edge-lb.toml", "changes": {}}
        ops.reload_problems = ["vip[0].port: must be an integer 0..65535", "vip[1]: duplicate"]
        rejected = await answer(client, "POST", "/api/v1/reload", 422, headers=AUTH)
        assert rejected == {"ok": False, "config": "/etc/edge-lb.toml", "problems": ops.reload_problems}

    run(body)


# -- the token


@pytest.mark.parametrize(("method", "path", "json"), MUTATIONS)
def test_every_mutation_needs_the_token(method: str, path: str, json: Any) -> None:
    async def body(client: Client, ops: FakeOperations) -> None:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                        {"Authorization": TOKEN}, {"Authorization": "Bearer "},
                        {"Authorization": "Bearer tökén"}):
            resp = await client.request(method, path, json=json, headers=headers)
            assert resp.status == 401, headers
            assert resp.headers["WWW-Authenticate"].startswith("Bearer")
            assert "bearer token" in (await resp.json())["error"]
        assert ops.log == [] and ops.doc["bgp"]["disabled"] is False, "nothing changed"
        await answer(client, method, path, 200, json=json, headers=AUTH)
        await answer(client, method, path, 200, json=json, headers={"Authorization": f"bearer  {TOKEN}"})

    run(body)


@pytest.mark.parametrize(("method", "path", "json"), MUTATIONS)
def test_no_configured_token_refuses_every_mutation(method: str, path: str, json: Any) -> None:
    async def body(client: Client, ops: FakeOperations) -> None:
        error = await answer(client, method, path, 401, json=json, headers=AUTH)
        assert "no API token is configured" in error["error"]
        await answer(client, "GET", "/api/v1/node", 200)  # reads stay open

    run(body, token=None)
    run(body, token="")  # or "Bearer " would pass


@pytest.mark.parametrize(("method", "path", "json"), MUTATIONS)
def test_the_unix_socket_app_needs_no_token(method: str, path: str, json: Any) -> None:
    async def body(client: Client, ops: FakeOperations) -> None:
        await answer(client, method, path, 200, json=json)

    run(body, token=None, require_token=False)


def test_the_token_is_checked_before_the_path_and_body() -> None:
    async def body(client: Client, ops: FakeOperations) -> None:
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
    async def body(client: Client, ops: FakeOperations) -> None:
        error = await answer(client, "GET", path, 404)
        assert error.get("field") == field and message in error["error"], error

    run(body)


@pytest.mark.parametrize(("method", "suffix", "json"), [
    ("POST", "/drain", None), ("POST", "/undrain", None), ("PUT", "/weight", {"weight": 3})])
def test_mutating_an_unknown_vip_or_backend_is_404(method: str, suffix: str, json: Any) -> None:
    async def body(client: Client, ops: FakeOperations) -> None:
        error = await answer(client, method, VIP + "/backends/10.1.0.9" + suffix, 404, json=json,
                             headers=AUTH)
        assert error == {"error": "no backend 10.1.0.9 in VIP 10.0.0.1:80/tcp"}
        error = await answer(client, method, "/api/v1/vips/10.0.0.9/80/tcp/backends/10.1.0.1" + suffix, 404,
                             json=json, headers=AUTH)
        assert error == {"error": "no VIP 10.0.0.9:80/tcp"}
        error = await answer(client, method, "/api/v1/vips/10.0.0.1/80/sctp/backends/10.1.0.1" + suffix, 404,
                             data=b"junk", headers=AUTH)
        assert error["field"] == "protocol", "a malformed path is reported before a bad body"
        assert ops.log == []

    run(body)


# -- the rest of HTTP


def test_unknown_routes_and_methods_answer_json() -> None:
    async def body(client: Client, ops: FakeOperations) -> None:
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
        reasons = request.app[rest.OPS].counters()["reasons"]
        return web.Response(text="".join(f'packets{{reason="{k}"}} {v}\n' for k, v in reasons.items()))

    def add_metrics(app: web.Application) -> None:
        app.router.add_get("/metrics", metrics)

    async def body(client: Client, ops: FakeOperations) -> None:
        resp = await client.get("/metrics")
        assert resp.status == 200 and 'packets{reason="STAT_TX"} 10' in await resp.text()

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
    async def body(client: Client, ops: FakeOperations) -> None:
        refused = await answer(client, "GET", "/api/v1/node", 403, headers={"Host": "evil.example:9100"})
        assert refused["field"] == "Host" and "DNS rebinding" in refused["error"]
        await answer(client, "POST", "/api/v1/node/disable", 403, headers={"Host": "evil.example"})
        assert ops.doc["bgp"]["disabled"] is False, "nothing changed"
        await answer(client, "GET", "/api/v1/node", 200, headers={"Host": "127.0.0.1:9100"})
        await answer(client, "GET", "/api/v1/node", 200, headers={"Host": "localhost:9100"})

    run(body, literal_hosts_only=True)
    run(lambda client, ops: answer(client, "GET", "/api/v1/node", 200, headers={"Host": "lb1.example"}))
