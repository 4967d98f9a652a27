"""Every exception edge-lb raises on purpose.

    EdgeLbError                 base: the CLI prints its message and exits non-zero
    +-- ConfigError             a config file or value is invalid; .problems lists "key.path: what is wrong"
    +-- DataplaneError          loading, adopting, attaching or writing the BPF program and maps failed
    +-- NetlinkError            an interface, route or neighbour could not be read from the kernel
    +-- PcapError               a pcap file could not be read or written
    +-- LabError                the namespace lab could not be built or torn down
    +-- SupervisorError         the supervisor cannot start (another one runs) or cannot be reached
    +-- BgpError                the BGP speaker (ExaBGP) refused a command, is not running, or cannot start
    +-- BackendError            `edge-lb backend`: a bad argument, a refused setup, a kernel's refusal
    +-- BenchError              `edge-lb bench`: a bad argument, or a measurement that could not run

Lower libraries' exceptions (bcc's bare Exception, pyroute2's NetlinkError, OSError) are translated once, at
the module that talks to them, with `raise XError(...) from exc`.
"""

from __future__ import annotations


class EdgeLbError(Exception):
    """Base class of every deliberate edge-lb error."""


class ConfigError(EdgeLbError):
    """A config is invalid. `problems` holds one "key.path: message" line per problem, in file order."""

    def __init__(self, problems: list[str], source: str = "config") -> None:
        self.problems = list(problems)
        self.source = source
        super().__init__(f"{source}: {len(self.problems)} problem(s)\n" + "\n".join(self.problems))


class DataplaneError(EdgeLbError):
    """The BPF data plane could not be compiled, loaded, adopted, attached or updated."""


class NetlinkError(EdgeLbError):
    """The kernel's view of interfaces, routes or neighbours could not be read."""


class PcapError(EdgeLbError):
    """A pcap file is unreadable, malformed or not Ethernet."""


class LabError(EdgeLbError):
    """The namespace lab could not be built, driven or torn down."""


class SupervisorError(EdgeLbError):
    """The supervisor cannot start (another one holds the instance) or its control socket is unreachable."""


class BgpError(EdgeLbError):
    """The BGP speaker refused a command, is not running, or could not be started."""


class BackendError(EdgeLbError):
    """`edge-lb backend`: a bad argument, a setup it refuses (a missing kernel module, someone else's XDP
    program, a VIP configured where it would answer ARP), or a change the kernel refused."""


class BenchError(EdgeLbError):
    """`edge-lb bench`: a bad argument, a measurement that could not run (its lab or supervisor failed), or a
    program that returned another XDP action than the case expects."""
