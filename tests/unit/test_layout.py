"""Every Python mirror of a C constant or name, checked against the C text (no root, no compiler).

Map layouts are read from bcc at run time (table.Key / table.Leaf, clang's own layout); what Python still
writes by hand - flag bits, family tags, the prefilter's formula, map names and sizes, the -D names the
loaders pass, counter field names, kernel ABI numbers - is compared here with bpf/*.h, or with the kernel's
uapi headers for what mirrors those. Each test fails when either side changes alone.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import platform
import re
import socket
import types
from pathlib import Path
from typing import Any

import pytest

from edge_lb.config import Dataplane as DataplaneSettings
from edge_lb.dataplane import bpfsys, checkencap, counters, decap, desired, gue, loader, simulate

BPF_DIR = loader.BPF_DIR
UAPI = Path("/usr/include/linux")


def source(name: str) -> str:
    return (BPF_DIR / name).read_text(encoding="utf-8")


def uapi(name: str) -> str:
    path = UAPI / name
    if not path.is_file():
        pytest.skip(f"{path} is missing (Debian: linux-libc-dev)")
    return path.read_text(encoding="utf-8")


def defines(text: str) -> dict[str, str]:
    """Object-like #defines: name -> value text, a trailing comment removed."""
    return dict(re.findall(r"^#define[ \t]+(\w+)[ \t]+(.*?)[ \t]*(?:/\*.*)?$", text, re.M))


def c_value(expr: str, names: dict[str, str]) -> int:
    """An integer constant expression of the C, its macros expanded from `names`."""
    expr = re.sub(r"\b(0x[0-9a-fA-F]+|\d+)[uUlL]+\b", r"\1", expr)
    def expand(m: re.Match[str]) -> str:
        return f"({c_value(names[m[0]], names)})" if m[0] in names else m[0]

    expr = re.sub(r"\b[A-Za-z_]\w*\b", expand, expr)
    return int(eval(expr.replace("/", "//"), {"__builtins__": {}}))


def enum_values(text: str, name: str) -> dict[str, int]:
    """Enumerators of `enum name { ... };` with their values (implicit ones counted, aliases resolved)."""
    body = re.search(rf"enum {name}\s*\{{(.*?)\}};", text, re.S)
    assert body is not None, f"enum {name} not found"
    values: dict[str, int] = {}
    following = 0
    for item in re.sub(r"/\*.*?\*/", "", body.group(1), flags=re.S).split(","):
        if not item.strip():
            continue
        ident, _, expr = (part.strip() for part in item.partition("="))
        values[ident] = c_value(expr, {k: str(v) for k, v in values.items()}) if expr else following
        following = values[ident] + 1
    return values


def required_defines(text: str) -> set[str]:
    """Macros a header refuses to compile without (#ifndef X / #error)."""
    return set(re.findall(r"#ifndef (\w+)\n#error", text))


def struct_fields(text: str, name: str) -> list[str]:
    body = re.search(rf"struct {name}\s*\{{(.*?)\}};", text, re.S)
    assert body is not None, f"struct {name} not found"
    return re.findall(r"^\s*[\w ]+?\s(\w+)(?:\[\w+\])?;", body.group(1), re.M)


# -- bpf/balancer_consts.h -------------------------------------------------------------------------

def test_backend_flags_match_the_c() -> None:
    consts = defines(source("balancer_consts.h"))
    flags = {name: c_value(value, consts) for name, value in consts.items() if name.startswith("BACKEND_F_")}
    assert flags == {"BACKEND_F_IPV6": loader.BACKEND_F_IPV6, "BACKEND_F_UP": loader.BACKEND_F_UP,
                     "BACKEND_F_GUE": loader.BACKEND_F_GUE}


def test_gue_constants_match_the_c() -> None:
    consts = defines(source("gue.h"))
    assert {name: c_value(consts[name], consts) for name in ("GUE_UDP_LEN", "GUE_SPORT_BASE",
                                                              "GUE_SPORT_HASH_MASK")} == {
        "GUE_UDP_LEN": gue.GUE_UDP_LEN, "GUE_SPORT_BASE": gue.GUE_SPORT_BASE,
        "GUE_SPORT_HASH_MASK": gue.GUE_SPORT_HASH_MASK}
    assert "(flow_hash ^ (flow_hash >> 16)) & GUE_SPORT_HASH_MASK" in source("gue.h")
    assert DataplaneSettings().gue_port == gue.DEFAULT_PORT


