"""The REST API's OpenAPI 3.1 document, served at /api/v1/openapi.json
(routes and handlers: edge_lb.api.rest).

Built in Python rather than kept as a JSON file so each shape is written once and reused. The Node, Vip,
Backend and Bgp schemas are built over the TypedDicts of edge_lb.control.document (the status document's one
definition): their keys, which are required, and the state and phase enums come from there, and building
refuses a schema whose properties are not exactly the TypedDict's keys. Kept true by
tests/unit/test_api_schema.py, which checks the live API against it with schemathesis, and checks that every
/api/v1 route is described and every described operation is routed.
"""

from __future__ import annotations

import copy
from typing import Any, get_args

from edge_lb.control.document import (
    ApiSite,
    BackendRow,
    BackendState,
    BgpStatus,
    CheckTunnelStatus,
    ConnTableStatus,
    LocalFaultStatus,
    NodeView,
    Phase,
    ProgramStatus,
    SpeakerStatus,
    VipRow,
    WatchdogStatus,
)

Doc = dict[str, Any]

MAX_WEIGHT = 1000  # a backend's weight, as in the config: 0..1000
MAX_EVENTS = 1000  # the most events one GET /api/v1/events returns
DEFAULT_EVENTS = 100


def _ref(name: str) -> Doc:
    return {"$ref": f"#/components/schemas/{name}"}


def _or_null(schema: Doc) -> Doc:
    return {**schema, "type": [schema["type"], "null"]}


def _object(properties: Doc, *, optional: tuple[str, ...] = (), closed: bool = True, **extra: Any) -> Doc:
    required = [name for name in properties if name not in optional]
    return {"type": "object", "properties": properties, "required": required,
            "additionalProperties": not closed, **extra}


def _typed(shape: Any, properties: Doc, **extra: Any) -> Doc:
    """A closed object schema for a TypedDict of edge_lb.control.document: its keys in the TypedDict's
    order, required as the TypedDict has them. A property missing or left over is a bug: it raises."""
    keys = list(shape.__annotations__)
    if set(properties) != set(keys):
        raise TypeError(f"the {shape.__name__} schema's properties {sorted(properties)} are not the "
                        f"TypedDict's keys {sorted(keys)}")
    required = [name for name in keys if name in shape.__required_keys__]
    return {"type": "object", "properties": {name: properties[name] for name in keys}, "required": required,
            "additionalProperties": False, **extra}


def _json(description: str, schema: Doc, headers: Doc | None = None) -> Doc:
    response: Doc = {"description": description, "content": {"application/json": {"schema": schema}}}
    if headers:
        response["headers"] = headers
    return response


_COUNT = {"type": "integer", "minimum": 0}
_TEXT = {"type": "string"}

