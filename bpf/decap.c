// SPDX-License-Identifier: GPL-2.0
/* edge-lb XDP decapsulator, for backends: the packet path only. Layouts, maps and constants live in decap_*.h.
 *
 * The balancer wraps each client packet in IPIP (IPv4 backend), IP6IP6 or 4in6 (IPv6 backend), or in the same
 * outer header plus a UDP header to DECAP_GUE_PORT (GUE variant 1, "direct IP": the inner packet right after the
 * UDP header, its version nibble telling IPv4 from IPv6; bpf/gue.h), and sends it to the backend.
 * This program strips that outer header (and UDP header) when the OUTER destination is one of this host's
 * addresses (map decap_addrs, filled by edge_lb/dataplane/decap.py), keeps the Ethernet header, and returns
 * XDP_PASS so the kernel delivers the inner packet to the VIP configured on lo. The backend then answers the
 * client directly (direct server return). It replaces an ipip/ip6tnl device on hosts that lack those modules.
 *
 * Anything else - not addressed to us, not encapsulated, UDP to another port, GUE whose UDP length is not the rest
 * of the datagram or whose inner version is neither 4 nor 6, IPv6 extension headers, IPv4 with options or a wrong
 * header checksum, outer fragments, truncated, an inner packet that is malformed (IPv4: IHL < 5, a wrong header
 * checksum, a total length shorter than its header) or longer than what the outer datagram carries - is passed
 * untouched: the kernel decides what to do with it, exactly as without us (never dropped here: a frame this
 * program misjudges still reaches the stack, its counters and tcpdump). So what it strips is exactly the packet
 * the tunnel carried: bytes past the outer datagram (Ethernet padding) are never taken for part of it.
 * The UDP checksum of GUE is not verified (the balancer sends 0, RFC 6935 for IPv6): the inner packet's own
 * checksums still protect it end to end. */
#include <uapi/linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/udp.h>

#include "decap_consts.h"
#include "decap_structs.h"
#include "decap_maps.h"

static __always_inline int pass_untouched(void) {
  __u32 zero = 0;
  struct decap_stats *st = decap_stats.lookup(&zero);
  if (st)
    st->passed++;
  return XDP_PASS;
}

static __always_inline void count_decap(int outer_v6, int gue) {
  __u32 zero = 0;
  struct decap_stats *st = decap_stats.lookup(&zero);
  if (!st)
    return;
  if (outer_v6)
    st->decap_v6++;
  else
    st->decap_v4++;
  if (gue)
    st->gue++;
}

/* RFC 6040 (normal mode): a CE mark set on the outer header on the way to us must survive decapsulation,
 * otherwise the congestion signal is lost. Only ECN-capable inner packets may carry CE. */
static __always_inline void ipv4_propagate_ce(struct iphdr *inner, __u8 outer_ecn) {
  if (outer_ecn != DECAP_ECN_CE || (inner->tos & DECAP_ECN_MASK) == 0 ||
      (inner->tos & DECAP_ECN_MASK) == DECAP_ECN_CE)
    return;
  /* Incremental checksum update (RFC 1624) over the 16-bit word holding the TOS byte. One's-complement
   * sums are byte-order independent, so the raw word is used as is. */
  __u16 old_word = *(__u16 *)inner;
  inner->tos |= DECAP_ECN_CE;
  __u16 new_word = *(__u16 *)inner;
  __u32 sum = (__u16)~inner->check + (__u16)~old_word + new_word;
  sum = (sum & 0xffff) + (sum >> 16);
  sum = (sum & 0xffff) + (sum >> 16);
  inner->check = ~sum;
}

/* IPv6 traffic class = low nibble of byte 0 + high nibble of byte 1; its ECN bits are 0x30 of byte 1. */
static __always_inline __u8 ipv6_ecn(const struct ipv6hdr *ip6) {
  return (ip6->flow_lbl[0] >> 4) & DECAP_ECN_MASK;
}

static __always_inline void ipv6_propagate_ce(struct ipv6hdr *inner, __u8 outer_ecn) {
  __u8 ecn = ipv6_ecn(inner);
  if (outer_ecn == DECAP_ECN_CE && ecn != 0)
    inner->flow_lbl[0] |= DECAP_ECN_CE << 4; /* no checksum in the IPv6 header */
}

/* Removes `outer_len` bytes after the Ethernet header: the Ethernet header is copied forward over the end of
 * the outer IP header, then the packet start moves past the old copy. Returns 0 on success. */
