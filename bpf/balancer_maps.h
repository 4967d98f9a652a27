/* SPDX-License-Identifier: GPL-2.0 */
/* Every map of the balancer, one commented block each. With -DPIN_DIR="..." each map is pinned at
 * PIN_DIR/<name> (adopted if it already exists), so a restarted supervisor keeps the connection table. */
#ifndef EDGE_LB_MAPS_H
#define EDGE_LB_MAPS_H

#include "balancer_structs.h"

#ifdef PIN_DIR
#define LB_MAP(type, key, leaf, name, size, flags) \
  BPF_TABLE_PINNED(type, key, leaf, name, size, PIN_DIR "/" #name, flags)
#else
#define LB_MAP(type, key, leaf, name, size, flags) BPF_F_TABLE(type, key, leaf, name, size, flags)
#endif

/* VIP (address, port, protocol) -> its number. */
LB_MAP("hash", struct vip_key, struct vip_meta, vips, MAX_VIPS, 0);

/* VIP address alone (port 0, proto 0) -> count of VIPs on it, | VIP_ADDR_NO_ECHO when its ICMP echo is off. Read
 * only on slow paths (fragments, options, ICMP, other protocols) to tell "to a VIP" from "to someone else". */
LB_MAP("hash", struct vip_key, __u32, vip_addrs, MAX_VIPS, 0);

/* The VIP address prefilter: bit (bucket & 31) of word (bucket >> 5) is set while some VIP's address falls in
 * the bucket. The control plane sets bits before the VIPs they cover go in, and clears them after. */
LB_MAP("array", __u32, __u32, vip_filter, VIP_FILTER_WORDS, 0);

/* All Maglev rings, RING_SIZE slots per VIP number -> backend index (0 = none). Mmapable: the control plane
 * writes changed slots as stores into the map's memory, not a syscall copying every key and value. */
LB_MAP("array", __u32, __u32, rings, RINGS_ENTRIES, BPF_F_MMAPABLE);

/* Backend index -> address and flags. */
LB_MAP("array", __u32, struct backend, backends, MAX_BACKENDS, 0);

/* Client flow -> backend. LRU with per-CPU lists: no cross-CPU lock on the packet path. */
LB_MAP("lru_hash", struct flow_key, struct conn, conn_table, CONN_TABLE_SIZE, BPF_F_NO_COMMON_LRU);

/* Node settings, one entry. */
LB_MAP("array", __u32, struct lb_ctl, ctl, 1, 0);

/* Per CPU: the ICMP too-big replies of the current second (the rate limit). */
LB_MAP("percpu_array", __u32, struct lb_rate, icmp_rate, 1, 0);

/* Per CPU: the connection-table inserts of the current second (ctl.new_flow_rate, the flood guard). */
LB_MAP("percpu_array", __u32, struct lb_rate, flow_rate, 1, 0);

/* Counters: per VIP number, per backend index, per enum lb_stat. */
LB_MAP("percpu_array", __u32, struct lb_counter, vip_stats, MAX_VIPS, 0);
LB_MAP("percpu_array", __u32, struct lb_counter, backend_stats, MAX_BACKENDS, 0);
LB_MAP("percpu_array", __u32, struct lb_counter, reason_stats, STAT_MAX, 0);

#endif
