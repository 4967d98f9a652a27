/* SPDX-License-Identifier: GPL-2.0 */
/* Every map key and value of the decapsulator (decap.c): the single source of each layout.
 * Python reads these layouts from bcc (table.Key / table.Leaf); nothing re-declares them by hand. */
#ifndef EDGE_LB_DECAP_STRUCTS_H
#define EDGE_LB_DECAP_STRUCTS_H

/* decap_addrs key. An IPv4 address sits in addr[0..3] with addr[4..15] zero. No padding: 16 + 4 bytes. */
struct decap_addr_key {
  __u8 addr[16]; /* the outer destination, network order */
  __u32 family;  /* DECAP_AF_INET or DECAP_AF_INET6, host order */
};

/* decap_stats value: one struct, so userspace reads fields by name (no index copied into Python). */
struct decap_stats {
  __u64 decap_v4; /* packets decapsulated whose outer header was IPv4 (IPIP) */
  __u64 decap_v6; /* packets decapsulated whose outer header was IPv6 (IP6IP6, 4in6) */
  __u64 passed;   /* packets passed untouched (everything not decapsulated) */
  __u64 gue;      /* of the decapsulated ones, those that came in GUE (UDP to DECAP_GUE_PORT) */
};

#endif
