#!/usr/bin/env bash
# What checkpoints cost host writes: fio 4 KiB randwrite QD32 through NBD to a pair's primary in
# PAIR (two 1 GiB RAM disks, metadata on the state directory's file system), with no checkpoint
# against 8 checkpoints, alternated in each round (none first in odd rounds). Each round with
# checkpoints deletes the previous ones and makes 8 new ones (8 splits, each backed up to a file
# on /dev/shm with a checkpoint, each resynced), so the runs pay for first writes to the new
# checkpoints' regions as a real schedule does. Prints each round's IOPS and the median ratio.
# Usage: bench/run-checkpoints.sh [SECONDS (default 5)] [ROUNDS (default 4)]
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/common.sh
secs=${1:-5}
rounds=${2:-4}
cargo build --release --locked -p engine --bin quicksplit >/dev/null 2>&1
qs=${QS:-${CARGO_TARGET_DIR:-$PWD/target}/release/quicksplit}
work=$(mktemp -d /var/tmp/qs-ckpt-bench.XXXXXX)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work" /dev/shm/qs-ckpt-bench-*.img; }
trap cleanup EXIT
size=$((1 << 30))
cat > "$work/cfg.json" <<JSON
{"config": [
 {"method": "bdev_malloc_create", "params": {"name": "p", "size": $size}},
 {"method": "bdev_malloc_create", "params": {"name": "s", "size": $size}},
 {"method": "pair_create", "params": {"name": "pr", "primary": "p", "secondary": "s"}},
 {"method": "nbd_export_start", "params": {"name": "p", "bdev": "p", "socket": "$work/nbd.sock"}}
]}
JSON
serve_two_cores "$work/cfg.json"
uri="nbd+unix:///p?socket=$work/nbd.sock"
wait_pair
fio --name=fill --ioengine=nbd --uri="$uri" --rw=write --bs=1m --iodepth=4 --size=1g >/dev/null 2>&1
wait_pair

checkpoints() { # count: deletes the pair's checkpoints, then makes COUNT new ones
  local names n id
  names=$(rpc checkpoint_list '{"pair": "pr"}' | $py -c "import json,sys; print(' '.join(c['name'] for c in json.load(sys.stdin)))")
  for n in $names; do rpc checkpoint_delete "{\"pair\": \"pr\", \"name\": \"$n\"}" >/dev/null; done
  for n in $(seq "$1"); do
    rpc pair_split '{"name": "pr"}' >/dev/null
    id=$(rpc backup_start "{\"pair\": \"pr\", \"rate\": 0, \"host_rate\": 0, \"target\": {\"type\": \"file\", \"path\": \"/dev/shm/qs-ckpt-bench-$n.img\"}, \"checkpoint\": \"k$RANDOM$n\"}" | $py -c "import json,sys; print(json.load(sys.stdin)['id'])")
    set -- $(backup_result "$work/rpc.sock" "$id" 0.1)
    [ "$1" = done ] || { echo "backup $id: $1" >&2; exit 1; }
    rm -f "/dev/shm/qs-ckpt-bench-$n.img"
    rpc pair_resync '{"name": "pr"}' >/dev/null
    wait_pair
  done
}
randwrite() {
  URI="$uri" RUNTIME=$secs NUMJOBS=1 fio --output-format=json bench/fio/nbd-randwrite.fio 2>/dev/null \
    | grep -v '^fio:' | $py -c "import json,sys; print(round(json.load(sys.stdin)['jobs'][0]['write']['iops']))"
}

echo "load before: $(uptime)"
ratios=()
for r in $(seq "$rounds"); do
  order=(0 8); [ $((r % 2)) = 0 ] && order=(8 0)
  declare -A got=()
  for n in "${order[@]}"; do
    checkpoints "$n"
    got[$n]=$(randwrite)
  done
  ratio=$($py -c "print(f'{${got[8]}/${got[0]}:.3f}')")
  ratios+=("$ratio")
  printf 'round %d  randwrite IOPS: no checkpoint %8d, 8 checkpoints %8d (%s)\n' "$r" "${got[0]}" "${got[8]}" "$ratio"
done
echo "load after: $(uptime)"
$py -c "
import statistics as s
v=[float(x) for x in '${ratios[*]}'.split()]
print(f'8 checkpoints / none, randwrite IOPS: median {s.median(v):.3f} ({min(v):.3f}-{max(v):.3f})')"
