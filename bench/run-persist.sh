#!/usr/bin/env bash
# What persisting pair metadata costs the host: 4 KiB randwrite QD32 on one core through a pair
# of 1 GiB uring files, in PAIR, right after a split once mirrored (nothing pending) and right
# after a split before any copy (every track pending: copy before write), with persistence on
# and off, alternated in one run; medians of ROUNDS (default 3).
# Usage: bench/run-persist.sh [DIR (default /var/tmp/qs-bench)] [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/common.sh
dir=${1:-/var/tmp/qs-bench}
secs=${2:-5}
rounds=${ROUNDS:-3}
mkdir -p "$dir"
cargo build --release --locked -p bench >/dev/null
q=target/release/qsbench
for f in host-p host-s; do
  [ -f "$dir/$f.img" ] || fio --name=fill --filename="$dir/$f.img" --size=1g --rw=write --bs=1m \
      --direct=1 --ioengine=io_uring --iodepth=8 >/dev/null
done
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
declare -A iops p999
for r in $(seq "$rounds"); do
  for phase in pair split-mirrored split; do
    for persist in on off; do
      out=$($q --bdev "uring:$dir/host-p.img" --secondary "uring:$dir/host-s.img" --phase $phase \
              --workload randwrite --qd 32 --time "$secs" --cores 1 --copier-core 0 \
              --persist $persist --json 2>/dev/null)
      iops[$phase-$persist]+="$(echo "$out" | $py -c 'import json,sys; print(json.load(sys.stdin)["iops"])') "
      p999[$phase-$persist]+="$(echo "$out" | $py -c 'import json,sys; print(json.load(sys.stdin)["lat_us"]["p99_9"])') "
    done
  done
done
for phase in pair split-mirrored split; do
  on=$(echo ${iops[$phase-on]} | tr ' ' '\n' | median)
  off=$(echo ${iops[$phase-off]} | tr ' ' '\n' | median)
  pon=$(echo ${p999[$phase-on]} | tr ' ' '\n' | median)
  poff=$(echo ${p999[$phase-off]} | tr ' ' '\n' | median)
  printf "%-14s persistence on: %8.0f IOPS p99.9 %8.1f us | off: %8.0f IOPS p99.9 %8.1f us | on/off %.2f\n" \
    "$phase" "$on" "$pon" "$off" "$poff" "$(echo "$on / $off" | bc -l)"
  echo "       rounds on: ${iops[$phase-on]}| off: ${iops[$phase-off]}"
done
