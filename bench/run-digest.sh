#!/usr/bin/env bash
# A backup's throughput with its sha256-tree digest (1 MiB chunks hashed on every reactor) and
# with the flat SHA-256 as well (`flat_sha256`: one stream, one core), against fio's sequential
# read of the same source, in paired rounds.
# The source reads faster than one core hashes: a pair of RAM disks (malloc), mirrored, split
# with nothing pending. The target is a new file on /dev/shm. The reference is fio reading the
# pair's image through the engine's NBD export (1 MiB QD8), the path a host reads it by; fio
# writing a new file on /dev/shm (1 MiB QD8, buffered) is measured too, as the target's side.
# Each round: fio read, a backup of each kind (their order alternates), fio read, fio write; a
# backup's ratio is to the mean of the two reads around it. Backups run with `host_rate` 0 (no
# host here; fio's reads through the image export would otherwise count as one).
# At the end, `quicksplit digest` (one thread per CPU, then one thread) and `sha256sum` of the
# last backup's file, for the command's own rate.
# Usage: bench/run-digest.sh [ROUNDS (default 5)] [SIZE_GIB (default 2)]
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/common.sh
rounds=${1:-5}
gib=${2:-2}
target_dir=${CARGO_TARGET_DIR:-$PWD/target}
cargo build --release --locked --bin quicksplit >/dev/null 2>&1
qs=$target_dir/release/quicksplit
work=$(mktemp -d /tmp/qs-digest.XXXXXX)
T=/dev/shm/qs-digest-target.img
W=/dev/shm/qs-digest-fio.img
pids=()
cleanup() {
  kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true
  rm -rf "$work" "$T" "$T.partial" "$W"
}
trap cleanup EXIT
size=$((gib << 30))
cat > "$work/c.json" <<JSON
{"config": [
 {"method": "bdev_malloc_create", "params": {"name": "p", "size": $size}},
 {"method": "bdev_malloc_create", "params": {"name": "s", "size": $size}},
 {"method": "pair_create", "params": {"name": "pr", "primary": "p", "secondary": "s"}},
 {"method": "nbd_export_start", "params": {"name": "p", "bdev": "p", "socket": "$work/nbd.sock"}},
 {"method": "nbd_export_start", "params": {"name": "img", "pair": "pr", "socket": "$work/nbd.sock"}}
]}
JSON
serve_two_cores "$work/c.json"
# Data, not zeros, in P (hashing costs the same; the copy and the reads are real ones).
fio --name=fill --ioengine=nbd --uri="nbd+unix:///p?socket=$work/nbd.sock" --rw=write --bs=1m \
    --iodepth=8 --size=${gib}g --refill_buffers >/dev/null
wait_pair

# fio's sequential read of the pair's image through NBD, MiB/s.
image_read() {
  fio --name=r --ioengine=nbd --uri="nbd+unix:///img?socket=$work/nbd.sock" --rw=read --bs=1m \
      --iodepth=8 --size=${gib}g --output-format=json 2>/dev/null | grep -v '^fio:' | $py -c \
      "import json,sys; print(round(json.load(sys.stdin)['jobs'][0]['read']['bw']/1024))"
}
# A merge backup to a new file $T, with the flat SHA-256 if $1 is true; MiB/s.
backup() { # flat
  rm -f "$T" "$T.partial"
  local id
  id=$(start_file_backup merge "$T" "\"host_rate\": 0, \"flat_sha256\": $1")
  set -- $(backup_result "$work/rpc.sock" "$id" 0.2)
  [ "$1" = done ] || { echo "backup failed: $*" >&2; exit 1; }
  echo "$2"
}

echo "source: RAM disk pair, ${gib} GiB; target: $T; engine on cores 0-1 ($(nproc) CPUs)"
printf '%-6s %10s %12s %12s %10s %11s %11s %12s\n' round "fio read" "tree MiB/s" "+flat MiB/s" \
  "fio read" "fio write" "tree/read" "+flat/read"
results=()
for r in $(seq "$rounds"); do
  rpc pair_split '{"name": "pr"}' >/dev/null
  before=$(image_read)
  if [ $((r % 2)) -eq 1 ]; then tree=$(backup false); flat=$(backup true)
  else flat=$(backup true); tree=$(backup false)
  fi
  after=$(image_read)
  write=$(seq_mibs write "$W" "$gib")
  read_mean=$($py -c "print(($before + $after) / 2)")
  tr=$($py -c "print('%.2f' % ($tree / $read_mean))")
  fr=$($py -c "print('%.2f' % ($flat / $read_mean))")
  printf '%-6s %10d %12d %12d %10d %11d %11s %12s\n' "$r" "$before" "$tree" "$flat" "$after" \
    "$write" "$tr" "$fr"
  results+=("$tree:$flat:$read_mean:$write")
  rpc pair_resync '{"name": "pr"}' >/dev/null; wait_pair
done
$py - "${results[@]}" <<'PY'
import statistics, sys
rows = [tuple(float(x) for x in item.split(':')) for item in sys.argv[1:]]
def med(xs): return statistics.median(xs)
tree = [t / r for t, f, r, w in rows]
flat = [f / r for t, f, r, w in rows]
slower = [t / min(r, w) for t, f, r, w in rows]
print('tree digest: median %.0f MiB/s, %.2f of fio read (range %.2f-%.2f, %d of %d at 0.90 or more), '
      '%.2f of the slower of fio read and write'
      % (med([t for t, f, r, w in rows]), med(tree), min(tree), max(tree),
         sum(x >= 0.9 for x in tree), len(tree), med(slower)))
print('flat SHA-256 too: median %.0f MiB/s, %.2f of fio read (range %.2f-%.2f)'
      % (med([f for t, f, r, w in rows]), med(flat), min(flat), max(flat)))
print('tree over flat: median %.2f' % med([t / f for t, f, r, w in rows]))
PY
# The command's own rate on the last backup's file (in the page cache: a hashing figure).
rpc pair_split '{"name": "pr"}' >/dev/null
backup false >/dev/null
rate() { # command... -> MiB/s over the file
  local s e
  s=$(date +%s.%N); "$@" "$T" >/dev/null; e=$(date +%s.%N)
  $py -c "print(round($gib * 1024 / ($e - $s)))"
}
one=$(rate "$qs" digest --threads 1); all=$(rate "$qs" digest); flat=$(rate sha256sum)
echo "quicksplit digest of the ${gib} GiB file on /dev/shm: $all MiB/s; with one thread: $one MiB/s;" \
  "sha256sum: $flat MiB/s"
