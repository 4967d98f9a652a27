// SPDX-License-Identifier: GPL-2.0
/* edge-lb XDP balancer: the packet path only. Layouts, maps and constants live in balancer_*.h.
 * VIP packet -> connection table (SYN skips it) or the VIP's Maglev ring -> IPIP / IP6IP6 / 4in6, or the same in
 * UDP (GUE, gue.h) for backends with BACKEND_F_GUE -> XDP_TX.
 * Everything that is not a VIP packet leaves untouched with XDP_PASS. */
#include <uapi/linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>

#include "balancer_consts.h"
#include "balancer_structs.h"
#include "balancer_maps.h"
#include "gue.h"
#include "lb_csum.h"
#include "lb_hash.h"

/* What the parser learned about one packet. */
struct packet {
  struct flow_key flow; /* client -> VIP, also for an ICMP error about that flow */
  __u32 ip_len;         /* IP total length: what encapsulation wraps */
  __u32 l3_len;         /* bytes from the IP header to the frame's end: >= ip_len (padding), sent as is */
  __u8 tos;             /* IPv4 TOS / IPv6 traffic class, copied to the outer header */
  __u8 syn;             /* TCP SYN without ACK: always consult the ring */
  __u8 icmp;            /* ICMP too-big about the flow: no conn-table insert */
  __u16 df;             /* inner IPv4 DF bit (network order), copied outward so PMTUD keeps working */
};

static __always_inline void count(__u32 idx, __u64 bytes) {
  struct lb_counter *c = reason_stats.lookup(&idx);
  if (c) {
    c->packets++;
    c->bytes += bytes;
  }
}

static __always_inline void count_in(void *map_lookup_result, __u64 bytes) {
  struct lb_counter *c = map_lookup_result;
  if (c) {
    c->packets++;
    c->bytes += bytes;
  }
}

/* The client address alone ([[vip]] hash = "source"): the same on every node, whatever the ports. */
static __always_inline __u32 source_hash(const struct flow_key *f) {
  if (f->family == LB_FAMILY_V4)
    return jhash3(f->src[0], 0, 0, FLOW_HASH_SEED);
  __u32 h = jhash3(f->src[0], f->src[1], f->src[2], FLOW_HASH_SEED);
  return jhash3(f->src[3], 0, 0, h);
}

/* The prefilter's answer for the xor of an address's 4 words (as loaded). False: no VIP has the address
 * (certain). True: one may (then the hash maps tell). */
static __always_inline int maybe_vip_folded(__u32 folded) {
  __u32 bucket = (folded * VIP_FILTER_MULT) >> 16;
  __u32 word = bucket >> 5;
  __u32 *bits = vip_filter.lookup(&word);
  return bits && (*bits & (1u << (bucket & 31)));
}

static __always_inline int maybe_vip(const __u32 *addr) {
  return maybe_vip_folded(addr[0] ^ addr[1] ^ addr[2] ^ addr[3]);
}

/* 1 when the frame's IP destination is surely no VIP's: most of what a node on a shared link receives. Asked
 * before anything else is parsed, so such a packet costs one array read; it is passed untouched and counted
 * not_vip whatever else is wrong with it (the kernel drops what is malformed). A header of the wrong IP version
 * is not read as an address: the parser counts it malformed. */
static __always_inline int surely_not_vip(void *data, void *data_end, __u16 h_proto) {
  if (h_proto == bpf_htons(ETH_P_IP)) {
    struct iphdr *ip = data + sizeof(struct ethhdr);
    return (void *)(ip + 1) <= data_end && ip->version == 4 && !maybe_vip_folded(ip->daddr);
  }
  struct ipv6hdr *ip6 = data + sizeof(struct ethhdr);
  if ((void *)(ip6 + 1) > data_end || ip6->version != 6)
    return 0;
  __u32 *d = (__u32 *)&ip6->daddr;
  return !maybe_vip_folded(d[0] ^ d[1] ^ d[2] ^ d[3]);
}

static __always_inline int is_vip_addr(const __u32 *addr, __u8 family) {
  if (!maybe_vip(addr))
    return 0;
  struct vip_key k = {};
  __builtin_memcpy(k.addr, addr, 16);
  k.family = family;
  return vip_addrs.lookup(&k) != NULL;
}

/* Slow path for packets we do not balance: drop what is to a VIP address, pass the rest. */
static __always_inline int drop_if_vip(const __u32 *addr, __u8 family, __u32 stat, __u64 bytes) {
  if (!is_vip_addr(addr, family)) {
    count(STAT_PASS_NOT_VIP, bytes);
    return XDP_PASS;
  }
  count(stat, bytes);
  return stat == STAT_PASS_OTHER ? XDP_PASS : XDP_DROP;
}

/* The packet is left to the kernel untouched: a header or length field does not hold together. */
static __always_inline int malformed(void) {
  count(STAT_PASS_MALFORMED, 0);
  return XDP_PASS;
}

/* ICMP error to a VIP address about one of its flows, but its quote cannot be trusted: dropped and counted. */
static __always_inline int bad_quote(__u32 stat, struct packet *p) {
  count(stat, p->ip_len);
  return XDP_DROP;
}

