#!/usr/bin/env bash
# The Veil demo, from a fresh machine: installs what it needs, fetches SmolLM2 and answers
# a prompt. Extra arguments go to `veil generate` (e.g. --prompt "..." --backend cpu).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh

log "building veil (release; a cold build takes 20-30 minutes)"
cargo build --release --locked -p veil-client
veil="$CARGO_TARGET_DIR/release/veil"
"$veil" model fetch smollm2 >/dev/null
if [ $# -eq 0 ]; then
  set -- --prompt "Name three planets of the solar system and one fact about each."
fi
"$veil" generate --local --model smollm2 --max-tokens 96 "$@"
