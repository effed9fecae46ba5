#!/usr/bin/env bash
# NVMe/TCP figures in one run, over loopback, one core each side:
#  1. backup throughput (merge mode, a 1 GiB pair on malloc bdevs filled with data, nothing
#     pending) to a file target on /dev/shm against an nvmf target: a second quicksplit's
#     export of a malloc bdev;
#  2. 4 KiB QD32 randread/randwrite IOPS of a host through quicksplit's nvmf export (qsbench
#     with quicksplit's initiator, `--bdev nvmf:...`) against its NBD export of the same bdev
#     (fio's nbd engine).
# Usage: [QS=BINARY] bench/run-nvmf.sh [SECONDS (default 5)]
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/common.sh
secs=${1:-5}
cargo build --release --locked --bin quicksplit --bin qsbench >/dev/null 2>&1
# QS=path runs another quicksplit build against this tree's qsbench (to compare builds).
qs=${QS:-$PWD/target/release/quicksplit}
qsbench=$PWD/target/release/qsbench
work=$(mktemp -d /tmp/qs-nvmf-bench.XXXXXX)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work" /dev/shm/qs-nvmf-bench.img; }
trap cleanup EXIT
port=$($py -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
nqn=nqn.2026-11.io.quicksplit:bench
start() { # name core config
  echo "$3" > "$work/$1.json"
  QUICKSPLIT_LOG=warn $qs serve --config "$work/$1.json" --rpc-socket "$work/$1.sock" \
    --state-dir "$work/$1" --cores "$2" --idle spin >/dev/null 2>&1 &
  pids+=($!)
  # Locking two 1 GiB RAM disks can take a while on a busy machine.
  for _ in $(seq 300); do [ -S "$work/$1.sock" ] && break; sleep 0.1; done
  [ -S "$work/$1.sock" ] || { echo "quicksplit ($1) did not start" >&2; exit 1; }
}
# The target side: core 1.
start dst 1 "{\"config\": [
 {\"method\": \"bdev_malloc_create\", \"params\": {\"name\": \"d\", \"size\": 1073741824}},
 {\"method\": \"nvmf_export_start\", \"params\": {\"nqn\": \"$nqn\", \"bdev\": \"d\", \"listen\": \"127.0.0.1:$port\"}},
 {\"method\": \"nbd_export_start\", \"params\": {\"name\": \"d\", \"bdev\": \"d\", \"socket\": \"$work/nbd.sock\"}}]}"
# The source side: core 0.
start src 0 '{"config": [
 {"method": "bdev_malloc_create", "params": {"name": "p", "size": 1073741824}},
 {"method": "bdev_malloc_create", "params": {"name": "s", "size": 1073741824}},
 {"method": "pair_create", "params": {"name": "pr", "primary": "p", "secondary": "s"}}]}'
rpc() { $qs rpc --socket "$work/$1.sock" "${@:2}"; }
# Data in P, so that the backups copy every byte (a RAM disk never written backs up as holes
# and Write Zeroes).
rpc src nbd_export_start "{\"name\": \"p\", \"bdev\": \"p\", \"socket\": \"$work/src-nbd.sock\"}" >/dev/null
fio --name=fill --ioengine=nbd --uri="nbd+unix:///p?socket=$work/src-nbd.sock" --rw=write --bs=1m \
    --iodepth=8 --size=1g --refill_buffers >/dev/null 2>&1
while [ "$(rpc src pair_get '{"name":"pr"}' | $py -c "import json,sys; p=json.load(sys.stdin)[0]; print(p['state'], p['pending_tracks'])" 2>/dev/null)" != "PAIR 0" ]; do sleep 0.2; done
rpc src pair_split '{"name": "pr"}' >/dev/null
backup() { # target-json -> "MiB/s cpu_copied"
  id=$(rpc src backup_start "{\"pair\": \"pr\", \"mode\": \"merge\", \"target\": $1}" | $py -c "import json,sys; print(json.load(sys.stdin)['id'])")
  set -- $(backup_result "$work/src.sock" "$id")
  [ "$1" = done ] || { echo "backup failed: $*" >&2; exit 1; }
  echo "$2 $3"
}
set -- $(backup '{"type": "file", "path": "/dev/shm/qs-nvmf-bench.img"}'); file_mibs=$1
set -- $(backup "{\"type\": \"nvmf\", \"traddr\": \"127.0.0.1\", \"trsvcid\": $port, \"subnqn\": \"$nqn\"}"); nvmf_mibs=$1; nvmf_copied=$2
echo "backup of a 1 GiB image (merge): file on /dev/shm $file_mibs MiB/s; nvmf to a second quicksplit $nvmf_mibs MiB/s (ratio $($py -c "print(round($nvmf_mibs/$file_mibs,2))")), cpu_copied_bytes $nvmf_copied"
kill "${pids[1]}" 2>/dev/null || true
for w in randread randwrite; do
  q=$(taskset -c 0 $qsbench --bdev "nvmf:127.0.0.1:$port:$nqn" --workload $w --bs 4096 --qd 32 \
      --time "$secs" --cores 0 --idle spin --json 2>/dev/null | $py -c "import json,sys; j=json.load(sys.stdin); print(round(j['iops']), j['lat_us']['p99'])")
  f=$(taskset -c 0 fio --name=h --ioengine=nbd --uri="nbd+unix:///d?socket=$work/nbd.sock" --rw=$w --bs=4k \
      --iodepth=32 --size=1g --time_based --runtime="$secs" --output-format=json 2>/dev/null | grep -v '^fio:' \
      | $py -c "import json,sys; j=json.load(sys.stdin)['jobs'][0]; k='read' if 'read' in '$w' else 'write'; print(round(j[k]['iops']), round(j[k]['clat_ns']['percentile']['99.000000']/1000,1))")
  set -- $q $f
  echo "4 KiB QD32 $w: nvmf (qsbench initiator) $1 IOPS p99 $2 us; NBD (fio nbd engine) $3 IOPS p99 $4 us; ratio $($py -c "print(round($1/$3,2))")"
done