/* L4 ports at l4 (TCP or UDP); l4_len: the datagram's bytes from l4 on (its length field, not the frame). */
static __always_inline int parse_ports(void *l4, __u32 l4_len, void *data_end, struct packet *p) {
  if (p->flow.proto == IPPROTO_TCP) {
    struct tcphdr *tcp = l4;
    if ((void *)(tcp + 1) > data_end || l4_len < sizeof(*tcp) || tcp->doff < 5 || tcp->doff * 4 > l4_len)
      return malformed();
    p->syn = tcp->syn && !tcp->ack;
  } else {
    struct udphdr *udp = l4;
    if ((void *)(udp + 1) > data_end || l4_len < sizeof(*udp))
      return malformed();
    __u16 ulen = bpf_ntohs(udp->len);
    if (ulen < sizeof(*udp) || ulen > l4_len)
      return malformed();
  }
  __u16 *ports = l4;
  p->flow.sport = ports[0];
  p->flow.dport = ports[1];
  return LB_CONTINUE;
}

/* Results of skip_ext_v6 besides LB_CONTINUE. */
#define EXT_FRAGMENT 1  /* a fragment header (in a quote: one that is not the first fragment) */
#define EXT_TRUNCATED 2 /* a header not inside both the frame and the first `len` bytes of the datagram */
#define EXT_TOO_MANY 3  /* more than LB_MAX_EXT_HDRS extension headers */

/* Walks the IPv6 extension headers (hop-by-hop, routing, destination options, fragment) of the IPv6 header at ip6,
 * the first one's type in *proto, until an upper-layer protocol: then *proto is it and *off its offset from ip6.
 * len: bytes of the datagram the headers must lie in. A quote (ICMPv6 too-big) may hold the first fragment of a
 * packet: its fragment header is skipped; outside a quote any fragment header ends the walk. */
static __always_inline int skip_ext_v6(void *ip6, void *data_end, __u32 len, __u8 *proto, __u32 *off,
                                       int quote) {
#pragma clang loop unroll(full)
  for (int i = 0; i < LB_MAX_EXT_HDRS; i++) {
    __u8 nh = *proto;
    if (nh != LB_IPPROTO_HOPOPTS && nh != LB_IPPROTO_ROUTING && nh != LB_IPPROTO_DSTOPTS &&
        nh != LB_IPPROTO_FRAGMENT)
      return LB_CONTINUE;
    if (nh == LB_IPPROTO_FRAGMENT && !quote)
      return EXT_FRAGMENT;
    __u32 o = *off;
    if (o > LB_EXT_MAX_OFF)
      return EXT_TRUNCATED;
    __u8 *h = ip6 + o;
    if ((void *)(h + 8) > data_end || o + 8 > len)
      return EXT_TRUNCATED;
    if (nh == LB_IPPROTO_FRAGMENT) {
      if (((h[2] << 8) | h[3]) & LB_IP6_FRAG_OFFSET)
        return EXT_FRAGMENT;
      *off = o + 8;
    } else {
      *off = o + (h[1] + 1) * 8;
    }
    *proto = h[0];
  }
  __u8 nh = *proto;
  if (nh == LB_IPPROTO_HOPOPTS || nh == LB_IPPROTO_ROUTING || nh == LB_IPPROTO_DSTOPTS ||
      nh == LB_IPPROTO_FRAGMENT)
    return EXT_TOO_MANY;
  return LB_CONTINUE;
}

/* Rebuild the client -> VIP flow from the quoted packet (VIP -> client): the error is about that flow. */
static __always_inline void flow_from_quote(struct packet *p, __u16 *ports, __u8 proto) {
  p->flow.sport = ports[1];
  p->flow.dport = ports[0];
  p->flow.proto = proto;
  p->icmp = 1;
}

/* ICMP frag-needed to a VIP address (checked by the caller); q: the quoted IP header, qlen: the bytes of the quote
 * inside the outer datagram. The quote must be a first fragment (or none), whole up to 8 bytes of L4, IPv4 with IHL
 * 5, honest about its length, and from the address the ICMP is to. */
static __always_inline int parse_quoted_v4(struct iphdr *q, __u32 qlen, void *data_end, struct packet *p) {
  if ((void *)(q + 1) + 8 > data_end || qlen < IPV4_HDR_LEN + 8)
    return bad_quote(STAT_DROP_ICMP_QUOTE_TRUNCATED, p);
  if (q->version != 4)
    return bad_quote(STAT_DROP_ICMP_QUOTE_VERSION, p);
  if (q->ihl < 5 || bpf_ntohs(q->tot_len) < IPV4_HDR_LEN + 8)
    return bad_quote(STAT_DROP_ICMP_QUOTE_LENGTH, p);
  if (q->ihl != 5)
    return bad_quote(STAT_DROP_IP_OPTIONS, p);
  if (q->frag_off & bpf_htons(LB_IP_OFFSET))
    return bad_quote(STAT_DROP_ICMP_QUOTE_FRAGMENT, p);
  if (q->protocol != IPPROTO_TCP && q->protocol != IPPROTO_UDP) {
    count(STAT_PASS_OTHER, p->ip_len);
    return XDP_PASS;
  }
  if (q->saddr != p->flow.dst[0])
    return bad_quote(STAT_DROP_ICMP_QUOTE_MISMATCH, p);
  p->flow.src[0] = q->daddr;
  flow_from_quote(p, (void *)(q + 1), q->protocol);
  return LB_CONTINUE;
}

