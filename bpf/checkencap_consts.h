/* SPDX-License-Identifier: GPL-2.0 */
/* Every constant of the check encapsulator (checkencap.c). The mark base comes from the loader as a -D integer
 * (validated there: edge_lb/dataplane/checkencap.py mirrors CHECK_MARK_INDEX_BITS, checked by test_layout). */
#ifndef EDGE_LB_CHECKENCAP_CONSTS_H
#define EDGE_LB_CHECKENCAP_CONSTS_H

#ifndef CHECK_MARK_BASE
#error "CHECK_MARK_BASE ([dataplane] check_mark_base: a multiple of 1 << CHECK_MARK_INDEX_BITS) must be given with -D"
#endif

/* A tunnel check's socket mark is CHECK_MARK_BASE | the backend's index in the balancer's backends map: the low
 * CHECK_MARK_INDEX_BITS bits (>= any max_backends the config accepts, 1,000,000), the rest equal to the base. */
#define CHECK_MARK_INDEX_BITS 20
#define CHECK_MARK_INDEX_MASK ((1u << CHECK_MARK_INDEX_BITS) - 1)

#define TC_ACT_OK 0
#define TC_ACT_SHOT 2

/* Indexes into check_stats (per CPU, packets). Python reads the names from this text. */
enum check_stat {
  CHECK_ENCAP_V4 = 0,      /* a check's packet wrapped in outer IPv4 (IPIP) */
  CHECK_ENCAP_V6,          /* wrapped in outer IPv6 (IP6IP6, 4in6) */
  CHECK_DROP_NO_BACKEND,   /* marked, but its index names no backend (not written yet, or removed): dropped */
  CHECK_DROP_NOT_IP,       /* marked, but not IPv4 / IPv6 (or its header is cut short): dropped */
  CHECK_DROP_ENCAP_FAILED, /* the kernel refused the room for the outer header: dropped */
  CHECK_STAT_MAX
};

#endif
