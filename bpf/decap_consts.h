/* SPDX-License-Identifier: GPL-2.0 */
/* Every constant of the backend-side decapsulator (decap.c). Its size comes from the loader as a -D integer
 * (validated there: edge_lb/dataplane/decap.py). Not balancer_consts.h: that one needs the balancer's sizes. */
#ifndef EDGE_LB_DECAP_CONSTS_H
#define EDGE_LB_DECAP_CONSTS_H

#ifndef DECAP_MAX_ADDRS
#error "DECAP_MAX_ADDRS (capacity of decap_addrs) must be given with -D"
#endif
#ifndef DECAP_GUE_PORT
#error "DECAP_GUE_PORT (UDP port GUE arrives on: the balancer's [dataplane] gue_port) must be given with -D"
#endif

/* GUE variant 1 (direct IP): UDP header, then the inner IP packet (bpf/gue.h says how the balancer builds it). */
#define DECAP_UDP_LEN 8

/* decap_addr_key.family: the AF_* values, as the loader writes them (socket.AF_INET / socket.AF_INET6). */
#define DECAP_AF_INET 2
#define DECAP_AF_INET6 10

/* The two ECN bits of the IPv4 TOS / IPv6 traffic class, and their Congestion Experienced value. */
#define DECAP_ECN_MASK 3
#define DECAP_ECN_CE 3

/* The longest IPv4 header (IHL 15): an inner header's checksum is summed over at most this. */
#define DECAP_IPV4_MAX_HDR_LEN 60

/* IPv4 frag_off bits that mark a fragment (MF flag | offset), host order. */
#define DECAP_IPV4_MF_OFFSET 0x3fff

#endif
