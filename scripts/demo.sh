#!/usr/bin/env bash
# The main job, until the dataplane exists: check every example ruleset, print it as
# `nft list ruleset` would, and trace packets through it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --quiet
ks=target/release/keepstate
for f in examples/*.nft; do
	echo "== keepstate check --print $f"
	(cd examples && "../$ks" check --print "$(basename "$f")")
done