def test_family_tags_match_the_c() -> None:
    consts = defines(source("balancer_consts.h"))
    assert {4: c_value(consts["LB_FAMILY_V4"], consts),
                                 6: c_value(consts["LB_FAMILY_V6"], consts)} == loader.FAMILY_TAG


def test_prefilter_constants_match_the_c() -> None:
    consts = defines(source("balancer_consts.h"))
    assert c_value(consts["VIP_FILTER_BITS"], consts) == desired.VIP_FILTER_BITS
    assert c_value(consts["VIP_FILTER_MULT"], consts) == desired.VIP_FILTER_MULT
    assert c_value(consts["VIP_ADDR_NO_ECHO"], consts) == desired.VIP_ADDR_NO_ECHO


def test_vip_flags_match_the_c() -> None:
    consts = defines(source("balancer_consts.h"))
    assert {k: c_value(v, consts) for k, v in consts.items() if k.startswith("VIP_F_")} == {
        "VIP_F_HASH_SOURCE": desired.VIP_F_HASH_SOURCE, "VIP_F_NO_CONNTRACK": desired.VIP_F_NO_CONNTRACK}


def test_filter_bucket_is_the_formula_of_maybe_vip() -> None:
    """desired.filter_bucket / filter_words copy maybe_vip (and maybe_vip_folded, which surely_not_vip calls
    with the same xor) in bpf/balancer.c: a change there must be made in both (this test then needs the new
    text)."""
    text = source("balancer.c")
    body = re.search(r"int maybe_vip\(const __u32 \*addr\) \{(.*?)\n\}", text, re.S)
    folded = re.search(r"int maybe_vip_folded\(__u32 folded\) \{(.*?)\n\}", text, re.S)
    assert body is not None and folded is not None, "maybe_vip / maybe_vip_folded not found in balancer.c"
    fold = "return maybe_vip_folded(addr[0] ^ addr[1] ^ addr[2] ^ addr[3]);"
    assert " ".join(body.group(1).split()) == fold
    assert [" ".join(line.split()) for line in folded.group(1).strip().splitlines()] == [
        "__u32 bucket = (folded * VIP_FILTER_MULT) >> 16;",
        "__u32 word = bucket >> 5;",
        "__u32 *bits = vip_filter.lookup(&word);",
        "return bits && (*bits & (1u << (bucket & 31)));",
    ]
    fast = re.search(r"int surely_not_vip\(.*?\n\}", text, re.S)
    assert fast is not None and "maybe_vip_folded(ip->daddr)" in fast.group(0)
    assert "maybe_vip_folded(d[0] ^ d[1] ^ d[2] ^ d[3])" in fast.group(0)
    consts = defines(source("balancer_consts.h"))
    mult = c_value(consts["VIP_FILTER_MULT"], consts)
    for text in ("10.200.1.1", "fd00:200::1", "0.0.0.0"):
        address = ipaddress.ip_address(text)
        raw = address.packed.ljust(16, b"\0")
        words = [int.from_bytes(raw[i:i + 4], "little") for i in (0, 4, 8, 12)]  # x86 and arm64 loads
        bucket = ((words[0] ^ words[1] ^ words[2] ^ words[3]) * mult % 2**32) >> 16
        assert desired.filter_bucket(address) == bucket, text
        assert desired.filter_words([address]) == {bucket >> 5: 1 << (bucket & 31)}, text


def test_counter_names_are_every_enumerator_of_lb_stat() -> None:
    stats = enum_values(source("balancer_consts.h"), "lb_stat")
    assert list(stats.values()) == list(range(len(stats))), "enum lb_stat must stay dense from 0"
    assert counters.reason_names() == tuple(stats)[:-1] and tuple(stats)[-1] == "STAT_MAX"


# -- bpf/balancer_maps.h and the loader ------------------------------------------------------------

def balancer_maps() -> dict[str, str]:
    """Map name -> its max_entries expression, from every LB_MAP(...) of balancer_maps.h."""
    found = re.findall(r"^LB_MAP\(\"\w+\",[^,]+,[^,]+,\s*(\w+),\s*(\w+),", source("balancer_maps.h"), re.M)
    assert found, "no LB_MAP in balancer_maps.h"
    return dict(found)


