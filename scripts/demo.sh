#!/usr/bin/env bash
# The main job: check every example ruleset, print it as `nft list ruleset` would, trace
# packets through the home router, replay a recorded session through it (conntrack events and
# table), size the classifier on a ClassBench filter set; then, as root on a kernel with
# AF_XDP, the live lab demo (`keepstate lab demo`): the appliance forwarding real traffic in
# network namespaces, each scenario with what was expected and what was observed.
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

echo
if [ "$(id -u)" -ne 0 ]; then
	echo "== keepstate lab demo: SKIPPED: it needs root (network namespaces, AF_XDP sockets); run scripts/demo.sh as root"
	exit 0
fi
echo "== keepstate lab demo"
status=0
"$ks" lab demo || status=$?
case $status in
0) ;;
77) echo "== keepstate lab demo: SKIPPED (the reason is above): the offline steps ran, the live demo could not" ;;
*) exit "$status" ;;
esac
