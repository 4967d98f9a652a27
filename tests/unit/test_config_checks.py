"""Health-check config: inheritance top-level -> VIP -> backend, and every problem with its key path."""

from __future__ import annotations

from typing import Any

import pytest

from edge_lb.config import parse_config
from edge_lb.errors import ConfigError
from healthchecks.spec import CheckSpec


def cfg(check: dict[str, Any] | None = None, vip_check: dict[str, Any] | None = None,
        backend_check: dict[str, Any] | None = None, port: int = 80) -> dict[str, Any]:
    backend: dict[str, Any] = {"address": "10.0.0.1"}
    if backend_check is not None:
        backend["healthcheck"] = backend_check
    vip: dict[str, Any] = {"address": "10.200.1.1", "port": port, "protocol": "tcp",
                           "backend": [backend, {"address": "10.0.0.2"}]}
    if vip_check is not None:
        vip["healthcheck"] = vip_check
    data: dict[str, Any] = {"node": {"interface": "eth0"}, "vip": [vip]}
    if check is not None:
        data["healthcheck"] = check
    return data


def specs(data: dict[str, Any]) -> tuple[CheckSpec, CheckSpec]:
    vip = parse_config(data).vips[0]
    return vip.backends[0].healthcheck, vip.backends[1].healthcheck


