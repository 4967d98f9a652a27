/* SPDX-License-Identifier: GPL-2.0 */
/* The flow hash, shared by balancer.c (ring slot, outer source, flow label) and checkencap.c (the outer source of
 * a tunnel health check), so a check's outer header is made exactly as a client packet's. Needs balancer_structs.h
 * and balancer_consts.h (FLOW_HASH_SEED, LB_FAMILY_V4) first. */
#ifndef EDGE_LB_HASH_H
#define EDGE_LB_HASH_H

static __always_inline __u32 lb_rol32(__u32 w, int s) { return (w << s) | (w >> (32 - s)); }

/* The kernel's jhash_3words (lookup3 final mix). */
static __always_inline __u32 jhash3(__u32 a, __u32 b, __u32 c, __u32 seed) {
  __u32 iv = seed + 0xdeadbeef + (3 << 2);
  a += iv;
  b += iv;
  c += iv;
  c ^= b; c -= lb_rol32(b, 14);
  a ^= c; a -= lb_rol32(c, 11);
  b ^= a; b -= lb_rol32(a, 25);
  c ^= b; c -= lb_rol32(b, 16);
  a ^= c; a -= lb_rol32(c, 4);
  b ^= a; b -= lb_rol32(a, 14);
  c ^= b; c -= lb_rol32(b, 24);
  return c;
}

/* Depends on packet fields only, so every node hashes a flow alike. */
static __always_inline __u32 flow_hash(const struct flow_key *f) {
  __u32 ports = ((__u32)f->sport << 16) | f->dport;
  if (f->family == LB_FAMILY_V4)
    return jhash3(f->src[0], f->dst[0] ^ f->proto, ports, FLOW_HASH_SEED);
  __u32 h = jhash3(f->src[0], f->src[1], f->src[2], FLOW_HASH_SEED);
  h = jhash3(f->src[3], f->dst[0], f->dst[1], h);
  return jhash3(f->dst[2], f->dst[3] ^ f->proto, ports, h);
}

#endif
