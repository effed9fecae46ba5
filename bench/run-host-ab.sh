#!/usr/bin/env bash
# Two builds of quicksplit compared on what hosts see during backups, in alternating order
# (A B, then B A) so a drift of the virtual disk weighs on both alike. For each build and round
# the engine starts afresh on the 1 GiB pair of uring files; the host is fio 4 KiB randwrite
# QD32 through NBD on P for 4 s, in PAIR and then under each condition:
#   none, merge, reflect, wait: right after a split with nearly every track pending (a 1 s
#     host run first), with no backup or a backup of that mode (to the RAM-backed loop device);
#   m-none, m-merge, ...: the same right after a split of the mirrored pair (nothing pending).
# Prints each window's IOPS and p99.9 (us), then p99, p99.9 and p99.99 over every write of each
# build and condition pooled.
# Usage: bench/run-host-ab.sh BUILD_A BUILD_B [ROUNDS (default 4)]
#        [CONDITIONS (default "none merge reflect wait")] [DIR (default /var/tmp/qs-bench)]
# BUILD_A and BUILD_B are quicksplit binaries (for instance target/release/quicksplit of two
# commits, copied aside). Needs root (the loop device).
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/common.sh
[ $# -ge 2 ] || { sed -n '2,14p' "$0"; exit 2; }
build_a=$(realpath "$1"); build_b=$(realpath "$2")
rounds=${3:-4}
conditions=${4:-"none merge reflect wait"}
dir=${5:-/var/tmp/qs-bench}
mkdir -p "$dir"
P=$dir/bk-p-1g.img; S=$dir/bk-s-1g.img
fill_files 1 "$P" "$S"
work=$(mktemp -d /tmp/qs-host-ab.XXXXXX)
pids=()
stop_serve() { kill "${pids[@]}" 2>/dev/null || true; wait "${pids[@]}" 2>/dev/null || true; pids=(); }
trap 'stop_serve; rm -rf "$work"; ram_device_stop' EXIT
ram_device_start 1; T=$ram_dev
mkdir -p "$work/lat"
for r in $(seq "$rounds"); do
  order="A B"; [ $((r % 2)) = 0 ] && order="B A"
  for b in $order; do
    if [ "$b" = A ]; then qs=$build_a; else qs=$build_b; fi
    rm -rf "$work/state" "$work/rpc.sock"
    pair_config "$work/c.json" "$work/nbd.sock"
    serve_two_cores "$work/c.json"
    wait_pair
    echo "$r $b PAIR $(host_randwrite 4 1 "$b-PAIR.$r")"
    for c in $conditions; do
      wait_pair
      case $c in
        m-*) ;;
        *) host_randwrite 1 1 >/dev/null ;;  # dirties nearly every track
      esac
      rpc pair_split '{"name": "pr"}' >/dev/null
      mode=${c#m-}; id=
      [ "$mode" = none ] || id=$(start_file_backup "$mode" "$T")
      echo "$r $b $c $(host_randwrite 4 1 "$b-$c.$r")"
      [ -z "$id" ] || backup_result "$work/rpc.sock" "$id" >/dev/null
      resync
    done
    stop_serve
  done
done
$py - "$work/lat" "$build_a" "$build_b" <<'PY'
import collections, os, sys
lat = collections.defaultdict(list)
for name in os.listdir(sys.argv[1]):
    if '_clat.' not in name:
        continue
    with open(os.path.join(sys.argv[1], name)) as f:
        lat[name.split('.')[0]].extend(int(line.split(',')[1]) for line in f)
print('A: %s\nB: %s' % (sys.argv[2], sys.argv[3]))
print('%-14s %9s %9s %9s %9s' % ('build-cond.', 'p99 us', 'p99.9 us', 'p99.99 us', 'writes'))
for k in sorted(lat):
    v = sorted(lat[k])
    q = lambda p: v[min(len(v) - 1, int(len(v) * p))] / 1000
    print('%-14s %9d %9d %9d %9d' % (k, q(0.99), q(0.999), q(0.9999), len(v)))
PY
