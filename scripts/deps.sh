#!/usr/bin/env bash
# Installs the Debian packages quicksplit builds and tests with, where missing.
# Usage: scripts/deps.sh [build|test]
set -euo pipefail
what=${1:-test}
build_pkgs=(pkg-config libhwloc-dev libudev-dev gcc)
test_pkgs=(fio libnbd-bin nbdkit qemu-utils tar coreutils)
pkgs=("${build_pkgs[@]}")
[ "$what" = test ] && pkgs+=("${test_pkgs[@]}")
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing Debian packages: ${missing[*]}"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo is missing: install a Rust toolchain with rustup (https://rustup.rs) and run again" >&2
  exit 1
fi
