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

#define LB_IPPROTO_FRAGMENT 44
#define LB_ICMP_DEST_UNREACH 3
#define LB_ICMP_FRAG_NEEDED 4
#define LB_ICMPV6_PKT_TOOBIG 2

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

/* Internal return value of helpers: keep going. Verdicts are >= 0. */
#define LB_CONTINUE -1

/* Indexes into reason_stats. Python reads the names from this text (edge_lb/dataplane/counters.py). */
enum lb_stat {
  STAT_TX = 0,               /* encapsulated and sent (XDP_TX) */
  STAT_TX_ICMP_TOO_BIG,      /* ICMP frag-needed / packet-too-big sent to the flow's backend */
  STAT_CT_HIT,               /* backend taken from the connection table */
  STAT_CT_MISS,              /* backend taken from the Maglev ring (new flow, SYN, or stale entry) */
  STAT_PASS_NOT_IP,          /* ARP, unknown ethertype, truncated Ethernet */
  STAT_PASS_NOT_VIP,         /* IP, but not to a VIP (address, port, protocol) */
  STAT_PASS_MALFORMED,       /* IP too short to parse, or its length field claims more than the frame */
  STAT_PASS_OTHER,           /* to a VIP address but a protocol we do not balance (ICMP echo, IPv6 ext hdr) */
  STAT_DROP_FRAGMENT,        /* IP fragment to a VIP address */
  STAT_DROP_IP_OPTIONS,      /* IPv4 with options to a VIP address */
  STAT_DROP_TOO_BIG,         /* would exceed the MTU once encapsulated */
  STAT_DROP_NO_BACKEND,      /* VIP has an empty ring */
  STAT_DROP_ENCAP_FAILED,    /* bpf_xdp_adjust_head refused the headroom */
  STAT_MAX
};

#endif
