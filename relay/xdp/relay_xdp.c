// SPDX-License-Identifier: MIT OR Apache-2.0
//
// wgice relay: the XDP fast path for TURN ChannelData (RFC 8656 §12).
//
// The user-space relay stays the authority. For every channel binding it
// allows (UDP client, live permission, peer of the client's family, concrete
// listening and relayed addresses) it installs two entries:
//
//   to_peer   (client ip, client port, listening port, channel)
//             -> relayed address, peer address, expiry, allocation token
//   to_client (peer ip, relayed ip, peer port, relayed port)
//             -> listening address, client address, channel, expiry, token
//
// A ChannelData datagram from a client whose entry matches (and whose
// destination is the entry's listening address) loses its 4-byte header and
// leaves from the relayed address to the peer; a datagram from a peer to a
// relayed address gains the header and leaves from the listening address to
// the client. Everything else returns XDP_PASS unchanged to the kernel and
// the user-space relay: STUN, Send and Data indications, IP options, IPv6
// extension headers, fragments, VLAN tags, unknown channels, padded
// ChannelData, mixed families, zero IPv6 checksums, expired entries, routes
// the kernel cannot resolve (no neighbour yet, or forwarding off on the
// interface), and packets the egress MTU would not carry. Over its bandwidth cap a packet is dropped, as user space
// drops it.
//
// Addresses are kept as 16 bytes (IPv4 as ::ffff:a.b.c.d). Checksums are
// updated incrementally (RFC 1624), the IPv4 header checksum recomputed.

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#ifndef AF_INET
#define AF_INET 2
#endif
#ifndef AF_INET6
#define AF_INET6 10
#endif

// Keep in sync with relay/src/driver/xdp.rs (repr(C) twins).
struct to_peer_key {
	__u8 client[16];
	__be16 client_port;
	__be16 listen_port;
	__be16 channel;
	__u16 pad;
};

struct to_peer_val {
	__u8 listen[16];
	__u8 relayed[16];
	__u8 peer[16];
	__be16 relayed_port;
	__be16 peer_port;
	__u32 pad;
	__u64 token;
	__u64 expires_ns;
	__u64 rate; // bytes per second, 0: no cap
};

struct to_client_key {
	__u8 peer[16];
	__u8 relayed[16];
	__be16 peer_port;
	__be16 relayed_port;
	__u32 pad;
};

struct to_client_val {
	__u8 listen[16];
	__u8 client[16];
	__be16 listen_port;
	__be16 client_port;
	__be16 channel;
	__u16 pad;
	__u64 token;
	__u64 expires_ns;
	__u64 rate;
};

// Per allocation, per CPU.
struct alloc_stats {
	__u64 packets_to_peer;
	__u64 bytes_to_peer;
	__u64 packets_to_client;
	__u64 bytes_to_client;
};

// Per allocation: the kernel's share of the bandwidth cap (user space keeps
// its own bucket for what it forwards). Racy across CPUs by design: a
// concurrent refill can over-grant a packet or two, never more.
struct bucket {
	__u64 tokens;
	__u64 last_ns;
};

// Index into `counters`.
enum {
	C_TO_PEER = 0,
	C_TO_CLIENT,
	C_PASS_EXPIRED,
	C_PASS_ROUTE,
	C_PASS_TOO_BIG,
	C_PASS_OTHER,
	C_DROP_BANDWIDTH,
	C_PASS_FWD_OFF,
	C_MAX,
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct to_peer_key);
	__type(value, struct to_peer_val);
	__uint(max_entries, 262144);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} to_peer SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct to_client_key);
	__type(value, struct to_client_val);
	__uint(max_entries, 262144);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} to_client SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__type(key, __u64);
	__type(value, struct alloc_stats);
	__uint(max_entries, 131072);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} alloc_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u64);
	__type(value, struct bucket);
	__uint(max_entries, 131072);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} buckets SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, C_MAX);
} counters SEC(".maps");

static __always_inline int count(__u32 which, int action)
{
	__u64 *c = bpf_map_lookup_elem(&counters, &which);
	if (c)
		*c += 1;
	return action;
}

// One's-complement sum helpers (RFC 1071/1624), on a 32-bit accumulator.
static __always_inline __u32 fold(__u32 s)
{
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return s;
}

