"""Config parsing: the DESIGN core, defaults, and every problem reported at once with its key path."""

from __future__ import annotations

import ipaddress
import pathlib
import tomllib
from typing import Any

import pytest

from edge_lb.config import Backend, Config, Dataplane, Node, Vip, load_config, parse_config
from edge_lb.errors import ConfigError

CORE = """\
[node]
interface = "eth0"                 # where XDP attaches (run mode)
mac = "02:00:00:00:00:01"          # optional: default is the interface's MAC
gateway_mac = "00:00:de:ad:be:af"  # optional: default is resolved from the kernel for the default gateway
mtu = 1500                         # optional: default is the interface's MTU (1500 in simulate mode)

[[vip]]
address = "10.200.1.1"             # IPv4 or IPv6
port = 80                          # 0 = every port of this address
protocol = "tcp"                   # "tcp" or "udp"

  [[vip.backend]]
  address = "10.0.0.1"             # IPv4 or IPv6 (an IPv4 VIP may have IPv6 backends: 4in6)
  weight = 1                       # 0 = drained: keeps its existing flows, gets no new ones
"""


def base() -> dict[str, Any]:
    """A fresh, valid config dict to break one piece of."""
    return {
        "node": {"interface": "eth0"},
        "vip": [
            {"address": "10.200.1.1", "port": 80, "protocol": "tcp", "backend": [{"address": "10.0.0.1"}]},
            {"address": "fd00::1", "port": 443, "protocol": "tcp", "backend": [{"address": "fd01::1"}]},
        ],
    }