_SCHEMAS: Doc = {
    "Error": _object({"error": {**_TEXT, "description": "what is wrong, for people"},
                      "field": {**_TEXT, "description": "the input at fault: a path part, a query parameter, "
                                                        "or the body's key(s)"}},
                     optional=("field",)),
    "Bgp": _typed(BgpStatus, {
        "peers": {"type": "object", "additionalProperties": _TEXT,
                  "description": 'peer address -> session state ("up", "down", "connected", "unknown")'},
        "announced": {"type": "array", "items": _TEXT, "description": "prefixes sent to the BGP speaker"},
        "withheld": {"type": "object", "additionalProperties": _TEXT,
                     "description": "prefix -> why this node does not announce it (disabled, detached, a VIP "
                                    "below its min_healthy)"},
        "disabled": {"type": "boolean", "description": "the maintenance switch: every VIP withdrawn"},
        "disable_file": {**_TEXT, "description": "the file whose presence keeps the node disabled"},
        "speaker": _ref("Speaker")}),
    "Speaker": _typed(SpeakerStatus, {
        "state": {"type": "string", "enum": ["starting", "up", "wedged", "restarting", "stopped"],
                  "description": "wedged: ExaBGP left a command unanswered; it is killed and restarted"},
        "pid": _or_null({"type": "integer", "description": "ExaBGP's pid while it runs"}),
        "restarts": _COUNT,
        "reason": _or_null({**_TEXT, "description": "why it is not up"}),
        "last_answer": _or_null({"type": "number", "minimum": 0,
                                 "description": "seconds since ExaBGP last answered a command"})}),
    "Watchdog": _typed(WatchdogStatus, {
        "ok": {"type": "boolean", "description": "the main loop and the check scheduler make progress: "
                                                 "systemd is pinged and ExaBGP's bridge keeps the routes"},
        "reason": _or_null({**_TEXT, "description": "why not"}),
        "loop_lag": {"type": "number", "minimum": 0, "description": "seconds the loop's last tick was late"},
        "checks_age": _or_null({"type": "number", "minimum": 0,
                                "description": "seconds since a check last completed; null: none run"}),
        "systemd": {"type": "boolean", "description": "systemd's WatchdogSec is set: WATCHDOG=1 is sent"}}),
    "Node": _typed(NodeView, {
        "phase": {"type": "string", "enum": list(get_args(Phase))},
        "instance": _or_null(_TEXT),
        "interface": _or_null({**_TEXT, "description": "where the XDP program attaches"}),
        "attached": _or_null({"type": "boolean", "description": "the XDP program is attached"}),
        "uptime": _or_null({"type": "number", "minimum": 0, "description": "seconds"}),
        "pid": {"type": "integer"},
        "config": _or_null({**_TEXT, "description": "the config file's path"}),
        "gateway_mac": _or_null(_TEXT),
        "mtu": _or_null({"type": "integer", "description": "the MTU the data plane checks against"}),
        "bgp": {"oneOf": [_ref("Bgp"), {"type": "null"}], "description": "null: no BGP configured"},
        "watchdog": {"oneOf": [_ref("Watchdog"), {"type": "null"}], "description": "null: still starting"},
        "local_faults": {"oneOf": [_ref("LocalFaults"), {"type": "null"}],
                         "description": "null: still starting"},
        "conntable": {"oneOf": [_ref("ConnTable"), {"type": "null"}], "description": "null: still starting"},
        "program": {"oneOf": [_ref("Program"), {"type": "null"}], "description": "null: still starting"},
        "check_tunnel": {"oneOf": [_ref("CheckTunnel"), {"type": "null"}],
                         "description": "null: still starting"},
        "api": {"type": "object", "additionalProperties": _ref("ApiSite"),
                "description": "API site (unix: the control socket, tcp: [api].listen) -> its connections"},
        "notices": {"type": "array", "items": _TEXT,
                    "description": "what `edge-lb status` says of the node beyond its VIPs, problems "
                                   "first (not attached, tunnel checks waiting, local faults, watchdog, "
                                   "speaker, the connection table); the dashboard shows them"}},
        description="Null fields are not known yet (phase starting)."),
    "ConnTable": _typed(ConnTableStatus, {
        "new_flow_rate_limit": {"type": "integer", "minimum": 0,
                                "description": "the flood guard: connection-table inserts per CPU per second "
                                               "([dataplane] new_flow_rate_limit or its default)"},
        "hits": {**_COUNT, "description": "packets whose backend came from the connection table"},
        "misses": {**_COUNT, "description": "packets whose backend came from the ring (SYNs, new flows)"},
        "flood_no_insert": {**_COUNT, "description": "new flows served from the ring without an entry: their "
                                                     "CPU was over the limit (a flood)"},
        "stateless": {**_COUNT, "description": "packets of VIPs with conntrack = false (always the ring)"}}),
    "Program": _typed(ProgramStatus, {
        "origin": {"type": "string", "enum": ["adopted", "compiled"],
                   "description": "adopted: the pinned program of the same build, without compiling"},
        "digest": {**_TEXT, "description": "sha256 of the C sources and compile flags it was built from"},
        "seconds": {"type": "number", "minimum": 0, "description": "adopting or compiling it took"}}),
    "CheckTunnel": _typed(CheckTunnelStatus, {
        "ready": {"type": "boolean", "description": "the tc filter and the fwmark rule are in place: tunnel "
                                                   "checks run (else they wait)"},
        "restores": {**_COUNT, "description": "times the filter or the rule was removed from outside and put "
                                              "back, since start"},
        "failures": {**_COUNT, "description": "failed attempts to put them in place (retried), since start"},
        "local_vips": {"type": "array", "items": _TEXT,
                       "description": "tunnelled VIPs that are local addresses on this node: their checks "
                                      "are answered locally (remove them or use via = \"direct\")"}}),
    "ApiSite": _typed(ApiSite, {
        "open": _COUNT,
        "limit": {**_COUNT, "description": "over it, the longest-idle connection is closed (or the new one "
                                           "answered 503 when every one is busy)"},
        "evicted": {**_COUNT, "description": "idle connections closed to make room, since start"},
        "refused": {**_COUNT, "description": "new connections refused because every one was busy, since "
                                             "start"}}),
    "LocalFaults": _typed(LocalFaultStatus, {
        "cannot_judge": _or_null({**_TEXT, "description": "why this node cannot judge its backends now "
                                  "(its link down, most checks failing for local reasons)"}),
        "since": _or_null({"type": "number", "description": "epoch seconds"}),
        "withdrawn": {"type": "boolean",
                      "description": "cannot_judge has lasted `bound` seconds: every VIP is withheld from "
                                     "BGP with the reason \"local fault\""},
        "bound": {"type": "number", "minimum": 0, "description": "seconds ([node].local_fault_after)"},
        "link": {**_TEXT, "description": "the node's own link: up, down (why), or unknown"},
        "checks": _COUNT,
        "faulty": {"type": "object", "additionalProperties": _COUNT,
                   "description": "cause (EMFILE, link down, ...) -> checks whose last result was a local "
                                  "fault, not counted against their backend"},
        "counts": {"type": "object", "additionalProperties": _COUNT,
                   "description": "cause -> local faults since start (edge_lb_local_faults_total)"}}),
    "Backend": _typed(BackendRow, {
        "address": _TEXT,
        "state": {"type": "string", "enum": list(get_args(BackendState)),
                  "description": "drained: weight 0, keeps its flows; unchecked: health check type none"},
        "reason": _or_null({**_TEXT, "description": "the last check's result"}),
        "last_check": _or_null({"type": "number", "description": "epoch seconds; null: never checked"}),
        "latency": _or_null({"type": "number", "minimum": 0, "description": "the last check's, seconds"}),
        "check": _or_null({**_TEXT, "description": "the health check type"}),
        "encap": {"type": "string", "enum": ["ipip", "gue"],
                  "description": "how its packets travel: ipip (IPIP, IP6IP6, 4in6) or gue (those in UDP)"},
        "via": _or_null({"type": "string", "enum": ["tunnel", "direct", None],
                         "description": "tunnel: checked at the VIP through the backend's tunnel, as clients "
                                        "reach it; direct: at its own address; null: not checked"}),
        "weight": {"type": "integer", "minimum": 0, "description": "in effect (runtime, else the config's)"},
        "config_weight": _or_null({"type": "integer", "minimum": 0, "description": "the config's weight"}),
        "ring_slots": _COUNT,
        "ring_share": {"type": "number", "minimum": 0, "maximum": 1},
        "packets": _COUNT,
        "bytes": _COUNT}),
    "Vip": _typed(VipRow, {
        "vip": {**_TEXT, "examples": ["10.0.0.1:80/tcp", "[fd00::1]:443/tcp"]},
        "address": _TEXT,
        "port": {"type": "integer", "minimum": 0, "maximum": 65535, "description": "0: every port"},
        "protocol": {"type": "string", "enum": ["tcp", "udp"]},
        "healthy": {**_COUNT, "description": "backends not down"},
        "in_ring": {**_COUNT, "description": "backends holding ring slots"},
        "packets": _COUNT,
        "bytes": _COUNT,
        "backends": {"type": "array", "items": _ref("Backend")}}),
    "Event": {"type": "object", "required": ["time", "event"], "additionalProperties": True,
              "properties": {"time": {"type": "number", "description": "epoch seconds"}, "event": _TEXT},
              "description": "one structured event; other keys depend on the event"},
    "WeightRequest": _object({"weight": {"type": "integer", "minimum": 0, "maximum": MAX_WEIGHT,
                                         "examples": [5], "description": "0 drains the backend"}}),
    "WeightResult": _object({"vip": _TEXT, "backend": _TEXT, "weight": {"type": "integer", "minimum": 0}}),
    "Disabled": _object({"disabled": {"type": "boolean"}}),
    "ReloadApplied": _object({"ok": {"const": True}, "config": _or_null(_TEXT),
                              "changes": {"type": "object", "description": "what the reload changed"}}),
    "ReloadRejected": _object({"ok": {"const": False}, "config": _or_null(_TEXT),
                               "problems": {"type": "array", "items": _TEXT, "minItems": 1,
                                            "description": '"key.path: what is wrong", in file order'}}),
}