// Replaces the 16-bit word `old` by `new` in the sum `s`.
static __always_inline __u32 replace16(__u32 s, __u16 old, __u16 new)
{
	return s + (__u16)~old + new;
}

static __always_inline __u32 replace_addr(__u32 s, const __u8 *old, const __u8 *new, int v6)
{
	const __u16 *o = (const __u16 *)old;
	const __u16 *n = (const __u16 *)new;
	if (v6) {
#pragma unroll
		for (int i = 0; i < 8; i++)
			s = replace16(s, o[i], n[i]);
	} else {
		// IPv4: the last 4 bytes of the mapped form.
		s = replace16(s, o[6], n[6]);
		s = replace16(s, o[7], n[7]);
	}
	return s;
}

static __always_inline __u16 ipv4_csum(struct iphdr *ip)
{
	__u32 s = 0;
	__u16 *w = (__u16 *)ip;
#pragma unroll
	for (int i = 0; i < 10; i++)
		s += w[i];
	return ~fold(s);
}

static __always_inline void to_mapped(__u8 *out, __be32 v4)
{
	__builtin_memset(out, 0, 10);
	out[10] = 0xff;
	out[11] = 0xff;
	__builtin_memcpy(out + 12, &v4, 4);
}

static __always_inline int same16(const __u8 *a, const __u8 *b)
{
	const __u64 *x = (const __u64 *)a;
	const __u64 *y = (const __u64 *)b;
	return x[0] == y[0] && x[1] == y[1];
}

// Takes `bytes` from the allocation's bucket; false when over the cap.
static __always_inline int pay(__u64 token, __u64 rate, __u64 bytes, __u64 now)
{
	if (!rate)
		return 1;
	struct bucket *b = bpf_map_lookup_elem(&buckets, &token);
	if (!b)
		return 1; // installed together with the entry; absent: no cap known
	__u64 burst = rate / 4 + 65536;
	__u64 dt = now - b->last_ns;
	if (dt > 1000000000ULL)
		dt = 1000000000ULL;
	__u64 tokens = b->tokens + (dt / 1000) * rate / 1000000;
	if (tokens > burst)
		tokens = burst;
	b->last_ns = now;
	if (tokens < bytes) {
		b->tokens = tokens;
		return 0;
	}
	b->tokens = tokens - bytes;
	return 1;
}

static __always_inline void account(__u64 token, int to_peer_dir, __u64 bytes)
{
	struct alloc_stats *st = bpf_map_lookup_elem(&alloc_stats, &token);
	if (!st)
		return;
	if (to_peer_dir) {
		st->packets_to_peer += 1;
		st->bytes_to_peer += bytes;
	} else {
		st->packets_to_client += 1;
		st->bytes_to_client += bytes;
	}
}

// Where the rewritten packet goes: fills the MACs into `eth` (a stack copy)
// and returns the egress ifindex, or -1 with the counter to bump.
static __always_inline int route(struct xdp_md *ctx, struct ethhdr *eth, int v6,
				 const __u8 *src, const __u8 *dst, __be16 sport, __be16 dport,
				 __u16 l3_len, __u32 *why)
{
	struct bpf_fib_lookup p = {};
	p.l4_protocol = IPPROTO_UDP;
	p.sport = sport;
	p.dport = dport;
	p.ifindex = ctx->ingress_ifindex;
	if (v6) {
		p.family = AF_INET6;
		__builtin_memcpy(p.ipv6_src, src, 16);
		__builtin_memcpy(p.ipv6_dst, dst, 16);
	} else {
		p.family = AF_INET;
		__builtin_memcpy(&p.ipv4_src, src + 12, 4);
		__builtin_memcpy(&p.ipv4_dst, dst + 12, 4);
	}
	p.tot_len = l3_len;
	// The kernel answers route lookups from XDP only for interfaces with
	// forwarding on (even with BPF_FIB_LOOKUP_OUTPUT); the relay checks it
	// for IPv4 at start.
	long rc = bpf_fib_lookup(ctx, &p, sizeof(p), 0);
	if (rc == BPF_FIB_LKUP_RET_FWD_DISABLED) {
		*why = C_PASS_FWD_OFF;
		return -1;
	}
	if (rc == BPF_FIB_LKUP_RET_FRAG_NEEDED) {
		*why = C_PASS_TOO_BIG;
		return -1;
	}
	if (rc != BPF_FIB_LKUP_RET_SUCCESS) {
		*why = C_PASS_ROUTE;
		return -1;
	}
	__builtin_memcpy(eth->h_dest, p.dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, p.smac, ETH_ALEN);
	return p.ifindex;
}

