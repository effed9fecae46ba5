#!/usr/bin/env bash
# What counting I/O statistics costs, statistics on against off in the same run, alternated
# (on first in odd rounds, off first in even ones):
#  - qsbench on a RAM disk, 4 KiB randread QD128 on one core (REACTOR_CORE, default 1), against
#    qsbench --no-stats;
#  - fio 4 KiB randread and randwrite QD32 through NBD, and qsbench's NVMe/TCP initiator
#    (randread and randwrite QD32, statistics off in the client), against two quicksplit serves
#    exporting a 1 GiB RAM disk each on the same core (REACTOR_CORE): one counting, one started
#    with --no-stats.
# Other processes on the cores take their share of time, so besides IOPS each run reports
# requests per CPU second of what is measured (qsbench's reactor thread; the serving engine
# process, from /proc/PID/stat), which such sharing leaves alone. Prints each round's figures and
# the median ratios on/off.
# Usage: bench/run-iostat.sh [SECONDS (default 4)] [ROUNDS (default 4)]
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/common.sh
secs=${1:-4}
rounds=${2:-4}
core=${REACTOR_CORE:-1}
cargo build --release --locked -p bench -p engine --bins >/dev/null 2>&1
tgt=${CARGO_TARGET_DIR:-$PWD/target}
qs=$tgt/release/quicksplit
qsbench=$tgt/release/qsbench
work=$(mktemp -d /tmp/qs-iostat-bench.XXXXXX)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
port_on=$((20000 + RANDOM % 10000)); port_off=$((port_on + 1))
nqn=nqn.2026-11.io.quicksplit:iostat-bench
for mode in on off; do
  port=$port_on; extra=()
  [ $mode = off ] && { port=$port_off; extra=(--no-stats); }
  mkdir -p "$work/$mode"
  cat > "$work/$mode/cfg.json" <<JSON
{"config": [
 {"method": "bdev_malloc_create", "params": {"name": "ram", "size": 1073741824}},
 {"method": "nbd_export_start", "params": {"name": "ram", "bdev": "ram", "socket": "$work/$mode/nbd.sock"}},
 {"method": "nvmf_export_start", "params": {"nqn": "$nqn", "bdev": "ram", "listen": "127.0.0.1:$port"}}
]}
JSON
  QUICKSPLIT_LOG=warn $qs serve --config "$work/$mode/cfg.json" --rpc-socket "$work/$mode/rpc.sock" \
    --state-dir "$work/$mode/state" --cores "$core" --idle adaptive "${extra[@]}" >/dev/null 2>&1 &
  pids+=($!)
  declare "pid_$mode=$!"
  for _ in $(seq 100); do [ -S "$work/$mode/rpc.sock" ] && break; sleep 0.1; done
done

# Every page of both RAM disks written once, so that no run pays for first touches.
for mode in on off; do
  fio --name=fill --ioengine=nbd --uri="nbd+unix:///ram?socket=$work/$mode/nbd.sock" --rw=write \
    --bs=1m --iodepth=4 --size=1g >/dev/null 2>&1
done

# Each prints "IOPS REQUESTS_PER_CPU_SECOND".
bench_malloc() { # on|off
  local flag=(); [ "$1" = off ] && flag=(--no-stats)
  $qsbench --bdev malloc:1G --workload randread --bs 4096 --qd 128 --time "$secs" --cores "$core" \
    --json "${flag[@]}" 2>/dev/null | $py -c \
    "import json,sys; d=json.load(sys.stdin); print(round(d['iops']), round(d['ios']/d['cpu_s']))"
}
# CPU time of the engine serving mode $1, in clock ticks (utime + stime).
engine_cpu() { local p; p=pid_$1; awk '{print $14 + $15}' "/proc/${!p}/stat"; }
# "IOPS REQUESTS" on stdin -> "IOPS REQUESTS_PER_ENGINE_CPU_SECOND", CPU ticks $1 to $2.
per_cpu() { $py -c "import sys,os; i,n=sys.stdin.read().split(); t=($2-$1)/os.sysconf('SC_CLK_TCK'); print(i, round(float(n)/max(t,0.01)))"; }
bench_nbd() { # on|off randread|randwrite
  local c0 c1 out
  c0=$(engine_cpu "$1")
  out=$(URI="nbd+unix:///ram?socket=$work/$1/nbd.sock" RUNTIME=$secs NUMJOBS=1 \
    fio --output-format=json "bench/fio/nbd-$2.fio" 2>/dev/null | grep -v '^fio:' | $py -c \
    "import json,sys; j=json.load(sys.stdin)['jobs'][0]; print(round(j['read']['iops']+j['write']['iops']), j['read']['total_ios']+j['write']['total_ios'])")
  c1=$(engine_cpu "$1")
  echo "$out" | per_cpu "$c0" "$c1"
}
bench_nvmf() { # on|off randread|randwrite
  local port=$port_on c0 c1 out; [ "$1" = off ] && port=$port_off
  # The client on the other core, not counting: only the target's counting is compared.
  local other=$(( core == 0 ? 1 : 0 ))
  c0=$(engine_cpu "$1")
  out=$($qsbench --bdev "nvmf:127.0.0.1:$port:$nqn" --workload "$2" --qd 32 --time "$secs" \
    --cores "$other" --no-stats --json 2>/dev/null | $py -c \
    "import json,sys; d=json.load(sys.stdin); print(round(d['iops']), d['ios'])")
  c1=$(engine_cpu "$1")
  echo "$out" | per_cpu "$c0" "$c1"
}

declare -A ratios cpu_ratios
tests=("malloc" "nbd randread" "nbd randwrite" "nvmf randread" "nvmf randwrite")
echo "load before: $(uptime)"
for r in $(seq "$rounds"); do
  order=(on off); [ $((r % 2)) = 0 ] && order=(off on)
  for t in "${tests[@]}"; do
    declare -A got=() cpu=()
    for m in "${order[@]}"; do
      case $t in
        malloc) set -- $(bench_malloc "$m") ;;
        nbd*) set -- $(bench_nbd "$m" "${t#nbd }") ;;
        nvmf*) set -- $(bench_nvmf "$m" "${t#nvmf }") ;;
      esac
      got[$m]=$1; cpu[$m]=$2
    done
    ratio=$($py -c "print(f'{${got[on]}/${got[off]}:.3f}')")
    cratio=$($py -c "print(f'{${cpu[on]}/${cpu[off]}:.3f}')")
    ratios[$t]="${ratios[$t]:-} $ratio"
    cpu_ratios[$t]="${cpu_ratios[$t]:-} $cratio"
    printf 'round %d  %-15s IOPS on %8d off %8d (%s)   per CPU s on %8d off %8d (%s)\n' \
      "$r" "$t" "${got[on]}" "${got[off]}" "$ratio" "${cpu[on]}" "${cpu[off]}" "$cratio"
  done
done
echo "load after: $(uptime)"
for t in "${tests[@]}"; do
  $py -c "
import statistics as s
v=[float(x) for x in '${ratios[$t]}'.split()]; c=[float(x) for x in '${cpu_ratios[$t]}'.split()]
print(f'{\"$t\":15s} on/off IOPS median {s.median(v):.3f} ({min(v):.3f}-{max(v):.3f}), per CPU second median {s.median(c):.3f} ({min(c):.3f}-{max(c):.3f})')"
done
