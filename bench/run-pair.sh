#!/usr/bin/env bash
# Pair figures in one run: split acknowledgement latency on 1 GiB and 1 TiB (sparse) uring pairs
# with every track pending, idle and under a 4 KiB QD32 randwrite load; host 4 KiB QD32
# randwrite on P without a pair, in PAIR, during the initial copy and right after a split with
# every track pending (copy before write), on filled volumes and on thin ones (every track a
# hole: the copy before write has nothing to read).
# Usage: bench/run-pair.sh [DIR (default /var/tmp/qs-bench)] [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-/var/tmp/qs-bench}
secs=${2:-5}
mkdir -p "$dir"
cargo build --release --locked -p bench >/dev/null
q=target/release/qsbench
show() { grep -E "IOPS|latency|splits|pair bench" | sed 's/^/    /'; }

for size in 1G 1T; do
  for load in idle randwrite; do
    rm -f "$dir"/split-p.img "$dir"/split-s.img
    if [ $load = idle ]; then w="--workload randread --qd 1"; else w="--workload randwrite --qd 32"; fi
    echo "split, $size pair, every track pending, load: $load"
    $q --bdev "uring:$dir/split-p.img:$size" --secondary "uring:$dir/split-s.img:$size" $w \
       --time "$secs" --cores 1 --copier-core 0 --splits 400 2>/dev/null | grep splits | sed 's/^/    /'
  done
done
rm -f "$dir"/split-p.img "$dir"/split-s.img

for f in host-p host-s; do
  [ -f "$dir/$f.img" ] || fio --name=fill --filename="$dir/$f.img" --size=1g --rw=write --bs=1m \
      --direct=1 --ioengine=io_uring --iodepth=8 >/dev/null
done
echo "host 4 KiB randwrite QD32, one core: P alone (no pair)"
$q --bdev "uring:$dir/host-p.img" --workload randwrite --qd 32 --time "$secs" --cores 1 2>/dev/null | show
for phase in pair copy split; do
  echo "host 4 KiB randwrite QD32, one core: pair phase $phase"
  $q --bdev "uring:$dir/host-p.img" --secondary "uring:$dir/host-s.img" --phase $phase \
     --workload randwrite --qd 32 --time "$secs" --cores 1 --copier-core 0 2>/dev/null | show
done
echo "host 4 KiB randwrite QD32, one core: pair phase split, thin 1 GiB volumes (holes)"
rm -f "$dir"/thin-p.img "$dir"/thin-s.img
$q --bdev "uring:$dir/thin-p.img:1G" --secondary "uring:$dir/thin-s.img:1G" --phase split \
   --workload randwrite --qd 32 --time "$secs" --cores 1 --copier-core 0 2>/dev/null | show
rm -f "$dir"/thin-p.img "$dir"/thin-s.img
