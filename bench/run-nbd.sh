#!/usr/bin/env bash
# fio through NBD against quicksplit and against qemu-storage-daemon exporting the same file, in
# one run, and the ratios. Two backings: RAM (quicksplit's malloc bdev against a /dev/shm file
# for qemu-storage-daemon) and a disk file (quicksplit's uring bdev and qemu-storage-daemon with
# O_DIRECT on the same file, next to fio's own io_uring O_DIRECT on it). Each with fio numjobs 1
# and 2: fio's nbd engine drives one libnbd connection per job and one job can be the limit.
# REACTOR_CORE (default 0) places quicksplit's reactor and qemu-storage-daemon, NBD_FIO_CORES
# (default: anywhere) the fio clients of both; fio's own run on the file stays unpinned.
# Usage: bench/run-nbd.sh [DISK_FILE (default /var/tmp/qs-nbd.img)] [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/common.sh
disk=${1:-/var/tmp/qs-nbd.img}
secs=${2:-6}
rcore=${REACTOR_CORE:-0}
fio_cores=${NBD_FIO_CORES:-}
# QS: another build to measure (a quicksplit binary copied aside), instead of this tree's.
[ -n "${QS:-}" ] || cargo build --release --locked --bin quicksplit >/dev/null 2>&1
qs=${QS:-$PWD/target/release/quicksplit}
work=$(mktemp -d /tmp/qs-nbd-bench.XXXXXX)
shm=/dev/shm/qs-nbd-bench.img
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work" "$shm"; }
trap cleanup EXIT
if [ ! -f "$disk" ] || [ "$(stat -c %s "$disk")" -lt $((1<<30)) ]; then
  fio --name=fill --filename="$disk" --size=1g --rw=write --bs=1m --direct=1 --ioengine=io_uring \
      --iodepth=8 >/dev/null
fi
dd if=/dev/zero of="$shm" bs=1M count=1024 status=none

# fio job file -> "IOPS CPU%"; URI, FILE, RW, NUMJOBS from the environment.
measure() {
  local pin=()
  [ -n "${URI:-}" ] && [ -n "$fio_cores" ] && pin=(taskset -c "$fio_cores")
  URI=${URI:-} FILE=${FILE:-} RW=${RW:-} RUNTIME=$secs NUMJOBS=${NUMJOBS:-1} \
    "${pin[@]}" fio --output-format=json "$1" 2>/dev/null | grep -v '^fio:' | $py -c \
    "import json,sys; j=json.load(sys.stdin)['jobs'][0]; print(round(j['read']['iops']+j['write']['iops']), round(j['usr_cpu']+j['sys_cpu']))"
}
busy() { $qs rpc --socket "$work/rpc.sock" framework_get_reactors | $py -c \
  "import json,sys; r=json.load(sys.stdin)[0]; print(r['busy_ns'], r['idle_ns'])"; }
declare -A R

cat > "$work/qs.json" <<JSON
{"config": [
 {"method": "bdev_malloc_create", "params": {"name": "ram", "size": 1073741824}},
 {"method": "bdev_uring_create", "params": {"name": "disk", "filename": "$disk"}},
 {"method": "nbd_export_start", "params": {"name": "ram", "bdev": "ram", "socket": "$work/qs.sock"}},
 {"method": "nbd_export_start", "params": {"name": "disk", "bdev": "disk", "socket": "$work/qs.sock"}}
]}
JSON
QUICKSPLIT_LOG=warn $qs serve --config "$work/qs.json" --rpc-socket "$work/rpc.sock" \
  --state-dir "$work/state" --cores "$rcore" --idle adaptive >/dev/null 2>&1 &
pids+=($!)
for _ in $(seq 100); do [ -S "$work/rpc.sock" ] && break; sleep 0.1; done
for nj in 1 2; do for back in ram disk; do for w in randread randwrite; do
  b0=$(busy)
  set -- $(URI="nbd+unix:///$back?socket=$work/qs.sock" NUMJOBS=$nj measure bench/fio/nbd-$w.fio)
  b1=$(busy)
  R[qs,$nj,$back,$w]=$1; R[qscpu,$nj,$back,$w]=$2
  R[qsbusy,$nj,$back,$w]=$($py -c "a='$b0'.split(); b='$b1'.split(); u=int(b[0])-int(a[0]); i=int(b[1])-int(a[1]); print(round(100*u/(u+i)))")
done; done; done
kill "${pids[@]}"; wait 2>/dev/null || true; pids=()

for back in ram disk; do
  if [ $back = ram ]; then file=$shm; direct=off; else file=$disk; direct=on; fi
  taskset -c "$rcore" qemu-storage-daemon --blockdev driver=file,filename="$file",node-name=f,cache.direct=$direct \
    --nbd-server addr.type=unix,addr.path="$work/qsd-$back.sock" \
    --export type=nbd,id=e,node-name=f,writable=on,name=x >/dev/null 2>&1 &
  pids+=($!)
  for _ in $(seq 100); do [ -S "$work/qsd-$back.sock" ] && break; sleep 0.1; done
  for nj in 1 2; do for w in randread randwrite; do
    set -- $(URI="nbd+unix:///x?socket=$work/qsd-$back.sock" NUMJOBS=$nj measure bench/fio/nbd-$w.fio)
    R[qsd,$nj,$back,$w]=$1
  done; done
  kill "${pids[@]}"; wait 2>/dev/null || true; pids=()
done
for w in randread randwrite; do
  set -- $(FILE="$disk" RW=$w measure bench/fio/file-direct.fio)
  R[fio,$w]=$1
done

printf '%-9s %-4s %-7s %10s %9s %7s %10s %6s %11s %6s\n' workload back numjobs quicksplit "fio cpu%" "busy%" qsd ratio "fio direct" ratio
for nj in 1 2; do for back in ram disk; do for w in randread randwrite; do
  q=${R[qs,$nj,$back,$w]}; d=${R[qsd,$nj,$back,$w]}
  extra=""
  [ $back = disk ] && extra=$($py -c "print('%11d %6.2f' % (${R[fio,$w]}, $q/${R[fio,$w]}))")
  $py -c "print('%-9s %-4s %-7d %10d %9d %7d %10d %6.2f ' % ('$w','$back',$nj,$q,${R[qscpu,$nj,$back,$w]},${R[qsbusy,$nj,$back,$w]},$d,$q/$d), end='')"
  echo "$extra"
done; done; done
echo "fio cpu%: CPU of fio itself (100 = one core); busy%: quicksplit's one reactor, busy share"
