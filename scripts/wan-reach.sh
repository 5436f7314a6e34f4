#!/usr/bin/env bash
# Direct, hole-punched and relayed decode across the testnet's WAN (veil-testnet wan): a
# client behind its NAT runs the model as one stage on (a) a public node, (b) a node at home
# behind an endpoint-independent NAT (reached through a relay, then a punched hole) and (c) a
# node at home behind a symmetric NAT (through a relay for good), one generation each after
# a warm-up, per delay; with the round-trip ceiling (each token: one round trip over the
# client's uplink and the node's, 2 · 2D, plus the relay's uplink twice through a relay) and
# the ratio to the public node.
#
#   scripts/wan-reach.sh [--delays 5,20] [--relay-delay MS] [--model smollm2] [--tokens 48]
#
#   --relay-delay MS   the public hosts' (bootstrap, relay) uplinks, one way [default: as
#                      each --delays entry]; 1 puts the relay in a data centre
#
# Needs root (network namespaces) and nftables (scripts/setup.sh installs it).
set -euo pipefail
cd "$(dirname "$0")/.."

delays="5,20" model="smollm2" tokens=48 relay_delay=""
while [ $# -gt 0 ]; do
  case "$1" in
    --delays) delays="$2"; shift 2 ;;
    --model) model="$2"; shift 2 ;;
    --tokens) tokens="$2"; shift 2 ;;
    --relay-delay) relay_delay="$2"; shift 2 ;;
    -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done

source scripts/wan-lib.sh
wan_prepare "$model"

echo "| one-way delay (ms) | relay's (ms) | node | reached | decode tok/s | ms/token | ceiling tok/s | vs public |"
echo "|---|---|---|---|---|---|---|---|"
IFS=',' read -ra list <<< "$delays"
for d in "${list[@]}"; do
  r="${relay_delay:-$d}"
  wan_up --homes eim,symmetric --home-nodes --delay-ms "$d" --public-delay-ms "$r" --jitter-ms 0
  id_of() { grep "^  $1 " "$work/wan.out" | grep -o "node [^ ]*" | awk '{print $2}'; }
  # the nodes at home are usable once their ads carry relayed addresses
  for _ in $(seq 60); do
    n=$(in_ns "$bin/veil" peers --bootstrap "$boot" --json --wait 1 2>/dev/null | grep -c 'p2p-circuit' || true)
    [ "$n" -ge 2 ] && break
  done
  public_tps=""
  for host in boot home0 home1; do
    peer=$(id_of "$host")
    [ -n "$peer" ] || { echo "no node on $host in:" >&2; cat "$work/wan.out" >&2; exit 1; }
    id=$(in_ns "$bin/veil" deploy --model "$model" --stages 1 --replicas 1 --nodes "$peer" \
      --bootstrap "$boot" --wait 3 | tail -1)
    run() {
      in_ns "$bin/veil" generate --deployment "$id" --bootstrap "$boot" --max-tokens "$tokens" \
        --prompt "Tell me about the rivers of Europe." --verify 0 --json > "$work/gen.json"
    }
    run  # warm-up: the node loads its shard
    run
    python3 - "$d" "$r" "$host" "${public_tps:-0}" "$work/gen.json" > "$work/row" <<'PY'
import json, sys
d, r, host, public, path = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3], float(sys.argv[4]), sys.argv[5]
out = json.load(open(path))
tps = out["timing"]["decode_tokens_per_s"]
c = out["network"]["connections"]
# one round trip per token over the client's uplink and the node's (and the relay's twice)
if host == "boot":
    how, one_way = "direct", d + r
elif c["hole_punches"] > 0:
    how, one_way = "direct (hole punched)", 2 * d
else:
    how, one_way = "relayed", 2 * d + 2 * r
ceiling = 1 / (2 * one_way / 1000) if one_way > 0 else float("inf")
ratio = f"{tps / public:.2f}" if public > 0 else "1.00"
print(f"| {d:g} | {r:g} | {host} | {how} | {tps:.1f} | {1000 / tps:.1f} | {ceiling:.1f} | {ratio} |")
print(tps)
PY
    head -1 "$work/row"
    if [ "$host" = boot ]; then public_tps=$(tail -1 "$work/row"); fi
  done
  wan_down
done
