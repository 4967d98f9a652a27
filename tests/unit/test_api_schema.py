"""The live API checked against its own OpenAPI document (schemathesis), and the document against the routes.

The API runs for real on 127.0.0.1 (an ephemeral port) in a thread with its own event loop, over an
in-memory node (tests/unit/memnode.py: the real NodeOperations over in-memory maps). schemathesis drives
every operation in the document the API serves at /api/v1/openapi.json
through its examples, coverage (boundary and negative values, unexpected methods) and fuzzing phases, with
the bearer token so mutations are exercised (its ignored_auth check also sends them without one), and checks
status codes, content types, headers and bodies against the document. Answers a healthy node never gives
(422, 503, 401 with no token configured) are checked against the document one by one, from a node whose
config file has gone bad, which has no [bgp] and whose maps refuse every write.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from aiohttp import web
from hypothesis import HealthCheck, settings
from schemathesis.config import SchemathesisConfig
from schemathesis.core import NOT_SET

from edge_lb.api import openapi, rest
from edge_lb.control import document
from edge_lb.control.operations import NodeOperations

from .memnode import MemNode

TOKEN = "schema-test-token"


@contextlib.contextmanager
def serving(tmp: Path, token: str | None, prepare: Callable[[MemNode], None] = lambda node: None,
            **options: Any) -> Iterator[str]:
    """The API (token) over an in-memory node (options, then prepare(node) once it runs) on
    127.0.0.1:(ephemeral) in a thread with its own event loop; yields its base URL."""
    loop = asyncio.new_event_loop()

    async def start() -> MemNode:
        node = MemNode(tmp, **options)
        await node.start()
        prepare(node)
        return node

    node = loop.run_until_complete(start())
    runner = web.AppRunner(rest.make_app(node.ops, token=token), access_log=None)
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", 0).start())
    port = runner.addresses[0][1]
    thread = threading.Thread(target=loop.run_forever, name="api-under-test", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.run_until_complete(runner.cleanup())
        loop.run_until_complete(node.stop())
        loop.close()


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with serving(tmp_path_factory.mktemp("node"), TOKEN) as url:
        yield url


# Loaded from openapi.document(), the very dict the API serves (test_the_served_document_is_the_one_checked):
# schemathesis' lazy loader (schemathesis.pytest.from_fixture), which could fetch it from the live server,
# fails on pytest 9.2 ('Function' object has no attribute '_nodeid').
schema = schemathesis.openapi.from_dict(openapi.document(), config=SchemathesisConfig.from_dict({
    "headers": {"Authorization": f"Bearer {TOKEN}"},
    "generation": {"mode": "all", "max-examples": 15, "deterministic": True},
    "phases": {"stateful": {"enabled": False}},
}))


@schema.parametrize()
@settings(max_examples=15, derandomize=True, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
def test_the_live_api_matches_its_openapi_document(case: schemathesis.Case[Any], base_url: str) -> None:
    case.call_and_validate(base_url=base_url)


def test_the_served_document_is_the_one_checked(base_url: str) -> None:
    served = requests.get(f"{base_url}{rest.PREFIX}/openapi.json", timeout=10)
    assert served.headers["Content-Type"].startswith("application/json")
    assert served.json() == openapi.document()


def _refusing(node: MemNode) -> None:
    """The node's config file goes bad (reload: 422) and its maps refuse every write (503); it has no [bgp],
    so there is nothing to disable (503)."""
    node.config_path.write_text(node.config_path.read_text().replace("port = 80", "port = 70000"))
    node.io.refuse = True


_BACKEND = {"address": "10.0.0.1", "port": 80, "protocol": "tcp", "backend": "10.1.0.1"}
_BACKEND_PATH = rest.PREFIX + "/vips/{address}/{port}/{protocol}/backends/{backend}"


@pytest.mark.parametrize(("token", "method", "path", "parameters", "body", "status"), [
    (TOKEN, "POST", rest.PREFIX + "/reload", {}, None, 422),
    (TOKEN, "POST", rest.PREFIX + "/node/disable", {}, None, 503),
    (TOKEN, "PUT", _BACKEND_PATH + "/weight", _BACKEND, {"weight": 3}, 503),
    (TOKEN, "POST", _BACKEND_PATH + "/drain", _BACKEND, None, 503),
    (None, "POST", rest.PREFIX + "/node/enable", {}, None, 401),
])
def test_answers_the_fake_never_gives_match_the_document(
        token: str | None, method: str, path: str, parameters: dict[str, Any], body: Any,
        status: int, tmp_path: Path) -> None:
    operation = schema[path][method]
    case = operation.Case(path_parameters=parameters, headers={"Authorization": f"Bearer {TOKEN}"},
                          body=NOT_SET if body is None else body)
    with serving(tmp_path, token, _refusing, bgp=False) as url:
        response = case.call(base_url=url)
    assert response.status_code == status, response.text
    assert str(status) in openapi.document()["paths"][path][method.lower()]["responses"]
    operation.validate_response(response)  # the body (validate_response does not check the status)


def test_every_route_is_described_and_every_description_routed() -> None:
    app = rest.make_app(NodeOperations("/etc/edge-lb.toml"), token=TOKEN)
    routed = {(route.method.lower(), route.resource.canonical) for route in app.router.routes()
              if route.method != "HEAD" and route.resource is not None}
    described = {(method, path) for path, item in openapi.document()["paths"].items()
                 for method in item if method != "parameters"}
    assert routed == described


def test_mutations_and_only_mutations_need_the_token() -> None:
    for path, item in openapi.document()["paths"].items():
        for method, operation in item.items():
            if method == "parameters":
                continue
            assert ("security" in operation) == (method != "get"), (method, path)
            assert ("401" in operation["responses"]) == (method != "get"), (method, path)


@pytest.mark.parametrize(("schema_name", "shape"), [
    ("Node", document.NodeView), ("Vip", document.VipRow), ("Backend", document.BackendRow),
    ("Bgp", document.BgpStatus)])
def test_the_status_schemas_are_the_documents_typed_dicts(schema_name: str, shape: Any) -> None:
    """edge_lb.control.document is the one definition: the schemas have exactly its keys, required alike."""
    schema = openapi.document()["components"]["schemas"][schema_name]
    assert list(schema["properties"]) == list(shape.__annotations__)
    assert set(schema["required"]) == shape.__required_keys__
    assert schema["additionalProperties"] is False


def test_the_node_view_is_the_node_documents_fields() -> None:
    assert set(document.NodeView.__annotations__) - set(document.NodeDocument.__annotations__) == {
        "notices"}, "derived from the document (status.notices)"
    assert set(document.NodeDocument.__annotations__) - set(document.NodeView.__annotations__) == {
        "vips", "ring_size", "applies"}, "what GET /node leaves out (GET /vips has the VIPs)"
