"""The REST API v1: an aiohttp application over an Operations (the supervisor's NodeOperations).

    GET  /api/v1/node                     phase, data plane, BGP peers and announcements, disabled or not
    GET  /api/v1/vips                     every VIP with its backends
    GET  VIP                              one VIP; VIP is /api/v1/vips/{address}/{port}/{protocol}
    GET  VIP/backends/{backend}           a backend: health, last check, latency, weight, ring share, traffic
    GET  /api/v1/events?limit=N           the N (1..1000, default 100) most recent events, newest last
    POST VIP/backends/{backend}/drain     weight 0: existing flows stay, new ones go elsewhere     (token)
    POST VIP/backends/{backend}/undrain   back to the config's weight                             (token)
    PUT  VIP/backends/{backend}/weight    {"weight": 0..1000}                                     (token)
    POST /api/v1/node/disable | enable    the maintenance switch                                  (token)
    POST /api/v1/reload                   re-read the config: 200, or 422 with its problems       (token)
    GET  /api/v1/openapi.json             the OpenAPI document (edge_lb.api.openapi)

Every answer is JSON; errors are {"error": "what is wrong", "field": "the input at fault"}. Mutations need
`Authorization: Bearer TOKEN` (401 otherwise, also when no token is configured), except on an app made with
require_token=False: the root-only Unix socket, whose file permissions are its authentication.
Response documents are projected field by field from the Operations' status (typed in
edge_lb.control.document, whose TypedDicts the OpenAPI document's schemas are built over), so the API's shape
is the OpenAPI document's and not whatever the status document holds today.
"""

from __future__ import annotations

import functools
import hmac
import ipaddress
import json
import logging
import re
from collections.abc import Callable, Sequence

from aiohttp import web
from aiohttp.typedefs import Handler

from edge_lb.api import openapi
from edge_lb.config import vip_name
from edge_lb.control.document import BackendRow, NodeDocument, NodeView, VipRow
from edge_lb.control.operations import Operations
from edge_lb.control.status import notices
from edge_lb.errors import EdgeLbError

PREFIX = "/api/v1"
OPS: web.AppKey[Operations] = web.AppKey("edge_lb.ops", Operations)  # for routes added through `extra`

log = logging.getLogger(__name__)
_dumps_any = functools.partial(json.dumps, default=str)
_PORT = re.compile(r"[0-9]{1,5}")


