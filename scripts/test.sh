#!/usr/bin/env bash
# The test suite, from a fresh machine: installs what it needs, fetches SmolLM2 (cached
# under $VEIL_HOME, default ~/.veil) and runs every test in release mode on the CPU and
# wgpu backends.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh

log "building (release; a cold build takes 20-30 minutes)"
cargo build --release --workspace --locked
log "fetching SmolLM2-135M-Instruct"
"$CARGO_TARGET_DIR/release/veil" model fetch smollm2 >/dev/null
log "running the tests"
cargo test --release --workspace --locked -- "$@"
