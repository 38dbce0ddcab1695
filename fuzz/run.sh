#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 300) on one core, starting from the seeds
# in fuzz/seeds/TARGET and the corpus it has grown before (fuzz/corpus/TARGET, not committed).
# Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`). A crash leaves its
# input in fuzz/artifacts/TARGET: copy it to tests/fixtures/fuzz/TARGET/ so that
# tests/fuzz_regressions.rs (stable) replays it from then on.
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-300}
shift || true
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(engine rules config ftp sip)
for t in "${targets[@]}"; do
	mkdir -p "corpus/$t"
	echo "== fuzz $t for ${secs}s"
	cargo +nightly fuzz run "$t" "corpus/$t" "seeds/$t" -- \
		-max_total_time="$secs" -rss_limit_mb=4096 -print_final_stats=1 2>&1 |
		grep -E "^(#[0-9]+.*(DONE|pulse)|stat::|==|SUMMARY|Crash|panicked)" | tail -8
done
