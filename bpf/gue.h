/* SPDX-License-Identifier: GPL-2.0 */
/* GUE encapsulation: the one place its header is built. Included by balancer.c; a tc-side encapsulator (health
 * checks through the tunnel) includes it too, so every GUE packet edge-lb sends looks alike.
 *
 * GUE variant 1, "direct IP" (draft-ietf-intarea-gue, section 4): [outer IPv4 | IPv6][UDP][inner IP packet].
 * There is no GUE header: the first nibble of the inner packet (0100 or 0110) is its version and tells IPv4 from
 * IPv6, as Katran's GUE_ENCAP sends it and Linux's fou in gue mode receives it. Variant 0's 4-byte header would
 * only say what the inner version nibble already says.
 *
 * UDP source port: from the flow hash (the client flow's, as the outer IP source), in the ephemeral range
 * 49152..65535 (RFC 8086 section 3.2): one flow always gets one port, and a backend NIC's RSS, which hashes the
 * outer addresses and UDP ports, spreads flows over its queues (no IPIP parsing needed).
 * UDP checksum: 0. For an IPv4 outer header that means "none" (RFC 768). For an IPv6 outer header it is the
 * tunnel exception of RFC 6935 / 6936: the receiver must allow it. Linux's UDP tunnel sockets (fou/gue) do by
 * default (udp_sock_create6 sets UDP_NO_CHECK6_RX unless a checksum is asked for), and decap.c strips GUE before
 * the kernel's UDP code sees it. The inner packet keeps its own checksums end to end. */
#ifndef EDGE_LB_GUE_H
#define EDGE_LB_GUE_H

#include <linux/udp.h>

#define GUE_UDP_LEN 8            /* bytes GUE adds to IPIP: the UDP header (variant 1 has no GUE header) */
#define GUE_SPORT_BASE 0xc000    /* 49152: the first ephemeral port */
#define GUE_SPORT_HASH_MASK 0x3fff /* 14 hash bits: 49152..65535 */

/* The UDP source port of a flow (host order). edge_lb/dataplane/gue.py mirrors it (checked by the fixtures). */
static __always_inline __u16 gue_sport(__u32 flow_hash) {
  return GUE_SPORT_BASE | ((flow_hash ^ (flow_hash >> 16)) & GUE_SPORT_HASH_MASK);
}

/* The UDP header in front of an inner IP packet of inner_len bytes, to dport (host order). */
static __always_inline void gue_udp_header(struct udphdr *udp, __u32 flow_hash, __u16 inner_len, __u16 dport) {
  udp->source = bpf_htons(gue_sport(flow_hash));
  udp->dest = bpf_htons(dport);
  udp->len = bpf_htons(inner_len + GUE_UDP_LEN);
  udp->check = 0;
}

#endif
