// SPDX-License-Identifier: GPL-2.0 OR MIT
//
// keepstate's XDP fast path: what the kernel's software flowtable does at ingress
// (nf_flow_offload_ip_hook), for the connections the engine offloaded (`flow add`).
//
// A frame whose (ingress ifindex, tuple) is in `flows4` or `flows6` and that is TCP or UDP,
// not a fragment, without IPv4 options, TTL/hop limit above 1, and without FIN, RST or SYN,
// gets its MACs, NAT rewrite (incremental checksums, RFC 1624) and TTL decrement here, counts
// on its entry's slot in `counters`, and is redirected to the egress port through
// `tx_ports`. Every other frame goes to the AF_XDP socket of its receive queue (`xsks`),
// where the engine decides it: FIN, RST and SYN too, so the engine keeps the flow's CLOSING
// state and teardown as the kernel's.
//
// The engine's workers fill the flow maps (both directions of an offloaded connection) and
// empty them on teardown; the main loop reads the counters and last-seen times from the
// mmapped `counters` to refresh the flows. The layouts of the keys, values, entries and
// counters, and the IPv4 table's hash and probing, are mirrored in src/dataplane/fastpath.rs
// and src/dataplane/flows4.rs: change them together.
//
// IPv4 flows are not in a kernel hash but in a table of our own, `flows4`: an mmapped array of
// 64-byte entries (a sequence number, the key and the value: one cache line), open addressing
// with linear probing (Robin Hood placement: lookups are unchanged by it), which keepstate
// writes from userspace without a system call. A lookup at a million flows misses the cache
// once instead of twice (the kernel hash's bucket, then its element). Each entry is a seqlock:
// the writer makes `seq` odd, writes, and makes it even again; a lookup that sees it odd, or
// changed by the time it has copied the value, gives the frame to the workers, which is always
// right (a miss costs speed, never a wrong rewrite). The reads rely on x86's load ordering
// (TSO) and on the compiler barriers below.

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>

// The few libbpf conventions this file needs, written out (no libbpf headers at build time).
#define SEC(name) __attribute__((section(name), used))
#define __uint(name, val) int (*name)[val]
#define __type(name, val) typeof(val) *name
#undef __always_inline
#define __always_inline inline __attribute__((always_inline))

static void *(*bpf_map_lookup_elem)(void *map, const void *key) = (void *)BPF_FUNC_map_lookup_elem;
static long (*bpf_redirect_map)(void *map, __u64 key, __u64 flags) = (void *)BPF_FUNC_redirect_map;
static __u64 (*bpf_ktime_get_coarse_ns)(void) = (void *)BPF_FUNC_ktime_get_coarse_ns;

#define bswap16(x) __builtin_bswap16(x)
#define htons(x) ((__u16)bswap16((__u16)(x)))

#define IP_MF 0x2000
#define IP_OFFSET 0x1fff

// An IPv4 direction's key: 20 bytes, so that with its value and a sequence number an entry
// of `flows4` is one cache line. At a million flows every lookup misses the cache.
struct flow_key4 {
	__u8 src[4];
	__u8 dst[4];
	__u16 sport; // network order
	__u16 dport;
	__u32 ifindex;
	__u8 proto; // IPPROTO_TCP or IPPROTO_UDP
	__u8 pad[3];
};

struct flow_key6 {
	__u32 ifindex;
	__u8 proto;
	__u8 pad[3];
	__u8 src[16];
	__u8 dst[16];
	__u16 sport; // network order
	__u16 dport;
};

// NAT edits, as CompiledRewrite's: a field is rewritten when its flag is set.
#define NAT_SRC 0x1
#define NAT_DST 0x2
#define NAT_SPORT 0x4
#define NAT_DPORT 0x8

// flow_head.flags: count the packets and bytes in `counters` (the flowtable's `counter`).
// Without it the program writes only the last-seen time there: no locked adds.
#define FLOW_COUNT 0x1

// What both families' values start with: where the direction leaves, the port rewrite, and
// its slot in `counters`.
struct flow_head {
	__u32 tx_port; // key in tx_ports (the egress ifindex)
	__u8 dmac[6];
	__u8 smac[6];
	__u8 nat; // NAT_* bits
	__u8 flags; // FLOW_* bits
	__u16 sport; // new ports (network order)
	__u16 dport;
	__u16 pad2;
	__u32 slot; // this direction's counters
};

struct flow_value4 {
	struct flow_head h;
	__u8 src[4]; // new addresses
	__u8 dst[4];
};

struct flow_value6 {
	struct flow_head h;
	__u8 src[16];
	__u8 dst[16];
};

