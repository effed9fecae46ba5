#!/usr/bin/env bash
# Incremental and sparse backups to tape archives, in one run:
# 1. A pair of 4 GiB RAM disks (malloc), P filled with data, mirrored and split: a full backup
#    to a tape archive on /dev/shm makes checkpoint c0. Then 1% of the tracks change (fio
#    writes 1 MiB in every 100 MiB through NBD), the pair is resynced and split again, and an
#    incremental backup since c0 goes to a second archive. Prints both backups' times (the
#    engine's elapsed_ns) and archive sizes, and the incremental's share of each.
# 2. A fresh pair of 4 GiB RAM disks with 10% written (1 MiB in every 10 MiB), split: a full
#    backup's archive size against the volume's.
# Usage: bench/run-incremental.sh [SIZE_GIB (default 4)]
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/common.sh
gib=${1:-4}
cargo build --release --locked -p engine --bin quicksplit >/dev/null 2>&1
qs=${QS:-${CARGO_TARGET_DIR:-$PWD/target}/release/quicksplit}
work=$(mktemp -d /var/tmp/qs-incremental.XXXXXX)
A=/dev/shm/qs-incremental
pids=()
cleanup() {
  kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true
  rm -rf "$work" "$A"-*.tar "$A"-*.tar.partial
}
trap cleanup EXIT
size=$((gib << 30))
config() {
  cat > "$work/cfg.json" <<JSON
{"config": [
 {"method": "bdev_malloc_create", "params": {"name": "p", "size": $size}},
 {"method": "bdev_malloc_create", "params": {"name": "s", "size": $size}},
 {"method": "pair_create", "params": {"name": "pr", "primary": "p", "secondary": "s"}},
 {"method": "nbd_export_start", "params": {"name": "p", "bdev": "p", "socket": "$work/nbd.sock"}}
]}
JSON
}
uri="nbd+unix:///p?socket=$work/nbd.sock"
# Runs a backup of "pr" to tape archive $1 with extra params $2; prints "SECONDS BYTES_STORED".
tape_backup() {
  local id
  id=$(rpc backup_start "{\"pair\": \"pr\", \"host_rate\": 0, \"target\": {\"type\": \"tape\", \"path\": \"$1\"}$2}" \
    | $py -c "import json,sys; print(json.load(sys.stdin)['id'])")
  set -- $(backup_result "$work/rpc.sock" "$id" 0.05)
  [ "$1" = done ] || { echo "backup $id: $1" >&2; exit 1; }
  rpc backup_get "{\"id\": $id}" | $py -c "
import json,sys; b=json.load(sys.stdin)[0]; print(b['elapsed_ns']/1e9, b['bytes_stored'])"
}
# Writes 1 MiB in every $1 MiB of P through NBD.
write_every() {
  fio --name=w --ioengine=nbd --uri="$uri" --rw=write:$(( $1 - 1 ))m --bs=1m --iodepth=4 \
    --size="$size" --randrepeat=0 >/dev/null 2>&1
}
echo "load before: $(uptime)"

config
serve_two_cores "$work/cfg.json"
wait_pair
fio --name=fill --ioengine=nbd --uri="$uri" --rw=write --bs=1m --iodepth=4 --size="$size" \
  --refill_buffers=1 >/dev/null 2>&1
wait_pair
rpc pair_split '{"name": "pr"}' >/dev/null
read -r full_s full_stored < <(tape_backup "$A-full.tar" ', "checkpoint": "c0"')
full_bytes=$(stat -c %s "$A-full.tar")
rpc pair_resync '{"name": "pr"}' >/dev/null
wait_pair
write_every 100
wait_pair
rpc pair_split '{"name": "pr"}' >/dev/null
read -r inc_s inc_stored < <(tape_backup "$A-inc.tar" ', "since": "c0"')
inc_bytes=$(stat -c %s "$A-inc.tar")
kill "${pids[@]}"; wait 2>/dev/null || true; pids=()
rm -rf "$work/state" "$work/rpc.sock" "$A-full.tar" "$A-inc.tar"
$py -c "
full_s, inc_s, full_b, inc_b = $full_s, $inc_s, $full_bytes, $inc_bytes
print(f'{$gib} GiB volume, 1% of tracks changed:')
print(f'  full backup        {full_s:7.3f} s  archive {full_b/2**20:9.1f} MiB  ({$full_stored/2**20:.0f} MiB stored)')
print(f'  incremental (c0)   {inc_s:7.3f} s  archive {inc_b/2**20:9.1f} MiB  ({$inc_stored/2**20:.0f} MiB stored)')
print(f'  incremental/full:  time {inc_s/full_s:.4f}  size {inc_b/full_b:.4f}')"

config
serve_two_cores "$work/cfg.json"
wait_pair
write_every 10
wait_pair
rpc pair_split '{"name": "pr"}' >/dev/null
read -r sparse_s sparse_stored < <(tape_backup "$A-sparse.tar" '')
sparse_bytes=$(stat -c %s "$A-sparse.tar")
$py -c "
b = $sparse_bytes
print(f'{$gib} GiB volume 10% full: full backup {$sparse_s:.3f} s, archive {b/2**20:.1f} MiB = {b/$size:.4f} of the volume')"
echo "load after: $(uptime)"
