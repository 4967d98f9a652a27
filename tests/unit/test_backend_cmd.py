"""`edge-lb backend setup / check / teardown` against an in-memory host (edge_lb.backend.fake.FakeSystem):
what check names for each fault, what setup changes (only that), idempotence, and teardown's exact undo."""

from __future__ import annotations

import io
import ipaddress
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from edge_lb import cli, paths
from edge_lb.backend import command, judge, plan, state
from edge_lb.backend.fake import V4_DEFAULT, V6_DEFAULT, FakeSystem
from edge_lb.backend.judge import conf
from edge_lb.backend.model import AddTunnel, AttachDecap, SetAdvmss, SetSysctl, Wanted
from edge_lb.backend.system import available_modules
from edge_lb.errors import BackendError

VIP4, VIP6 = ipaddress.ip_address("10.0.100.1"), ipaddress.ip_address("fd00:100::1")


def run(fake: FakeSystem, argv: str, tmp_path: Path) -> tuple[int, str]:
    args = cli.build_parser().parse_args(["backend", *argv.split()])
    if getattr(args, "state", "absent") is None:
        args.state = tmp_path / "backend.json"
    out = io.StringIO()
    return command.run(args, system=fake, out=out), out.getvalue()


def failing(fake: FakeSystem, *vips: object) -> list[str]:
    wanted = Wanted(vips=tuple(ipaddress.ip_address(str(v)) for v in vips or (VIP4,)), interface="eth0")
    return [i.name for i in judge.items(fake.gather(wanted), wanted) if not i.ok]


def set_up(tmp_path: Path, vips: str = f"--vip {VIP4}") -> FakeSystem:
    fake = FakeSystem()
    assert run(fake, f"setup {vips}", tmp_path)[0] == 0
    return fake


def test_a_fresh_host_fails_everything_but_rp_filter(tmp_path: Path) -> None:
    code, out = run(FakeSystem(), f"check --vip {VIP4}", tmp_path)
    assert code == 1
    assert failing(FakeSystem()) == ["vip", "decap", "arp_ignore", "arp_announce", "mss"]
    assert "10.0.100.1 is not on lo" in out and "would NOT serve" in out
    assert "advmss unset, so 1460 from MTU 1500; want <= 1412" in out


def _sysctl(**values: int) -> Callable[[FakeSystem], None]:
    def fault(fake: FakeSystem) -> None:
        for key, value in values.items():
            device, name = key.split("__")
            fake.sysctls[conf(device, name)] = value
    return fault


