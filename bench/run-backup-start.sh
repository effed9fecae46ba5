#!/usr/bin/env bash
# What starting and ending backups costs the hosts: fio 4 KiB randread QD8 through NBD on P for
# 6 s while four merge backups of the mirrored pair start, run 0.3 s and are cancelled. Run twice
# per round: once with the host's connection on the reactor that runs the backups, once on the
# other one (an extra NBD connection before fio's shifts the round robin). Prints the host's
# IOPS, p99.9, p99.99 and worst latency for each.
# Usage: [QS=BINARY] bench/run-backup-start.sh [DIR (default /var/tmp/qs-bench)] [ROUNDS (default 2)]
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/common.sh
dir=${1:-/var/tmp/qs-bench}
rounds=${2:-2}
mkdir -p "$dir"
cargo build --release --locked --bin quicksplit >/dev/null 2>&1
qs=${QS:-$PWD/target/release/quicksplit}  # QS: another build to compare
P=$dir/bk-p-1g.img; S=$dir/bk-s-1g.img
fill_files 1 "$P" "$S"
ram_device_start 1; T=$ram_dev
work=
pids=()
stop_serve() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; pids=(); [ -z "$work" ] || rm -rf "$work"; }
trap 'stop_serve; ram_device_stop' EXIT
one_run() { # shift_connection (0 or 1) -> "IOPS p99.9 p99.99 max"
  work=$(mktemp -d /tmp/qs-backup-start.XXXXXX)
  pair_config "$work/c.json" "$work/nbd.sock"
  serve_two_cores "$work/c.json"
  wait_pair
  [ "$1" = 0 ] || nbdinfo --size "nbd+unix:///p?socket=$work/nbd.sock" >/dev/null
  fio --name=h --ioengine=nbd --uri="nbd+unix:///p?socket=$work/nbd.sock" --rw=randread --bs=4k \
      --iodepth=8 --size=1g --time_based --runtime=6 --output-format=json 2>/dev/null >"$work/fio.json" &
  local fp=$! id
  sleep 1
  for _ in 1 2 3 4; do
    rpc pair_split '{"name": "pr"}' >/dev/null
    id=$(start_file_backup merge "$T" '"rate": 52428800, "host_rate": 0')
    sleep 0.3
    rpc backup_cancel "{\"id\": $id}" >/dev/null
    backup_result "$work/rpc.sock" "$id" 0.05 >/dev/null
    rpc pair_resync '{"name": "pr"}' >/dev/null; wait_pair
  done
  wait $fp
  grep -v '^fio:' "$work/fio.json" | $py -c "import json,sys; r=json.load(sys.stdin)['jobs'][0]['read']; c=r['clat_ns']; print('%.1fk %.2f %.2f %.1f' % (r['iops']/1000, c['percentile']['99.900000']/1e6, c['percentile']['99.990000']/1e6, c['max']/1e6))"
  stop_serve; work=
}
printf '%-6s %-22s %10s %10s %11s %9s\n' round "host connection" IOPS "p99.9 ms" "p99.99 ms" "max ms"
for r in $(seq "$rounds"); do
  for shift in 0 1; do
    set -- $(one_run $shift)
    printf '%-6s %-22s %10s %10s %11s %9s\n' "$r" "$([ $shift = 1 ] && echo "shifted by one" || echo "first in round robin")" "$@"
  done
done
