#!/usr/bin/env bash
# The test suite, from a fresh machine: installs what it needs, fetches SmolLM2 (cached
# under $VEIL_HOME, default ~/.veil), runs every test in release mode on the CPU and wgpu
# backends, then a short testnet bench and chaos run on SmolLM2 (their report goes to
# $CARGO_TARGET_DIR/testnet-report). Arguments go to the test binaries.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh

log "building (release; a cold build takes 20-30 minutes)"
cargo build --release --workspace --locked
log "fetching SmolLM2-135M-Instruct"
"$CARGO_TARGET_DIR/release/veil" model fetch smollm2 >/dev/null
log "running the tests"
cargo test --release --workspace --locked -- "$@"

testnet="$CARGO_TARGET_DIR/release/veil-testnet"
report="$CARGO_TARGET_DIR/testnet-report"
log "short testnet bench on SmolLM2 (3 nodes, up to 2 sessions)"
"$testnet" bench --sessions 2 --prompt-tokens 16 --gen-tokens 16 --report "$report"
log "short chaos run on SmolLM2 (a node killed every 2 s)"
"$testnet" chaos --sessions 2 --rounds 4 --gen-tokens 32 --kill-every 2 --down 1 \
  --json "$report/chaos.json"
log "projection to larger networks from this bench"
"$testnet" simulate --from "$report/bench.json" --nodes 10,100,1000 --duration 60