static __always_inline int strip_outer(struct xdp_md *ctx, int outer_len, __be16 inner_proto) {
  void *data = (void *)(long)ctx->data;
  void *data_end = (void *)(long)ctx->data_end;
  struct ethhdr eth_copy;
  struct ethhdr *eth = data;

  if ((void *)(eth + 1) > data_end)
    return -1;
  __builtin_memcpy(&eth_copy, eth, sizeof(eth_copy));
  if (bpf_xdp_adjust_head(ctx, outer_len))
    return -1;
  /* adjust_head invalidates every packet pointer: reload and re-check before writing. */
  data = (void *)(long)ctx->data;
  data_end = (void *)(long)ctx->data_end;
  eth = data;
  if ((void *)(eth + 1) > data_end)
    return -1;
  __builtin_memcpy(eth, &eth_copy, sizeof(*eth));
  eth->h_proto = inner_proto;
  return 0;
}

/* Strips the outer header, then carries its CE mark to the inner header. Only changes the packet once the
 * strip succeeded, so a failure leaves it truly untouched. */
static __always_inline int decapsulate(struct xdp_md *ctx, int outer_len, __be16 inner_proto, __u8 outer_ecn,
                                       int outer_v6, int gue) {
  if (strip_outer(ctx, outer_len, inner_proto))
    return pass_untouched();
  void *data = (void *)(long)ctx->data;
  void *data_end = (void *)(long)ctx->data_end;
  if (inner_proto == bpf_htons(ETH_P_IP)) {
    struct iphdr *ip4 = data + sizeof(struct ethhdr);
    if ((void *)(ip4 + 1) <= data_end)
      ipv4_propagate_ce(ip4, outer_ecn);
  } else {
    struct ipv6hdr *ip6 = data + sizeof(struct ethhdr);
    if ((void *)(ip6 + 1) <= data_end)
      ipv6_propagate_ce(ip6, outer_ecn);
  }
  count_decap(outer_v6, gue);
  return XDP_PASS;
}

/* The IPv4 header at ip (ihl 32-bit words) sums to 0xffff: its checksum is right. Each word is checked to lie
 * inside the packet (the verifier needs it; a header cut short is not right). */
static __always_inline int ipv4_header_ok(const struct iphdr *ip, void *data_end) {
  const __u16 *w = (const void *)ip;
  __u32 words = ip->ihl * 2;
  __u32 sum = 0;
#pragma clang loop unroll(full)
  for (int i = 0; i < DECAP_IPV4_MAX_HDR_LEN / 2; i++) {
    if (i < words) {
      if ((void *)(w + i + 1) > data_end)
        return 0;
      sum += w[i];
    }
  }
  sum = (sum & 0xffff) + (sum >> 16);
  sum = (sum & 0xffff) + (sum >> 16);
  return sum == 0xffff;
}

/* A well-formed IPv4 (version 4) or IPv6 packet at inner that lies inside the `carried` bytes the outer datagram
 * has after its headers (those are inside the frame: the callers checked the outer length against it). */
static __always_inline int inner_ok(void *inner, __u32 carried, void *data_end, int version) {
  if (version == 4) {
    struct iphdr *ip4 = inner;
    if ((void *)(ip4 + 1) > data_end || ip4->version != 4 || ip4->ihl < 5)
      return 0;
    __u32 len = bpf_ntohs(ip4->tot_len);
    return ip4->ihl * 4 <= len && len <= carried && ipv4_header_ok(ip4, data_end);
  }
  struct ipv6hdr *ip6 = inner;
  if ((void *)(ip6 + 1) > data_end || ip6->version != 6)
    return 0;
  return sizeof(*ip6) + bpf_ntohs(ip6->payload_len) <= carried;
}

static __always_inline int is_our_address(const void *addr, int len, __u32 family) {
  struct decap_addr_key key;

  __builtin_memset(&key, 0, sizeof(key)); /* the whole key is hashed: unused bytes must be zero */
  __builtin_memcpy(key.addr, addr, len);
  key.family = family;
  return decap_addrs.lookup(&key) != NULL;
}

/* GUE variant 1 behind the UDP header at udp, udp_len: the outer datagram's bytes from udp on. Returns the inner
 * packet's EtherType (network order), or 0 when it is not GUE to strip: another port, a UDP length that is not the
 * rest of the datagram, an inner version neither 4 nor 6, or an inner packet that is not well-formed inside it. */
static __always_inline __be16 gue_inner(struct udphdr *udp, __u32 udp_len, void *data_end) {
  if (udp_len < DECAP_UDP_LEN || (void *)(udp + 1) > data_end || udp->dest != bpf_htons(DECAP_GUE_PORT) ||
      bpf_ntohs(udp->len) != udp_len)
    return 0;
  __u8 *inner = (void *)(udp + 1);
  if ((void *)(inner + 1) > data_end)
    return 0;
  if (inner[0] >> 4 == 4 && inner_ok(inner, udp_len - DECAP_UDP_LEN, data_end, 4))
    return bpf_htons(ETH_P_IP);
  if (inner[0] >> 4 == 6 && inner_ok(inner, udp_len - DECAP_UDP_LEN, data_end, 6))
    return bpf_htons(ETH_P_IPV6);
  return 0;
}