class ApiError(Exception):
    """An answer other than 200: rendered as {"error": message, "field": field} by the middleware."""

    def __init__(self, status: int, message: str, field: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.field, self.headers = status, message, field, headers or {}


def _error_response(status: int, message: str, field: str | None = None,
                    headers: dict[str, str] | None = None) -> web.Response:
    body = {"error": message} if field is None else {"error": message, "field": field}
    return web.json_response(body, status=status, headers=headers)


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """ApiError, and aiohttp's own 404/405/413, as JSON; an Operations failure as 503."""
    try:
        return await handler(request)
    except ApiError as exc:
        return _error_response(exc.status, exc.message, exc.field, exc.headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        kept = {k: v for k, v in exc.headers.items() if k.lower() not in ("content-type", "content-length")}
        return _error_response(exc.status, exc.reason, headers=kept)
    except EdgeLbError as exc:
        log.warning("API %s %s failed: %s", request.method, request.path, exc)
        return _error_response(503, str(exc))
    except Exception as exc:  # a bug: still JSON, and logged with its traceback
        log.exception("API %s %s failed", request.method, request.path)
        return _error_response(500, f"internal error: {exc.__class__.__name__}")


def host_is_literal(host: str) -> bool:
    """A Host header naming no DNS name: an IP literal or localhost, with or without a port."""
    if host.startswith("["):  # [v6] or [v6]:port
        name = host[1:host.find("]")] if "]" in host else host
    else:
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    if name.lower() == "localhost":
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


@web.middleware
async def _literal_hosts_only(request: web.Request, handler: Handler) -> web.StreamResponse:
    """DNS rebinding guard for an API on loopback: a web page whose name an attacker re-points at 127.0.0.1
    sends its own name as Host. Clients of a loopback API name it by address or as localhost."""
    if not host_is_literal(request.host):
        why = "this API is on loopback and answers only to an IP address or localhost (DNS rebinding guard)"
        return _error_response(403, f"Host {request.host!r} refused: {why}", "Host")
    return await handler(request)


# -- path parts


def _address(text: str, part: str) -> str:
    """An IP address as the config writes it (ipaddress's canonical form); 404 naming the part otherwise."""
    try:
        if "%" in text:
            raise ValueError(text)
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise ApiError(404, f"{part} {text!r} is not an IP address (IPv6 without brackets)", part) from None


def _vip_name(request: web.Request) -> str:
    """The VIP's name as Operations knows it: 10.0.0.1:80/tcp or [fd00::1]:80/tcp."""
    info = request.match_info
    address = _address(info["address"], "address")
    if not _PORT.fullmatch(info["port"]) or int(info["port"]) > 65535:
        raise ApiError(404, f"port {info['port']!r} is not an integer 0..65535", "port")
    if info["protocol"] not in ("tcp", "udp"):
        raise ApiError(404, f"protocol {info['protocol']!r} is not tcp or udp", "protocol")
    return vip_name(ipaddress.ip_address(address), int(info["port"]), info["protocol"])


# -- projections: the status document's rows as the OpenAPI document describes them


def _backend(row: BackendRow) -> BackendRow:
    return {"address": row["address"], "state": row["state"], "reason": row["reason"],
            "last_check": row["last_check"], "latency": row["latency"], "check": row["check"],
            "encap": row["encap"],
            "via": row["via"],
            "weight": row["weight"], "config_weight": row["config_weight"], "ring_slots": row["ring_slots"],
            "ring_share": row["ring_share"], "packets": row["packets"], "bytes": row["bytes"]}


def _vip(row: VipRow) -> VipRow:
    return {"vip": row["vip"], "address": row["address"], "port": row["port"], "protocol": row["protocol"],
            "healthy": row["healthy"], "in_ring": row["in_ring"], "packets": row["packets"],
            "bytes": row["bytes"], "backends": [_backend(b) for b in row["backends"]]}


def _node(doc: NodeDocument) -> NodeView:
    bgp = doc.get("bgp")
    return {"phase": doc["phase"], "instance": doc.get("instance"), "interface": doc.get("interface"),
            "attached": doc.get("attached"), "uptime": doc.get("uptime"), "pid": doc["pid"],
            "config": doc.get("config"), "gateway_mac": doc.get("gateway_mac"),
            "mtu": doc.get("mtu"), "program": doc.get("program"), "check_tunnel": doc.get("check_tunnel"),
            "bgp": None if bgp is None else {"peers": dict(bgp["peers"]), "announced": list(bgp["announced"]),
                                             "withheld": dict(bgp["withheld"]),
                                             "disabled": bool(bgp["disabled"]),
                                             "disable_file": str(bgp["disable_file"]),
                                             "speaker": bgp["speaker"]},
            "watchdog": doc.get("watchdog"), "local_faults": doc.get("local_faults"),
            "conntable": doc.get("conntable"),
            "api": {site: {"open": s["open"], "limit": s["limit"], "evicted": s["evicted"],
                           "refused": s["refused"]} for site, s in doc.get("api", {}).items()},
            "notices": notices(doc)}


# -- request parts


def _limit(request: web.Request) -> int:
    values = request.query.getall("limit", [])
    if not values:
        return openapi.DEFAULT_EVENTS
    if len(values) > 1:
        raise ApiError(400, "limit: given more than once", "limit")
    text = values[0]
    if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= openapi.MAX_EVENTS:
        raise ApiError(400, f"limit: must be an integer 1..{openapi.MAX_EVENTS}, not {text!r}", "limit")
    return int(text)


async def _weight(request: web.Request) -> int:
    """The body {"weight": 0..1000}; 400 naming "weight" (or the unknown keys) otherwise."""
    usage = f'the body must be a JSON object {{"weight": 0..{openapi.MAX_WEIGHT}}}'
    try:
        body = json.loads(await request.read())
    except (ValueError, RecursionError):
        raise ApiError(400, f"{usage}: it is not JSON", "weight") from None
    if not isinstance(body, dict):
        raise ApiError(400, usage, "weight")
    unknown = sorted(set(body) - {"weight"})
    if unknown:
        raise ApiError(400, f"unknown key(s) {', '.join(unknown)}: {usage}", ",".join(unknown))
    if "weight" not in body:
        raise ApiError(400, f"weight: missing; {usage}", "weight")
    weight = body["weight"]
    if type(weight) is float and weight.is_integer():  # JSON has one number type: 5.0 is the integer 5
        weight = int(weight)
    if type(weight) is not int or not 0 <= weight <= openapi.MAX_WEIGHT:
        raise ApiError(400, f"weight: must be an integer 0..{openapi.MAX_WEIGHT}, not {weight!r}", "weight")
    return weight


# -- the application


class _Api:
    def __init__(self, ops: Operations, token: str | None, require_token: bool) -> None:
        self.ops, self.require_token = ops, require_token
        self.token = token or None  # an empty token would let "Bearer " in
        self.spec = json.dumps(openapi.document())

    def authorize(self, request: web.Request) -> None:
        if not self.require_token:
            return
        challenge = {"WWW-Authenticate": 'Bearer realm="edge-lb"'}
        if self.token is None:
            raise ApiError(401, "no API token is configured on this node, so changes through the API are "
                                "refused: set a token or a token file in the config", headers=challenge)
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        expected = self.token.encode("utf-8", "replace")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode("utf-8", "replace"),
                                                                 expected):
            raise ApiError(401, "a valid bearer token is needed: Authorization: Bearer TOKEN",
                           headers=challenge)

    def find_vip(self, request: web.Request) -> VipRow:
        name = _vip_name(request)
        for vip in self.ops.status()["vips"]:
            if vip["vip"] == name:
                return vip
        raise ApiError(404, f"no VIP {name}")

    def find_backend(self, request: web.Request) -> BackendRow:
        vip = self.find_vip(request)
        address = _address(request.match_info["backend"], "backend")
        for row in vip["backends"]:
            if row["address"] == address:
                return row
        raise ApiError(404, f"no backend {address} in VIP {vip['vip']}", "backend")

    # GET
    async def get_node(self, request: web.Request) -> web.Response:
        return web.json_response(_node(self.ops.status(vips=False)))

    async def get_vips(self, request: web.Request) -> web.Response:
        return web.json_response([_vip(v) for v in self.ops.status()["vips"]])

    async def get_vip(self, request: web.Request) -> web.Response:
        return web.json_response(_vip(self.find_vip(request)))

    async def get_backend(self, request: web.Request) -> web.Response:
        return web.json_response(_backend(self.find_backend(request)))

    async def get_events(self, request: web.Request) -> web.Response:
        # an event's fields may hold any value (an exception, a path): as text, like the log line
        return web.json_response(self.ops.events(_limit(request)), dumps=_dumps_any)

    async def get_openapi(self, request: web.Request) -> web.Response:
        return web.Response(text=self.spec, content_type="application/json")

    # mutations: authorize first, then the path, then the body
    async def set_weight(self, request: web.Request, weight: int | None) -> web.Response:
        vip = _vip_name(request)
        backend = _address(request.match_info["backend"], "backend")
        try:
            result = await self.ops.set_weight(vip, backend, weight)
        except KeyError as exc:  # KeyError's str() quotes its message: use the message itself
            message = str(exc.args[0]) if exc.args else f"no backend {backend} in VIP {vip}"
            raise ApiError(404, message) from None
        return web.json_response({"vip": vip, "backend": backend, "weight": result["weight"]})

    async def drain(self, request: web.Request) -> web.Response:
        self.authorize(request)
        return await self.set_weight(request, 0)

    async def undrain(self, request: web.Request) -> web.Response:
        self.authorize(request)
        return await self.set_weight(request, None)

    async def put_weight(self, request: web.Request) -> web.Response:
        self.authorize(request)
        _vip_name(request)  # a malformed path is a 404 before a bad body is a 400
        _address(request.match_info["backend"], "backend")
        return await self.set_weight(request, await _weight(request))

    async def set_disabled(self, request: web.Request, disabled: bool) -> web.Response:
        self.authorize(request)
        result = await self.ops.set_disabled(disabled)
        return web.json_response({"disabled": bool(result.get("disabled", disabled))})

    async def disable(self, request: web.Request) -> web.Response:
        return await self.set_disabled(request, True)

    async def enable(self, request: web.Request) -> web.Response:
        return await self.set_disabled(request, False)

    async def reload(self, request: web.Request) -> web.Response:
        self.authorize(request)
        result = await self.ops.reload()
        if result.get("ok"):
            return web.json_response({"ok": True, "config": result.get("config"),
                                      "changes": result.get("changes", {})})
        return web.json_response({"ok": False, "config": result.get("config"),
                                  "problems": [str(p) for p in result.get("problems", [])]}, status=422)


def make_app(ops: Operations, *, token: str | None, require_token: bool = True,
             extra: Sequence[Callable[[web.Application], None]] = (),
             literal_hosts_only: bool = False) -> web.Application:
    """The API over ops. token: the bearer token mutations need (None or "": mutations answer 401) unless
    require_token is False. extra: callables adding their own routes (metrics, the dashboard); they find ops
    at app[OPS]. Errors those routes raise as aiohttp HTTPExceptions are answered as JSON too.
    literal_hosts_only: 403 to a Host header that is a DNS name (for a site on loopback)."""
    api = _Api(ops, token, require_token)
    guards = [_literal_hosts_only] if literal_hosts_only else []
    app = web.Application(middlewares=[*guards, _json_errors], client_max_size=64 * 1024)
    app[OPS] = ops
    vip = PREFIX + "/vips/{address}/{port}/{protocol}"
    backend = vip + "/backends/{backend}"
    app.router.add_get(PREFIX + "/node", api.get_node)
    app.router.add_get(PREFIX + "/vips", api.get_vips)
    app.router.add_get(vip, api.get_vip)
    app.router.add_get(backend, api.get_backend)
    app.router.add_get(PREFIX + "/events", api.get_events)
    app.router.add_get(PREFIX + "/openapi.json", api.get_openapi)
    app.router.add_post(backend + "/drain", api.drain)
    app.router.add_post(backend + "/undrain", api.undrain)
    app.router.add_put(backend + "/weight", api.put_weight)
    app.router.add_post(PREFIX + "/node/disable", api.disable)
    app.router.add_post(PREFIX + "/node/enable", api.enable)
    app.router.add_post(PREFIX + "/reload", api.reload)
    for add in extra:
        add(app)
    return app
