/* SPDX-License-Identifier: GPL-2.0 */
/* Every constant of the edge-lb data plane. Sizes come from the loader as -D integers (validated there). */
#ifndef EDGE_LB_CONSTS_H
#define EDGE_LB_CONSTS_H

#ifndef RING_SIZE
#error "RING_SIZE (a prime: Maglev slots per VIP) must be given with -D"
#endif
#ifndef MAX_VIPS
#error "MAX_VIPS must be given with -D"
#endif
#ifndef MAX_BACKENDS
#error "MAX_BACKENDS must be given with -D (index 0 is reserved: 'no backend')"
#endif
#ifndef CONN_TABLE_SIZE
#error "CONN_TABLE_SIZE must be given with -D"
#endif
#ifndef ICMP_TOO_BIG_RATE
#error "ICMP_TOO_BIG_RATE (ICMP too-big replies per CPU per second; 0 = none) must be given with -D"
#endif
#ifndef GUE_PORT
#error "GUE_PORT (UDP destination port of GUE encapsulation, [dataplane] gue_port) must be given with -D"
#endif

/* One array holds every VIP's ring: VIP n owns slots [n * RING_SIZE, (n + 1) * RING_SIZE). */
#define RINGS_ENTRIES (RING_SIZE * MAX_VIPS)

/* Seed of the flow hash. Every LB node must use the same value: ECMP may move a flow between nodes. */
#define FLOW_HASH_SEED 0x5eed1b00u

#define OUTER_TTL 64
#define IPV4_HDR_LEN 20
#define IPV6_HDR_LEN 40

/* IPv4 frag_off bits (kernel-internal names, not in uapi). */
#define LB_IP_DF 0x4000
#define LB_IP_MF 0x2000
#define LB_IP_OFFSET 0x1fff

/* IPv6 extension headers the parser walks; at most LB_MAX_EXT_HDRS of them (RFC 8200's order has 5 of these
 * kinds at most: hop-by-hop, destination options, routing, fragment, destination options). */
#define LB_IPPROTO_HOPOPTS 0
#define LB_IPPROTO_ROUTING 43
#define LB_IPPROTO_FRAGMENT 44
#define LB_IPPROTO_DSTOPTS 60
#define LB_MAX_EXT_HDRS 6
#define LB_IP6_FRAG_OFFSET 0xfff8 /* offset bits of the fragment header's bytes 2-3 (host order) */
/* A chain reaching further than this (bytes from the IPv6 header) is not walked: a bound for the verifier, above any
 * real chain (40 + 6 headers x 2,048 bytes at most). */
#define LB_EXT_MAX_OFF 12328
#define LB_ICMP_DEST_UNREACH 3
#define LB_ICMP_FRAG_NEEDED 4
#define LB_ICMPV6_PKT_TOOBIG 2
#define LB_ICMP_ECHO 8
#define LB_ICMP_ECHOREPLY 0
#define LB_ICMPV6_ECHO_REQUEST 128
#define LB_ICMPV6_ECHO_REPLY 129

/* vip_meta.flags ([[vip]] hash, edge_lb/dataplane/desired.py mirrors it, checked by tests/unit/test_layout.py).
 * Clear ("flow"): the Maglev slot of a new flow comes from the flow hash (addresses, protocol, both ports).
 * Set ("source"): from a hash of the client address alone, FLOW_HASH_SEED as its seed on every node, so each of a
 * client's flows to the VIP (any source port; any destination port of a port-0 VIP) gets the same backend. The
 * connection table stays keyed by the full flow and the outer source / flow label still come from the flow hash. */
#define VIP_F_HASH_SOURCE (1u << 0)
/* Set ([[vip]] conntrack = false): the VIP is stateless (DNS and the like). No connection-table lookup and no
 * insert: every packet takes the ring, so a ring change moves its flows (and a flood of them costs the table
 * nothing). */
#define VIP_F_NO_CONNTRACK (1u << 1)

/* vip_addrs value: the count of VIPs on the address in the low bits, and this flag when its echo is off. */
#define VIP_ADDR_NO_ECHO (1u << 31)

/* ICMP too-big replies to the client (RFC 1812 4.3.2.3: as much of the packet as fits in 576 bytes; RFC 4443 2.4:
 * as much as fits in the IPv6 minimum MTU, 1280). A packet that gets one is longer than MTU - 48 >= 1232 bytes
 * (node.mtu >= 1280; 48 = IPv6 + UDP, the largest encapsulation: GUE over IPv6), so the quote is always this long;
 * both are multiples of 4 (bpf_csum_diff). */
#define ICMP4_QUOTE_LEN 548  /* 576 - 20 - 8 */
#define ICMP6_QUOTE_LEN 1232 /* 1280 - 40 - 8 */
#define LB_ICMP_PROTO 1
#define LB_ICMPV6_PROTO 58
#define LB_NSEC_PER_SEC 1000000000ull

