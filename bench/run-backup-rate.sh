#!/usr/bin/env bash
# A backup's own streaming rate next to fio reading its source, in paired rounds: each backup of
# a mirrored pair's split (nothing pending, so every mode streams the image) runs between two fio
# sequential reads of the source, and its ratio is to their mean. The target goes to TARGET_DIR
# (default /dev/shm), another device than the source, so the source read is the slower of the
# two fio figures. The virtual disks this was written on change rate within seconds, which is
# why each backup is compared with reads made right around it.
# Usage: bench/run-backup-rate.sh [DIR (default /var/tmp/qs-bench)] [ROUNDS (default 4)]
#        [TARGET_DIR (default /dev/shm)]
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/common.sh
dir=${1:-/var/tmp/qs-bench}
rounds=${2:-4}
tdir=${3:-/dev/shm}
mkdir -p "$dir"
cargo build --release --locked --bin quicksplit >/dev/null 2>&1
qs=$PWD/target/release/quicksplit
work=$(mktemp -d /tmp/qs-backup-rate.XXXXXX)
P=$dir/bk-p.img; S=$dir/bk-s.img; T=$tdir/bk-rate-target.img
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work" "$T" "$T.partial"; }
trap cleanup EXIT
for f in "$P" "$S"; do
  [ -f "$f" ] && [ "$(stat -c %s "$f")" -ge $((1<<30)) ] && continue
  fio --name=fill --filename="$f" --size=1g --rw=write --bs=1m --direct=1 --ioengine=io_uring \
      --iodepth=8 >/dev/null
done
read_mibs() {
  fio --name=s --filename="$S" --size=1g --rw=read --bs=1m --direct=1 --ioengine=io_uring \
      --iodepth=8 --output-format=json 2>/dev/null | $py -c \
      "import json,sys; j=json.load(sys.stdin)['jobs'][0]; print(round(j['read']['bw']/1024))"
}
cat > "$work/c.json" <<JSON
{"config": [
 {"method": "bdev_uring_create", "params": {"name": "p", "filename": "$P"}},
 {"method": "bdev_uring_create", "params": {"name": "s", "filename": "$S"}},
 {"method": "pair_create", "params": {"name": "pr", "primary": "p", "secondary": "s"}}
]}
JSON
serve_two_cores "$work/c.json"
backup() { # mode -> MiB/s
  rm -f "$T" "$T.partial"
  rpc pair_split '{"name": "pr"}' >/dev/null
  local id
  id=$(rpc backup_start "{\"pair\": \"pr\", \"mode\": \"$1\", \"target\": {\"type\": \"file\", \"path\": \"$T\"}}" \
    | $py -c "import json,sys; print(json.load(sys.stdin)['id'])")
  set -- $(backup_result "$work/rpc.sock" "$id")
  [ "$1" = done ] || { echo "backup failed: $*" >&2; exit 1; }
  rpc pair_resync '{"name": "pr"}' >/dev/null; wait_pair
  echo "$2"
}
wait_pair
printf '%-6s %-8s %14s %12s %16s %7s\n' round mode "fio read before" "backup MiB/s" "fio read after" ratio
ratios=()
before=$(read_mibs)
for r in $(seq "$rounds"); do
  for mode in merge reflect wait; do
    b=$(backup $mode); after=$(read_mibs)
    ratio=$($py -c "print('%.2f' % ($b / (($before + $after) / 2)))")
    printf '%-6s %-8s %14d %12d %16d %7s\n' "$r" $mode "$before" "$b" "$after" "$ratio"
    ratios+=("$ratio"); before=$after
  done
done
$py -c "import statistics; r=[float(x) for x in '${ratios[*]}'.split()]; print('ratio to the mean of the fio reads around it: median %.2f, range %.2f-%.2f, %d of %d at 0.90 or more' % (statistics.median(r), min(r), max(r), sum(x >= 0.9 for x in r), len(r)))"
