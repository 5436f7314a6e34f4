#!/usr/bin/env bash
# Side by side: Veil as built from another commit (default: origin/main, else HEAD~1)
# against the working tree, both benchmarked in one run on the same machine and model.
# Prints each build's `veil bench --local` figures and the ratios new/old, per backend.
#
#   scripts/compare-builds.sh [REF] [--backend cpu|wgpu]... [--model M] [--features wgpu]
#                             [-- BENCH-ARGS...]
#
# BENCH-ARGS go to `veil bench` (e.g. `--prompt-tokens 32 --gen-tokens 8 --runs 1` for the
# software Vulkan device, which decodes about one token a second).
# The other commit is built in a worktree with its own target directory (kept under
# ~/.cache/veil/compare-<commit> for the next run); a cold build takes 10-30 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh

ref=""
backends=()
model=smollm2
features=()
bench_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --) shift; bench_args=("$@"); break ;;
    --backend) backends+=(--backend "$2"); shift 2 ;;
    --model) model="$2"; shift 2 ;;
    --features) features=(--features "$2"); shift 2 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    -*) log "unknown option $1 (see --help)"; exit 2 ;;
    *) ref="$1"; shift ;;
  esac
done
if [ -z "$ref" ]; then
  ref=$(git rev-parse --verify -q origin/main || git rev-parse HEAD~1)
fi
commit=$(git rev-parse --short "$ref")
old_dir="$HOME/.cache/veil/compare-$commit"
if [ ! -d "$old_dir/src" ]; then
  git worktree add --detach "$old_dir/src" "$commit" >/dev/null
fi
log "building $commit (old)"
# the old commit may predate the wgpu feature (it then always has the backend)
(cd "$old_dir/src" && CARGO_TARGET_DIR="$old_dir/target" cargo build --release --workspace \
  --locked "${features[@]}" 2>/dev/null || CARGO_TARGET_DIR="$old_dir/target" cargo build \
  --release --workspace --locked)
log "building the working tree (new)"
cargo build --release --workspace --locked "${features[@]}"
"$CARGO_TARGET_DIR/release/veil" model fetch smollm2 >/dev/null

old_json=$(mktemp) new_json=$(mktemp)
trap 'rm -f "$old_json" "$new_json"' EXIT
log "benchmarking old and new in turn"
"$old_dir/target/release/veil" bench --local --model "$model" "${backends[@]}" "${bench_args[@]}" \
  --json >"$old_json"
"$CARGO_TARGET_DIR/release/veil" bench --local --model "$model" "${backends[@]}" "${bench_args[@]}" \
  --json >"$new_json"
python3 - "$old_json" "$new_json" "$commit" <<'EOF'
import json, sys
old = {r["backend"]: r for r in json.load(open(sys.argv[1]))}
new = {r["backend"]: r for r in json.load(open(sys.argv[2]))}
print(f"| backend | build | prompt tok/s | decode tok/s | peak RSS MiB |")
print(f"|---|---|---|---|---|")
for b in new:
    for name, r in ((sys.argv[3], old.get(b)), ("working tree", new[b])):
        if r:
            print(f"| {b} | {name} | {r['prompt_tokens_per_s']:.1f} | {r['decode_tokens_per_s']:.1f} | {r['peak_rss_mib']:.0f} |")
    if b in old:
        o, n = old[b], new[b]
        print(f"| {b} | **new/old** | {n['prompt_tokens_per_s'] / o['prompt_tokens_per_s']:.2f} | "
              f"{n['decode_tokens_per_s'] / o['decode_tokens_per_s']:.2f} | "
              f"{n['peak_rss_mib'] / o['peak_rss_mib']:.2f} |")
EOF
