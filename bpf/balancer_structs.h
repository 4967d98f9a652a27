/* SPDX-License-Identifier: GPL-2.0 */
/* Every map key and value of the edge-lb data plane: the single source of each layout.
 * Python reads these layouts from bcc (table.Key / table.Leaf); nothing re-declares them by hand.
 * Addresses: 16 bytes in network order; an IPv4 address fills addr[0] and leaves the rest zero. */
#ifndef EDGE_LB_STRUCTS_H
#define EDGE_LB_STRUCTS_H

/* vips key: one service. Also the vip_addrs key with port = 0 and proto = 0. */
struct vip_key {
  __u32 addr[4];   /* VIP address, network order */
  __u16 port;      /* network order; 0 = every port */
  __u8 proto;      /* IPPROTO_TCP or IPPROTO_UDP */
  __u8 family;     /* LB_FAMILY_V4 / LB_FAMILY_V6 */
};

/* vips value. */
struct vip_meta {
  __u32 vip_num;   /* < MAX_VIPS: index of its ring (rings) and its counters (vip_stats) */
  __u32 flags;     /* VIP_F_* */
};

/* backends value (index 0 unused). One entry per (VIP, backend address) pair. */
struct backend {
  __u32 addr[4];   /* backend address, network order */
  __u32 flags;     /* BACKEND_F_* */
  __u32 vip_num;   /* owning VIP: a restarted supervisor rebuilds its index allocation from the maps */
};

/* conn_table key: the client's flow as it arrives (client -> VIP). Padding must be zero. */
struct flow_key {
  __u32 src[4];    /* client address */
  __u32 dst[4];    /* VIP address */
  __u16 sport;     /* network order */
  __u16 dport;     /* network order */
  __u8 proto;
  __u8 family;
  __u16 pad;
};

/* conn_table value. */
struct conn {
  __u32 backend_idx; /* index into backends */
};

/* Per-CPU counter used by vip_stats, backend_stats and reason_stats. */
struct lb_counter {
  __u64 packets;
  __u64 bytes;     /* IP bytes before encapsulation */
};

/* ctl[0]: node-wide settings written by the control plane. */
struct lb_ctl {
  __u8 own_mac[6];          /* Ethernet source of what we send */
  __u8 gw_mac[6];           /* Ethernet destination: the gateway */
  __u16 mtu;                /* host order: largest IP packet we may send */
  __u16 port0_vips;         /* host order: count of port-0 VIPs; 0 skips the second VIP lookup */
  __u32 encap_v4_prefix;    /* network order: outer IPv4 source prefix */
  __u32 encap_v4_hostmask;  /* network order: outer IPv4 source bits taken from the flow hash */
  __u32 encap_v6_prefix[4]; /* network order: outer IPv6 source prefix */
  __u32 encap_v6_hostmask;  /* network order: bits of the last word taken from the flow hash */
  __u32 new_flow_rate;      /* host order: connection-table inserts per CPU per second; new flows beyond it take
                             * the ring without an insert ([dataplane] new_flow_rate_limit) */
};

/* icmp_rate and flow_rate value: one CPU's events (ICMP too-big replies, connection-table inserts) in the current
 * one-second window. */
struct lb_rate {
  __u64 window_start; /* bpf_ktime_get_ns() when the window began */
  __u64 sent;         /* events in it */
};

#endif