/* VIP address prefilter: one bit per bucket of a hash of the destination address. A clear bit answers "no VIP
 * has this address" with one array read instead of a hash-map lookup: the cheap path for the traffic we pass.
 * bucket = ((xor of the 4 address words, as loaded) * VIP_FILTER_MULT) >> 16; edge_lb/dataplane/desired.py
 * mirrors it, checked by tests/unit/test_layout.py. */
#define VIP_FILTER_BITS 65536
#define VIP_FILTER_WORDS (VIP_FILTER_BITS / 32)
#define VIP_FILTER_MULT 0x9e3779b1u

/* Address family tags in keys (not AF_*: these are part of the map ABI). */
#define LB_FAMILY_V4 4
#define LB_FAMILY_V6 6

/* backend.flags */
#define BACKEND_F_IPV6 (1u << 0) /* addr holds an IPv6 address: IP6IP6 / 4in6 */
#define BACKEND_F_UP (1u << 1)   /* may carry existing flows; cleared when the backend is down or removed */
#define BACKEND_F_GUE (1u << 2)  /* encap = "gue": the same outer IP header, then UDP to GUE_PORT (gue.h) */

/* Internal return value of helpers: keep going. Verdicts are >= 0. */
#define LB_CONTINUE -1

/* Indexes into reason_stats. Python reads the names from this text (edge_lb/dataplane/counters.py).
 * New reasons go at the end (before STAT_MAX): an adopted pinned reason_stats keeps its indexes' meaning. */
enum lb_stat {
  STAT_TX = 0,               /* encapsulated and sent (XDP_TX) */
  STAT_TX_ICMP_TOO_BIG,      /* ICMP frag-needed / packet-too-big sent to the flow's backend */
  STAT_CT_HIT,               /* backend taken from the connection table */
  STAT_CT_MISS,              /* backend taken from the Maglev ring (new flow, SYN, or stale entry) */
  STAT_PASS_NOT_IP,          /* ARP, unknown ethertype, truncated Ethernet */
  STAT_PASS_NOT_VIP,         /* IP, but not to a VIP (address, port, protocol); also whatever else is wrong with a
                              * packet whose destination the prefilter rules out at once (surely_not_vip) */
  STAT_PASS_MALFORMED,       /* IP version not the EtherType's, IPv4 IHL < 5, a length field claiming more than the
                              * frame or less than its headers, or a header we read (IPv6 extension, TCP, UDP,
                              * ICMP) not inside both the frame and the datagram's own length */
  STAT_PASS_OTHER,           /* to a VIP address but nothing we balance (ICMP echo switched off, other ICMP, other
                              * protocols, more than LB_MAX_EXT_HDRS IPv6 extension headers) */
  STAT_DROP_FRAGMENT,        /* IPv4 fragment, or IPv6 with a fragment header anywhere in its chain, to a VIP address */
  STAT_DROP_IP_OPTIONS,      /* IPv4 with options to a VIP address, or quoted by an ICMP frag-needed to one */
  STAT_DROP_TOO_BIG,         /* would exceed the MTU once encapsulated (whether or not the client is told) */
  STAT_DROP_NO_BACKEND,      /* VIP has an empty ring */
  STAT_DROP_ENCAP_FAILED,    /* bpf_xdp_adjust_head refused the headroom */
  /* ICMP frag-needed / packet-too-big to a VIP address whose quoted packet ... */
  STAT_DROP_ICMP_QUOTE_FRAGMENT,  /* ... is a non-first fragment (no ports to steer by) */
  STAT_DROP_ICMP_QUOTE_TRUNCATED, /* ... is cut before the end of its IP (and extension) headers + 8 bytes, counting
                                   * only what lies inside the outer datagram's length */
  STAT_DROP_ICMP_QUOTE_VERSION,   /* ... is not of the ICMP's own IP version (4 in ICMP, 6 in ICMPv6) */
  STAT_DROP_ICMP_QUOTE_LENGTH,    /* ... claims a length shorter than the headers quoted (IHL < 5, total or
                                   * payload length < its headers + 8) */
  STAT_DROP_ICMP_QUOTE_MISMATCH,  /* ... is from another address than the ICMP is to (about another VIP, or forged) */
  STAT_TX_TOO_BIG_REPLY,     /* an ICMP frag-needed / packet-too-big sent back to the client for a packet counted
                              * STAT_DROP_TOO_BIG (the LB's MTU less the encapsulation in it) */
  STAT_TOO_BIG_RATE_LIMITED, /* ... not sent: this CPU sent ICMP_TOO_BIG_RATE of them in the last second */
  STAT_TX_ICMP_ECHO_REPLY,   /* an ICMP / ICMPv6 echo request to a VIP address answered (XDP_TX) */
  STAT_CT_FLOOD_NO_INSERT,   /* a new flow served from the ring but not inserted into the connection table: this
                              * CPU already inserted ctl.new_flow_rate in the current second (a flood) */
  STAT_CT_STATELESS,         /* backend taken from the ring for a VIP with conntrack = false (no lookup, no insert) */
  STAT_MAX
};

#endif
