#!/usr/bin/env bash
# The Veil demo, from a fresh machine: installs what it needs, builds Veil, fetches SmolLM2,
# starts a local network of three veil-node processes, deploys the model's encrypted
# stages on them (two replicas each), asks a question through the network and prints the
# answer, the route and the speed. The network stays up until ctrl-c; pass --exit to stop
# right after the answer. Other arguments go to `veil-testnet up` (e.g. --prompt "...",
# --nodes 5, --model tiny).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh

log "building Veil (release; a cold build takes about 10 minutes on two cores)"
cargo build --release --workspace --locked
log "fetching SmolLM2-135M-Instruct (cached under ${VEIL_HOME:-~/.veil})"
"$CARGO_TARGET_DIR/release/veil" model fetch smollm2 >/dev/null
exec "$CARGO_TARGET_DIR/release/veil-testnet" up "$@"
