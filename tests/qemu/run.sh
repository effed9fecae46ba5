#!/usr/bin/env bash
# Runs the NVMe driver's guest tests: builds a small guest (Debian's kernel with its vfio
# modules, a busybox-static initramfs, the project's static binaries), boots it under
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

for tool in qemu-system-x86_64 busybox dpkg-deb apt-get; do
  command -v "$tool" >/dev/null || { echo "qemu guest: $tool is missing (scripts/deps.sh test installs it)" >&2; exit 1; }
done

# 1. The guest kernel and its vfio modules, from Debian's package.
modules=(virt/lib/irqbypass.ko drivers/vfio/vfio.ko drivers/vfio/vfio_iommu_type1.ko
  drivers/vfio/vfio_virqfd.ko drivers/vfio/pci/vfio-pci-core.ko drivers/vfio/pci/vfio-pci.ko)
# NVMe/TCP host and target (nvme-tcp, nvmet-tcp) with their dependencies.
modules+=(crypto/crct10dif_common.ko crypto/crct10dif_generic.ko lib/crc-t10dif.ko lib/crc64.ko
  crypto/crc64_rocksoft_generic.ko lib/crc64-rocksoft.ko block/t10-pi.ko fs/configfs/configfs.ko
  crypto/crc32c_generic.ko drivers/nvme/host/nvme-core.ko drivers/nvme/host/nvme-fabrics.ko
  drivers/nvme/host/nvme-tcp.ko drivers/nvme/target/nvmet.ko drivers/nvme/target/nvmet-tcp.ko)
kernel=$cache/kernel
if [ ! -f "$kernel/vmlinuz" ] || [ ! -f "$kernel/modules/nvmet-tcp.ko" ]; then
  pkg_name() { apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}'; }
  pkg=$(pkg_name)
  if [ -z "$pkg" ]; then apt-get update -qq; pkg=$(pkg_name); fi
  [ -n "$pkg" ] || { echo "qemu guest: no linux-image package found" >&2; exit 1; }
  echo "qemu guest: fetching $pkg"
  work=$cache/kernel.tmp
  rm -rf "$work" && mkdir -p "$work/modules"
  (cd "$work" && apt-get download -q "$pkg" >/dev/null)
  dpkg-deb -x "$work"/*.deb "$work/root"
  cp "$work"/root/boot/vmlinuz-* "$work/vmlinuz"
  for m in "${modules[@]}"; do
    # A module built into this kernel has no file: the guest's insmod skips it.
    cp "$work"/root/lib/modules/*/kernel/"$m" "$work/modules/" 2>/dev/null ||
      echo "qemu guest: $m not in the package (built in?)"
  done
  rm -rf "$kernel" && mkdir -p "$kernel"
  mv "$work/vmlinuz" "$work/modules" "$kernel/"
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
cp "$kernel"/modules/*.ko "$rootfs/lib/modules/"
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