// Out of the interface the route names, the ingress one included: a
// redirect rather than XDP_TX, because veth drops XDP_TX frames of packets
// that reached it as sk_buffs (seen on 6.18) while redirect works on every
// driver with XDP transmit.
static __always_inline int send(int ifindex)
{
	return bpf_redirect(ifindex, 0);
}

SEC("xdp")
int relay_xdp(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > end)
		return XDP_PASS;

	int v6;
	__u8 saddr[16] __attribute__((aligned(8)));
	__u8 daddr[16] __attribute__((aligned(8)));
	struct udphdr *udp;
	__u16 l3_hdr;
	__u8 ttl_or_hops;
	__be16 frag_off = 0;
	__u32 flow = 0;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);
		if ((void *)(ip + 1) > end)
			return XDP_PASS;
		if (ip->ihl != 5 || ip->protocol != IPPROTO_UDP)
			return XDP_PASS;
		if (ip->frag_off & bpf_htons(0x3fff)) // MF or an offset
			return count(C_PASS_OTHER, XDP_PASS);
		udp = (void *)(ip + 1);
		if ((void *)(udp + 1) > end)
			return XDP_PASS;
		if (bpf_ntohs(ip->tot_len) != sizeof(*ip) + bpf_ntohs(udp->len))
			return XDP_PASS;
		v6 = 0;
		to_mapped(saddr, ip->saddr);
		to_mapped(daddr, ip->daddr);
		l3_hdr = sizeof(*ip);
		ttl_or_hops = ip->ttl;
		frag_off = ip->frag_off;
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);
		if ((void *)(ip6 + 1) > end)
			return XDP_PASS;
		if (ip6->nexthdr != IPPROTO_UDP)
			return XDP_PASS;
		udp = (void *)(ip6 + 1);
		if ((void *)(udp + 1) > end)
			return XDP_PASS;
		if (bpf_ntohs(ip6->payload_len) != bpf_ntohs(udp->len))
			return XDP_PASS;
		v6 = 1;
		__builtin_memcpy(saddr, &ip6->saddr, 16);
		__builtin_memcpy(daddr, &ip6->daddr, 16);
		l3_hdr = sizeof(*ip6);
		ttl_or_hops = ip6->hop_limit;
		__builtin_memcpy(&flow, ip6, 4);
	} else {
		return XDP_PASS;
	}
	(void)ttl_or_hops;
	__u16 ulen = bpf_ntohs(udp->len);
	if (ulen < sizeof(*udp))
		return XDP_PASS;
	__u16 plen = ulen - sizeof(*udp);
	__u8 *payload = (void *)(udp + 1);
	if ((void *)(payload + 4) > end)
		goto from_peer; // too short for ChannelData: maybe a peer's datagram
	__u64 now = bpf_ktime_get_ns();
	__be16 old_ulen = udp->len;
	__be16 old_csum = udp->check;
	__be16 old_sport = udp->source, old_dport = udp->dest;
	struct ethhdr e;
	__builtin_memcpy(&e, eth, sizeof(e));

	// Client -> peer: ChannelData, exactly one unpadded message.
	if ((payload[0] & 0xc0) == 0x40) {
		struct to_peer_key k = {};
		__builtin_memcpy(k.client, saddr, 16);
		k.client_port = udp->source;
		k.listen_port = udp->dest;
		__builtin_memcpy(&k.channel, payload, 2);
		struct to_peer_val *v = bpf_map_lookup_elem(&to_peer, &k);
		if (!v)
			goto from_peer;
		__be16 cd_len;
		__builtin_memcpy(&cd_len, payload + 2, 2);
		if (bpf_ntohs(cd_len) + 4 != plen || !same16(v->listen, daddr))
			return count(C_PASS_OTHER, XDP_PASS);
		if (now >= v->expires_ns)
			return count(C_PASS_EXPIRED, XDP_PASS);
		if (v6 && old_csum == 0)
			return count(C_PASS_OTHER, XDP_PASS);
		__u16 new_plen = plen - 4;
		__be16 new_ulen = bpf_htons(new_plen + sizeof(*udp));
		__u32 why = 0;
		int oif = route(ctx, &e, v6, v->relayed, v->peer, v->relayed_port, v->peer_port,
				l3_hdr + new_plen + sizeof(*udp), &why);
		if (oif < 0)
			return count(why, XDP_PASS);
		if (!pay(v->token, v->rate, new_plen, now))
			return count(C_DROP_BANDWIDTH, XDP_DROP);
		__be16 csum = 0;
		if (old_csum) {
			__u32 s = (__u16)~old_csum;
			s = replace_addr(s, saddr, v->relayed, v6);
			s = replace_addr(s, daddr, v->peer, v6);
			s = replace16(s, old_sport, v->relayed_port);
			s = replace16(s, old_dport, v->peer_port);
			s = replace16(s, old_ulen, new_ulen); // pseudo-header
			s = replace16(s, old_ulen, new_ulen); // UDP header
			// The ChannelData header leaves the payload.
			__u16 w0, w1;
			__builtin_memcpy(&w0, payload, 2);
			__builtin_memcpy(&w1, payload + 2, 2);
			s = replace16(s, w0, 0);
			s = replace16(s, w1, 0);
			csum = ~fold(s);
			if (csum == 0)
				csum = 0xffff;
		}
		__u64 token = v->token;
		__u8 relayed[16] __attribute__((aligned(8)));
		__u8 peer[16] __attribute__((aligned(8)));
		__builtin_memcpy(relayed, v->relayed, 16);
		__builtin_memcpy(peer, v->peer, 16);
		__be16 rport = v->relayed_port, pport = v->peer_port;
		// Headers move 4 bytes towards the payload, over the ChannelData header.
		if (bpf_xdp_adjust_head(ctx, 4))
			return count(C_PASS_OTHER, XDP_PASS);
		data = (void *)(long)ctx->data;
		end = (void *)(long)ctx->data_end;
		eth = data;
		if ((void *)(eth + 1) > end)
			return XDP_DROP;
		__builtin_memcpy(eth, &e, sizeof(e));
		if (v6) {
			struct ipv6hdr *ip6 = (void *)(eth + 1);
			udp = (void *)(ip6 + 1);
			if ((void *)(udp + 1) > end)
				return XDP_DROP;
			__builtin_memcpy(ip6, &flow, 4);
			ip6->payload_len = new_ulen;
			ip6->nexthdr = IPPROTO_UDP;
			ip6->hop_limit = 64;
			__builtin_memcpy(&ip6->saddr, relayed, 16);
			__builtin_memcpy(&ip6->daddr, peer, 16);
		} else {
			struct iphdr *ip = (void *)(eth + 1);
			udp = (void *)(ip + 1);
			if ((void *)(udp + 1) > end)
				return XDP_DROP;
			ip->version = 4;
			ip->ihl = 5;
			ip->tos = 0;
			ip->tot_len = bpf_htons(sizeof(*ip) + new_plen + sizeof(*udp));
			ip->id = 0;
			ip->frag_off = frag_off;
			ip->ttl = 64;
			ip->protocol = IPPROTO_UDP;
			ip->check = 0;
			__builtin_memcpy(&ip->saddr, relayed + 12, 4);
			__builtin_memcpy(&ip->daddr, peer + 12, 4);
			ip->check = ipv4_csum(ip);
		}
		udp->source = rport;
		udp->dest = pport;
		udp->len = new_ulen;
		udp->check = csum;
		account(token, 1, new_plen);
		count(C_TO_PEER, 0);
		return send(oif);
	}