static __always_inline int parse_quoted_v6(struct ipv6hdr *q, __u32 qlen, void *data_end, struct packet *p) {
  if ((void *)(q + 1) > data_end || qlen < IPV6_HDR_LEN + 8)
    return bad_quote(STAT_DROP_ICMP_QUOTE_TRUNCATED, p);
  if (q->version != 6)
    return bad_quote(STAT_DROP_ICMP_QUOTE_VERSION, p);
  __u8 proto = q->nexthdr;
  __u32 off = IPV6_HDR_LEN;
  int ext = skip_ext_v6(q, data_end, qlen, &proto, &off, 1);
  if (ext == EXT_FRAGMENT)
    return bad_quote(STAT_DROP_ICMP_QUOTE_FRAGMENT, p);
  if (ext == EXT_TRUNCATED)
    return bad_quote(STAT_DROP_ICMP_QUOTE_TRUNCATED, p);
  if (ext != LB_CONTINUE || (proto != IPPROTO_TCP && proto != IPPROTO_UDP)) {
    count(STAT_PASS_OTHER, p->ip_len);
    return XDP_PASS;
  }
  if (off > LB_EXT_MAX_OFF)
    return bad_quote(STAT_DROP_ICMP_QUOTE_TRUNCATED, p);
  __u16 *ports = (void *)q + off;
  if ((void *)(ports + 4) > data_end || off + 8 > qlen)
    return bad_quote(STAT_DROP_ICMP_QUOTE_TRUNCATED, p);
  if (bpf_ntohs(q->payload_len) + IPV6_HDR_LEN < off + 8)
    return bad_quote(STAT_DROP_ICMP_QUOTE_LENGTH, p);
  __u32 *src = (__u32 *)&q->saddr;
  if ((src[0] ^ p->flow.dst[0]) | (src[1] ^ p->flow.dst[1]) | (src[2] ^ p->flow.dst[2]) |
      (src[3] ^ p->flow.dst[3]))
    return bad_quote(STAT_DROP_ICMP_QUOTE_MISMATCH, p);
  __builtin_memcpy(p->flow.src, &q->daddr, 16);
  flow_from_quote(p, ports, proto);
  return LB_CONTINUE;
}

/* A length field claiming more than the frame holds (or less than a header) is left to the kernel, which
 * drops it: encapsulating it would send a header that lies. Trailing bytes (Ethernet padding) are kept. */
static __always_inline int lengths_bad(struct packet *p, void *ip, void *data_end, __u32 hdr_len) {
  p->l3_len = data_end - ip;
  return p->ip_len > p->l3_len || p->ip_len < hdr_len;
}

/* ICMP / ICMPv6 echo to a VIP address: answered in place (addresses and Ethernet swapped, TTL 64, type changed,
 * checksum updated as RFC 1624 says), unless switched off for the address or asked by a multicast source. */
static __always_inline void swap_macs(struct ethhdr *eth) {
  __u8 mac[ETH_ALEN];
  __builtin_memcpy(mac, eth->h_source, ETH_ALEN);
  __builtin_memcpy(eth->h_source, eth->h_dest, ETH_ALEN);
  __builtin_memcpy(eth->h_dest, mac, ETH_ALEN);
}

/* The echo request's type byte becomes `reply`; the ICMP checksum follows (RFC 1624, eqn. 3). */
static __always_inline void echo_type(__u8 *icmp, __u8 reply) {
  __u16 *w = (__u16 *)icmp;
  __u16 old = w[0];
  icmp[0] = reply;
  __u32 sum = (__u16)~w[1] + (__u16)~old + w[0];
  sum = (sum & 0xffff) + (sum >> 16);
  sum = (sum & 0xffff) + (sum >> 16);
  w[1] = ~sum;
}

/* 1: answer, 0: passed (echo off for the address, or a multicast source), counted either way. */
static __always_inline int echo_wanted(struct packet *p, __u8 multicast_src) {
  if (!maybe_vip(p->flow.dst)) {
    count(STAT_PASS_NOT_VIP, p->ip_len);
    return 0;
  }
  struct vip_key k = {};
  __builtin_memcpy(k.addr, p->flow.dst, 16);
  k.family = p->flow.family;
  __u32 *flags = vip_addrs.lookup(&k);
  if (!flags) {
    count(STAT_PASS_NOT_VIP, p->ip_len);
    return 0;
  }
  if ((*flags & VIP_ADDR_NO_ECHO) || multicast_src) {
    count(STAT_PASS_OTHER, p->ip_len);
    return 0;
  }
  count(STAT_TX_ICMP_ECHO_REPLY, p->ip_len);
  return 1;
}

