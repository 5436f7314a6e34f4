#!/usr/bin/env bash
# The test suite, from a fresh machine: installs what it needs, builds Veil with the wgpu
# backend (the `wgpu` feature; the demo builds without it), fetches SmolLM2 and Gemma 3 270M
# (cached under $VEIL_HOME, default ~/.veil), the `openai` and `selenium` Python packages and Debian's
# chromium that the gateway tests drive, runs every test in release mode on the CPU and wgpu
# backends, then a short testnet bench, chaos run and soak on SmolLM2 (their reports go to
# $CARGO_TARGET_DIR/testnet-report). Every step runs even when an earlier one fails; the
# failing tests and steps are listed at the end, and the exit status is non-zero if any.
#
#   scripts/test.sh [--stress | --one-core] [--cpu-only] [ARGS...]
#
#   --stress     run everything beside a busy loop on every core: the suite must not
#                assume a fast or idle machine (also VEIL_STRESS=1)
#   --one-core   run everything pinned to one core (taskset -c 0)
#   --cpu-only   build without the wgpu backend (as the demo does) and test the CPU only
#   ARGS         go to the test binaries (e.g. a test name filter)
set -euo pipefail
cd "$(dirname "$0")/.."

stress="${VEIL_STRESS:-0}"
pin=()
features=(--features wgpu)
args=()
for a in "$@"; do
  case "$a" in
    --stress) stress=1 ;;
    --one-core) pin=(taskset -c 0) ;;
    --cpu-only) features=() ;;
    *) args+=("$a") ;;
  esac
done
if [ ${#features[@]} -gt 0 ]; then export VEIL_WGPU=1; fi
source scripts/setup.sh

t0=$SECONDS
elapsed() { printf '%dm%02ds' $(( (SECONDS - $1) / 60 )) $(( (SECONDS - $1) % 60 )); }

log "building (release${features[*]:+, ${features[*]}})"
t=$SECONDS
cargo build --release --workspace --locked "${features[@]}"
log "built in $(elapsed "$t")"
log "fetching SmolLM2-135M-Instruct and Gemma 3 270M"
"$CARGO_TARGET_DIR/release/veil" model fetch smollm2 >/dev/null
"$CARGO_TARGET_DIR/release/veil" model fetch gemma3 >/dev/null
# pip_site PACKAGE VERSION: install a Python package once into ~/.cache/veil/PACKAGE-VERSION
# and print that directory (a failed install is logged; the tests that need it then fail).
pip_site() {
  local site="${VEIL_CACHE:-$HOME/.cache/veil}/$1-$2"
  if [ ! -f "$site/$1/__init__.py" ]; then
    log "installing the $1 Python package $2 into $site"
    rm -rf "$site.partial"
    if PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check --no-warn-conflicts \
      --target "$site.partial" "$1==$2" >&2; then
      mv "$site.partial" "$site"
    else
      log "could not install $1 $2: the gateway tests that use it will fail"
    fi
  fi
  printf '%s\n' "$site"
}
# The official OpenAI Python client, which the gateway's tests drive (about 10 s, once).
VEIL_OPENAI_SITE=$(pip_site openai 3.57.0)
export VEIL_OPENAI_SITE
# A headless browser for the gateway page's test: Debian's chromium and its driver (apt,
# once), and selenium to drive them (pip, about 5 s).
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    log "installing chromium and chromium-driver with apt-get (once)"
    { sudo_cmd apt-get update -qq &&
      sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; } ||
      log "could not install chromium: the gateway page's browser test will fail"
  else
    log "no apt-get: install chromium and its chromedriver for the gateway page's browser test"
  fi
fi
VEIL_SELENIUM_SITE=$(pip_site selenium 4.38.0)
export VEIL_SELENIUM_SITE

busy=()
stop_busy() { if [ ${#busy[@]} -gt 0 ]; then kill "${busy[@]}" 2>/dev/null || true; fi; }
trap stop_busy EXIT
trap 'stop_busy; exit 130' INT TERM
if [ "$stress" = 1 ]; then
  log "stress: a busy loop on each of $(nproc) cores for the whole run"
  for _ in $(seq "$(nproc)"); do
    ( trap - EXIT INT TERM; while :; do :; done ) &
    busy+=($!)
  done
fi
if [ ${#pin[@]} -gt 0 ]; then
  log "pinned to one core"
fi

report="$CARGO_TARGET_DIR/testnet-report"
mkdir -p "$report"
output="$report/test-output.log"
failed_steps=()

log "running the tests (output also in $output)"
t=$SECONDS
if ! "${pin[@]}" cargo test --release --workspace --locked "${features[@]}" --no-fail-fast \
  -- "${args[@]}" 2>&1 | tee "$output"; then
  failed_steps+=("cargo test")
fi
log "tests ran in $(elapsed "$t")"

testnet="$CARGO_TARGET_DIR/release/veil-testnet"
step() {
  local name="$1"
  shift
  log "$name"
  local t=$SECONDS
  if ! "${pin[@]}" "$@"; then
    failed_steps+=("$name")
  fi
  log "$name: $(elapsed "$t")"
}
step "short testnet bench on SmolLM2 (3 nodes, up to 2 sessions)" \
  "$testnet" bench --sessions 2 --prompt-tokens 16 --gen-tokens 16 --report "$report"
step "short chaos run on SmolLM2 (a node killed every 2 s)" \
  "$testnet" chaos --sessions 2 --rounds 4 --gen-tokens 32 --kill-every 2 --down 1 \
  --json "$report/chaos.json"
step "short soak on SmolLM2 (abusive peers beside normal generations for 45 s)" \
  "$testnet" soak --duration 45s --report "$report/soak"
if [ -f "$report/bench.json" ]; then
  step "projection to larger networks from this bench" \
    "$testnet" simulate --from "$report/bench.json" --nodes 10,100,1000 --duration 60
fi

log "all steps took $(elapsed "$t0")"
failed_tests=$(grep -E '^test .+ \.\.\. FAILED$' "$output" | sed -E 's/^test (.+) \.\.\. FAILED$/\1/' || true)
crashed=$(sed -n '/^error: [0-9]* targets\? failed:/,$p' "$output" | grep -E '^ +`' || true)
if [ ${#failed_steps[@]} -eq 0 ]; then
  log "everything passed"
  exit 0
fi
log "FAILED:"
for s in "${failed_steps[@]}"; do printf '  step: %s\n' "$s" >&2; done
if [ -n "$failed_tests" ]; then
  printf '  test: %s\n' $failed_tests >&2
fi
if [ -n "$crashed" ]; then
  printf '  test binaries that failed (rerun with cargo test --release):\n%s\n' "$crashed" >&2
fi
exit 1
