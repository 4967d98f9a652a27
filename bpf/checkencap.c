// SPDX-License-Identifier: GPL-2.0
/* edge-lb check encapsulator: a tc egress program on the LB node's interface. A packet whose mark is in the
 * tunnel-check range (CHECK_MARK_BASE | backend index, set with SO_MARK on the check's socket) is wrapped toward
 * that backend exactly as balancer.c wraps a client packet: IPIP for an IPv4 backend, IP6IP6 / 4in6 for an IPv6
 * one, the same in UDP (GUE, gue.h) for a backend with BACKEND_F_GUE, outer source = the encap prefix | the flow
 * hash's low bits, TTL 64, TOS / traffic class and DF copied. So the check reaches the service through the
 * backend's decapsulation and the VIP on its lo, as clients do. Everything unmarked leaves untouched. It reads the balancer's own backends and ctl maps, adopted from their
 * pins: what the change path writes for clients is what the checks follow. */
#include <uapi/linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>

#include "balancer_consts.h"
#include "balancer_structs.h"
#include "checkencap_consts.h"
#include "gue.h"
#include "lb_csum.h"
#include "lb_hash.h"

#ifndef PIN_DIR
#error "PIN_DIR (the balancer's pin directory: its backends and ctl maps are shared) must be given with -D"
#endif

/* The balancer's maps (balancer_maps.h), opened from their pins: backend index -> address and flags; ctl[0]. */
BPF_TABLE_PINNED("array", __u32, struct backend, backends, MAX_BACKENDS, PIN_DIR "/backends");
BPF_TABLE_PINNED("array", __u32, struct lb_ctl, ctl, 1, PIN_DIR "/ctl");

/* Per CPU, per enum check_stat: packets. */
BPF_TABLE_PINNED("percpu_array", __u32, __u64, check_stats, CHECK_STAT_MAX, PIN_DIR "/check_stats");

static __always_inline int counted(__u32 idx, int verdict) {
  __u64 *c = check_stats.lookup(&idx);
  if (c)
    (*c)++;
  return verdict;
}

/* The check's own flow (node -> VIP) as a client flow, for the hash; its TOS and DF. 0, or -1 if not IP. */
static __always_inline int read_flow(struct __sk_buff *skb, struct flow_key *f, __u8 *tos, __u16 *df) {
  __u16 ports[2] = {};
  if (skb->protocol == bpf_htons(ETH_P_IP)) {
    struct iphdr ip;
    if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) || ip.version != 4)
      return -1;
    f->family = LB_FAMILY_V4;
    f->src[0] = ip.saddr;
    f->dst[0] = ip.daddr;
    f->proto = ip.protocol;
    *tos = ip.tos;
    *df = ip.frag_off & bpf_htons(LB_IP_DF);
    bpf_skb_load_bytes(skb, ETH_HLEN + ip.ihl * 4, ports, sizeof(ports)); /* none: ports stay 0 */
  } else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
    struct ipv6hdr ip6;
    if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip6, sizeof(ip6)) || ip6.version != 6)
      return -1;
    f->family = LB_FAMILY_V6;
    __builtin_memcpy(f->src, &ip6.saddr, 16);
    __builtin_memcpy(f->dst, &ip6.daddr, 16);
    f->proto = ip6.nexthdr; /* a check's own packets carry no extension header */
    *tos = (ip6.priority << 4) | (ip6.flow_lbl[0] >> 4);
    bpf_skb_load_bytes(skb, ETH_HLEN + IPV6_HDR_LEN, ports, sizeof(ports));
  } else {
    return -1;
  }
  if (f->proto == IPPROTO_TCP || f->proto == IPPROTO_UDP) {
    f->sport = ports[0];
    f->dport = ports[1];
  }
  return 0;
}

/* Room for the outer IP header (ip_len bytes, at hand in `hdr`) plus, for a GUE backend, its UDP header, then both
 * written and the EtherType set. */
static __always_inline int push_outer(struct __sk_buff *skb, void *hdr, __u32 ip_len, __u64 l3_flag, int gue,
                                      __u32 hash, __u16 inner_len, __u16 ethertype) {
  __u64 flags = l3_flag | (gue ? BPF_F_ADJ_ROOM_ENCAP_L4_UDP : 0);
  if (bpf_skb_adjust_room(skb, ip_len + (gue ? GUE_UDP_LEN : 0), BPF_ADJ_ROOM_MAC, flags))
    return -1;
  __u16 proto = bpf_htons(ethertype);
  if (bpf_skb_store_bytes(skb, ETH_HLEN, hdr, ip_len, 0) ||
      bpf_skb_store_bytes(skb, offsetof(struct ethhdr, h_proto), &proto, sizeof(proto), 0))
    return -1;
  if (gue) {
    struct udphdr udp;
    gue_udp_header(&udp, hash, inner_len, GUE_PORT);
    if (bpf_skb_store_bytes(skb, ETH_HLEN + ip_len, &udp, sizeof(udp), 0))
      return -1;
  }
  return 0;
}

