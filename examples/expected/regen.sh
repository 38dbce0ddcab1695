#!/bin/sh
# Regenerate examples/expected/NAME.list for every examples/NAME.nft.
#
# Each example is loaded with the real nft into a fresh, throwaway network
# namespace (the host's ruleset is never touched) and the exact stdout of
# `nft list ruleset` is saved. nft runs from the examples/ directory because
# `include "./x.nft"` is resolved against the current working directory.
# A failing example leaves NAME.err instead and makes the script exit 1.
#
# Usage: sh examples/expected/regen.sh      (needs root and nft)

set -u
NFT=${NFT:-/usr/sbin/nft}
out=$(cd "$(dirname "$0")" && pwd) || exit 1
ns="ks-ex-$$"
trap 'ip netns del "$ns" 2>/dev/null' EXIT
trap 'exit 130' INT TERM HUP
cd "$out/.." || exit 1

status=0
for f in *.nft; do
	base=${f%.nft}
	ip netns del "$ns" 2>/dev/null
	ip netns add "$ns" || exit 1
	if ip netns exec "$ns" "$NFT" -f "$f" 2>"$out/$base.err"; then
		ip netns exec "$ns" "$NFT" list ruleset >"$out/$base.list" || status=1
		rm -f "$out/$base.err"
		echo "ok   $f"
	else
		rm -f "$out/$base.list"
		echo "FAIL $f (see expected/$base.err)" >&2
		status=1
	fi
	ip netns del "$ns"
done
exit $status
