"""The status document's shape, written once: the node document NodeOperations.status() builds (from
edge_lb.control.status.document, the node's fields and BgpController.status()), its VIP and backend rows, the
bgp block, and NodeView, the projection GET /api/v1/node serves.

edge_lb.api.openapi builds its Node, Vip, Backend and Bgp schemas over these keys (it refuses to build when
they differ), so the API's document, the status document and the code that fills them cannot drift apart.
"""

from typing import Literal, NotRequired, TypedDict

BackendState = Literal["up", "down", "drained", "unchecked"]  # edge_lb.control.nodestate.BackendView.state
Phase = Literal["starting", "running", "stopping"]


class BackendRow(TypedDict):
    """One backend of one VIP: health, weight, ring placement, traffic."""

    address: str
    weight: int  # in effect: the runtime weight, else the config's
    state: str  # a BackendState
    config_weight: int | None
    reason: str | None  # the last check's result
    last_check: float | None  # epoch seconds; None: never checked
    latency: float | None  # seconds the last check took
    check: str | None  # the health check type
    encap: str  # "ipip" (IPIP / IP6IP6 / 4in6) or "gue" (the same in UDP): how its packets travel
    via: str | None  # "tunnel" (the VIP through its tunnel, as clients reach it), "direct"; None: unchecked
    ring_slots: int
    ring_share: float
    packets: int
    bytes: int


class VipRow(TypedDict):
    """One VIP with its backends and traffic."""

    vip: str  # 10.0.0.1:80/tcp, [fd00::1]:443/tcp
    address: str
    port: int
    protocol: str  # "tcp" or "udp"
    healthy: int  # backends not down
    in_ring: int  # backends holding ring slots
    backends: list[BackendRow]
    packets: int
    bytes: int


class SpeakerStatus(TypedDict):
    """The BGP speaker's liveness (edge_lb.bgp.exabgp_liveness): does ExaBGP answer its commands."""

    state: str  # "starting", "up", "wedged" (no answer: killed, restarting), "restarting", "stopped"
    pid: int | None
    restarts: int  # since the supervisor started
    reason: str | None  # why it is not up
    last_answer: float | None  # seconds since ExaBGP last answered; None: never


class WatchdogStatus(TypedDict):
    """edge_lb.control.watchdog.Watchdog.status(): does the supervisor make progress."""

    ok: bool  # the loop and the check scheduler make progress: systemd is pinged, the bridge gets heartbeats
    reason: str | None  # why not
    loop_lag: float  # seconds the main loop's last tick came late
    checks_age: float | None  # seconds since a health check last completed (None: no checks run)
    systemd: bool  # WatchdogSec is set: WATCHDOG=1 is sent


class ProgramStatus(TypedDict):
    """The XDP program this supervisor serves with (edge_lb.dataplane.loader.Dataplane) and how it got it."""

    origin: str  # "adopted": the pinned program of the same build, taken by fd without compiling;
    #              "compiled": built by bcc at this start (first start, or the sources/flags changed)
    digest: str  # sha256 of the C sources and compile flags it was built from (edge_lb.dataplane.pinned)
    seconds: float  # how long adopting or compiling took at startup


class CheckTunnelStatus(TypedDict):
    """edge_lb.control.checktunnel.TunnelKeeper.status(): the tunnel checks' encapsulator, kept in place."""

    ready: bool  # the tc filter and the fwmark rule are in place: tunnel checks run (else they wait)
    restores: int  # times the filter or the rule was found removed from outside and put back, since start
    failures: int  # failed attempts to put them in place (retried with a backoff), since start
    local_vips: list[str]  # tunnelled VIPs that are local addresses here: their checks are answered locally


class BgpStatus(TypedDict):
    """edge_lb.bgp.controller.BgpController.status()."""

    peers: dict[str, str]  # peer address -> session state
    announced: list[str]  # prefixes sent to the speaker
    withheld: dict[str, str]  # prefix -> why it is not announced
    disabled: bool
    disable_file: str
    speaker: SpeakerStatus


class LocalFaultStatus(TypedDict):
    """edge_lb.control.localfaults.LocalFaults.status(): checks that failed for a reason on this node."""

    cannot_judge: str | None  # why the node cannot judge its backends now; None: it can
    since: float | None  # epoch seconds
    withdrawn: bool  # cannot_judge has lasted `bound` seconds: BGP withholds every VIP
    bound: float  # seconds
    link: str  # "up", "down (why)", or "unknown" (not followed)
    checks: int  # checks running
    faulty: dict[str, int]  # cause -> checks whose last result was a local fault
    counts: dict[str, int]  # cause -> local faults since start (edge_lb_local_faults_total)


class ConnTableStatus(TypedDict):
    """edge_lb.control.status.conntable: the connection table's flood guard and what the data plane counted
    (packets since the program was loaded, from the counter snapshot)."""

    new_flow_rate_limit: int  # inserts per CPU per second, as written into the data plane (ctl)
    hits: int  # backend taken from the table
    misses: int  # backend taken from the ring: SYNs, new flows, stale entries
    flood_no_insert: int  # new flows served from the ring without an entry: their CPU was over the limit
    stateless: int  # packets of conntrack = false VIPs: always the ring


class Served(TypedDict):
    """edge_lb.control.status.document: what the data plane serves."""

    vips: list[VipRow]
    ring_size: int


class ApiSite(TypedDict):
    """One API site's connections (edge_lb.api.gate.Gate.stats): "unix" (the control socket) or "tcp"."""

    open: int
    limit: int  # over it, the longest-idle connection is closed, or the new one refused if none is idle
    evicted: int  # idle connections closed to make room, since start
    refused: int  # new connections answered 503 because every one was busy, since start


class NodeDocument(TypedDict):
    """NodeOperations.status(): while starting only phase, pid, config and (no) vips."""

    vips: list[VipRow]
    ring_size: NotRequired[int]
    phase: str  # a Phase
    instance: NotRequired[str]
    interface: NotRequired[str]
    pid: int
    uptime: NotRequired[float]
    config: str
    gateway_mac: NotRequired[str]
    mtu: NotRequired[int]  # the MTU written into the data plane (followed live unless [node].mtu fixes it)
    applies: NotRequired[int]
    bgp: NotRequired[BgpStatus | None]  # None: no [bgp]
    attached: NotRequired[bool]
    api: NotRequired[dict[str, ApiSite]]  # site -> its connections
    local_faults: NotRequired[LocalFaultStatus]
    watchdog: NotRequired[WatchdogStatus]
    conntable: NotRequired[ConnTableStatus]
    program: NotRequired[ProgramStatus]
    check_tunnel: NotRequired[CheckTunnelStatus]


class NodeView(TypedDict):
    """GET /api/v1/node: the node document's fields without its VIPs; None for what is not known yet."""

    phase: str
    instance: str | None
    interface: str | None
    attached: bool | None
    uptime: float | None
    pid: int
    config: str | None
    gateway_mac: str | None
    mtu: int | None
    bgp: BgpStatus | None
    local_faults: LocalFaultStatus | None
    conntable: ConnTableStatus | None
    watchdog: WatchdogStatus | None
    program: ProgramStatus | None
    check_tunnel: CheckTunnelStatus | None
    api: dict[str, ApiSite]  # site -> its connections
    notices: list[str]  # derived (edge_lb.control.status.notices): what `edge-lb status` says of the node
