// SPDX-License-Identifier: GPL-2.0
/* The three small programs of benchmarks/live_frames.py (not part of the product).
 *
 * gen: run by BPF_PROG_RUN in live-frames mode (BPF_F_TEST_XDP_LIVE_FRAMES) on the peer veth; every frame it
 *   returns XDP_TX is really sent out of that veth, into the program attached natively on the other end. It
 *   rewrites each frame's Ethernet header (the balancer's encapsulation overwrote it when the page was last
 *   used: the test run's page pool re-uses pages without copying the frame again) and gives it its flow:
 *   mode 0 cycles over `flows` established flows, mode 1 makes every frame a flow never seen.
 *   The client of flow n is 198.18.0.0 + (n >> 2), port 1024 + n % 60000: edge_lb/dataplane/bench.py's _client.
 * sink: attached to the peer veth itself, so that what the balancer sends back with XDP_TX arrives (a native veth
 *   delivers XDP_TX only to a peer with an XDP program, notes/environment.md) and is dropped there, counted.
 * reflect: XDP_TX and nothing else: attached in the balancer's place, the harness's own ceiling. */
#include <uapi/linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/tcp.h>

struct gen_state {
  __u64 sent;   /* frames given a flow so far (per CPU) */
  __u32 mode;   /* 0: established flows in turn, 1: new flows */
  __u32 flows;  /* how many established flows (mode 0); the first new flow's number (mode 1) */
};

BPF_PERCPU_ARRAY(gen_state, struct gen_state, 1);

#define CLIENT_NET 0xc6120000u /* 198.18.0.0, host order */

int gen(struct xdp_md *ctx) {
  void *data = (void *)(long)ctx->data;
  void *data_end = (void *)(long)ctx->data_end;
  struct ethhdr *eth = data;
  struct iphdr *ip = (void *)(eth + 1);
  struct tcphdr *tcp = (void *)(ip + 1);
  __u32 zero = 0;
  struct gen_state *s = gen_state.lookup(&zero);
  if (!s || (void *)(tcp + 1) > data_end)
    return XDP_DROP;
  __u32 n = s->mode ? s->flows + (__u32)s->sent : (__u32)(s->sent % (s->flows ? s->flows : 1));
  s->sent++;
  eth->h_dest[0] = 0x02; eth->h_dest[1] = 0; eth->h_dest[2] = 0; eth->h_dest[3] = 0; eth->h_dest[4] = 0;
  eth->h_dest[5] = 0x01;
  eth->h_source[0] = 0x02; eth->h_source[1] = 0; eth->h_source[2] = 0; eth->h_source[3] = 0;
  eth->h_source[4] = 0; eth->h_source[5] = 0x99;
  eth->h_proto = bpf_htons(ETH_P_IP);
  ip->saddr = bpf_htonl(CLIENT_NET + (n >> 2));
  tcp->source = bpf_htons(1024 + n % 60000);
  return XDP_TX;
}

int sink(struct xdp_md *ctx) { return XDP_DROP; }

int reflect(struct xdp_md *ctx) { return XDP_TX; }
