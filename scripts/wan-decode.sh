#!/usr/bin/env bash
# Decode speed across the testnet's WAN (veil-testnet wan): a client behind its NAT, the
# model in 2 stages on the two public nodes, one generation per delay after a warm-up, with
# the round-trip ceiling beside each figure (each token crosses 2 stages, each a round trip
# over the client's uplink and the node's: 2 · 2 · 2D, plus the compute measured at D = 0).
#
#   scripts/wan-decode.sh [--delays 0,5,20] [--model smollm2] [--tokens 48]
#
# Needs root (network namespaces) and nftables (scripts/setup.sh installs it).
set -euo pipefail
cd "$(dirname "$0")/.."

delays="0,5,20" model="smollm2" tokens=48
while [ $# -gt 0 ]; do
  case "$1" in
    --delays) delays="$2"; shift 2 ;;
    --model) model="$2"; shift 2 ;;
    --tokens) tokens="$2"; shift 2 ;;
    -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done

source scripts/wan-lib.sh
wan_prepare "$model"

echo "| one-way delay per uplink (ms) | decode tokens/s | ceiling tokens/s | ratio |"
echo "|---|---|---|---|"
compute_s=""
IFS=',' read -ra list <<< "$delays"
# the compute per token comes from the run without delay: it goes first
if [ "${list[0]}" != 0 ]; then list=(0 "${list[@]}"); fi
for d in "${list[@]}"; do
  wan_up --homes eim --delay-ms "$d" --jitter-ms 0
  for _ in $(seq 30); do
    n=$(in_ns "$bin/veil" peers --bootstrap "$boot" --json --wait 1 2>/dev/null | grep -c '"peer"' || true)
    [ "$n" -ge 2 ] && break
  done
  id=$(in_ns "$bin/veil" deploy --model "$model" --stages 2 --replicas 1 --bootstrap "$boot" --wait 3 | tail -1)
  run() {
    in_ns "$bin/veil" generate --deployment "$id" --bootstrap "$boot" --max-tokens "$tokens" \
      --prompt "Tell me about the rivers of Europe." --verify 0 --json |
      python3 -c "import json,sys; print(json.load(sys.stdin)['timing']['decode_tokens_per_s'])"
  }
  run > /dev/null  # warm-up: nodes load their shards
  tps=$(run)
  if [ -z "$compute_s" ]; then compute_s=$(python3 -c "print(1 / $tps)"); fi
  python3 -c "
d, tps, c = $d, $tps, $compute_s
ceiling = 1 / (2 * 2 * 2 * d / 1000 + c)
print(f'| {d} | {tps:.1f} | {ceiling:.1f} | {tps / ceiling:.2f} |')"
  wan_down
done
