/* SPDX-License-Identifier: GPL-2.0 */
/* Every map of the decapsulator, one commented block each. Nothing is pinned: an attached program keeps its
 * maps alive, and attaching again replaces both. */
#ifndef EDGE_LB_DECAP_MAPS_H
#define EDGE_LB_DECAP_MAPS_H

#include "decap_structs.h"

/* The host's own addresses: an encapsulated packet is stripped only when its outer destination is here.
 * The value is unused (presence is the answer). Filled by edge_lb/dataplane/decap.py. */
BPF_HASH(decap_addrs, struct decap_addr_key, __u8, DECAP_MAX_ADDRS);

/* Counters, one slot per CPU: no atomics on the packet path. */
BPF_PERCPU_ARRAY(decap_stats, struct decap_stats, 1);

#endif