/* What the outer header says follows it: as balancer.c's outer_proto. */
static __always_inline __u8 next_proto(struct flow_key *f, int gue) {
  if (gue)
    return IPPROTO_UDP;
  return f->family == LB_FAMILY_V4 ? IPPROTO_IPIP : IPPROTO_IPV6;
}

static __always_inline int wrap_v4(struct __sk_buff *skb, struct flow_key *f, struct backend *be,
                                   struct lb_ctl *c, __u8 tos, __u16 df) {
  __u32 hash = flow_hash(f);
  int gue = be->flags & BACKEND_F_GUE;
  __u16 inner_len = skb->len - ETH_HLEN;
  struct iphdr o = {};
  o.version = 4;
  o.ihl = 5;
  o.tos = tos;
  o.tot_len = bpf_htons(inner_len + IPV4_HDR_LEN + (gue ? GUE_UDP_LEN : 0));
  if (!df) { /* as balancer.c: a fragmentable outer header gets a varying, non-zero ID (RFC 6864) */
    __u16 id = bpf_get_prandom_u32();
    o.id = bpf_htons(id + !id);
  }
  o.frag_off = df;
  o.ttl = OUTER_TTL;
  o.protocol = next_proto(f, gue);
  o.saddr = c->encap_v4_prefix | (hash & c->encap_v4_hostmask);
  o.daddr = be->addr[0];
  o.check = ipv4_csum(&o);
  if (push_outer(skb, &o, sizeof(o), BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, gue, hash, inner_len, ETH_P_IP))
    return counted(CHECK_DROP_ENCAP_FAILED, TC_ACT_SHOT);
  return counted(CHECK_ENCAP_V4, TC_ACT_OK);
}

static __always_inline int wrap_v6(struct __sk_buff *skb, struct flow_key *f, struct backend *be,
                                   struct lb_ctl *c, __u8 tos) {
  __u32 hash = flow_hash(f);
  int gue = be->flags & BACKEND_F_GUE;
  __u16 inner_len = skb->len - ETH_HLEN;
  struct ipv6hdr o = {};
  o.version = 6;
  o.priority = tos >> 4;
  o.flow_lbl[0] = (tos << 4) | ((hash >> 16) & 0x0f); /* the flow label from the flow hash, as balancer.c */
  o.flow_lbl[1] = hash >> 8;
  o.flow_lbl[2] = hash;
  o.payload_len = bpf_htons(inner_len + (gue ? GUE_UDP_LEN : 0));
  o.nexthdr = next_proto(f, gue);
  o.hop_limit = OUTER_TTL;
  __u32 *src = (__u32 *)&o.saddr;
  src[0] = c->encap_v6_prefix[0];
  src[1] = c->encap_v6_prefix[1];
  src[2] = c->encap_v6_prefix[2];
  src[3] = c->encap_v6_prefix[3] | (hash & c->encap_v6_hostmask);
  __builtin_memcpy(&o.daddr, be->addr, 16);
  if (push_outer(skb, &o, sizeof(o), BPF_F_ADJ_ROOM_ENCAP_L3_IPV6, gue, hash, inner_len, ETH_P_IPV6))
    return counted(CHECK_DROP_ENCAP_FAILED, TC_ACT_SHOT);
  return counted(CHECK_ENCAP_V6, TC_ACT_OK);
}

int checkencap(struct __sk_buff *skb) {
  __u32 mark = skb->mark;
  if ((mark & ~CHECK_MARK_INDEX_MASK) != CHECK_MARK_BASE)
    return TC_ACT_OK;
  __u32 idx = mark & CHECK_MARK_INDEX_MASK;
  __u32 zero = 0;
  struct backend *be = idx ? backends.lookup(&idx) : NULL;
  struct lb_ctl *c = ctl.lookup(&zero);
  /* A cleared slot (a removed backend) has neither flags nor address; a down IPv4 backend has an address. */
  if (!be || !c || (!be->flags && !be->addr[0]))
    return counted(CHECK_DROP_NO_BACKEND, TC_ACT_SHOT);
  struct flow_key f = {};
  __u8 tos = 0;
  __u16 df = 0;
  if (read_flow(skb, &f, &tos, &df))
    return counted(CHECK_DROP_NOT_IP, TC_ACT_SHOT);
  struct backend dst = *be; /* copy: the change path may rewrite the slot meanwhile */
  if (dst.flags & BACKEND_F_IPV6)
    return wrap_v6(skb, &f, &dst, c, tos);
  return wrap_v4(skb, &f, &dst, c, tos, df);
}