_PARAMETERS: Doc = {
    "address": {"name": "address", "in": "path", "required": True, "example": "10.0.0.1",
                "description": "the VIP's address, IPv6 without brackets",
                "schema": {"type": "string", "anyOf": [{"format": "ipv4"}, {"format": "ipv6"}]}},
    "port": {"name": "port", "in": "path", "required": True, "example": 80,
             "schema": {"type": "integer", "minimum": 0, "maximum": 65535}},
    "protocol": {"name": "protocol", "in": "path", "required": True, "example": "tcp",
                 "schema": {"type": "string", "enum": ["tcp", "udp"]}},
    "backend": {"name": "backend", "in": "path", "required": True, "example": "10.1.0.1",
                "description": "the backend's address",
                "schema": {"type": "string", "anyOf": [{"format": "ipv4"}, {"format": "ipv6"}]}},
    "limit": {"name": "limit", "in": "query", "required": False,
              "schema": {"type": "integer", "minimum": 1, "maximum": MAX_EVENTS, "default": DEFAULT_EVENTS}},
}

_ERROR = _ref("Error")
_RESPONSES: Doc = {
    "BadRequest": _json("A malformed query or body; `field` names the input at fault", _ERROR),
    "NotFound": _json("No such VIP or backend, or a malformed path part (named in `field`)", _ERROR),
    "Unauthorized": _json("No bearer token, a wrong one, or none configured on this node", _ERROR,
                          {"WWW-Authenticate": {"schema": {"type": "string"}, "required": True}}),
    "Unavailable": _json("The node could not carry out the change (e.g. the BGP speaker refused it)", _ERROR),
    "ReloadRejected": _json("The config is invalid; the running one stays", _ref("ReloadRejected")),
}