static __always_inline int echo_v4(void *data, struct iphdr *ip, __u8 *icmp, struct packet *p) {
  if (!echo_wanted(p, (((__u8 *)&ip->saddr)[0] & 0xf0) >= 0xe0)) /* 224/4 multicast, 240/4 and broadcast */
    return XDP_PASS;
  swap_macs(data);
  ip->saddr = p->flow.dst[0];
  ip->daddr = p->flow.src[0];
  ip->ttl = OUTER_TTL;
  ip->check = 0;
  ip->check = ipv4_csum(ip);
  echo_type(icmp, LB_ICMP_ECHOREPLY);
  return XDP_TX;
}

static __always_inline int echo_v6(void *data, struct ipv6hdr *ip6, __u8 *icmp, struct packet *p) {
  if (!echo_wanted(p, ((__u8 *)&ip6->saddr)[0] == 0xff))
    return XDP_PASS;
  swap_macs(data);
  __builtin_memcpy(&ip6->saddr, p->flow.dst, 16);
  __builtin_memcpy(&ip6->daddr, p->flow.src, 16);
  ip6->hop_limit = OUTER_TTL;
  echo_type(icmp, LB_ICMPV6_ECHO_REPLY); /* the pseudo-header sum does not change when its addresses swap */
  return XDP_TX;
}

static __always_inline int parse_v4(void *data, void *data_end, struct packet *p) {
  struct iphdr *ip = data + sizeof(struct ethhdr);
  if ((void *)(ip + 1) > data_end || ip->version != 4 || ip->ihl < 5)
    return malformed();
  p->flow.family = LB_FAMILY_V4;
  p->flow.src[0] = ip->saddr;
  p->flow.dst[0] = ip->daddr;
  p->flow.proto = ip->protocol;
  p->ip_len = bpf_ntohs(ip->tot_len);
  if (lengths_bad(p, ip, data_end, ip->ihl * 4))
    return malformed();
  p->tos = ip->tos;
  p->df = ip->frag_off & bpf_htons(LB_IP_DF);
  if (ip->frag_off & bpf_htons(LB_IP_MF | LB_IP_OFFSET))
    return drop_if_vip(p->flow.dst, LB_FAMILY_V4, STAT_DROP_FRAGMENT, p->ip_len);
  if (ip->ihl != 5)
    return drop_if_vip(p->flow.dst, LB_FAMILY_V4, STAT_DROP_IP_OPTIONS, p->ip_len);
  void *l4 = ip + 1;
  __u32 l4_len = p->ip_len - IPV4_HDR_LEN;
  if (ip->protocol == IPPROTO_TCP || ip->protocol == IPPROTO_UDP)
    return parse_ports(l4, l4_len, data_end, p);
  if (ip->protocol == IPPROTO_ICMP) {
    __u8 *icmp = l4;
    if ((void *)(icmp + 8) > data_end || l4_len < 8)
      return malformed();
    if (icmp[0] == LB_ICMP_DEST_UNREACH && icmp[1] == LB_ICMP_FRAG_NEEDED) {
      if (!is_vip_addr(p->flow.dst, LB_FAMILY_V4)) {
        count(STAT_PASS_NOT_VIP, p->ip_len);
        return XDP_PASS;
      }
      return parse_quoted_v4((void *)(icmp + 8), l4_len - 8, data_end, p);
    }
    if (icmp[0] == LB_ICMP_ECHO && icmp[1] == 0)
      return echo_v4(data, ip, icmp, p);
  }
  return drop_if_vip(p->flow.dst, LB_FAMILY_V4, STAT_PASS_OTHER, p->ip_len);
}

static __always_inline int parse_v6(void *data, void *data_end, struct packet *p) {
  struct ipv6hdr *ip6 = data + sizeof(struct ethhdr);
  if ((void *)(ip6 + 1) > data_end || ip6->version != 6)
    return malformed();
  p->flow.family = LB_FAMILY_V6;
  __builtin_memcpy(p->flow.src, &ip6->saddr, 16);
  __builtin_memcpy(p->flow.dst, &ip6->daddr, 16);
  p->ip_len = bpf_ntohs(ip6->payload_len) + IPV6_HDR_LEN;
  if (lengths_bad(p, ip6, data_end, IPV6_HDR_LEN))
    return malformed();
  p->tos = (ip6->priority << 4) | (ip6->flow_lbl[0] >> 4);
  __u8 proto = ip6->nexthdr;
  __u32 off = IPV6_HDR_LEN;
  if (proto != IPPROTO_TCP && proto != IPPROTO_UDP) { /* the common case has no extension header to walk */
    int ext = skip_ext_v6(ip6, data_end, p->ip_len, &proto, &off, 0);
    if (ext == EXT_FRAGMENT)
      return drop_if_vip(p->flow.dst, LB_FAMILY_V6, STAT_DROP_FRAGMENT, p->ip_len);
    if (ext == EXT_TRUNCATED || off > LB_EXT_MAX_OFF)
      return malformed();
    if (ext != LB_CONTINUE)
      return drop_if_vip(p->flow.dst, LB_FAMILY_V6, STAT_PASS_OTHER, p->ip_len);
  }
  p->flow.proto = proto;
  void *l4 = (void *)ip6 + off;
  if (off > p->ip_len)
    return malformed();
  __u32 l4_len = p->ip_len - off;
  if (proto == IPPROTO_TCP || proto == IPPROTO_UDP)
    return parse_ports(l4, l4_len, data_end, p);
  if (proto == IPPROTO_ICMPV6) {
    __u8 *icmp = l4;
    if ((void *)(icmp + 8) > data_end || l4_len < 8)
      return malformed();
    if (icmp[0] == LB_ICMPV6_PKT_TOOBIG) {
      if (!is_vip_addr(p->flow.dst, LB_FAMILY_V6)) {
        count(STAT_PASS_NOT_VIP, p->ip_len);
        return XDP_PASS;
      }
      return parse_quoted_v6((void *)(icmp + 8), l4_len - 8, data_end, p);
    }
    if (icmp[0] == LB_ICMPV6_ECHO_REQUEST && icmp[1] == 0 && off == IPV6_HDR_LEN) /* no extension header */
      return echo_v6(data, ip6, icmp, p);
  }
  return drop_if_vip(p->flow.dst, LB_FAMILY_V6, STAT_PASS_OTHER, p->ip_len);
}

