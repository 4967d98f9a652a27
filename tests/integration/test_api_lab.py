"""The operator's interface on a real node: REST API (checked against its OpenAPI document), the bearer
token, /metrics, the CLI's drain, and the dashboard in headless Chromium following that drain."""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
from typing import Any

import jsonschema
import pytest
from prometheus_client.parser import text_string_to_metric_families

from edge_lb.api import openapi
from edge_lb.lab.labs import PY, VIP, DataplaneLab, wait_for

pytestmark = pytest.mark.root

TOKEN = "lab-token-0123456789abcdef"
API = "http://127.0.0.1:9100"
VIP_NAME = f"{VIP}:80/tcp"
CHECK = '  type = "http"\n  interval = 1.0\n  fast_interval = 0.25\n  fall = 2\n  rise = 2\n'


@pytest.fixture
def node(dlab: DataplaneLab) -> DataplaneLab:
    """The lab's LB running `edge-lb run` with an API token, every backend up."""
    dlab.config_path.write_text(dlab.config_text(check=CHECK) + f'\n[api]\ntoken = "{TOKEN}"\n')
    dlab.start_supervisor()
    wait_for(lambda: all(s == "up" for s, _ in dlab.backend_states().values()), 15, "every backend up")
    return dlab


def curl(d: DataplaneLab, method: str, path: str, token: str | None = None, body: str | None = None,
         host: str | None = None) -> tuple[int, str]:
    """HTTP from inside the LB namespace, where the API listens on 127.0.0.1:9100."""
    assert d.lb is not None
    argv = ["curl", "-s", "-m", "10", "-X", method, "-w", "\n%{http_code}", f"{API}{path}"]
    if token:
        argv += ["-H", f"Authorization: Bearer {token}"]
    if host:
        argv += ["-H", f"Host: {host}"]
    if body is not None:
        argv += ["-H", "Content-Type: application/json", "--data", body]
    out = d.lb.ns.run(argv).stdout
    text, _, code = out.rpartition("\n")
    return int(code), text


def metric(d: DataplaneLab, name: str, **labels: str) -> float:
    """One sample of GET /metrics (families are named without _total, as the parser reports them)."""
    code, text = curl(d, "GET", "/metrics")
    assert code == 200
    return next(s.value for family in text_string_to_metric_families(text) if family.name == name
                for s in family.samples if s.name == family.name or s.name == f"{name}_total"
                if all(s.labels.get(k) == v for k, v in labels.items()))


def schema_of(name: str) -> dict[str, Any]:
    doc = openapi.document()
    return {**doc["components"]["schemas"][name], "components": doc["components"]}


def dashboard(d: DataplaneLab) -> str:
    """The page after its script ran ~4 s of virtual time, as Chromium renders it in the LB namespace."""
    assert d.lb is not None
    with tempfile.TemporaryDirectory(prefix="elb-chromium-") as profile:
        return d.lb.ns.run(["chromium", "--headless=new", "--no-sandbox", "--disable-gpu",
                            f"--user-data-dir={profile}", "--virtual-time-budget=4000", "--dump-dom",
                            f"{API}/"], timeout=90).stdout


def row_state(page: str, backend: str) -> str | None:
    match = re.search(rf'<tr[^>]*data-backend="{re.escape(backend)}"[^>]*data-state="([a-z]+)"', page)
    return match.group(1) if match else None


def test_api_metrics_cli_and_dashboard_on_a_real_node(node: DataplaneLab) -> None:
    dlab = node
    b2 = dlab.server("b2").address
    code, body = curl(dlab, "GET", "/api/v1/node")
    assert code == 200
    jsonschema.validate(json.loads(body), schema_of("Node"))
    code, body = curl(dlab, "GET", "/api/v1/vips")
    vips = json.loads(body)
    for vip in vips:
        jsonschema.validate(vip, schema_of("Vip"))
    assert vips[0]["vip"] == VIP_NAME and len(vips[0]["backends"]) == 3

    page = dashboard(dlab)
    assert f'data-vip="{VIP_NAME}"' in page
    assert [row_state(page, s.address) for s in dlab.servers] == ["up", "up", "up"]

    drain = f"/api/v1/vips/{VIP}/80/tcp/backends/{b2}/drain"
    assert curl(dlab, "POST", drain)[0] == 401, "a mutation over TCP needs the token"
    assert curl(dlab, "POST", drain, token="wrong-token-0123456789")[0] == 401
    assert curl(dlab, "GET", "/api/v1/node", host="rebound.example:9100")[0] == 403, "DNS rebinding guard"
    cli = subprocess.run([PY, "-m", "edge_lb", "drain", "-c", str(dlab.config_path), "--vip", VIP_NAME,
                          "--backend", b2], capture_output=True, text=True, timeout=30)
    assert cli.returncode == 0, cli.stderr
    assert "weight 0" in cli.stdout

    page = dashboard(dlab)
    assert row_state(page, b2) == "drained", "the dashboard follows the drain"
    assert "b2" not in dlab.http_get(60)["served"], "a drained backend gets no new flows"

    # The metrics are read from the maps once a second: the requests above show up within that.
    wait_for(lambda: metric(dlab, "edge_lb_backend_packets", backend=dlab.server("b1").address) > 0, 5,
             "b1's packets in /metrics")
    assert metric(dlab, "edge_lb_backend_state", backend=b2, state="drained") == 1.0
    assert metric(dlab, "edge_lb_backend_state", backend=b2, state="up") == 0.0
    # Within a sampler period or two (one CI run read 0 here once, right after b1's packets showed up; the
    # node's own conntable block is printed if it stays 0).
    table = json.loads(curl(dlab, "GET", "/api/v1/node")[1])["conntable"]
    wait_for(lambda: metric(dlab, "edge_lb_conntable_hits") > 0, 5, f"connection-table hits ({table})")
    via = json.loads(curl(dlab, "GET", "/api/v1/vips")[1])[0]["backends"][1]["via"]
    assert via in ("tunnel", "direct")
    assert metric(dlab, "edge_lb_backend_check_via", backend=b2, via=via) == 1.0
    if via == "tunnel":
        assert metric(dlab, "edge_lb_check_tunnel_ready") == 1.0

    weight = f"/api/v1/vips/{VIP}/80/tcp/backends/{b2}/weight"
    assert curl(dlab, "PUT", weight, token=TOKEN, body='{"weight": "x"}')[0] == 400
    code, body = curl(dlab, "PUT", weight, token=TOKEN, body='{"weight": 2}')
    assert code == 200 and json.loads(body)["weight"] == 2
    wait_for(lambda: dlab.backend_states()["b2"][0] == "up", 5, "b2 serving again")
    assert "b2" in dlab.http_get(60)["served"]