// A direction's counters, apart from the hash so that the main loop reads them from memory
// (the map is mmapped) instead of walking the hash with system calls. The two directions of
// a flow take slots 2k and 2k+1: one cache line.
struct flow_counters {
	__u64 packets; // atomics, with FLOW_COUNT: the main loop takes them (exchanges them with zero)
	__u64 bytes; // IP lengths
	// Written after the counts; the main loop takes it too: zero when nothing was forwarded
	// since it last looked.
	__u64 last_seen; // bpf_ktime_get_coarse_ns (CLOCK_MONOTONIC, to a tick)
	__u64 pad;
};

// What this CPU forwarded, all flows together: `keepstate stats` sums the CPUs' copies
// (one system call) instead of reading every flow's counters.
struct totals {
	__u64 packets;
	__u64 bytes; // IP lengths
};

// An entry of `flows4`: empty while key.ifindex is 0.
struct flow_entry4 {
	__u32 seq; // odd while keepstate writes the entry
	struct flow_key4 key;
	struct flow_value4 v;
	__u32 hash; // the key hash's low half, for keepstate's moves (flows4.rs); not read here
};

// `flows4`'s shape: the table in use is mask + 1 entries (a power of two, without TOP) at
// the map's start, or at its end with TOP; keepstate doubles it, into the other end, as it
// fills. The hash is seeded, once, so that nobody can pick flows that pile up on one slot.
struct flow_conf {
	__u64 seed;
	__u32 mask;
	__u32 capacity; // the map's entries
};

#define TOP (1u << 31)

// How far from its home slot an entry may lie; keepstate places none farther.
#define PROBES 32