def problems(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    assert caught.value.source == "config"
    return caught.value.problems


def test_design_core_parses_exactly_as_written(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "edge-lb.toml"
    path.write_text(CORE)
    assert load_config(path) == Config(
        node=Node(interface="eth0", mac="02:00:00:00:00:01", gateway_mac="00:00:de:ad:be:af", mtu=1500),
        dataplane=Dataplane(),
        vips=(
            Vip(
                address=ipaddress.IPv4Address("10.200.1.1"),
                port=80,
                protocol="tcp",
                backends=(Backend(address=ipaddress.IPv4Address("10.0.0.1"), weight=1),),
            ),
        ),
    )


def test_brief_core_with_dataplane_table() -> None:
    text = CORE.replace("[[vip]]", "[dataplane]\nring_size = 65537\n\n[[vip]]", 1)
    assert parse_config(tomllib.loads(text)).dataplane.ring_size == 65537


def test_defaults() -> None:
    config = parse_config({"node": {"interface": "eth0"}})
    assert config.vips == ()  # an idle node is valid
    assert config.node == Node(interface="eth0", mac=None, gateway_mac=None, mtu=None)
    assert config.dataplane == Dataplane(
        instance="default",
        ring_size=65537,
        conn_table_size=262144,
        max_vips=64,
        max_backends=4096,
        encap_src_v4=ipaddress.IPv4Network("172.16.0.0/16"),
        encap_src_v6=ipaddress.IPv6Network("fd00:e1b::/64"),
        xdp_mode="native",
    )


def test_backend_weight_defaults_to_one_and_vip_may_have_no_backends() -> None:
    data = base()
    data["vip"][1]["backend"] = []
    del data["vip"][0]["backend"][0]
    data["vip"][0]["backend"] = [{"address": "10.0.0.1"}, {"address": "10.0.0.2", "weight": 0}]
    vips = parse_config(data).vips
    assert [b.weight for b in vips[0].backends] == [1, 0]
    assert vips[1].backends == ()


def test_mac_is_normalised_to_lower_case() -> None:
    data = base()
    data["node"]["mac"] = "02:AB:cd:00:00:0F"
    assert parse_config(data).node.mac == "02:ab:cd:00:00:0f"


def test_full_dataplane_table() -> None:
    data = base()
    data["dataplane"] = {
        "instance": "edge-2_b",
        "ring_size": 1009,
        "conn_table_size": 1024,
        "max_vips": 4096,
        "max_backends": 2,
        "encap_src_v4": "100.64.0.0/10",
        "encap_src_v6": "2001:db8::/32",
        "xdp_mode": "generic",
    }
    data["vip"][1]["backend"] = []
    dataplane = parse_config(data).dataplane
    assert dataplane.instance == "edge-2_b"
    assert dataplane.encap_src_v4 == ipaddress.IPv4Network("100.64.0.0/10")
    assert dataplane.xdp_mode == "generic"


def test_vip_names() -> None:
    vips = parse_config(base()).vips
    assert [vip.name for vip in vips] == ["10.200.1.1:80/tcp", "[fd00::1]:443/tcp"]


def test_four_in_six_and_port_zero_beside_a_port() -> None:
    data = base()
    data["vip"][0]["backend"].append({"address": "fd01::2"})
    data["vip"].append({"address": "10.200.1.1", "port": 0, "protocol": "tcp"})
    data["vip"].append({"address": "10.200.1.1", "port": 80, "protocol": "udp"})
    vips = parse_config(data).vips
    assert vips[0].backends[1].address == ipaddress.IPv6Address("fd01::2")
    assert len(vips) == 4


def _set(path: str, value: Any) -> dict[str, Any]:
    """base() with one value set (or deleted, when value is DELETE); path like "vip.0.backend.0.address"."""
    data = base()
    *parents, last = path.split(".")
    target: Any = data
    for part in parents:
        target = target[int(part)] if part.isdigit() else target.setdefault(part, {})
    if value is DELETE:
        del target[last]
    else:
        target[int(last) if last.isdigit() else last] = value
    return data


DELETE = object()


@pytest.mark.parametrize(
    ("path", "value", "problem"),
    [
        ("vip.1.backend.0.address", "nope", "vip[1].backend[0].address: not an IP address"),
        ("vip.1.backend.0.address", 42, "vip[1].backend[0].address: not an IP address"),
        ("node.mac", "02:00:00:00:00", "node.mac: not a MAC address (want aa:bb:cc:dd:ee:ff)"),
        ("node.mac", "02-00-00-00-00-01", "node.mac: not a MAC address (want aa:bb:cc:dd:ee:ff)"),
        (
            "node.gateway_mac",
            "ff:ff:ff:ff:ff:ff",
            "node.gateway_mac: ff:ff:ff:ff:ff:ff is a multicast MAC address (want a unicast one)",
        ),
        ("node.interface", DELETE, "node.interface: required"),
        (
            "node.interface",
            "",
            "node.interface: must match an interface name (1..15 characters, no '/', ':' or space)",
        ),
        (
            "node.interface",
            "a-very-long-name",
            "node.interface: must match an interface name (1..15 characters, no '/', ':' or space)",
        ),
        ("node.mtu", 1279, "node.mtu: must be an integer 1280..65535"),
        ("node.mtu", "1500", "node.mtu: must be an integer 1280..65535"),
        ("node.speed", 10, "node.speed: unknown key"),
        ("dataplane.ring_size", 65536, "dataplane.ring_size: 65536 is not prime"),
        ("dataplane.ring_size", 1007, "dataplane.ring_size: must be an integer 1009..1000003"),
        ("dataplane.ring_size", 65537.0, "dataplane.ring_size: must be an integer 1009..1000003"),
        ("dataplane.instance", "Default", "dataplane.instance: must match [a-z0-9][a-z0-9_-]{0,31}"),
        ("dataplane.instance", "a" * 33, "dataplane.instance: must match [a-z0-9][a-z0-9_-]{0,31}"),
        ("dataplane.conn_table_size", 1023, "dataplane.conn_table_size: must be an integer 1024..100000000"),
        ("dataplane.max_vips", 0, "dataplane.max_vips: must be an integer 1..4096"),
        ("dataplane.new_flow_rate_limit", 0,
         "dataplane.new_flow_rate_limit: must be an integer 1..1000000000"),
        ("dataplane.new_flow_rate_limit", 2.5,
         "dataplane.new_flow_rate_limit: must be an integer 1..1000000000"),
        ("dataplane.new_flow_rate_limit", "1000",
         "dataplane.new_flow_rate_limit: must be an integer 1..1000000000"),
        (
            "dataplane.max_vips",
            4096,
            "dataplane.max_vips: max_vips * ring_size must be at most 2**28 (268435456)",
        ),
        ("dataplane.max_backends", 1, "dataplane.max_backends: must be an integer 2..1000000"),
        (
            "dataplane.encap_src_v4",
            "172.16.0.1/16",
            "dataplane.encap_src_v4: not an IPv4 prefix without host bits, like 172.16.0.0/16",
        ),
        (
            "dataplane.encap_src_v4",
            "172.16.0.0/31",
            "dataplane.encap_src_v4: must be an IPv4 prefix of length 8..30",
        ),
        (
            "dataplane.encap_src_v4",
            "fd00::/64",
            "dataplane.encap_src_v4: must be an IPv4 prefix of length 8..30",
        ),
        (
            "dataplane.encap_src_v6",
            "fd00::/16",
            "dataplane.encap_src_v6: must be an IPv6 prefix of length 32..124",
        ),
        ("dataplane.xdp_mode", "offload", 'dataplane.xdp_mode: must be "native" or "generic"'),
        ("dataplane", "big", "dataplane: must be a table"),
        ("vip.0.port", 65536, "vip[0].port: must be an integer 0..65535"),
        ("vip.0.port", -1, "vip[0].port: must be an integer 0..65535"),
        ("vip.0.port", True, "vip[0].port: must be an integer 0..65535"),
        ("vip.0.port", "80", "vip[0].port: must be an integer 0..65535"),
        ("vip.0.port", DELETE, "vip[0].port: required"),
        ("vip.0.protocol", "TCP", 'vip[0].protocol: must be "tcp" or "udp"'),
        ("vip.0.protocol", "sctp", 'vip[0].protocol: must be "tcp" or "udp"'),
        ("vip.0.hash", "src", 'vip[0].hash: must be "flow" or "source"'),
        ("vip.0.hash", True, 'vip[0].hash: must be "flow" or "source"'),
        ("vip.0.encap", "gre", 'vip[0].encap: must be "ipip" or "gue"'),
        ("vip.1.backend.0.encap", "GUE", 'vip[1].backend[0].encap: must be "ipip" or "gue"'),
        ("dataplane.gue_port", 0, "dataplane.gue_port: must be an integer 1..65535"),
        ("dataplane.gue_port", "6080", "dataplane.gue_port: must be an integer 1..65535"),
        ("vip.0.conntrack", "no", "vip[0].conntrack: must be true or false"),
        ("vip.0.conntrack", 0, "vip[0].conntrack: must be true or false"),
        ("vip.0.address", DELETE, "vip[0].address: required"),
        ("vip.0.address", "224.0.0.1", "vip[0].address: 224.0.0.1 is a multicast address"),
        ("vip.0.address", "0.0.0.0", "vip[0].address: 0.0.0.0 is the unspecified address"),
        ("vip.0.address", "127.0.0.1", "vip[0].address: 127.0.0.1 is a loopback address"),
        ("vip.0.address", "255.255.255.255", "vip[0].address: 255.255.255.255 is the broadcast address"),
        ("vip.0.address", "fe80::1%eth0", "vip[0].address: fe80::1%eth0 has a zone (%eth0): not allowed"),
        ("vip.1.backend.0.address", "::", "vip[1].backend[0].address: :: is the unspecified address"),
        ("vip.1.backend.0.address", "::1", "vip[1].backend[0].address: ::1 is a loopback address"),
        ("vip.1.backend.0.address", "ff02::1", "vip[1].backend[0].address: ff02::1 is a multicast address"),
        ("vip.1.backend.0.address", "10.0.0.9", "vip[1].backend[0].address: IPv6 VIP needs IPv6 backends"),
        ("vip.1.backend.0.weight", 1001, "vip[1].backend[0].weight: must be an integer 0..1000"),
        ("vip.1.backend.0.weight", False, "vip[1].backend[0].weight: must be an integer 0..1000"),
        ("vip.1.backend.0.weight", 1.5, "vip[1].backend[0].weight: must be an integer 0..1000"),
        ("vip.1.backend.0.address", DELETE, "vip[1].backend[0].address: required"),
        ("vip.1.backend.0.host", "x", "vip[1].backend[0].host: unknown key"),
        (
            "vip.1.backend",
            {"address": "fd01::1"},
            "vip[1].backend: must be an array of tables ([[vip.backend]])",
        ),
        ("vip.1.backend.0", "fd01::1", "vip[1].backend[0]: must be a table"),
        ("vip.0", ["x"], "vip[0]: must be a table"),
        ("node", "eth0", "node: must be a table"),
        ("vip", {"address": "10.1.1.1"}, "vip: must be an array of tables ([[vip]])"),
        ("nodes", {}, "nodes: unknown key"),
    ],
)
def test_one_problem(path: str, value: Any, problem: str) -> None:
    assert problems(_set(path, value)) == [problem]


def test_unknown_key_beside_a_missing_one() -> None:
    data = base()
    data["vip"][0]["prot"] = data["vip"][0].pop("protocol")
    assert problems(data) == ["vip[0].prot: unknown key", "vip[0].protocol: required"]


def test_duplicate_vip() -> None:
    data = base()
    data["vip"].append({"address": "10.200.1.1", "port": 80, "protocol": "tcp"})
    assert problems(data) == ["vip[2]: duplicate of vip[0] (10.200.1.1:80/tcp)"]


def test_duplicate_vip_compares_addresses_not_spelling() -> None:
    data = base()
    data["vip"].append({"address": "fd00:0::0001", "port": 443, "protocol": "tcp"})
    assert problems(data) == ["vip[2]: duplicate of vip[1] ([fd00::1]:443/tcp)"]


def test_duplicate_backend() -> None:
    data = base()
    data["vip"][0]["backend"] = [{"address": a} for a in ("10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.2")]
    assert problems(data) == ["vip[0].backend[3].address: duplicate of vip[0].backend[1]"]


def test_same_backend_in_two_vips_is_fine() -> None:
    data = base()
    data["vip"].append(
        {"address": "10.200.1.2", "port": 80, "protocol": "tcp", "backend": [{"address": "10.0.0.1"}]}
    )
    assert len(parse_config(data).vips) == 3


def test_more_vips_than_max_vips() -> None:
    data = base()
    data["dataplane"] = {"max_vips": 1}
    assert problems(data) == ["vip: 2 VIPs are more than dataplane.max_vips (1)"]


def test_more_backends_than_the_backend_array_holds() -> None:
    data = base()
    data["dataplane"] = {"max_backends": 2}  # slot 0 reserved: room for one backend
    assert problems(data) == [
        "vip: 2 backends are more than dataplane.max_backends - 1 (1; slot 0 is reserved)"
    ]


def test_every_problem_is_reported_at_once() -> None:
    data = base()
    data["node"]["mac"] = "nope"
    data["dataplane"] = {"ring_size": 65536}
    data["vip"][0]["port"] = 70000
    data["vip"][1]["backend"][0]["address"] = "not-an-ip"
    assert problems(data) == [
        "node.mac: not a MAC address (want aa:bb:cc:dd:ee:ff)",
        "dataplane.ring_size: 65536 is not prime",
        "vip[0].port: must be an integer 0..65535",
        "vip[1].backend[0].address: not an IP address",
    ]


def test_missing_node_table() -> None:
    assert problems({}) == ["node.interface: required"]


def test_toml_syntax_error_names_file_and_line(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text('[node]\ninterface = "eth0"\nmtu = = 1500\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.source == str(path)
    [problem] = caught.value.problems
    assert problem.startswith(f"{path}: invalid TOML: ")
    assert "line 3" in problem


def test_unreadable_file_names_it(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "missing.toml"
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.problems == [f"{path}: cannot read: No such file or directory"]


def test_problems_carry_the_file_as_source(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(CORE.replace('protocol = "tcp"', 'protocol = "icmp"'))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.source == str(path)
    assert caught.value.problems == ['vip[0].protocol: must be "tcp" or "udp"']
    assert str(caught.value).startswith(f"{path}: 1 problem(s)\n")


def test_not_utf8_names_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[node]\ninterface = "\xe9th0"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.problems[0].startswith(f"{path}: ")


def test_api_table() -> None:
    cfg = parse_config({**base(), "api": {"listen": "[::1]:9200", "token": "s3cret-token-0123456789"}})
    assert (cfg.api.host, cfg.api.port, cfg.api.enabled) == ("::1", 9200, True)
    assert cfg.api.listen == "[::1]:9200"  # host and port parsed once, at load; listen rebuilt for messages
    assert parse_config(base()).api.listen == "127.0.0.1:9100"


LISTEN = 'api.listen: must be "address:port", like "127.0.0.1:9100" or "[::1]:9100"'


@pytest.mark.parametrize(("api", "problem"), [
    ({"listen": "localhost:9100"}, LISTEN),
    ({"listen": "::1:9100"}, LISTEN),
    ({"listen": "127.0.0.1:0"}, LISTEN),
    ({"token": "short"}, "api.token: must be at least 16 characters without spaces"),
    ({"token": "s3cret-token-0123456789", "token_file": "/etc/edge-lb/token"},
     "api.token_file: set token or token_file, not both"),
])
def test_api_problems(api: dict[str, Any], problem: str) -> None:
    assert problems({**base(), "api": api}) == [problem]


def test_encap_is_the_vips_default_and_a_backends_override() -> None:
    data = base()
    data["vip"][0]["encap"] = "gue"
    data["vip"][0]["backend"].append({"address": "10.0.0.2", "encap": "ipip"})
    data["dataplane"] = {"gue_port": 7000}
    config = parse_config(data)
    assert config.dataplane.gue_port == 7000 and Dataplane().gue_port == 6080
    assert config.vips[0].encap == "gue" and config.vips[1].encap == "ipip"
    assert [b.encap for b in config.vips[0].backends] == ["gue", "ipip"]
    assert [b.encap for b in config.vips[1].backends] == ["ipip"]
