"""GUE as the balancer sends it (bpf/gue.h), for Python: its overhead, the UDP source port of a flow and the
UDP header, byte for byte. What a Python-side or tc-side encapsulator (health checks through the tunnel) needs
to send packets the backends' decapsulation takes exactly as it takes the balancer's.

A backend's encapsulation is its `encap` ([[vip.backend]] encap, else its [[vip]] encap, else "ipip"), carried
to the data plane as BACKEND_F_GUE in its backends-map entry (desired.BackendSlot.gue):

    "ipip": [outer IPv4 | IPv6 (the backend's family)][inner IP packet]   IPIP, IP6IP6, 4in6
    "gue":  [outer IPv4 | IPv6][UDP sport(flow), dport [dataplane] gue_port, checksum 0][inner IP packet]

GUE variant 1 ("direct IP"): no GUE header, the inner version nibble tells IPv4 from IPv6. The outer IP header
is the same as IPIP's (source from [dataplane] encap_src_v4 / encap_src_v6 and the flow hash, TTL 64, DSCP/ECN
and DF copied), only its protocol / next header is UDP (17) and its length 8 bytes more.
"""

from __future__ import annotations

import struct

GUE_UDP_LEN = 8  # bytes GUE adds to IPIP (bpf/gue.h GUE_UDP_LEN)
GUE_SPORT_BASE = 0xC000  # 49152 (bpf/gue.h)
GUE_SPORT_HASH_MASK = 0x3FFF  # (bpf/gue.h)
DEFAULT_PORT = 6080  # [dataplane] gue_port's default, Katran's GUE_DPORT
IPV4_HDR_LEN, IPV6_HDR_LEN = 20, 40


def source_port(flow_hash: int) -> int:
    """The UDP source port of a flow with this 32-bit flow hash (bpf/gue.h gue_sport): 49152..65535."""
    return GUE_SPORT_BASE | ((flow_hash ^ (flow_hash >> 16)) & GUE_SPORT_HASH_MASK)


def udp_header(flow_hash: int, inner_len: int, port: int = DEFAULT_PORT) -> bytes:
    """The 8-byte UDP header in front of an inner IP packet of inner_len bytes (bpf/gue.h gue_udp_header)."""
    return struct.pack("!HHHH", source_port(flow_hash), port, inner_len + GUE_UDP_LEN, 0)


def overhead(backend_version: int, gue: bool) -> int:
    """Bytes the encapsulation adds to a client packet: what the MTU check and the too-big reply count."""
    return (IPV6_HDR_LEN if backend_version == 6 else IPV4_HDR_LEN) + (GUE_UDP_LEN if gue else 0)
