#!/usr/bin/env bash
# Installs what Veil needs on a fresh Debian/Ubuntu machine; sourced by demo.sh and test.sh.
#  - a Rust toolchain (must already be there: https://rustup.rs)
#  - with VEIL_WGPU=1: Mesa's software Vulkan driver, so that burn's wgpu backend runs
#    without a GPU
#  - Python 3 with pip, which `veil model fetch` uses to download SmolLM2
#  - curl, for the gateway's examples and tests
set -euo pipefail

log() { printf '\033[1m[veil]\033[0m %s\n' "$*" >&2; }

sudo_cmd() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    log "need root to run: $*"; return 1; fi
}

if ! command -v cargo >/dev/null 2>&1; then
  log "cargo not found: install Rust from https://rustup.rs and run this again"
  exit 1
fi

need_apt=()
# Vulkan only for a build with the wgpu backend (scripts/test.sh sets VEIL_WGPU=1).
if [ "${VEIL_WGPU:-0}" = 1 ]; then
  ls /usr/share/vulkan/icd.d/lvp_icd*.json >/dev/null 2>&1 || need_apt+=(mesa-vulkan-drivers)
  ldconfig -p 2>/dev/null | grep -q 'libvulkan.so.1' || need_apt+=(libvulkan1)
fi
python3 -m pip --version >/dev/null 2>&1 || need_apt+=(python3-pip)
# the gateway's README examples and tests use curl
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
# the testnet's WAN topology (network namespaces behind NAT routers): nftables and iproute2
command -v nft >/dev/null 2>&1 || need_apt+=(nftables)
command -v ip >/dev/null 2>&1 || need_apt+=(iproute2)
if [ ${#need_apt[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1; then
    log "installing ${need_apt[*]} with apt-get"
    sudo_cmd apt-get update -qq
    sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    log "please install: ${need_apt[*]} (no apt-get here); continuing"
  fi
fi

# Builds are cached outside the clone so that a machine reuses them across checkouts.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/veil/target}"
# Mesa's Vulkan loader complains on every start when this is unset (headless machines).
if [ -z "${XDG_RUNTIME_DIR:-}" ]; then
  export XDG_RUNTIME_DIR="${TMPDIR:-/tmp}/veil-runtime-$(id -u)"
  mkdir -p -m 700 "$XDG_RUNTIME_DIR"
fi
