#!/usr/bin/env bash
# Installs the Debian packages quicksplit builds and tests with, where missing.
# Usage: scripts/deps.sh [build|test]
set -euo pipefail
what=${1:-test}
build_pkgs=(pkg-config libhwloc-dev libudev-dev libssl-dev gcc)
test_pkgs=(fio libnbd-bin nbdkit qemu-utils openssl tar coreutils busybox-static curl prometheus tmux
  xz-utils binutils)
pkgs=("${build_pkgs[@]}")
[ "$what" = test ] && pkgs+=("${test_pkgs[@]}")
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
sudo=""
[ "$(id -u)" -eq 0 ] || sudo=sudo
# The NVMe guest tests boot QEMU. qemu-system-x86 conflicts with a newer qemu-utils (it removes
# it) and naming both in one command fails, so it goes in a command of its own, first; the
# loop below then installs Debian's qemu-utils to match it.
if [ "$what" = test ] && ! installed qemu-system-x86; then
  echo "installing Debian package: qemu-system-x86"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends qemu-system-x86
fi
missing=()
for p in "${pkgs[@]}"; do
  installed "$p" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing Debian packages: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo is missing: install a Rust toolchain with rustup (https://rustup.rs) and run again" >&2
  exit 1
fi
