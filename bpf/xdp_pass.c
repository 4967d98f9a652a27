// SPDX-License-Identifier: GPL-2.0
/* Attached to the router-side peer of an LB's veth in the lab: with native XDP, a frame the LB sends with
 * XDP_TX reaches the peer veth only if the peer has an XDP program too (see notes/environment.md). */
#include <uapi/linux/bpf.h>

int xdp_pass(struct xdp_md *ctx) { return XDP_PASS; }
