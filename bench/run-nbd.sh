#!/usr/bin/env bash
# fio through NBD against quicksplit and against qemu-storage-daemon exporting the same file, in
# one run, and the ratios. Two backends: RAM (quicksplit's malloc bdev against a /dev/shm file
# for qemu-storage-daemon) and a disk file (uring bdev against the same file, next to fio's own
# io_uring O_DIRECT on that file).
# Usage: bench/run-nbd.sh [DISK_FILE (default /var/tmp/qs-nbd.img)] [SECONDS] [NUMJOBS]
set -euo pipefail
cd "$(dirname "$0")/.."
disk=${1:-/var/tmp/qs-nbd.img}
secs=${2:-8}
jobs=${3:-1}
cargo build --release --locked --bin quicksplit >/dev/null
qs=target/release/quicksplit
work=$(mktemp -d /tmp/qs-nbd-bench.XXXXXX)
shm=/dev/shm/qs-nbd-bench.img
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work" "$shm"; }
pids=()
trap cleanup EXIT
[ -f "$disk" ] && [ "$(stat -c %s "$disk")" -ge $((1<<30)) ] || \
  fio --name=fill --filename="$disk" --size=1g --rw=write --bs=1m --direct=1 --ioengine=io_uring --iodepth=8 >/dev/null
dd if=/dev/zero of="$shm" bs=1M count=1024 status=none

iops() { # fio job file, URI or FILE env -> IOPS (read+write)
  URI=${URI:-} FILE=${FILE:-} RW=${RW:-} RUNTIME=$secs NUMJOBS=$jobs fio --output-format=json "$1" 2>/dev/null \
    | grep -v '^fio:' | python3 -c "import json,sys; j=json.load(sys.stdin)['jobs'][0]; print(j['read']['iops']+j['write']['iops'])"
}

cat > "$work/qs.json" <<JSON
{"config": [
 {"method": "bdev_malloc_create", "params": {"name": "ram", "size": 1073741824}},
 {"method": "bdev_uring_create", "params": {"name": "disk", "filename": "$disk"}},
 {"method": "nbd_export_start", "params": {"name": "ram", "bdev": "ram", "socket": "$work/qs.sock"}},
 {"method": "nbd_export_start", "params": {"name": "disk", "bdev": "disk", "socket": "$work/qs.sock"}}
]}
JSON
QUICKSPLIT_LOG=warn $qs serve --config "$work/qs.json" --rpc-socket "$work/rpc.sock" --state-dir "$work/state" \
  --cores 0 --idle adaptive >/dev/null 2>&1 &
pids+=($!)
for i in $(seq 100); do [ -S "$work/qs.sock" ] && break; sleep 0.1; done

for w in randread randwrite; do
  q_ram=$(URI="nbd+unix:///ram?socket=$work/qs.sock" iops bench/fio/nbd-$w.fio)
  q_disk=$(URI="nbd+unix:///disk?socket=$work/qs.sock" iops bench/fio/nbd-$w.fio)
  echo "quicksplit  $w ram $q_ram disk $q_disk"
  eval "qs_${w}_ram=$q_ram; qs_${w}_disk=$q_disk"
done
kill "${pids[@]}"; wait 2>/dev/null || true; pids=()

for backing in "$shm" "$disk"; do
  name=$(basename "$backing")
  qemu-storage-daemon --blockdev driver=file,filename="$backing",node-name=f,cache.direct=$([ "$backing" = "$disk" ] && echo on || echo off) \
    --nbd-server addr.type=unix,addr.path="$work/qsd-$name.sock" \
    --export type=nbd,id=e,node-name=f,writable=on,name=x >/dev/null 2>&1 &
  pids+=($!)
  for i in $(seq 100); do [ -S "$work/qsd-$name.sock" ] && break; sleep 0.1; done
  for w in randread randwrite; do
    v=$(URI="nbd+unix:///x?socket=$work/qsd-$name.sock" iops bench/fio/nbd-$w.fio)
    echo "qemu-storage-daemon $w $name $v"
    if [ "$backing" = "$shm" ]; then eval "qsd_${w}_ram=$v"; else eval "qsd_${w}_disk=$v"; fi
  done
  kill "${pids[@]}"; wait 2>/dev/null || true; pids=()
done
for w in randread randwrite; do
  v=$(FILE="$disk" RW=$w iops bench/fio/file-direct.fio)
  eval "fio_${w}_disk=$v"
  echo "fio io_uring direct $w disk $v"
done
echo
printf '%-10s %-5s %12s %12s %8s %12s %8s\n' workload back quicksplit qsd ratio fio-direct ratio
for w in randread randwrite; do
  eval "a=\$qs_${w}_ram b=\$qsd_${w}_ram c=\$qs_${w}_disk d=\$qsd_${w}_disk e=\$fio_${w}_disk"
  python3 -c "print('%-10s %-5s %12.0f %12.0f %8.2f' % ('$w','ram',$a,$b,$a/$b))"
  python3 -c "print('%-10s %-5s %12.0f %12.0f %8.2f %12.0f %8.2f' % ('$w','disk',$c,$d,$c/$d,$e,$c/$e))"
done
