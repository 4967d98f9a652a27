"""Local faults: a check that failed for a reason on this node says nothing about the backend.

    cause(errno, routed)        THE classification: the errno of a failed check -> a local cause, or None
    failed(what, exc, target)   a failed Result with its local cause set (how checkers fail on an OSError)
    blamed(result, node_fault)  a failure during a node-level fault (its link down) is that fault's

Some errnos can only come from this node (no file descriptors, no buffers, no local port, a local firewall).
ENETUNREACH and EHOSTUNREACH come from this node's routing table *or* from an ICMP error the network sent back
(a router without a route, a host that does not answer ARP): they are local only when this node has no route
to the target itself, which `routed` asks the kernel (a UDP connect: a route lookup, nothing is sent).
"""

from __future__ import annotations

import errno
import os
import socket

from healthchecks import reasons
from healthchecks.base import Result, Target

# Errors no backend can cause: this node ran out of something or refused the check itself.
ALWAYS_LOCAL = frozenset({
    errno.EMFILE,  # this process's file descriptor limit
    errno.ENFILE,  # the system's
    errno.ENOBUFS,  # no socket buffer memory
    errno.ENOMEM,
    errno.EAGAIN,  # fork (exec checks) or port allocation refused for now
    errno.EADDRNOTAVAIL,  # no local port or source address left
    errno.ENETDOWN,  # the route's interface is down
    errno.EPERM,  # a local firewall (netfilter OUTPUT) or SO_MARK without CAP_NET_ADMIN
    errno.EACCES,  # a prohibit route, or an exec program this node cannot run
})
# Errors that are local only when this node itself has no route to the target (else an ICMP error said so).
LOCAL_WITHOUT_ROUTE = frozenset({errno.ENETUNREACH, errno.EHOSTUNREACH})

LINK_DOWN = "link down"
CHECKER_ERROR = "checker error"
CHECKER_OVERRAN = "checker overran"
NOT_WRITTEN = "tunnel not ready"  # a tunnel check before its slot or the encapsulator is in place (a moment)


def cause(err: int | None, routed: bool | None) -> str | None:
    """The local cause of a failure with errno `err` ("EMFILE"), or None when it may be the backend's.
    `routed`: whether this node has a route to the target (None: not known, or not asked)."""
    if err is None:
        return None
    if err in ALWAYS_LOCAL or (err in LOCAL_WITHOUT_ROUTE and routed is False):
        return errno.errorcode.get(err, str(err))
    return None


def describe(local: str) -> str:
    """"EMFILE" -> "EMFILE (too many open files)"; causes that are not errno names are already words."""
    number = getattr(errno, local, None)
    return f"{local} ({os.strerror(number).lower()})" if isinstance(number, int) else local


def routed(target: Target) -> bool | None:
    """Whether this node has a route to the target (marked as the check's sockets are), asked by connecting
    a UDP socket: a route lookup, nothing sent. None when even that socket cannot be had."""
    try:
        sock = target.socket(socket.SOCK_DGRAM)
    except OSError:
        return None
    try:
        return sock.connect_ex((str(target.address), target.port or 9)) not in LOCAL_WITHOUT_ROUTE
    finally:
        sock.close()


def failed(what: str, exc: OSError, target: Target) -> Result:
    """Result(ok=False, "what: refused") with its local cause, the route asked only when it decides."""
    err = exc.errno
    local = cause(err, routed(target) if err in LOCAL_WITHOUT_ROUTE else None)
    return Result(ok=False, reason=f"{what}: {reasons.os_error(exc)}", local=local)


def blamed(result: Result, node_fault: str | None) -> Result:
    """A failure that the checker could not pin on this node is still this node's while its link was down
    during the check: a timeout then says nothing about the backend."""
    if result.ok or result.local is not None or node_fault is None:
        return result
    return Result(ok=False, reason=result.reason, local=node_fault)
