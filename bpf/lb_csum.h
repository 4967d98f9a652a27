/* SPDX-License-Identifier: GPL-2.0 */
/* The IPv4 header checksum of an outer header built here, shared by balancer.c (IPIP/GUE, ICMP replies) and
 * checkencap.c (a tunnel health check's outer header). Needs balancer_consts.h (IPV4_HDR_LEN) first. */
#ifndef EDGE_LB_CSUM_H
#define EDGE_LB_CSUM_H

static __always_inline __u16 ipv4_csum(struct iphdr *ip) {
  __u32 sum = 0;
  __u16 *w = (__u16 *)ip;
#pragma clang loop unroll(full)
  for (int i = 0; i < IPV4_HDR_LEN / 2; i++)
    sum += w[i];
  sum = (sum & 0xffff) + (sum >> 16);
  sum = (sum & 0xffff) + (sum >> 16);
  return ~sum;
}

#endif