/* The prefilter already let the destination through (surely_not_vip, the same address in every case). */
static __always_inline struct vip_meta *find_vip(struct packet *p, struct lb_ctl *ctl) {
  struct vip_key k = {};
  __builtin_memcpy(k.addr, p->flow.dst, 16);
  k.port = p->flow.dport;
  k.proto = p->flow.proto;
  k.family = p->flow.family;
  struct vip_meta *vip = vips.lookup(&k);
  if (vip || !ctl->port0_vips)
    return vip;
  k.port = 0;
  return vips.lookup(&k);
}

/* One more event in this CPU's one-second window r, unless `limit` of them already happened in it. */
static __always_inline int within_rate(struct lb_rate *r, __u64 limit) {
  __u64 now = bpf_ktime_get_ns();
  if (now - r->window_start >= LB_NSEC_PER_SEC) {
    r->window_start = now;
    r->sent = 0;
  }
  if (r->sent >= limit)
    return 0;
  r->sent++;
  return 1;
}

/* As within_rate, but the clock is read only once `limit` inserts were counted in the window (below the limit, the
 * common case, an insert costs an increment): a window still lasts at least a second and holds at most `limit`. */
static __always_inline int new_flow_allowed(struct lb_rate *r, __u64 limit) {
  if (r->sent < limit) {
    r->sent++;
    return 1;
  }
  __u64 now = bpf_ktime_get_ns();
  if (now - r->window_start < LB_NSEC_PER_SEC)
    return 0;
  r->window_start = now;
  r->sent = 1;
  return 1;
}

/* The flood guard (Katran's MAX_CONN_RATE): a new flow goes into the connection table only while this CPU has
 * inserted fewer than ctl->new_flow_rate this second. Beyond, it is served from the ring without an insert, so a
 * flood of new flows cannot evict the entries of established ones (the LRU lists are per CPU). */
static __always_inline void remember_flow(struct packet *p, __u32 idx, struct lb_ctl *ctl) {
  __u32 zero = 0;
  struct lb_rate *r = flow_rate.lookup(&zero);
  if (!r || !new_flow_allowed(r, ctl->new_flow_rate)) {
    count(STAT_CT_FLOOD_NO_INSERT, 0);
    return;
  }
  struct conn c = {.backend_idx = idx};
  conn_table.update(&p->flow, &c);
}

/* Backend index for the flow: the connection table unless SYN, a stale entry or a miss; else the ring. A VIP
 * with VIP_F_NO_CONNTRACK always takes the ring. */
static __always_inline __u32 pick_backend(struct packet *p, struct vip_meta *vip, __u32 hash,
                                          struct backend **be, struct lb_ctl *ctl) {
  int stateless = vip->flags & VIP_F_NO_CONNTRACK;
  if (!p->syn && !stateless) {
    struct conn *c = conn_table.lookup(&p->flow);
    if (c) {
      __u32 idx = c->backend_idx;
      *be = backends.lookup(&idx);
      /* vip_num check: a freed index may since belong to another VIP's backend. */
      if (*be && ((*be)->flags & BACKEND_F_UP) && (*be)->vip_num == vip->vip_num) {
        count(STAT_CT_HIT, 0);
        return idx;
      }
    }
  }
  count(stateless ? STAT_CT_STATELESS : STAT_CT_MISS, 0);
  if (vip->flags & VIP_F_HASH_SOURCE)
    hash = source_hash(&p->flow);
  __u32 slot = vip->vip_num * RING_SIZE + hash % RING_SIZE;
  __u32 *ring_idx = rings.lookup(&slot);
  if (!ring_idx || !*ring_idx)
    return 0;
  __u32 idx = *ring_idx;
  *be = backends.lookup(&idx);
  if (!*be)
    return 0;
  if (!p->icmp && !stateless)
    remember_flow(p, idx, ctl);
  return idx;
}