/* GUE to daddr (one of our addresses?) behind an outer header of outer_len bytes. */
static __always_inline int handle_gue(struct xdp_md *ctx, struct udphdr *udp, __u32 udp_len, void *data_end,
                                      const void *daddr, int addr_len, __u32 family, __u8 outer_ecn,
                                      int outer_len) {
  __be16 inner_proto = gue_inner(udp, udp_len, data_end);
  if (!inner_proto || !is_our_address(daddr, addr_len, family))
    return pass_untouched();
  return decapsulate(ctx, outer_len + DECAP_UDP_LEN, inner_proto, outer_ecn, family == DECAP_AF_INET6, 1);
}

static __always_inline int handle_ipv4(struct xdp_md *ctx, struct iphdr *outer, void *data_end) {
  if ((void *)(outer + 1) > data_end)
    return pass_untouched();
  /* ihl != 5: options. The balancer never sends them; a tunnel packet with options is not ours to strip. */
  if (outer->version != 4 || outer->ihl != 5 ||
      (outer->protocol != IPPROTO_IPIP && outer->protocol != IPPROTO_UDP))
    return pass_untouched();
  /* A fragment of the outer packet carries only part of the inner one: leave it to the kernel. */
  if (outer->frag_off & bpf_htons(DECAP_IPV4_MF_OFFSET))
    return pass_untouched();
  __u16 tot_len = bpf_ntohs(outer->tot_len);
  if (tot_len < sizeof(*outer) + sizeof(struct iphdr) || (void *)outer + tot_len > data_end)
    return pass_untouched(); /* the frame is shorter than the outer header claims */
  if (!ipv4_header_ok(outer, data_end))
    return pass_untouched(); /* corrupted on the way: the kernel drops it, as it would without us */
  if (outer->protocol == IPPROTO_UDP)
    return handle_gue(ctx, (void *)(outer + 1), tot_len - sizeof(*outer), data_end, &outer->daddr,
                      sizeof(outer->daddr), DECAP_AF_INET, outer->tos & DECAP_ECN_MASK, sizeof(*outer));
  if (!inner_ok(outer + 1, tot_len - sizeof(*outer), data_end, 4))
    return pass_untouched();
  if (!is_our_address(&outer->daddr, sizeof(outer->daddr), DECAP_AF_INET))
    return pass_untouched();

  return decapsulate(ctx, sizeof(*outer), bpf_htons(ETH_P_IP), outer->tos & DECAP_ECN_MASK, 0, 0);
}

static __always_inline int handle_ipv6(struct xdp_md *ctx, struct ipv6hdr *outer, void *data_end) {
  if ((void *)(outer + 1) > data_end)
    return pass_untouched();
  /* Extension headers (nexthdr other than 4 / 41 / 17) are not parsed: the balancer never adds them. */
  if (outer->version != 6 ||
      (outer->nexthdr != IPPROTO_IPV6 && outer->nexthdr != IPPROTO_IPIP && outer->nexthdr != IPPROTO_UDP))
    return pass_untouched();
  __u16 payload_len = bpf_ntohs(outer->payload_len);
  if ((void *)(outer + 1) + payload_len > data_end)
    return pass_untouched();
  if (outer->nexthdr == IPPROTO_UDP)
    return handle_gue(ctx, (void *)(outer + 1), payload_len, data_end, &outer->daddr, sizeof(outer->daddr),
                      DECAP_AF_INET6, ipv6_ecn(outer), sizeof(*outer));

  void *inner = (void *)(outer + 1);
  __u8 outer_ecn = ipv6_ecn(outer);
  int version = outer->nexthdr == IPPROTO_IPV6 ? 6 : 4;
  if (!inner_ok(inner, payload_len, data_end, version) ||
      !is_our_address(&outer->daddr, sizeof(outer->daddr), DECAP_AF_INET6))
    return pass_untouched();
  __be16 inner_proto = version == 6 ? bpf_htons(ETH_P_IPV6) : bpf_htons(ETH_P_IP);
  return decapsulate(ctx, sizeof(*outer), inner_proto, outer_ecn, 1, 0);
}

int xdp_decap(struct xdp_md *ctx) {
  void *data = (void *)(long)ctx->data;
  void *data_end = (void *)(long)ctx->data_end;
  struct ethhdr *eth = data;

  if ((void *)(eth + 1) > data_end)
    return pass_untouched();
  if (eth->h_proto == bpf_htons(ETH_P_IP))
    return handle_ipv4(ctx, (void *)(eth + 1), data_end);
  if (eth->h_proto == bpf_htons(ETH_P_IPV6))
    return handle_ipv6(ctx, (void *)(eth + 1), data_end);
  return pass_untouched();
}