FAULTS: dict[str, tuple[Callable[[FakeSystem], None], str]] = {
    "VIP removed from lo": (lambda f: f.lo.clear(), "vip"),
    "decap detached": (lambda f: setattr(f, "xdp", None), "decap"),
    "an address added after decap": (lambda f: f.on_interface.add(ipaddress.ip_address("10.0.0.9")), "decap"),
    "rp_filter=1 on eth0": (_sysctl(eth0__rp_filter=1), "rp_filter"),
    "rp_filter=1 on all": (_sysctl(all__rp_filter=1), "rp_filter"),
    "arp_ignore=0": (_sysctl(all__arp_ignore=0, eth0__arp_ignore=0), "arp_ignore"),
    "arp_announce=1": (_sysctl(all__arp_announce=1, eth0__arp_announce=1), "arp_announce"),
    "MSS not clamped": (lambda f: f.advmss.update({V4_DEFAULT: None}), "mss"),
    "MSS clamped too little": (lambda f: f.advmss.update({V4_DEFAULT: 1420}), "mss"),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_check_names_each_fault_and_setup_fixes_it(fault: str, tmp_path: Path) -> None:
    fake = set_up(tmp_path)
    assert failing(fake) == []
    breaks, name = FAULTS[fault]
    breaks(fake)
    assert failing(fake) == [name]
    assert run(fake, f"check --vip {VIP4}", tmp_path)[0] == 1
    fake.applied.clear()
    code, out = run(fake, f"setup --vip {VIP4}", tmp_path)
    assert code == 0, out
    assert len(fake.applied) >= 1 and failing(fake) == []
    assert run(fake, f"check --vip {VIP4}", tmp_path)[0] == 0


def test_setup_twice_changes_nothing_and_says_so(tmp_path: Path) -> None:
    fake = set_up(tmp_path, f"--vip {VIP4} --vip {VIP6}")
    recorded = (tmp_path / "backend.json").read_text()
    fake.applied.clear()
    code, out = run(fake, f"setup --vip {VIP4} --vip {VIP6}", tmp_path)
    assert (code, fake.applied) == (0, [])
    assert "nothing to change" in out
    assert (tmp_path / "backend.json").read_text() == recorded


def test_setup_changes_exactly_what_is_wrong(tmp_path: Path) -> None:
    fake = FakeSystem()
    fake.sysctls[conf("all", "rp_filter")] = 1
    fake.sysctls[conf("eth0", "arp_ignore")] = 2  # enough (the larger of all and eth0 counts): left alone
    run(fake, f"setup --vip {VIP4} --vip {VIP6}", tmp_path)
    assert [str(c) for c in fake.applied] == [
        "add 10.0.100.1/32 to lo", "add fd00:100::1/128 to lo",
        "net/ipv4/conf/all/arp_announce = 2 (was 0)", "net/ipv4/conf/eth0/arp_announce = 2 (was 0)",
        "net/ipv4/conf/all/rp_filter = 2 (was 1)",
        "attach xdp_decap (bpf/decap.c; GUE on UDP 6080) to eth0",
        "advmss 1412 on route default (was unset)", "advmss 1392 on route default metric 1024 (was unset)"]


def test_teardown_restores_the_host_as_it_was(tmp_path: Path) -> None:
    fake = FakeSystem()
    fake.sysctls[conf("eth0", "rp_filter")] = 1
    fake.advmss[V6_DEFAULT] = 1300  # already below the limit: kept
    before = fake.snapshot()
    run(fake, f"setup --vip {VIP4} --vip {VIP6}", tmp_path)
    fake.sysctls[conf("eth0", "rp_filter")] = 1  # broken again and fixed again: the original is kept
    run(fake, f"setup --vip {VIP4}", tmp_path)
    code, out = run(fake, "teardown", tmp_path)
    assert code == 0, out
    assert fake.snapshot() == before
    assert not (tmp_path / "backend.json").exists()
    assert run(fake, "teardown", tmp_path)[1].startswith("nothing recorded")


def test_teardown_of_one_vip_keeps_the_shared_settings(tmp_path: Path) -> None:
    fake = set_up(tmp_path, f"--vip {VIP4} --vip {VIP6}")
    code, _ = run(fake, f"teardown --vip {VIP6}", tmp_path)
    assert code == 0
    assert failing(fake, VIP4) == []
    assert [str(a) for a in fake.lo] == ["10.0.100.1/32"]
    assert state.load(tmp_path / "backend.json").vips == ("10.0.100.1",)
    with pytest.raises(BackendError, match="not set up"):
        run(fake, "teardown --vip 10.9.9.9", tmp_path)


def test_a_change_the_kernel_refuses_keeps_what_was_done_recorded(tmp_path: Path) -> None:
    fake = FakeSystem(fail_on="xdp_decap")
    with pytest.raises(BackendError, match="refused"):
        run(fake, f"setup --vip {VIP4}", tmp_path)
    recorded = state.load(tmp_path / "backend.json")
    assert [u.op for u in recorded.undos] == ["remove_address", *["sysctl"] * 4]
    fake.fail_on = None
    run(fake, "teardown", tmp_path)
    assert fake.lo == set() and fake.sysctls[conf("all", "arp_ignore")] == 0


def test_ipip_mode_refused_without_the_modules_naming_them(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match=r"needs the kernel module\(s\) ipip, ip6_tunnel.*Use --mode xdp"):
        run(FakeSystem(), f"setup --vip {VIP4} --mode ipip", tmp_path)


def test_ipip_mode_is_the_default_with_the_modules(tmp_path: Path) -> None:
    fake = FakeSystem(modules={"ipip", "ip6_tunnel"})
    code, out = run(fake, f"setup --vip {VIP4}", tmp_path)
    assert code == 0, out
    assert AttachDecap(interface="eth0") not in fake.applied
    assert AddTunnel(name="elb-ipip0", kind="ipip") in fake.applied
    assert SetSysctl(key=conf("elb-ip6tnl0", "rp_filter"), value=2) in fake.applied
    fake.sysctls[conf("elb-ipip0", "rp_filter")] = 1  # the inner packet arrives on the tunnel device
    assert failing(fake) == ["rp_filter"]
    fake.tunnels["elb-ipip0"] = ("ipip", False)  # down: no packet arrives there (and decap is missing)
    assert failing(fake) == ["decap"]
    fake.tunnels["elb-ipip0"] = ("ipip", True)
    run(fake, "teardown", tmp_path)
    assert fake.tunnels == {}


def test_decap_by_tunnel_devices_counts(tmp_path: Path) -> None:
    fake = set_up(tmp_path)
    fake.xdp = None
    fake.tunnels = {"tunl0": ("ipip", True), "ip6tnl0": ("ip6tnl", True)}
    assert failing(fake) == []
    fake.tunnels["ip6tnl0"] = ("ip6tnl", False)
    assert failing(fake) == ["decap"]


@pytest.mark.parametrize(("change", "message"), [
    (lambda f: f.lo.add(ipaddress.ip_interface("10.0.100.1/24")), "on lo as 10.0.100.1/24"),
    (lambda f: f.on_interface.add(VIP4), "is on eth0"),
    (lambda f: setattr(f, "xdp", (3, "xdp_other")), "another XDP program, 'xdp_other'"),
    (lambda f: f.advmss.pop(V4_DEFAULT), "no route for replies from 10.0.100.1"),
])
def test_setup_refuses_what_it_must_not_fix(change: Callable[[FakeSystem], None], message: str,
                                            tmp_path: Path) -> None:
    fake = FakeSystem()
    change(fake)
    assert failing(fake)
    with pytest.raises(BackendError, match=message):
        run(fake, f"setup --vip {VIP4}", tmp_path)
    assert fake.applied == []


def test_ipv6_only_vips_have_no_arp_items_and_an_ipv6_mss(tmp_path: Path) -> None:
    fake = FakeSystem()
    assert failing(fake, VIP6) == ["vip", "decap", "mss"]
    wanted = Wanted(vips=(VIP6,), interface="eth0", overhead=20)
    changes = plan.plan(fake.gather(wanted), wanted).changes
    assert SetAdvmss(route=V6_DEFAULT, value=1420, previous=None) in changes  # 1500 - 20 - 60


def test_check_json(tmp_path: Path) -> None:
    fake = set_up(tmp_path)
    fake.sysctls[conf("eth0", "rp_filter")] = 1
    code, out = run(fake, f"check --vip {VIP4} --json", tmp_path)
    doc = json.loads(out)
    assert code == 1 and doc["ok"] is False
    assert [i["item"] for i in doc["items"] if not i["ok"]] == ["rp_filter"]


@pytest.mark.parametrize(("argv", "message"), [
    ("check --vip 10.0.0.1/32", "is not an IP address"),
    ("check --vip banana", "is not an IP address"),
    ("setup --vip 224.0.0.1", "must be a unicast address"),
    ("setup --vip 10.0.0.1 --overhead 500", "integer 0..200"),
    ("setup --vip 10.0.0.1 --mode gre", "invalid choice"),
    ("setup --vip 10.0.0.1 --gue-port 0", "a UDP port, 1..65535"),
    ("check", "--vip"),
])
def test_bad_arguments_are_named(argv: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.build_parser().parse_args(["backend", *argv.split()])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_an_unknown_interface_is_named(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match="--interface eth9"):
        run(FakeSystem(), f"check --vip {VIP4} --interface eth9", tmp_path)


def test_state_file_round_trip_and_bad_files(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    fake = set_up(tmp_path)
    recorded = state.load(tmp_path / "backend.json")
    state.save(path, recorded)
    assert state.load(path) == recorded
    path.write_text('{"version": 99}')
    with pytest.raises(BackendError, match="version 99"):
        state.load(path)
    path.write_text("not json")
    with pytest.raises(BackendError, match="unreadable"):
        state.load(path)
    assert fake.xdp is not None


def test_the_gue_port_reaches_decap(tmp_path: Path) -> None:
    fake = FakeSystem()
    run(fake, f"setup --vip {VIP4} --gue-port 7000", tmp_path)
    assert AttachDecap(interface="eth0", gue_port=7000) in fake.applied


def test_kernel_modules_are_found_loaded_installed_or_built_in(tmp_path: Path) -> None:
    sys_module, lib = tmp_path / "sys", tmp_path / "lib"
    sys_module.mkdir()
    lib.mkdir()
    assert available_modules(["ipip", "ip6_tunnel"], sys_module, lib) == set()
    (lib / "modules.dep").write_text("kernel/net/ipv4/ipip.ko.xz: kernel/net/ipv4/tunnel4.ko.xz\n"
                                     "kernel/net/ipv6/sit.ko.zst: kernel/net/ipv4/tunnel4.ko.xz\n")
    assert available_modules(["ipip", "ip6_tunnel"], sys_module, lib) == {"ipip"}
    (lib / "modules.builtin").write_text("kernel/net/ipv6/ip6_tunnel.ko\n")
    assert available_modules(["ipip", "ip6_tunnel"], sys_module, lib) == {"ipip", "ip6_tunnel"}
    (sys_module / "ip6_tunnel").mkdir()
    (lib / "modules.builtin").unlink()
    assert available_modules(["ipip", "ip6_tunnel"], sys_module, lib) == {"ipip", "ip6_tunnel"}


def test_the_state_file_is_per_network_namespace(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(paths, "RUN_DIR", tmp_path)
    inodes = {"/proc/self/ns/net": 4026531840, "/proc/1/ns/net": 4026531840}
    monkeypatch.setattr(state, "_netns", inodes.__getitem__)
    assert state.default_path() == tmp_path / "backend.json"
    inodes["/proc/self/ns/net"] = 4026532999
    assert state.default_path() == tmp_path / "backend-netns-4026532999.json"