static __always_inline void write_eth(struct ethhdr *eth, struct lb_ctl *ctl, __u16 proto) {
  __builtin_memcpy(eth->h_dest, ctl->gw_mac, ETH_ALEN);
  __builtin_memcpy(eth->h_source, ctl->own_mac, ETH_ALEN);
  eth->h_proto = bpf_htons(proto);
}

/* What the outer header's protocol / next header says follows it. */
static __always_inline __u8 outer_proto(struct packet *p, int gue) {
  if (gue)
    return IPPROTO_UDP;
  return p->flow.family == LB_FAMILY_V4 ? IPPROTO_IPIP : IPPROTO_IPV6;
}

static __always_inline int encap_v4(struct xdp_md *ctx, struct packet *p, struct backend *be,
                                    struct lb_ctl *ctl, __u32 hash) {
  int gue = be->flags & BACKEND_F_GUE;
  int hdr_len = IPV4_HDR_LEN + (gue ? GUE_UDP_LEN : 0);
  if (bpf_xdp_adjust_head(ctx, 0 - hdr_len))
    return STAT_DROP_ENCAP_FAILED;
  void *data = (void *)(long)ctx->data;
  void *data_end = (void *)(long)ctx->data_end;
  struct ethhdr *eth = data;
  struct iphdr *outer = data + sizeof(struct ethhdr);
  struct udphdr *udp = (void *)(outer + 1); /* GUE only; inside the frame either way (the inner packet is there) */
  if ((void *)(udp + 1) > data_end)
    return STAT_DROP_ENCAP_FAILED;
  write_eth(eth, ctl, ETH_P_IP);
  if (gue)
    gue_udp_header(udp, hash, p->ip_len, GUE_PORT);
  outer->version = 4;
  outer->ihl = 5;
  outer->tos = p->tos;
  outer->tot_len = bpf_htons(p->ip_len + hdr_len);
  /* DF copied (path MTU discovery keeps working for the client). A DF-clear packet may be fragmented on the way
   * to the backend: its outer ID must then vary (RFC 6864), so it is random per packet and never 0. */
  __u16 id = 0;
  if (!p->df) {
    id = bpf_get_prandom_u32();
    id += !id;
  }
  outer->id = bpf_htons(id);
  outer->frag_off = p->df;
  outer->ttl = OUTER_TTL;
  outer->protocol = outer_proto(p, gue);
  outer->check = 0;
  outer->saddr = ctl->encap_v4_prefix | (hash & ctl->encap_v4_hostmask);
  outer->daddr = be->addr[0];
  outer->check = ipv4_csum(outer);
  return LB_CONTINUE;
}

static __always_inline int encap_v6(struct xdp_md *ctx, struct packet *p, struct backend *be,
                                    struct lb_ctl *ctl, __u32 hash) {
  int gue = be->flags & BACKEND_F_GUE;
  int extra = gue ? GUE_UDP_LEN : 0;
  if (bpf_xdp_adjust_head(ctx, 0 - (IPV6_HDR_LEN + extra)))
    return STAT_DROP_ENCAP_FAILED;
  void *data = (void *)(long)ctx->data;
  void *data_end = (void *)(long)ctx->data_end;
  struct ethhdr *eth = data;
  struct ipv6hdr *outer = data + sizeof(struct ethhdr);
  struct udphdr *udp = (void *)(outer + 1);
  if ((void *)(udp + 1) > data_end)
    return STAT_DROP_ENCAP_FAILED;
  write_eth(eth, ctl, ETH_P_IPV6);
  if (gue)
    gue_udp_header(udp, hash, p->ip_len, GUE_PORT);
  outer->version = 6;
  outer->priority = p->tos >> 4;
  /* Flow label from the flow hash: routers and NICs spread tunnelled flows by it. */
  outer->flow_lbl[0] = (p->tos << 4) | ((hash >> 16) & 0x0f);
  outer->flow_lbl[1] = hash >> 8;
  outer->flow_lbl[2] = hash;
  outer->payload_len = bpf_htons(p->ip_len + extra);
  outer->nexthdr = outer_proto(p, gue);
  outer->hop_limit = OUTER_TTL;
  __u32 *src = (__u32 *)&outer->saddr;
  src[0] = ctl->encap_v6_prefix[0];
  src[1] = ctl->encap_v6_prefix[1];
  src[2] = ctl->encap_v6_prefix[2];
  src[3] = ctl->encap_v6_prefix[3] | (hash & ctl->encap_v6_hostmask);
  __builtin_memcpy(&outer->daddr, be->addr, 16);
  return LB_CONTINUE;
}

/* ICMP too-big replies: at most ICMP_TOO_BIG_RATE per CPU per second (a flood of big packets must not turn the
 * LB into an ICMP cannon). */
static __always_inline int too_big_reply_allowed(void) {
  __u32 zero = 0;
  struct lb_rate *r = icmp_rate.lookup(&zero);
  return r && within_rate(r, ICMP_TOO_BIG_RATE);
}

static __always_inline __u16 lb_csum_fold(__u32 csum) {
  csum = (csum & 0xffff) + (csum >> 16);
  csum = (csum & 0xffff) + (csum >> 16);
  return ~csum;
}

