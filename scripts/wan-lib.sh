# Shared by the scripts that measure across `veil-testnet wan` (sourced, not run):
#   wan_prepare MODEL   build Veil, make a work directory (removed on exit, with any WAN
#                       still up) and a client home sharing the model cache
#   wan_up ARGS…        start `veil-testnet wan ARGS…` and wait until it is up; sets
#                       $ns (the client's namespace) and $boot (the bootstrap address)
#   wan_down            ctrl-c the WAN and wait until it has removed everything
#   in_ns CMD…          run CMD in the client's namespace
# Needs root (network namespaces) and nftables (scripts/setup.sh installs it).

wan_prepare() {
  source scripts/setup.sh
  log "building Veil (release)"
  local features=()
  if [ "${VEIL_WGPU:-0}" = 1 ]; then features=(--features wgpu); fi
  cargo build --release --workspace --locked "${features[@]}"
  bin="$CARGO_TARGET_DIR/release"
  work="$(mktemp -d)"
  wan_pid=""
  trap 'wan_down; rm -rf "$work"' EXIT
  export VEIL_HOME="$work/home" VEIL_LOG=warn
  mkdir -p "$VEIL_HOME"
  "$bin/veil" model fetch "$1" >/dev/null 2>&1 || true
  [ -d "$HOME/.veil/models" ] && ln -s "$HOME/.veil/models" "$VEIL_HOME/models" 2>/dev/null || true
}

wan_up() {
  "$bin/veil-testnet" wan "$@" > "$work/wan.out" 2> "$work/wan.err" &
  wan_pid=$!
  for _ in $(seq 120); do grep -q "veil chat" "$work/wan.out" 2>/dev/null && break; sleep 1; done
  ns=$(grep -o "namespace [^ ]*" "$work/wan.out" | awk '{print $2}')
  boot=$(grep -o "veil peers --bootstrap [^ ]*" "$work/wan.out" | awk '{print $4}')
  [ -n "$ns" ] && [ -n "$boot" ] || { cat "$work/wan.err" >&2; exit 1; }
}

wan_down() {
  if [ -n "${wan_pid:-}" ]; then
    kill -INT "$wan_pid" 2>/dev/null || true
    wait "$wan_pid" 2>/dev/null || true
    wan_pid=""
  fi
}

in_ns() { ip netns exec "$ns" "$@"; }
