#!/usr/bin/env bash
# The main job, until the dataplane exists: check every example ruleset, print it as
# `nft list ruleset` would, trace packets through the home router, replay a recorded session
# through it (conntrack events and table), and size the classifier on a ClassBench filter set.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --quiet
ks=$PWD/target/release/keepstate

for f in examples/*.nft; do
	echo "== keepstate check --print $f"
	(cd examples && "$ks" check --print "$(basename "$f")")
done

trace() {
	echo
	echo "== keepstate trace --rules examples/home-router.nft \"$1\""
	"$ks" trace --rules examples/home-router.nft "$1"
}
trace "tcp from 192.168.1.10:40000 to 198.51.100.7:443 iif lan oif wan"
trace "tcp from 203.0.113.5:5555 to 198.51.100.1:8080 iif wan oif lan"
trace "tcp from 203.0.113.5:5555 to 198.51.100.1:22 iif wan"
trace "tcp from 198.51.100.7:443 to 192.168.1.10:40000 iif wan oif lan flags ack ct established"
trace "icmp from 203.0.113.5 to 198.51.100.1 iif wan type echo-request"

echo
echo "== keepstate replay of a recorded home session (pcapng) through the home router"
"$ks" replay --config tests/fixtures/pcap/home-router.toml --rules examples/home-router.nft \
	--pcap tests/fixtures/pcap/home-session.pcapng --trace --events

cb=../shared/classbench/acl1_10k
if [ -f "$cb" ]; then
	echo
	echo "== keepstate bench classify --classbench $cb"
	"$ks" bench classify --classbench "$cb" --packets 100000
fi
