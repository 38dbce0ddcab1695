#!/usr/bin/env bash
# The whole test suite: installs what it needs, builds everything (benches included), runs
# every test. Tests that need root and network namespaces skip with a message when not root.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# Benchmarks must keep compiling, but run only with `cargo bench`.
cargo build --release --benches --quiet
cargo test --quiet 2>&1
