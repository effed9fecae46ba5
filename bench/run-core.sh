#!/usr/bin/env bash
# Engine-core figures in one run: the memcpy limit next to qsbench on a malloc bdev (4 KiB,
# QD128, one core), and qsbench on a uring file next to fio io_uring O_DIRECT on the same file
# (4 KiB, QD32). Usage: bench/run-core.sh [FILE (default /var/tmp/qs-bench.img)] [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/common.sh
file=${1:-/var/tmp/qs-bench.img}
secs=${2:-5}
core=${CORE:-1}
cargo build --release --locked -p bench >/dev/null
bin=target/release
json() { $py -c "import json,sys; print(json.load(sys.stdin)$1)"; }

limit=$($bin/memcpy-limit --time "$secs" --json | json "['copies_per_sec']")
printf 'memcpy limit (one core, random 4 KiB out of 1 GiB): %.0f/s\n' "$limit"
for w in randread randwrite; do
  out=$($bin/qsbench --bdev malloc:1G --workload $w --bs 4096 --qd 128 --time "$secs" --cores "$core" --json 2>/dev/null)
  iops=$(echo "$out" | json "['iops']"); p99=$(echo "$out" | json "['lat_us']['p99']")
  $py -c "print('malloc %-9s qd128: %9.0f IOPS  p99 %6.1f us  = %.0f%% of the memcpy limit' % ('$w', $iops, $p99, 100*$iops/$limit))"
done

if [ ! -f "$file" ] || [ "$(stat -c %s "$file")" -lt $((2<<30)) ]; then
  fio --name=fill --filename="$file" --size=2g --rw=write --bs=1m --direct=1 --ioengine=io_uring \
      --iodepth=8 >/dev/null
fi
# The disk's rate drifts by 10-20% within a minute: alternate fio and qsbench for ROUNDS rounds
# and compare medians.
rounds=${ROUNDS:-3}
median() { $py -c "import statistics,sys; print(statistics.median(float(x) for x in sys.argv[1:]))" "$@"; }
for w in randread randwrite; do
  f=(); q=(); p=()
  for _ in $(seq "$rounds"); do
    f+=("$(fio --name=t --filename="$file" --size=2g --rw=$w --bs=4k --direct=1 --ioengine=io_uring \
        --iodepth=32 --time_based --runtime="$secs" --cpus_allowed="$core" --output-format=json 2>/dev/null \
        | grep -v '^fio:' | $py -c "import json,sys; j=json.load(sys.stdin)['jobs'][0]; print(j['read']['iops']+j['write']['iops'])")")
    out=$($bin/qsbench --bdev "uring:$file" --workload $w --bs 4096 --qd 32 --time "$secs" --cores "$core" --json 2>/dev/null)
    q+=("$(echo "$out" | json "['iops']")"); p+=("$(echo "$out" | json "['lat_us']['p99']")")
  done
  fio_iops=$(median "${f[@]}"); iops=$(median "${q[@]}"); p99=$(median "${p[@]}")
  $py -c "print('uring  %-9s qd32:  %9.0f IOPS  p99 %6.1f us;  fio io_uring direct %9.0f IOPS;  ratio %.2f  (medians of $rounds alternating runs)' % ('$w', $iops, $p99, $fio_iops, $iops/$fio_iops))"
done
