#!/usr/bin/env bash
# Where a cold release build spends its time: builds the workspace from nothing into a
# fresh target directory with `cargo build --timings` and prints the wall time, the total
# compile time, the slowest crates and the main groups of crates.
#
#   scripts/build-timings.sh [--features wgpu] [--keep DIR]
#
#   --features F   build with these features (e.g. wgpu: the GPU backend, as CI does)
#   --keep DIR     use DIR as the target directory and keep it (default: a temporary one)
#
# Crates already downloaded are not downloaded again: set CARGO_HOME to an empty directory
# to include the downloads, as on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh

features=()
target=""
while [ $# -gt 0 ]; do
  case "$1" in
    --features) features=(--features "$2"); shift 2 ;;
    --keep) target="$2"; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) log "unknown argument $1 (see --help)"; exit 2 ;;
  esac
done
if [ -z "$target" ]; then
  target="$(mktemp -d "${TMPDIR:-/tmp}/veil-build-timings.XXXXXX")"
  trap 'rm -rf "$target"' EXIT
fi

log "cold release build into $target${features[*]:+ (${features[*]})}"
start=$SECONDS
CARGO_TARGET_DIR="$target" cargo build --release --workspace --locked "${features[@]}" --timings
wall=$((SECONDS - start))
report="$target/cargo-timings/cargo-timing.html"
cp "$report" "${TMPDIR:-/tmp}/veil-cargo-timing.html"
log "wall time ${wall} s; the full report: ${TMPDIR:-/tmp}/veil-cargo-timing.html"
python3 - "$report" "$wall" <<'EOF'
import json, re, sys
html = open(sys.argv[1]).read()
units = json.loads(re.search(r"const UNIT_DATA = (\[.*?\]);\n", html, re.S).group(1))
by_crate = {}
for u in units:
    by_crate[u["name"]] = by_crate.get(u["name"], 0.0) + u["duration"]
total = sum(by_crate.values())
print(f"wall {int(sys.argv[2]) / 60:.1f} min; {total / 60:.1f} min of compilation over {len(units)} units")
print("\nslowest crates (minutes):")
for name, t in sorted(by_crate.items(), key=lambda x: -x[1])[:25]:
    print(f"  {name:32s} {t / 60:5.2f}")
groups = {
    "GPU stack (cubecl, cubek, wgpu, naga, pliron, burn-cubecl, burn-fusion, burn-wgpu)":
        lambda n: n.startswith(("cubecl", "cubek", "wgpu", "naga", "pliron", "spirv",
                                "burn-cubecl", "burn-fusion", "burn-wgpu")),
    "burn (CPU backend and core)": lambda n: n.startswith("burn"),
    "libp2p and its TLS": lambda n: "libp2p" in n or n in (
        "quinn", "quinn-proto", "rustls", "aws-lc-sys", "aws-lc-rs", "ring", "yamux", "snow"),
    "Veil's crates": lambda n: n.startswith("veil"),
}
print("\ngroups (minutes):")
for g, pick in groups.items():
    print(f"  {sum(t for n, t in by_crate.items() if pick(n)) / 60:5.1f}  {g}")
EOF