/* Turn the frame into [Ethernet][IP header of hdr_len][ICMP header 8][the first quote_len bytes of the client's IP
 * packet]: cut the tail, then grow the head. The Ethernet addresses are swapped (back to the router that sent
 * it). Returns 0, or -1 when the kernel refuses a resize. */
static __always_inline int make_reply_room(struct xdp_md *ctx, int hdr_len, int quote_len, __u16 proto) {
  void *data = (void *)(long)ctx->data;
  void *data_end = (void *)(long)ctx->data_end;
  struct ethhdr *eth = data;
  if ((void *)(eth + 1) > data_end)
    return -1;
  __u8 macs[12];
  __builtin_memcpy(macs, eth->h_source, ETH_ALEN);
  __builtin_memcpy(macs + ETH_ALEN, eth->h_dest, ETH_ALEN);
  int frame_len = data_end - data;
  if (bpf_xdp_adjust_tail(ctx, (int)sizeof(struct ethhdr) + quote_len - frame_len))
    return -1;
  if (bpf_xdp_adjust_head(ctx, 0 - (hdr_len + 8)))
    return -1;
  data = (void *)(long)ctx->data;
  data_end = (void *)(long)ctx->data_end;
  eth = data;
  if ((void *)(eth + 1) > data_end)
    return -1;
  __builtin_memcpy(eth->h_dest, macs, ETH_ALEN);
  __builtin_memcpy(eth->h_source, macs + ETH_ALEN, ETH_ALEN);
  eth->h_proto = bpf_htons(proto);
  return 0;
}

/* ICMP "fragmentation needed" from the VIP to the client, next-hop MTU = mtu. */
static __always_inline int reply_too_big_v4(struct xdp_md *ctx, struct packet *p, __u16 mtu) {
  if (make_reply_room(ctx, IPV4_HDR_LEN, ICMP4_QUOTE_LEN, ETH_P_IP))
    return -1;
  void *data = (void *)(long)ctx->data;
  void *data_end = (void *)(long)ctx->data_end;
  struct iphdr *ip = data + sizeof(struct ethhdr);
  __u8 *icmp = (void *)(ip + 1);
  __u8 *quote = icmp + 8;
  if ((void *)(quote + ICMP4_QUOTE_LEN) > data_end)
    return -1;
  ip->version = 4;
  ip->ihl = 5;
  ip->tos = 0;
  ip->tot_len = bpf_htons(IPV4_HDR_LEN + 8 + ICMP4_QUOTE_LEN);
  __u16 id = bpf_get_prandom_u32();
  ip->id = id + !id;
  ip->frag_off = 0;
  ip->ttl = OUTER_TTL;
  ip->protocol = LB_ICMP_PROTO;
  ip->check = 0;
  ip->saddr = p->flow.dst[0];
  ip->daddr = p->flow.src[0];
  ip->check = ipv4_csum(ip);
  __u16 *w = (__u16 *)icmp;
  icmp[0] = LB_ICMP_DEST_UNREACH;
  icmp[1] = LB_ICMP_FRAG_NEEDED;
  w[1] = 0; /* checksum */
  w[2] = 0; /* unused */
  w[3] = bpf_htons(mtu);
  __u32 sum = bpf_csum_diff(0, 0, (void *)icmp, 8, 0);
  sum = bpf_csum_diff(0, 0, (void *)quote, 512, sum);
  sum = bpf_csum_diff(0, 0, (void *)(quote + 512), ICMP4_QUOTE_LEN - 512, sum);
  w[1] = lb_csum_fold(sum);
  return 0;
}

/* ICMPv6 "packet too big" from the VIP to the client, MTU = mtu. */
static __always_inline int reply_too_big_v6(struct xdp_md *ctx, struct packet *p, __u16 mtu) {
  if (make_reply_room(ctx, IPV6_HDR_LEN, ICMP6_QUOTE_LEN, ETH_P_IPV6))
    return -1;
  void *data = (void *)(long)ctx->data;
  void *data_end = (void *)(long)ctx->data_end;
  struct ipv6hdr *ip6 = data + sizeof(struct ethhdr);
  __u8 *icmp = (void *)(ip6 + 1);
  __u8 *quote = icmp + 8;
  if ((void *)(quote + ICMP6_QUOTE_LEN) > data_end)
    return -1;
  ip6->version = 6;
  ip6->priority = 0;
  ip6->flow_lbl[0] = 0;
  ip6->flow_lbl[1] = 0;
  ip6->flow_lbl[2] = 0;
  ip6->payload_len = bpf_htons(8 + ICMP6_QUOTE_LEN);
  ip6->nexthdr = LB_ICMPV6_PROTO;
  ip6->hop_limit = OUTER_TTL;
  __builtin_memcpy(&ip6->saddr, p->flow.dst, 16);
  __builtin_memcpy(&ip6->daddr, p->flow.src, 16);
  __u32 *w = (__u32 *)icmp;
  icmp[0] = LB_ICMPV6_PKT_TOOBIG;
  icmp[1] = 0;
  icmp[2] = 0; /* checksum */
  icmp[3] = 0;
  w[1] = bpf_htonl(mtu);
  __be32 pseudo[2] = {bpf_htonl(8 + ICMP6_QUOTE_LEN), bpf_htonl(LB_ICMPV6_PROTO)};
  __u32 sum = bpf_csum_diff(0, 0, (void *)&ip6->saddr, 32, 0);
  sum = bpf_csum_diff(0, 0, pseudo, sizeof(pseudo), sum);
  sum = bpf_csum_diff(0, 0, (void *)icmp, 8, sum);
  sum = bpf_csum_diff(0, 0, (void *)quote, 512, sum);
  sum = bpf_csum_diff(0, 0, (void *)(quote + 512), 512, sum);
  sum = bpf_csum_diff(0, 0, (void *)(quote + 1024), ICMP6_QUOTE_LEN - 1024, sum);
  __u16 folded = lb_csum_fold(sum);
  __builtin_memcpy(icmp + 2, &folded, 2);
  return 0;
}

