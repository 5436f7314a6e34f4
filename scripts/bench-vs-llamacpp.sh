#!/usr/bin/env bash
# Veil beside llama.cpp on the same GGUF files, same threads and lengths, in one run:
# prompt and decode tokens/s and peak RSS of each, and Veil's ratios.
#
#   scripts/bench-vs-llamacpp.sh [--models M,...] [--prompt N] [--gen N] [--runs N]
#                                [--pairs N] [--threads N] [--exact] [--encrypted]
#
#   --models    smollm2 (the default model, Q4_1), gemma3 (Q4_K_M), synth shapes as SHAPE-QUANT (llama-1b-q8_0,
#               llama-1b-q4_0, llama-3b-q4_0, llama-8b-q4_0, ...: written once with
#               `veil model synth` into the cache), or .gguf paths.
#               Default: smollm2,llama-1b-q8_0,llama-1b-q4_0
#   --prompt    prompt tokens (default 128); --gen: tokens decoded (default 64)
#   --runs      timed runs per measurement, median reported (default 3)
#   --pairs     llama.cpp/Veil measurements alternated per model (default 2); the table
#               shows each figure's median over the pairs
#   --threads   threads of both (default: the number of cores)
#   --exact     Veil with f32 activations (default: 8-bit activations, as llama.cpp)
#   --encrypted also Veil's encrypted pipeline (q8_0 shards) and its ratio to plaintext
#
# llama-cpp-python 0.3.36 is built from source once into $VEIL_CACHE/llama-cpp-python
# (about 6 minutes on 2 cores). Decode is memory-bound: the table shows the ceiling
# bandwidth / bytes per token beside it when ../shared/tools/membw.c is there.
set -euo pipefail
cd "$(dirname "$0")/.."

models="smollm2,llama-1b-q8_0,llama-1b-q4_0"
prompt=128 gen=64 runs=3 pairs=2 threads="$(nproc)" exact=() encrypted=()
while [ $# -gt 0 ]; do
  case "$1" in
    --models) models="$2"; shift 2 ;;
    --prompt) prompt="$2"; shift 2 ;;
    --gen) gen="$2"; shift 2 ;;
    --runs) runs="$2"; shift 2 ;;
    --pairs) pairs="$2"; shift 2 ;;
    --threads) threads="$2"; shift 2 ;;
    --exact) exact=(--exact); shift ;;
    --encrypted) encrypted=(--encrypted); shift ;;
    -h|--help) sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done

source scripts/setup.sh
cache="${VEIL_CACHE:-$HOME/.cache/veil}"
site="$cache/llama-cpp-python-0.3.36"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

log "building Veil (release)"
features=()
if [ "${VEIL_WGPU:-0}" = 1 ]; then features=(--features wgpu); fi
cargo build --release --workspace --locked "${features[@]}"
veil="$CARGO_TARGET_DIR/release/veil"

if [ ! -f "$site/.complete" ]; then
  log "building llama-cpp-python 0.3.36 from source into $site (once; about 6 minutes)"
  rm -rf "$site"
  python3 -m pip install --quiet --disable-pip-version-check --target "$site" \
    llama-cpp-python==0.3.36 numpy
  touch "$site/.complete"
fi

bandwidth=""
if [ -f ../shared/tools/membw.c ] && command -v gcc >/dev/null; then
  gcc -O2 -fopenmp -o "$work/membw" ../shared/tools/membw.c 2>/dev/null \
    || gcc -O2 -o "$work/membw" ../shared/tools/membw.c 2>/dev/null || true
  if [ -x "$work/membw" ]; then
    bandwidth="$(OMP_NUM_THREADS="$threads" "$work/membw" 2>/dev/null \
      | grep -oE '[0-9]+(\.[0-9]+)? *GB/s' | tail -1 | grep -oE '^[0-9.]+' || true)"
  fi
fi