def test_map_sizes_cover_every_map_with_the_c_size() -> None:
    sizes = loader.MapSizes(ring_size=1009, max_vips=7, max_backends=33, conn_table_size=4096)
    names = defines(source("balancer_consts.h"))
    names |= dict(re.findall(r"^-D(\w+)=(\d+)$", "\n".join(sizes.cflags()), re.M))
    names["STAT_MAX"] = str(len(counters.reason_names()))
    maps = balancer_maps()
    want = sizes.max_entries()
    assert set(want) == set(maps)
    for name, expr in maps.items():
        if want[name] < 0:  # not checked when adopting (sized by the enum: grows with a newer program)
            assert expr == "STAT_MAX", name
        else:
            assert want[name] == c_value(expr, names), name


def test_balancer_loads_with_every_required_define_and_opens_only_its_maps(
        monkeypatch: pytest.MonkeyPatch) -> None:
    loaded: list[tuple[Path, str, list[str]]] = []
    opened: list[str] = []

    class Bpf:
        def __getitem__(self, name: bytes) -> object:
            opened.append(name.decode())
            return types.SimpleNamespace(map_fd=len(opened))

    def load_xdp(src: Path, func: str, cflags: list[str]) -> tuple[Any, Any]:
        loaded.append((src, func, list(cflags)))
        return Bpf(), types.SimpleNamespace(fd=0)

    monkeypatch.setattr(loader, "_import_bcc", lambda: None)
    monkeypatch.setattr(loader, "load_xdp", load_xdp)
    monkeypatch.setattr(loader, "FdMapIO", lambda fds, ring_size: None)
    loader.Dataplane.load(DataplaneSettings(ring_size=1009), pin=False)
    [(src, func, cflags)] = loaded
    assert src == BPF_DIR / "balancer.c"
    assert re.search(rf"^int {func}\(struct xdp_md \*ctx\)", source(src.name), re.M)
    given = {m[1] for flag in cflags if (m := re.match(r"-D(\w+)=", flag))}
    assert given == required_defines(source("balancer_consts.h"))
    assert f"-I{BPF_DIR}" in cflags
    assert opened and set(opened) <= set(balancer_maps())


# -- bpf/decap_*.h and edge_lb.dataplane.decap -----------------------------------------------------

def test_decap_families_are_the_socket_values_python_writes() -> None:
    consts = defines(source("decap_consts.h"))
    assert c_value(consts["DECAP_AF_INET"], consts) == socket.AF_INET
    assert c_value(consts["DECAP_AF_INET6"], consts) == socket.AF_INET6


def test_decap_stats_fields_match_the_struct() -> None:
    fields = struct_fields(source("decap_structs.h"), "decap_stats")
    assert fields == [f.name for f in dataclasses.fields(decap.DecapStats)]


def test_decap_address_key_names_every_field_of_the_struct() -> None:
    class Table:
        @staticmethod
        def Key(**fields: Any) -> dict[str, Any]:  # bcc's name
            return fields

    key = decap._address_key(Table(), ipaddress.IPv4Address("10.0.0.1"))
    assert list(key) == struct_fields(source("decap_structs.h"), "decap_addr_key")
    assert bytes(key["addr"]) == bytes([10, 0, 0, 1]) + bytes(12) and key["family"] == socket.AF_INET


def test_decap_loads_with_every_required_define(monkeypatch: pytest.MonkeyPatch) -> None:
    loaded: list[tuple[Path, str, list[str]]] = []

    def load_xdp(src: Path, func: str, cflags: list[str]) -> tuple[Any, Any]:
        loaded.append((src, func, list(cflags)))
        return object(), object()

    monkeypatch.setattr(loader, "load_xdp", load_xdp)
    decap.load(5)
    [(src, func, cflags)] = loaded
    assert src == BPF_DIR / "decap.c"
    assert re.search(rf"^int {func}\(struct xdp_md \*ctx\)", source(src.name), re.M)
    given = dict(m.groups() for flag in cflags if (m := re.match(r"-D(\w+)=(.*)", flag)))
    assert given == {"DECAP_MAX_ADDRS": "5", "DECAP_GUE_PORT": "6080"}
    assert set(given) == required_defines(source("decap_consts.h"))
    includes = [Path(flag[2:]) for flag in cflags if flag.startswith("-I")]
    for header in re.findall(r'^#include "(.+)"', source("decap.c"), re.M):
        assert any((d / header).is_file() for d in includes), header


