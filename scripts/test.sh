#!/usr/bin/env bash
# The whole test suite: installs what it needs, builds everything (benches included), runs
# every test. Tests that need root and network namespaces skip with a message when not root.
# Ends with one summary line, `tests: N passed, N failed`, summed over every test binary.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# Benchmarks must keep compiling, but run only with `cargo bench`.
cargo build --release --benches --quiet
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --no-fail-fast 2>&1 | tee "$log" || status=$?
awk '/^test result:/ {
	for (i = 1; i <= NF; i++) {
		if ($(i) ~ /^passed;?$/) p += $(i-1)
		if ($(i) ~ /^failed;?$/) f += $(i-1)
	}
} END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit $status
