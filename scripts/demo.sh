#!/usr/bin/env bash
# The Veil demo, from a fresh machine: installs what it needs, builds Veil, fetches SmolLM2,
# starts a local network of three veil-node processes, deploys the model's encrypted
# stages on them (two replicas each), asks a question through the network and prints the
# answer, the route and the speed. The network stays up until ctrl-c, with an
# OpenAI-compatible gateway to it (`veil serve`, its URL printed; port $VEIL_SERVE_PORT, by
# default any free one); pass --exit to stop right after the answer. Other arguments go to
# `veil-testnet up` (e.g. --prompt "...", --nodes 5, --model tiny).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh

log "building Veil (release; a cold build takes about 10 minutes on two cores)"
cargo build --release --workspace --locked
log "fetching SmolLM2-135M-Instruct (cached under ${VEIL_HOME:-~/.veil})"
"$CARGO_TARGET_DIR/release/veil" model fetch smollm2 >/dev/null
serve=(--serve "${VEIL_SERVE_PORT:-0}")
for a in "$@"; do
  if [ "$a" = --exit ] || [ "$a" = --serve ]; then serve=(); fi
done
exec "$CARGO_TARGET_DIR/release/veil-testnet" up "${serve[@]}" "$@"
