"""Bring one LB node's data plane to the config: load or adopt, resolve MACs, write the maps."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from edge_lb import netlink
from edge_lb.config import Config, IPAddress, Node
from edge_lb.dataplane.bpfsys import possible_cpus
from edge_lb.dataplane.desired import Allocator, Ring, RingCache, VipKey, desired_state, frozen, new_flow_rate
from edge_lb.dataplane.loader import Dataplane
from edge_lb.dataplane.mapio import Ctl, MapIO
from edge_lb.dataplane.programmer import ApplyReport, Programmer
from edge_lb.errors import ConfigError


@dataclass(frozen=True)
class Link:
    """Layer-2 facts the data plane needs: from config, or from the kernel in run mode."""

    own_mac: str
    gw_mac: str
    mtu: int


def link_for(node: Node, *, read_kernel: bool = True, gateway_mac: str | None = None) -> Link:
    """The node's Link. Each fact comes from config when set there, else from `gateway_mac` when given (the
    supervisor's gateway watcher), else from the kernel: the interface and the default gateway's neighbour
    entry. Without read_kernel (simulate) the MACs must be in config and the MTU defaults to 1500."""
    gateway_mac = node.gateway_mac or gateway_mac
    if not read_kernel:
        facts = {"mac": node.mac, "gateway_mac": gateway_mac}
        missing = [f"node.{k}: required by simulate" for k, v in facts.items() if v is None]
        if missing:
            raise ConfigError(missing)
        assert node.mac and gateway_mac
        return Link(node.mac, gateway_mac, node.mtu or 1500)
    return Link(node.mac or netlink.interface_mac(node.interface),
                gateway_mac or netlink.gateway_mac(node.interface),
                node.mtu or netlink.interface_mtu(node.interface))


def _mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def ctl_for(config: Config, link: Link, port0_vips: int) -> Ctl:
    d = config.dataplane
    rate = new_flow_rate(d.conn_table_size, d.new_flow_rate_limit, possible_cpus())
    return Ctl(own_mac=_mac(link.own_mac), gw_mac=_mac(link.gw_mac), mtu=link.mtu, port0_vips=port0_vips,
               encap_v4=d.encap_src_v4, encap_v6=d.encap_src_v6, new_flow_rate=rate)


class NodeMaps:
    """Keeps one node's maps equal to a config: stable numbering across applies, ring diffs only. Readers
    (status, the change path) ask through the methods below, never through the programmer's tables."""

    def __init__(self, io: MapIO, config: Config, link: Link, adopt: bool) -> None:
        d = config.dataplane
        self.io = io
        self.link = link  # as last written into the ctl map
        self.new_flow_rate = 0  # the flood guard's rate, as last written into the ctl map (0: not yet)
        self.alloc = Allocator(max_vips=d.max_vips, max_backends=d.max_backends)
        self.programmer = Programmer(io, d.ring_size)
        self.ring_cache: RingCache = {}
        if adopt:
            self.programmer.adopt(self.alloc)

    @property
    def ring_size(self) -> int:
        return self.programmer.ring_size

    def adopted_up(self) -> dict[tuple[VipKey, IPAddress], bool]:
        """What the maps say of each (VIP, backend): may it carry flows? Read once after adopting."""
        nums = self.vip_names()
        return {(nums[s.vip_num], s.address): s.up for s in self.programmer.backends.values()
                if s.vip_num in nums}

    def vip_number(self, vip: VipKey) -> int | None:
        return self.programmer.vips.get(vip)

    def vip_names(self) -> dict[int, VipKey]:
        """VIP number -> VIP, as last written."""
        return {num: key for key, num in self.programmer.vips.items()}

    def backend_index(self, vip: VipKey, address: IPAddress) -> int | None:
        num = self.programmer.vips.get(vip)
        return None if num is None else self.alloc.backend_idx.get((num, address))

    def index_of(self, vip_address: IPAddress, address: IPAddress, gue: bool) -> int | None:
        """The backend index of `address` with this encap under any VIP on `vip_address` (a tunnel check's
        mark: any of them wraps the same way toward the same backend), as last written; else None."""
        # copies: the change path's write (a worker thread) may be updating the tables meanwhile
        backends = self.programmer.backends
        for key, num in list(self.programmer.vips.items()):
            if key.address != vip_address:
                continue
            index = self.alloc.backend_idx.get((num, address))
            # the allocator may already have handed the index on (a reload frees and reuses indexes before the
            # maps are written): only the written slot says whom a mark reaches
            slot = None if index is None else backends.get(index)
            if slot is not None and (slot.vip_num, slot.address, slot.gue) == (num, address, gue):
                return index
        return None

    def written_up(self, vip: VipKey, address: IPAddress) -> bool:
        """The backend's slot as last written carries the UP flag (it may take new flows)."""
        index = self.backend_index(vip, address)
        slot = None if index is None else self.programmer.backends.get(index)
        return slot is not None and slot.up

    def ring(self, vip: VipKey) -> Ring:
        """The VIP's ring as last written (backend index per slot, read-only); empty when the VIP is not
        written."""
        num = self.programmer.vips.get(vip)
        ring = None if num is None else self.programmer.rings.get(num)
        return _NO_RING if ring is None else ring

    def slot_counts(self, vip: VipKey) -> dict[int, int]:
        """Backend index -> slots it holds in the VIP's ring as last written (0 included: empty slots)."""
        indexes, counts = np.unique(self.ring(vip), return_counts=True)
        return dict(zip(indexes.tolist(), counts.tolist(), strict=True))

    def apply(self, config: Config, health: Mapping[tuple[VipKey, IPAddress], bool] | None = None,
              link: Link | None = None) -> ApplyReport:
        """Numbering changes are kept only if the maps took them: a failed apply leaves it as it was."""
        link = link or self.link
        saved = (dict(self.alloc.vip_nums), dict(self.alloc.backend_idx))
        try:
            want = desired_state(config, self.alloc, health, self.ring_cache)
            ctl = ctl_for(config, link, want.port0_vips)
            self.io.write_ctl(ctl)
            report = self.programmer.apply(want)
        except Exception:
            self.alloc.vip_nums, self.alloc.backend_idx = saved
            raise
        self.link = link
        self.new_flow_rate = ctl.new_flow_rate
        return report


_NO_RING: Ring = frozen(np.zeros(0, dtype=np.uint32))


def program_maps(io: MapIO, config: Config, link: Link, adopt: bool) -> ApplyReport:
    """Write the whole desired state; with adopt, continue from what pinned maps already hold."""
    return NodeMaps(io, config, link, adopt).apply(config)


def load_node(config: Config, attach: bool = True) -> tuple[Dataplane, ApplyReport]:
    """Load or adopt the pinned data plane, program it, and attach it (atomically replacing an older one)."""
    link = link_for(config.node)
    dp = Dataplane.load(config.dataplane, pin=True)
    report = program_maps(dp.io, config, link, adopt=True)
    if attach:
        dp.attach(config.node.interface, config.dataplane.xdp_mode)
    return dp, report
