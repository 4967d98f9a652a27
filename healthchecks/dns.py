"""The udp-dns check: one query over UDP; healthy when the answer's rcode is the expected one.

The exchange is done by hand on a connected UDP socket from Target.socket(), so the socket carries the
target's mark; dnspython's own udp() wants a socket made by its backend. Connecting also makes the kernel drop
datagrams from other sources and report an ICMP port unreachable as a refused recv.
"""

from __future__ import annotations

import asyncio
import socket

import dns.exception
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype

from healthchecks import local, reasons
from healthchecks.base import Result, Target
from healthchecks.spec import CheckSpec

MAX_DATAGRAM = 65535


class DnsChecker:
    def __init__(self, spec: CheckSpec) -> None:
        self.spec = spec
        try:
            self._name = dns.name.from_text(spec.query_name)
            self._rdtype = dns.rdatatype.from_text(spec.query_type)
            self._want = dns.rcode.from_text(spec.rcode)
        except dns.exception.DNSException as exc:
            raise ValueError(f"udp-dns check: {exc}") from exc

    async def check(self, target: Target) -> Result:
        query = dns.message.make_query(self._name, self._rdtype)  # a fresh random id each time
        try:
            sock = target.socket(socket.SOCK_DGRAM)
        except OSError as exc:
            return local.failed("socket", exc, target)
        try:
            async with asyncio.timeout(self.spec.timeout):
                wire = await _exchange(sock, target, query.to_wire())
        # TimeoutError is an OSError: catch it first.
        except TimeoutError:
            return Result(ok=False, reason=reasons.timeout(self.spec.timeout))
        except OSError as exc:
            return local.failed("udp", exc, target)
        except Exception as exc:  # the checker's contract: a failed check, never an exception
            return Result(ok=False, reason=reasons.clip(f"error: {type(exc).__name__}: {exc}"))
        finally:
            sock.close()
        return self._judge(query, wire)

    async def aclose(self) -> None:
        pass

    def _judge(self, query: dns.message.Message, wire: bytes) -> Result:
        try:
            response = dns.message.from_wire(wire)
        except dns.exception.DNSException as exc:
            return Result(ok=False, reason=reasons.clip(f"bad response: {exc}"))
        if not query.is_response(response):
            return Result(ok=False, reason="bad response: not an answer to the query")
        got = dns.rcode.to_text(response.rcode())
        if response.rcode() != self._want:
            return Result(ok=False, reason=f"rcode {got} (want {dns.rcode.to_text(self._want)})")
        return Result(ok=True, reason=f"rcode {got}")


async def _exchange(sock: socket.socket, target: Target, query: bytes) -> bytes:
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, (str(target.address), target.port))
    await loop.sock_sendall(sock, query)
    return await loop.sock_recv(sock, MAX_DATAGRAM)