_VIP_PATH = "/api/v1/vips/{address}/{port}/{protocol}"
_BACKEND_PATH = _VIP_PATH + "/backends/{backend}"
_VIP_PARAMS = [{"$ref": f"#/components/parameters/{name}"} for name in ("address", "port", "protocol")]
_BACKEND_PARAMS = [*_VIP_PARAMS, {"$ref": "#/components/parameters/backend"}]


def _response(name: str) -> Doc:
    return {"$ref": f"#/components/responses/{name}"}


def _read(operation_id: str, summary: str, ok: Doc, *errors: tuple[str, str], **more: Any) -> Doc:
    """A GET; errors are (status, component response name)."""
    responses: Doc = {"200": ok} | {status: _response(name) for status, name in errors}
    return {"get": {"operationId": operation_id, "summary": summary, "responses": responses, **more}}


def _mutation(method: str, operation_id: str, summary: str, ok: Doc, *errors: tuple[str, str],
              body: Doc | None = None) -> Doc:
    """A change: bearer token (401 without), 503 when the node cannot carry it out."""
    responses: Doc = {"200": ok, "401": _response("Unauthorized"), "503": _response("Unavailable")}
    responses |= {status: _response(name) for status, name in errors}
    operation: Doc = {"operationId": operation_id, "summary": summary, "security": [{"bearer": []}],
                      "responses": responses}
    if body is not None:
        operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    return {method: operation}


def _paths() -> Doc:
    weight = _json("The backend's weight now", _ref("WeightResult"))
    disabled = _json("The maintenance switch now", _ref("Disabled"))
    backend = {"parameters": _BACKEND_PARAMS}
    missing = ("404", "NotFound")
    return {
        "/api/v1/node": _read("getNode", "The node: phase, data plane, BGP peers and announcements",
                              _json("The node", _ref("Node"))),
        "/api/v1/vips": _read("listVips", "Every VIP with its backends",
                              _json("The VIPs", {"type": "array", "items": _ref("Vip")})),
        _VIP_PATH: {"parameters": _VIP_PARAMS, **_read("getVip", "One VIP", _json("The VIP", _ref("Vip")),
                                                       missing)},
        _BACKEND_PATH: {**backend, **_read("getBackend", "One backend of one VIP",
                                           _json("The backend", _ref("Backend")), missing)},
        _BACKEND_PATH + "/drain": {**backend, **_mutation(
            "post", "drainBackend", "Weight 0: existing flows stay, new ones go elsewhere", weight, missing)},
        _BACKEND_PATH + "/undrain": {**backend, **_mutation(
            "post", "undrainBackend", "Back to the config's weight", weight, missing)},
        _BACKEND_PATH + "/weight": {**backend, **_mutation(
            "put", "setWeight", "A runtime weight, kept across restarts", weight, missing,
            ("400", "BadRequest"), body=_ref("WeightRequest"))},
        "/api/v1/events": _read("listEvents", "The most recent structured events, newest last",
                                _json("The events", {"type": "array", "items": _ref("Event")}),
                                ("400", "BadRequest"),
                                parameters=[{"$ref": "#/components/parameters/limit"}]),
        "/api/v1/node/disable": _mutation("post", "disableNode", "Withdraw every VIP (maintenance)",
                                          disabled),
        "/api/v1/node/enable": _mutation("post", "enableNode", "Announce the healthy VIPs again", disabled),
        "/api/v1/reload": _mutation("post", "reload", "Re-read the config file and apply it",
                                    _json("The config was applied", _ref("ReloadApplied")),
                                    ("422", "ReloadRejected")),
        "/api/v1/openapi.json": _read("getOpenapi", "This document",
                                      _json("The OpenAPI document", {"type": "object"})),
    }


def document() -> Doc:
    """The whole OpenAPI document (a new one on each call: callers may change it)."""
    return copy.deepcopy({
        "openapi": "3.1.0",
        "info": {"title": "edge-lb", "version": "1",
                 "description": "A node of the edge-lb XDP load balancer: status, VIPs, backends, events; "
                                "drain, weights, maintenance switch, reload. Mutations need a bearer token."},
        "paths": _paths(),
        "components": {
            "schemas": _SCHEMAS,
            "parameters": _PARAMETERS,
            "responses": _RESPONSES,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "the token from the config or its token file"}},
        },
    })