/* The loader sizes the maps from the conntrack table's max: `flows6` and `counters` take
 * both directions of every connection (`flows6` allocated as entries come, `counters` at
 * load), `flows4` room for its largest table (half as much again, rounded up to a power of
 * two) and the half-size one it grows from, side by side (an array: at load). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, struct flow_entry4);
} flows4 SEC(".maps");

// Mapped into keepstate too, which moves the table as it grows (flows4.rs's `step`).
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, struct flow_conf);
} flows4_conf SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct flow_key6);
	__type(value, struct flow_value6);
} flows6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, struct flow_counters);
} counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct totals);
} totals SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_DEVMAP);
	__uint(max_entries, 256);
	__type(key, __u32);
	__type(value, __u32);
} tx_ports SEC(".maps");

// The AF_XDP sockets of every port: the socket of queue q on ifindex i is in slot
// xsk_base[i] + q (one XSKMAP for all ports, since an XSK takes only frames of the
// device it is bound to).
struct {
	__uint(type, BPF_MAP_TYPE_XSKMAP);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, __u32);
} xsks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, __u32);
	__type(value, __u32);
} xsk_base SEC(".maps");

// The egress ports a redirect reaches (by ifindex). The dataplane leaves out a port that
// takes no redirected frames (a veth whose peer runs no XDP program): its flows' packets go
// to the sockets instead, and the workers forward them.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, __u32);
	__type(value, __u32);
} tx_ok SEC(".maps");

// RFC 1624: HC' = ~(~HC + ~m + m'), 16 bits at a time.
static __always_inline __u16 csum_fold(__u32 s)
{
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)s;
}

static __always_inline void csum_replace(__u16 *sum, const __u16 *old, const __u16 *new, int words)
{
	__u32 s = (__u16)~*sum;
	for (int i = 0; i < words; i++) {
		s += (__u16)~old[i];
		s += new[i];
	}
	*sum = ~csum_fold(s);
}

#define barrier() asm volatile("" ::: "memory")
#define READ_ONCE_U32(x) (*(volatile __u32 *)&(x))

// The hash of an IPv4 key (its five 32-bit words, native order): flows4.rs's `hash`.
static __always_inline __u64 flow_hash4(const struct flow_key4 *k, __u64 seed)
{
	const __u32 *w = (const __u32 *)k;
	__u64 x = (((__u64)w[1] << 32) | w[0]) ^ seed;

	x *= 0x9e3779b97f4a7c15ULL;
	x ^= ((__u64)w[3] << 32) | w[2];
	x *= 0xc2b2ae3d27d4eb4fULL;
	x ^= w[4];
	x ^= x >> 29;
	x *= 0x165667b19e3779f9ULL;
	x ^= x >> 32;
	return x;
}

// Finds `key` in `flows4` and copies its value into `out`: 0 if found in a stable state.
static __always_inline int flows4_get(const struct flow_key4 *key, struct flow_value4 *out)
{
	__u32 zero = 0;
	struct flow_conf *conf = bpf_map_lookup_elem(&flows4_conf, &zero);
	const __u32 *kw = (const __u32 *)key;

	if (!conf)
		return -1;
	__u64 h = flow_hash4(key, conf->seed);
	__u32 m = READ_ONCE_U32(conf->mask); // one load: the table's size and place together
	__u32 mask = m & ~TOP;
	__u32 at = (m & TOP) ? conf->capacity - mask - 1 : 0;
#pragma unroll
	for (int i = 0; i < PROBES; i++) {
		__u32 idx = at + (((__u32)h + i) & mask);
		struct flow_entry4 *e = bpf_map_lookup_elem(&flows4, &idx);
		if (!e)
			return -1;
		__u32 seq = READ_ONCE_U32(e->seq);
		barrier();
		if (seq & 1)
			return -1; // being written
		const __u32 *ew = (const __u32 *)&e->key;
		if (ew[3] == 0)
			return -1; // empty: the key is nowhere further on
		if (ew[0] != kw[0] || ew[1] != kw[1] || ew[2] != kw[2] || ew[3] != kw[3] ||
		    ew[4] != kw[4])
			continue;
		__builtin_memcpy(out, &e->v, sizeof(*out));
		barrier();
		if (READ_ONCE_U32(e->seq) != seq)
			return -1; // rewritten meanwhile
		return 0;
	}
	return -1;
}

static __always_inline int to_xsk(struct xdp_md *ctx)
{
	__u32 ifindex = ctx->ingress_ifindex;
	__u32 *base = bpf_map_lookup_elem(&xsk_base, &ifindex);

	// A queue beyond a port's slots would land in the next port's (MAX_QUEUES in fastpath.rs).
	if (!base || ctx->rx_queue_index >= 64)
		return XDP_PASS;
	return bpf_redirect_map(&xsks, *base + ctx->rx_queue_index, XDP_PASS);
}

SEC("xdp")
int keepstate_fastpath(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	__u16 *l4_sum = 0;
	__u16 *ports;
	__u32 ip_len;
	__u8 proto;
	int v4;

	if ((void *)(eth + 1) > end)
		return to_xsk(ctx);
	void *l3 = eth + 1;
	void *l4;

	if (eth->h_proto == htons(ETH_P_IP)) {
		struct iphdr *ip4 = l3;
		if ((void *)(ip4 + 1) > end || ip4->ihl != 5 || ip4->ttl <= 1)
			return to_xsk(ctx);
		if (ip4->frag_off & htons(IP_MF | IP_OFFSET))
			return to_xsk(ctx);
		v4 = 1;
		proto = ip4->protocol;
		l4 = ip4 + 1;
		ip_len = bswap16(ip4->tot_len);
	} else if (eth->h_proto == htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = l3;
		if ((void *)(ip6 + 1) > end || ip6->hop_limit <= 1)
			return to_xsk(ctx);
		v4 = 0;
		proto = ip6->nexthdr;
		l4 = ip6 + 1;
		ip_len = bswap16(ip6->payload_len) + sizeof(*ip6);
	} else {
		return to_xsk(ctx);
	}

	if (proto == IPPROTO_TCP) {
		struct tcphdr *th = l4;
		if ((void *)(th + 1) > end)
			return to_xsk(ctx);
		// The engine keeps the flow's state: CLOSING on FIN/RST, teardown on a SYN.
		if (th->fin || th->rst || th->syn)
			return to_xsk(ctx);
		l4_sum = &th->check;
		ports = (__u16 *)th;
	} else if (proto == IPPROTO_UDP) {
		struct udphdr *uh = l4;
		if ((void *)(uh + 1) > end)
			return to_xsk(ctx);
		// A zero UDP checksum over IPv4 means none, and stays none.
		if (uh->check || !v4)
			l4_sum = &uh->check;
		ports = (__u16 *)uh;
	} else {
		return to_xsk(ctx);
	}

	struct flow_head *v;
	struct flow_value4 val4;
	if (v4) {
		struct iphdr *h = l3;
		struct flow_key4 key = {};
		if ((void *)(h + 1) > end)
			return XDP_DROP;
		__builtin_memcpy(key.src, &h->saddr, 4);
		__builtin_memcpy(key.dst, &h->daddr, 4);
		key.sport = ports[0];
		key.dport = ports[1];
		key.ifindex = ctx->ingress_ifindex;
		key.proto = proto;
		if (flows4_get(&key, &val4))
			return to_xsk(ctx);
		struct flow_value4 *v4v = &val4;
		v = &v4v->h;
		if (!bpf_map_lookup_elem(&tx_ok, &v->tx_port))
			return to_xsk(ctx);
		// NAT: the addresses (the header sum and the pseudo-header's part of the L4 sum).
		if (v->nat & NAT_SRC) {
			csum_replace(&h->check, (__u16 *)&h->saddr, (__u16 *)v4v->src, 2);
			if (l4_sum)
				csum_replace(l4_sum, (__u16 *)&h->saddr, (__u16 *)v4v->src, 2);
			__builtin_memcpy(&h->saddr, v4v->src, 4);
		}
		if (v->nat & NAT_DST) {
			csum_replace(&h->check, (__u16 *)&h->daddr, (__u16 *)v4v->dst, 2);
			if (l4_sum)
				csum_replace(l4_sum, (__u16 *)&h->daddr, (__u16 *)v4v->dst, 2);
			__builtin_memcpy(&h->daddr, v4v->dst, 4);
		}
	} else {
		struct ipv6hdr *h = l3;
		struct flow_key6 key = {};
		if ((void *)(h + 1) > end)
			return XDP_DROP;
		__builtin_memcpy(key.src, &h->saddr, 16);
		__builtin_memcpy(key.dst, &h->daddr, 16);
		key.sport = ports[0];
		key.dport = ports[1];
		key.ifindex = ctx->ingress_ifindex;
		key.proto = proto;
		struct flow_value6 *v6v = bpf_map_lookup_elem(&flows6, &key);
		if (!v6v)
			return to_xsk(ctx);
		v = &v6v->h;
		if (!bpf_map_lookup_elem(&tx_ok, &v->tx_port))
			return to_xsk(ctx);
		if (v->nat & NAT_SRC) {
			if (l4_sum)
				csum_replace(l4_sum, (__u16 *)&h->saddr, (__u16 *)v6v->src, 8);
			__builtin_memcpy(&h->saddr, v6v->src, 16);
		}
		if (v->nat & NAT_DST) {
			if (l4_sum)
				csum_replace(l4_sum, (__u16 *)&h->daddr, (__u16 *)v6v->dst, 8);
			__builtin_memcpy(&h->daddr, v6v->dst, 16);
		}
	}
	if (v->nat & NAT_SPORT) {
		if (l4_sum)
			csum_replace(l4_sum, &ports[0], &v->sport, 1);
		ports[0] = v->sport;
	}
	if (v->nat & NAT_DPORT) {
		if (l4_sum)
			csum_replace(l4_sum, &ports[1], &v->dport, 1);
		ports[1] = v->dport;
	}
	if (l4_sum && proto == IPPROTO_UDP && *l4_sum == 0)
		*l4_sum = 0xffff; // CSUM_MANGLED_0

	// ip_decrease_ttl: the TTL is the high byte of its 16-bit word with the protocol.
	if (v4) {
		struct iphdr *h = l3;
		if ((void *)(h + 1) > end)
			return XDP_DROP;
		__u16 old = *(__u16 *)&h->ttl;
		h->ttl--;
		csum_replace(&h->check, &old, (__u16 *)&h->ttl, 1);
	} else {
		struct ipv6hdr *h = l3;
		if ((void *)(h + 1) > end)
			return XDP_DROP;
		h->hop_limit--;
	}

	__builtin_memcpy(eth->h_dest, v->dmac, 6);
	__builtin_memcpy(eth->h_source, v->smac, 6);
	__u32 slot = v->slot;
	struct flow_counters *c = bpf_map_lookup_elem(&counters, &slot);
	if (c) {
		if (v->flags & FLOW_COUNT) {
			__sync_fetch_and_add(&c->packets, 1);
			__sync_fetch_and_add(&c->bytes, ip_len);
		}
		// The coarse clock (the last tick, a few ms): timeouts are in seconds, and the
		// precise one read the TSC, about 20 ns a packet (profiled).
		c->last_seen = bpf_ktime_get_coarse_ns();
	}
	__u32 zero = 0;
	struct totals *t = bpf_map_lookup_elem(&totals, &zero);
	if (t) {
		// This CPU's copy: plain adds (XDP runs with preemption off).
		t->packets++;
		t->bytes += ip_len;
	}
	return bpf_redirect_map(&tx_ports, v->tx_port, 0);
}

// A pass-through program for the peers of redirected-to veths: veth delivers an
// XDP_REDIRECTed frame only to a peer that runs XDP.
SEC("xdp")
int keepstate_pass(struct xdp_md *ctx)
{
	return XDP_PASS;
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