def problems(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    return caught.value.problems


def test_default_is_a_tcp_connect_to_the_vip_port() -> None:
    first, second = specs(cfg())
    assert first == second == CheckSpec()
    assert first.kind == "tcp" and first.port is None


def test_each_level_replaces_only_the_keys_it_sets() -> None:
    first, second = specs(cfg(check={"interval": 1, "fall": 3},
                              vip_check={"type": "http", "path": "/healthz", "status": [200, 204]},
                              backend_check={"host": "api.example", "fall": 5}))
    assert second == CheckSpec(kind="http", interval=1.0, fall=3, path="/healthz", status=(200, 204))
    assert first == CheckSpec(kind="http", interval=1.0, fall=5, path="/healthz", status=(200, 204),
                              host="api.example")


def test_every_kind_parses() -> None:
    kinds = [{"type": "tcp"}, {"type": "https", "tls_verify": False, "body": "ok", "method": "HEAD"},
             {"type": "udp-dns", "query_name": "example.org", "query_type": "A", "rcode": "NXDOMAIN"},
             {"type": "exec", "command": ["/usr/bin/check", "{address}", "{port}"], "timeout": 5,
              "interval": 10}, {"type": "none"}]
    for kind in kinds:
        first, _ = specs(cfg(vip_check=kind))
        assert first.kind == kind["type"]
    assert specs(cfg(vip_check=kinds[3]))[0].command == ("/usr/bin/check", "{address}", "{port}")


def test_bare_port0_vip_is_served_unchecked_but_a_chosen_type_needs_a_port() -> None:
    assert specs(cfg(port=0))[0].kind == "none"
    assert specs(cfg(port=0, vip_check={"type": "http", "port": 8080}))[0].port == 8080
    assert problems(cfg(port=0, vip_check={"type": "http"})) == [
        'vip[0].healthcheck.port: required for a port-0 VIP (type = "http")']
    assert problems(cfg(port=0, check={"type": "tcp"})) == [
        'vip[0].healthcheck.port: required for a port-0 VIP (type = "tcp")']


@pytest.mark.parametrize(("where", "check", "problem"), [
    ("top", {"type": "icmp"}, 'healthcheck.type: must be "tcp" or "http" or "https" or "udp-dns" or "exec" '
                              'or "none"'),
    ("vip", {"interval": 0}, "vip[0].healthcheck.interval: must be a number of seconds 0.05..3600"),
    ("vip", {"interval": "2s"}, "vip[0].healthcheck.interval: must be a number of seconds 0.05..3600"),
    ("vip", {"rise": 0}, "vip[0].healthcheck.rise: must be an integer 1..100"),
    ("vip", {"jitter": 0.9}, "vip[0].healthcheck.jitter: must be a fraction of the delay, 0..0.5"),
    ("vip", {"fast_interval": 5}, "vip[0].healthcheck.fast_interval: 5.0 must not exceed interval (2.0)"),
    ("vip", {"path": "health"}, "vip[0].healthcheck.path: must be a URL path starting with '/', without "
                                "spaces or control characters"),
    ("vip", {"status": [200, 999]}, "vip[0].healthcheck.status: must be an HTTP status code 100..599 or a "
                                    "non-empty list of them"),
    ("vip", {"host": "a\r\nX-Evil: 1"}, "vip[0].healthcheck.host: must be a string of printable characters"),
    ("vip", {"tls_verify": "no"}, "vip[0].healthcheck.tls_verify: must be true or false"),
    ("vip", {"type": "exec"}, 'vip[0].healthcheck.command: required when type = "exec"'),
    ("vip", {"type": "exec", "command": ["check"]}, "vip[0].healthcheck.command: 'check': the program must "
                                                     "be an absolute path (no shell, no PATH search)"),
    ("backend", {"port": 70000}, "vip[0].backend[0].healthcheck.port: must be an integer 1..65535"),
    ("backend", {"colour": "red"}, "vip[0].backend[0].healthcheck.colour: unknown key"),
])
def test_one_problem(where: str, check: dict[str, Any], problem: str) -> None:
    data = {"top": cfg(check=check), "vip": cfg(vip_check=check), "backend": cfg(backend_check=check)}[where]
    assert problems(data) == [problem]


def test_bare_udp_vip_is_served_unchecked_but_may_choose_a_check() -> None:
    data = cfg()
    data["vip"][0]["protocol"] = "udp"
    assert specs(data)[0].kind == "none"
    data["vip"][0]["healthcheck"] = {"type": "udp-dns"}
    assert specs(data)[0].kind == "udp-dns"
    data["vip"][0]["healthcheck"] = {"type": "tcp", "port": 8080}
    assert specs(data)[0] == CheckSpec(kind="tcp", port=8080)


def test_port0_vip_with_a_backend_level_type_needs_its_port() -> None:
    assert problems(cfg(port=0, backend_check={"type": "http"})) == [
        'vip[0].backend[0].healthcheck.port: required for a port-0 VIP (type = "http")']
    first, second = specs(cfg(port=0, backend_check={"type": "http", "port": 8080}))
    assert (first.kind, first.port, second.kind) == ("http", 8080, "none")


def test_an_inherited_mistake_is_reported_once_where_it_was_written() -> None:
    assert problems(cfg(check={"fast_interval": 3}, backend_check={"rise": 3})) == [
        "healthcheck.fast_interval: 3.0 must not exceed interval (2.0)"]
    assert problems(cfg(check={"type": "exec"}, vip_check={"interval": 5})) == [
        'healthcheck.command: required when type = "exec"']


def test_a_timeout_longer_than_the_interval_is_refused_where_it_was_written() -> None:
    why = "must not exceed interval ({}): a check may not run longer than the time between checks"
    assert problems(cfg(vip_check={"timeout": 5})) == [
        "vip[0].healthcheck.timeout: timeout (5) " + why.format(2)]
    assert problems(cfg(check={"interval": 0.5}, backend_check={"rise": 3})) == [  # default timeout 1 s
        "healthcheck.interval: timeout (1) " + why.format(0.5)]
    assert problems(cfg(check={"timeout": 3}, vip_check={"interval": 10}, backend_check={"interval": 2})) == [
        "healthcheck.timeout: timeout (3) " + why.format(2), "vip[0].backend[0].healthcheck.interval: "
        "timeout (3) " + why.format(2)]
    assert specs(cfg(vip_check={"interval": 1, "timeout": 1, "fast_interval": 0.2}))[0].timeout == 1.0


@pytest.mark.parametrize("name", ["a" * 64 + ".com", "x..y"])
def test_dns_query_name_must_be_a_dns_name(name: str) -> None:
    found = problems(cfg(vip_check={"type": "udp-dns", "query_name": name}))
    assert len(found) == 1 and found[0].startswith("vip[0].healthcheck.query_name: not a DNS name")