/* A client packet too big once encapsulated (itself, not only its padding): tell the client, rate-limited. */
static __always_inline int reply_too_big(struct xdp_md *ctx, struct packet *p, __u16 mtu) {
  if (!too_big_reply_allowed()) {
    count(STAT_TOO_BIG_RATE_LIMITED, p->ip_len);
    return XDP_DROP;
  }
  int err = p->flow.family == LB_FAMILY_V4 ? reply_too_big_v4(ctx, p, mtu) : reply_too_big_v6(ctx, p, mtu);
  if (err) {
    count(STAT_DROP_ENCAP_FAILED, p->ip_len);
    return XDP_DROP;
  }
  count(STAT_TX_TOO_BIG_REPLY, p->ip_len);
  return XDP_TX;
}

static __always_inline int balance(struct xdp_md *ctx, struct packet *p, struct lb_ctl *ctl) {
  struct vip_meta *vip = find_vip(p, ctl);
  if (!vip) {
    count(STAT_PASS_NOT_VIP, p->ip_len);
    return XDP_PASS;
  }
  __u32 hash = flow_hash(&p->flow);
  struct backend *be = NULL;
  __u32 idx = pick_backend(p, vip, hash, &be, ctl);
  if (!idx || !be) {
    count(STAT_DROP_NO_BACKEND, p->ip_len);
    return XDP_DROP;
  }
  int v6 = be->flags & BACKEND_F_IPV6;
  __u32 overhead = (v6 ? IPV6_HDR_LEN : IPV4_HDR_LEN) + (be->flags & BACKEND_F_GUE ? GUE_UDP_LEN : 0);
  if (p->l3_len + overhead > ctl->mtu) { /* what really goes on the wire */
    count(STAT_DROP_TOO_BIG, p->ip_len);
    /* The client is told when its packet itself is too big (not only its padding), unless it is an ICMP error
     * itself. IPv4 without DF too (as Katran does): fragmenting here would need the reassembly we refuse. */
    if (ICMP_TOO_BIG_RATE && !p->icmp && p->ip_len + overhead > ctl->mtu)
      return reply_too_big(ctx, p, ctl->mtu - overhead);
    return XDP_DROP;
  }
  __u32 vip_num = vip->vip_num;
  struct backend dst = *be; /* copy: the map value may change under us while we rewrite the packet */
  int err = v6 ? encap_v6(ctx, p, &dst, ctl, hash) : encap_v4(ctx, p, &dst, ctl, hash);
  if (err != LB_CONTINUE) {
    count(err, p->ip_len);
    return XDP_DROP;
  }
  count_in(vip_stats.lookup(&vip_num), p->ip_len);
  count_in(backend_stats.lookup(&idx), p->ip_len);
  count(p->icmp ? STAT_TX_ICMP_TOO_BIG : STAT_TX, p->ip_len);
  return XDP_TX;
}

int balancer(struct xdp_md *ctx) {
  void *data = (void *)(long)ctx->data;
  void *data_end = (void *)(long)ctx->data_end;
  struct ethhdr *eth = data;
  struct packet p = {};
  __u32 zero = 0;
  int verdict;

  if ((void *)(eth + 1) > data_end) {
    count(STAT_PASS_NOT_IP, 0);
    return XDP_PASS;
  }
  __u16 h_proto = eth->h_proto;
  if (h_proto != bpf_htons(ETH_P_IP) && h_proto != bpf_htons(ETH_P_IPV6)) {
    count(STAT_PASS_NOT_IP, 0);
    return XDP_PASS;
  }
  if (surely_not_vip(data, data_end, h_proto)) {
    count(STAT_PASS_NOT_VIP, 0);
    return XDP_PASS;
  }
  struct lb_ctl *cfg = ctl.lookup(&zero);
  if (!cfg)
    return XDP_PASS;
  if (h_proto == bpf_htons(ETH_P_IP))
    verdict = parse_v4(data, data_end, &p);
  else
    verdict = parse_v6(data, data_end, &p);
  if (verdict != LB_CONTINUE)
    return verdict;
  return balance(ctx, &p, cfg);
}
