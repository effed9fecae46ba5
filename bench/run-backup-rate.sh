#!/usr/bin/env bash
# A backup's own streaming rate next to fio, in paired rounds: each backup of a mirrored pair's
# split (nothing pending, so every mode streams the image) runs between two fio sequential reads
# of the source, after a fio sequential write of the target in the same round; its ratio is to
# the slower of the target write and the mean of the two reads. The virtual disks this was
# written on change rate within seconds, which is why each backup is compared with figures taken
# right around it.
# The target is another device than the source: by default a RAM-backed block device made for
# the run (bench/common.sh, ram_device_start; needs root), or TARGET: a block device (overwritten)
# or a directory (the backup writes a new file there).
# Usage: bench/run-backup-rate.sh [DIR (default /var/tmp/qs-bench)] [ROUNDS (default 4)]
#        [SIZE_GIB (default 1)] [TARGET]
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/common.sh
dir=${1:-/var/tmp/qs-bench}
rounds=${2:-4}
gib=${3:-1}
target=${4:-}
mkdir -p "$dir"
cargo build --release --locked --bin quicksplit >/dev/null 2>&1
qs=$PWD/target/release/quicksplit
work=$(mktemp -d /tmp/qs-backup-rate.XXXXXX)
P=$dir/bk-p-${gib}g.img; S=$dir/bk-s-${gib}g.img
pids=()
cleanup() {
  kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"
  [ -b "$T" ] || rm -f "$T" "$T.partial"
  ram_device_stop
}
if [ -z "$target" ]; then ram_device_start "$gib"; T=$ram_dev
elif [ -b "$target" ]; then T=$target
else T=$target/bk-rate-target.img
fi
trap cleanup EXIT
fill_files "$gib" "$P" "$S"
pair_config "$work/c.json"
serve_two_cores "$work/c.json"
backup() { # mode -> MiB/s
  [ -b "$T" ] || rm -f "$T" "$T.partial"
  rpc pair_split '{"name": "pr"}' >/dev/null
  local id
  id=$(start_file_backup "$1" "$T")
  set -- $(backup_result "$work/rpc.sock" "$id")
  [ "$1" = done ] || { echo "backup failed: $*" >&2; exit 1; }
  rpc pair_resync '{"name": "pr"}' >/dev/null; wait_pair
  echo "$2"
}
wait_pair
echo "source: $S; target: $T"
printf '%-6s %-8s %13s %16s %13s %16s %7s\n' round mode "target write" "fio read before" "backup MiB/s" \
  "fio read after" ratio
results=()
before=$(seq_mibs read "$S" "$gib")
for r in $(seq "$rounds"); do
  write=$(seq_mibs write "$T" "$gib")
  for mode in merge reflect wait; do
    b=$(backup $mode); after=$(seq_mibs read "$S" "$gib")
    ratio=$($py -c "print('%.2f' % ($b / min($write, ($before + $after) / 2)))")
    printf '%-6s %-8s %13d %16d %13d %16d %7s\n' "$r" $mode "$write" "$before" "$b" "$after" "$ratio"
    results+=("$mode:$ratio"); before=$after
  done
done
$py - "${results[@]}" <<'PY'
import statistics, sys
by = {}
for item in sys.argv[1:]:
    mode, ratio = item.split(':')
    by.setdefault(mode, []).append(float(ratio))
for mode, r in by.items():
    print('%-8s ratio to the slower fio figure around it: median %.2f, range %.2f-%.2f, %d of %d at 0.90 or more'
          % (mode, statistics.median(r), min(r), max(r), sum(x >= 0.9 for x in r), len(r)))
PY