resolve() {
  case "$1" in
    smollm2|gemma3) "$veil" model fetch "$1" ;;
    *.gguf) echo "$1" ;;
    *-*)
      local shape="${1%-*}" quant="${1##*-}" path="$cache/synth/$1.gguf"
      mkdir -p "$cache/synth"
      if [ ! -f "$path" ]; then
        log "writing the random-weight $shape model in $quant ($path)"
        "$veil" model synth --shape "$shape" --quant "$quant" --out "$path" >/dev/null
      fi
      echo "$path" ;;
    *) echo "unknown model $1" >&2; return 1 ;;
  esac
}

results="$work/results"
mkdir -p "$results"
IFS=',' read -ra list <<< "$models"
n=0
for m in "${list[@]}"; do
  path="$(resolve "$m")"
  for pair in $(seq "$pairs"); do
    n=$((n + 1))
    log "$m: llama.cpp ($pair/$pairs)"
    PYTHONPATH="$site" python3 tools/reference/bench_llama_cpp.py "$path" "$prompt" "$gen" \
      "$runs" "$threads" --json > "$results/$n.llama.cpp.json"
    log "$m: Veil ($pair/$pairs)"
    RAYON_NUM_THREADS="$threads" VEIL_LOG=warn "$veil" bench --local --backend cpu \
      --model "$path" --prompt-tokens "$prompt" --gen-tokens "$gen" --runs "$runs" \
      "${exact[@]}" "${encrypted[@]}" --json > "$results/$n.veil.json"
    printf '%s\n%s\n' "$m" "$path" > "$results/$n.model"
  done
done

python3 - "$results" "$n" "$threads" "$bandwidth" "${exact[*]:-}" <<'PY'
import json, os, statistics, sys
path, n, threads, bw, exact = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
rows = []
for i in range(1, n + 1):
    model, file = open(f"{path}/{i}.model").read().split("\n")[:2]
    for engine in ["llama.cpp", "veil"]:
        r = json.load(open(f"{path}/{i}.{engine}.json"))
        if isinstance(r, list):  # veil bench --json: one object per backend
            r = r[0]
        rows.append({"model": model, "file": file, "engine": engine, "r": r})
fig = lambda r: r["r"]
models = list(dict.fromkeys(r["model"] for r in rows))
print(f"\n{threads} threads, prompt/decode lengths as given; medians over alternating pairs"
      + (f"; read bandwidth {bw} GB/s" if bw else "") + (", Veil --exact" if exact else ""))
hdr = "| model | file | | llama.cpp | Veil | Veil / llama.cpp |"
if bw:
    hdr += " decode ceiling |"
print(hdr)
print("|" + "---|" * (hdr.count("|") - 1))
for m in models:
    ll = [fig(r) for r in rows if r["model"] == m and r["engine"] == "llama.cpp"]
    vv = [fig(r) for r in rows if r["model"] == m and r["engine"] == "veil"]
    f = next(r["file"] for r in rows if r["model"] == m)
    size = os.path.getsize(f) / 1e9
    med = lambda xs, k: statistics.median(x[k] for x in xs)
    enc = [x["encrypted"] for x in vv if x.get("encrypted")]
    rss = "peak RSS MiB" + (" (Veil's includes encrypting)" if enc else "")
    for key, name in [("prompt_tokens_per_s", "prompt tok/s"), ("decode_tokens_per_s", "decode tok/s"),
                      ("peak_rss_mib", rss)]:
        a, b = med(ll, key), med(vv, key)
        line = f"| {m} | {size:.2f} GB | {name} | {a:.1f} | {b:.1f} | {b / a:.2f} |"
        if bw:
            line += f" {float(bw) / size:.1f} tok/s |" if key == "decode_tokens_per_s" else " |"
        print(line)
    if enc:
        print(f"| {m} | | encrypted/plaintext decode | | {statistics.median(e['decode_ratio'] for e in enc):.2f} | |"
              + (" |" if bw else ""))
PY
