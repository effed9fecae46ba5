#!/usr/bin/env bash
# Runs the NVMe driver's guest tests: builds a small guest (Debian's 6.12 kernel with the
# modules it needs, a busybox-static initramfs, the project's static binaries), boots it under
# qemu-system-x86_64 (TCG) with two emulated NVMe controllers and an emulated IOMMU, and exits
# with the guest's result. The kernel and the build are cached under target/, so reruns are
# fast.
#
# Usage: tests/qemu/run.sh [--bench]
#   --bench   run qsbench on the emulated controller instead of the tests (release build)
# Environment: QS_GUEST_TIMEOUT (seconds, default 900), QS_GUEST_PROFILE (debug or release).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
here=$root/tests/qemu
cache=$root/target/qemu
mode=test
profile=${QS_GUEST_PROFILE:-debug}
if [ "${1:-}" = --bench ]; then
  mode=bench
  profile=${QS_GUEST_PROFILE:-release}
fi
mkdir -p "$cache"

for tool in qemu-system-x86_64 busybox dpkg-deb apt-get xz strings; do
  command -v "$tool" >/dev/null || { echo "qemu guest: $tool is missing (scripts/deps.sh test installs it)" >&2; exit 1; }
done

# 1. The guest kernel and the modules the tests load (with everything they depend on), from
# Debian's package: the newest 6.12 kernel of bookworm (its nvme and nvmet have DH-HMAC-CHAP,
# 6.1's do not), else the default one. Modules are stored uncompressed, in the order to load
# them (lib/modules/order in the guest).
wanted=(vfio-pci vfio_iommu_type1 nvme-tcp nvmet-tcp)
pkg_name() {
  apt-cache search --names-only '^linux-image-6\.12\.[0-9.]*\+deb12-amd64-unsigned$' 2>/dev/null |
    awk '{print $1}' | sort -V | tail -1
}
pkg=$(pkg_name)
if [ -z "$pkg" ]; then apt-get update -qq; pkg=$(pkg_name); fi
[ -n "$pkg" ] || { echo "qemu guest: no linux-image 6.12 package found" >&2; exit 1; }
kernel=$cache/kernel
if [ "$(cat "$kernel/package" 2>/dev/null)" != "$pkg" ]; then
  echo "qemu guest: fetching $pkg"
  work=$cache/kernel.tmp
  rm -rf "$work" && mkdir -p "$work/modules"
  (cd "$work" && apt-get download -q "$pkg" >/dev/null)
  dpkg-deb -x "$work"/*.deb "$work/root"
  cp "$work"/root/boot/vmlinuz-* "$work/vmlinuz"
  tree=$(echo "$work"/root/lib/modules/*/kernel)
  # Each module's file by its name ('-' and '_' are the same in module names).
  declare -A file_of=()
  while IFS= read -r f; do
    n=$(basename "$f"); n=${n%%.ko*}
    file_of[${n//-/_}]=$f
  done < <(find "$tree" -name '*.ko*')
  declare -A placed=()
  order=()
  place() { # a module after what it depends on
    local key=${1//-/_} f deps d
    [ -n "${placed[$key]:-}" ] && return
    placed[$key]=1
    f=${file_of[$key]:-}
    [ -n "$f" ] || return 0 # built into the kernel
    case "$f" in
      *.xz) xz -dc "$f" >"$work/modules/$1.ko" ;;
      *) cp "$f" "$work/modules/$1.ko" ;;
    esac
    deps=$(strings "$work/modules/$1.ko" | sed -n 's/^depends=//p' | head -1)
    for d in ${deps//,/ }; do place "$d"; done
    order+=("$1")
  }
  for m in "${wanted[@]}"; do
    [ -n "${file_of[${m//-/_}]:-}" ] || { echo "qemu guest: module $m not in $pkg" >&2; exit 1; }
    place "$m"
  done
  printf '%s\n' "${order[@]}" >"$work/modules/order"
  rm -rf "$kernel" && mkdir -p "$kernel"
  mv "$work/vmlinuz" "$work/modules" "$kernel/"
  echo "$pkg" >"$kernel/package"
  rm -rf "$work"
fi

# 2. Static binaries (hwloc left out: it does not link statically; topology comes from /sys).
target=x86_64-unknown-linux-gnu
build=(cargo build --locked --target "$target" --no-default-features
  -p engine --bin quicksplit -p quicksplit-tests --bin nvme-guest -p bench --bin qsbench)
[ "$profile" = release ] && build+=(--release)
echo "qemu guest: building static binaries ($profile)"
# Optimized even in the debug profile: TCG runs unoptimized code very slowly.
(cd "$root" && CARGO_PROFILE_DEV_OPT_LEVEL=2 RUSTFLAGS="-C target-feature=+crt-static" "${build[@]}")
bin=${CARGO_TARGET_DIR:-$root/target}/$target/$profile

# 3. The initramfs.
rootfs=$cache/rootfs
rm -rf "$rootfs"
mkdir -p "$rootfs"/{bin,proc,sys,dev,tmp,lib/modules}
cp "$(command -v busybox)" "$rootfs/bin/busybox"
for applet in $("$rootfs/bin/busybox" --list); do
  # A link named busybox to itself would make every exec fail (ELOOP).
  [ "$applet" = busybox ] || ln -sf busybox "$rootfs/bin/$applet"
done
cp "$kernel"/modules/*.ko "$kernel/modules/order" "$rootfs/lib/modules/"
cp "$bin/quicksplit" "$bin/nvme-guest" "$bin/qsbench" "$rootfs/bin/"
install -m 0755 "$here/init" "$rootfs/init"
install -m 0755 "$here/nvmf-guest.sh" "$rootfs/bin/nvmf-guest"
(cd "$rootfs" && find . | busybox cpio -o -H newc 2>/dev/null | gzip -1 > "$cache/initrd.gz")

# 4. Two controllers, each with its own image (QEMU locks an image).
for i in 0 1; do
  rm -f "$cache/nvme$i.img"
  truncate -s 32M "$cache/nvme$i.img"
done

# 5. Boot (TCG: KVM hangs these guests early) and read the result from the serial console.
console=$cache/console-$mode.log
echo "qemu guest: booting ($mode)"
status=0
timeout "${QS_GUEST_TIMEOUT:-900}" qemu-system-x86_64 \
  -M q35,kernel-irqchip=split -m 1G -smp 2 -nographic -no-reboot \
  -device intel-iommu,intremap=on,aw-bits=48 \
  -kernel "$kernel/vmlinuz" -initrd "$cache/initrd.gz" \
  -append "console=ttyS0 intel_iommu=on quiet panic=-1 qs.mode=$mode" \
  -drive "file=$cache/nvme0.img,if=none,id=nv0,format=raw" -device nvme,serial=qs0,drive=nv0 \
  -drive "file=$cache/nvme1.img,if=none,id=nv1,format=raw" -device nvme,serial=qs1,drive=nv1 \
  </dev/null >"$console" 2>&1 || status=$?
result=$(tr -d '\r' <"$console" | sed -n 's/^QS-GUEST-RESULT rc=\([0-9]*\).*/\1/p' | tail -1)
if [ -z "$result" ] || [ "$result" != 0 ]; then
  echo "qemu guest: FAILED (qemu exit $status, guest result '${result:-none}'); console:" >&2
  tr -d '\r' <"$console" >&2
  exit 1
fi
tr -d '\r' <"$console" | grep -E '^(ok|not ok|#|QS-GUEST|[0-9]+ passed|qsbench|  )' || true
echo "qemu guest: passed"