def test_decap_python_opens_only_maps_of_decap_maps() -> None:
    maps = set(re.findall(r"^BPF_\w+\((\w+),", source("decap_maps.h"), re.M))
    opened: list[str] = []

    class Table:
        max_entries = 4

        def __init__(self) -> None:
            self.Key = self.Leaf = lambda *args, **kwargs: None

        def clear(self) -> None:
            pass

        def __getitem__(self, key: object) -> list[Any]:
            return []

    class Bpf:
        def __getitem__(self, name: str) -> Table:
            opened.append(name)
            return Table()

    decap.set_addresses(Bpf(), [])
    decap.read_stats(Bpf())
    assert opened and set(opened) <= maps


# -- the kernel's uapi headers ---------------------------------------------------------------------

def test_xdp_flags_match_if_link_h() -> None:
    flags = defines(uapi("if_link.h"))
    assert {"generic": c_value(flags["XDP_FLAGS_SKB_MODE"], flags),
                                "native": c_value(flags["XDP_FLAGS_DRV_MODE"], flags)} == loader.XDP_FLAGS


def test_verdicts_match_enum_xdp_action() -> None:
    assert {v: k for k, v in enum_values(uapi("bpf.h"), "xdp_action").items()} == simulate.VERDICTS


def test_bpf_commands_match_enum_bpf_cmd() -> None:
    cmds = enum_values(uapi("bpf.h"), "bpf_cmd")
    for name in ("BPF_OBJ_GET", "BPF_PROG_TEST_RUN", "BPF_OBJ_GET_INFO_BY_FD", "BPF_MAP_LOOKUP_BATCH"):
        assert getattr(bpfsys, name) == cmds[name], name


def test_bpf_syscall_number_matches_unistd_h() -> None:
    headers = {"x86_64": "/usr/include/x86_64-linux-gnu/asm/unistd_64.h",
               "aarch64": "/usr/include/asm-generic/unistd.h"}
    path = Path(headers.get(platform.machine(), "/nonexistent"))
    if not path.is_file():
        pytest.skip(f"no unistd header for {platform.machine()}")
    nr = defines(path.read_text(encoding="utf-8"))["__NR_bpf"]
    assert bpfsys._SYS_BPF[platform.machine()] == int(nr)


# -- bpf/checkencap* and edge_lb.dataplane.checkencap ----------------------------------------------


def test_check_mark_bits_match_the_c() -> None:
    consts = defines(source("checkencap_consts.h"))
    bits = c_value(consts["CHECK_MARK_INDEX_BITS"], consts)
    assert bits == checkencap.MARK_INDEX_BITS
    assert c_value(consts["CHECK_MARK_INDEX_MASK"], consts) == 0xFFFFFFFF ^ checkencap.MARK_MASK
    assert 1 << bits > 1_000_000, "every max_backends the config accepts fits the index bits"


def test_check_stat_names_are_every_enumerator() -> None:
    values = enum_values(source("checkencap_consts.h"), "check_stat")
    assert checkencap.stat_names() == tuple(n for n, _ in sorted(values.items(), key=lambda kv: kv[1])
                                            if n != "CHECK_STAT_MAX")


def test_checkencap_opens_the_balancer_maps_by_their_pins() -> None:
    text = source("checkencap.c")
    pattern = r'^BPF_TABLE_PINNED\("\w+", [^,]+, [^,]+, (\w+), (\w+), PIN_DIR "/(\w+)"\);'
    found = re.findall(pattern, text, re.M)
    assert all(name == pin for name, _, pin in found), "each map pinned under its own name"
    pinned = {name: size for name, size, _ in found}
    shared = {name: size for name, size in pinned.items() if name in balancer_maps()}
    assert shared == {"backends": balancer_maps()["backends"], "ctl": balancer_maps()["ctl"]}
    assert set(pinned) - set(shared) == {"check_stats"}
    flags = loader.MapSizes(1009, 7, 33, 4096).cflags()
    given = {m[1] for flag in flags if (m := re.match(r"-D(\w+)=", flag))} | {"CHECK_MARK_BASE", "PIN_DIR"}
    assert required_defines(text) | required_defines(source("checkencap_consts.h")) <= given