from_peer:;
	// Peer -> client: any datagram to a relayed address with a channel.
	struct to_client_key pk = {};
	__builtin_memcpy(pk.peer, saddr, 16);
	__builtin_memcpy(pk.relayed, daddr, 16);
	pk.peer_port = udp->source;
	pk.relayed_port = udp->dest;
	struct to_client_val *cv = bpf_map_lookup_elem(&to_client, &pk);
	if (!cv)
		return XDP_PASS;
	__u64 now2 = bpf_ktime_get_ns();
	if (now2 >= cv->expires_ns)
		return count(C_PASS_EXPIRED, XDP_PASS);
	__be16 csum0 = udp->check;
	if (v6 && csum0 == 0)
		return count(C_PASS_OTHER, XDP_PASS);
	if (plen > 0xffff - 4 - sizeof(*udp) - l3_hdr)
		return count(C_PASS_TOO_BIG, XDP_PASS);
	__be16 ulen0 = udp->len;
	__be16 sport0 = udp->source, dport0 = udp->dest;
	__be16 ulen1 = bpf_htons(plen + 4 + sizeof(*udp));
	struct ethhdr e2;
	__builtin_memcpy(&e2, eth, sizeof(e2));
	__u32 why2 = 0;
	int oif2 = route(ctx, &e2, v6, cv->listen, cv->client, cv->listen_port, cv->client_port,
			 l3_hdr + plen + 4 + sizeof(*udp), &why2);
	if (oif2 < 0)
		return count(why2, XDP_PASS);
	if (!pay(cv->token, cv->rate, plen, now2))
		return count(C_DROP_BANDWIDTH, XDP_DROP);
	__be16 chan = cv->channel;
	__be16 cdlen = bpf_htons(plen);
	__be16 csum1 = 0;
	if (csum0) {
		__u32 s = (__u16)~csum0;
		s = replace_addr(s, saddr, cv->listen, v6);
		s = replace_addr(s, daddr, cv->client, v6);
		s = replace16(s, sport0, cv->listen_port);
		s = replace16(s, dport0, cv->client_port);
		s = replace16(s, ulen0, ulen1);
		s = replace16(s, ulen0, ulen1);
		s = replace16(s, 0, chan);
		s = replace16(s, 0, cdlen);
		csum1 = ~fold(s);
		if (csum1 == 0)
			csum1 = 0xffff;
	}
	__u64 token2 = cv->token;
	__u8 listen[16] __attribute__((aligned(8)));
	__u8 client[16] __attribute__((aligned(8)));
	__builtin_memcpy(listen, cv->listen, 16);
	__builtin_memcpy(client, cv->client, 16);
	__be16 lport = cv->listen_port, cport = cv->client_port;
	if (bpf_xdp_adjust_head(ctx, -4))
		return count(C_PASS_OTHER, XDP_PASS);
	data = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
	eth = data;
	if ((void *)(eth + 1) > end)
		return XDP_DROP;
	__builtin_memcpy(eth, &e2, sizeof(e2));
	__u8 *cd;
	if (v6) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);
		udp = (void *)(ip6 + 1);
		cd = (void *)(udp + 1);
		if ((void *)(cd + 4) > end)
			return XDP_DROP;
		__builtin_memcpy(ip6, &flow, 4);
		ip6->payload_len = ulen1;
		ip6->nexthdr = IPPROTO_UDP;
		ip6->hop_limit = 64;
		__builtin_memcpy(&ip6->saddr, listen, 16);
		__builtin_memcpy(&ip6->daddr, client, 16);
	} else {
		struct iphdr *ip = (void *)(eth + 1);
		udp = (void *)(ip + 1);
		cd = (void *)(udp + 1);
		if ((void *)(cd + 4) > end)
			return XDP_DROP;
		ip->version = 4;
		ip->ihl = 5;
		ip->tos = 0;
		ip->tot_len = bpf_htons(sizeof(*ip) + plen + 4 + sizeof(*udp));
		ip->id = 0;
		ip->frag_off = frag_off;
		ip->ttl = 64;
		ip->protocol = IPPROTO_UDP;
		ip->check = 0;
		__builtin_memcpy(&ip->saddr, listen + 12, 4);
		__builtin_memcpy(&ip->daddr, client + 12, 4);
		ip->check = ipv4_csum(ip);
	}
	udp->source = lport;
	udp->dest = cport;
	udp->len = ulen1;
	udp->check = csum1;
	__builtin_memcpy(cd, &chan, 2);
	__builtin_memcpy(cd + 2, &cdlen, 2);
	account(token2, 0, plen);
	count(C_TO_CLIENT, 0);
	return send(oif2);
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
