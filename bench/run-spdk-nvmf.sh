#!/usr/bin/env bash
# NVMe/TCP over loopback, one core each, against SPDK in the same run: SPDK's nvmf_tgt and
# quicksplit's target (malloc bdevs), each driven by spdk_nvme_perf and by qsbench's NVMe/TCP
# initiator, on the same cores (target core 0, initiator core 1), 4 KiB QD32; prints every round
# with its quicksplit/SPDK ratio, the medians of the four pairings and of the rounds' ratios.
# TARGET_CORE and INITIATOR_CORE (default 0 and 1) swap the cores.
# Needs SPDK built from source as in the peers recipe (build/bin/nvmf_tgt, spdk_nvme_perf,
# scripts/rpc.py); reserves 1024 hugepages for both and puts the old count back at the end.
# Usage: bench/run-spdk-nvmf.sh SPDK_DIR [ROUNDS (default 5)] [SECONDS (default 8)]
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/common.sh
spdk=${1:?usage: bench/run-spdk-nvmf.sh SPDK_DIR [ROUNDS] [SECONDS]}
rounds=${2:-5}
secs=${3:-8}
tcore=${TARGET_CORE:-0}
icore=${INITIATOR_CORE:-1}
# QS and QSBENCH: another build to measure (binaries copied aside), instead of this tree's.
[ -n "${QS:-}" ] && [ -n "${QSBENCH:-}" ] ||
  cargo build --release --locked --bin quicksplit --bin qsbench >/dev/null 2>&1
qs=${QS:-$PWD/target/release/quicksplit}
qsbench=${QSBENCH:-$PWD/target/release/qsbench}
work=$(mktemp -d /tmp/qs-spdk-nvmf.XXXXXX)
old_hugepages=$(cat /proc/sys/vm/nr_hugepages)
pid=
cleanup() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null
  wait 2>/dev/null || true
  echo "$old_hugepages" > /proc/sys/vm/nr_hugepages
  rm -rf "$work"
}
trap cleanup EXIT
echo 1024 > /proc/sys/vm/nr_hugepages
mkdir -p /dev/hugepages
mountpoint -q /dev/hugepages || mount -t hugetlbfs nodev /dev/hugepages
export LD_LIBRARY_PATH=$spdk/build/lib
nqn=nqn.2016-06.io.spdk:cnode1
port=4420

spdk_target() { # starts SPDK's target
  local rpc="python3 $spdk/scripts/rpc.py -s $work/spdk.sock"
  "$spdk/build/bin/nvmf_tgt" -m $((1 << tcore)) -r "$work/spdk.sock" >"$work/spdk.log" 2>&1 &
  pid=$!
  for _ in $(seq 200); do [ -S "$work/spdk.sock" ] && break; sleep 0.1; done
  $rpc framework_wait_init >/dev/null
  $rpc nvmf_create_transport -t TCP -u 16384 -m 8 -c 8192 >/dev/null
  $rpc bdev_malloc_create -b Malloc0 1024 4096 >/dev/null
  $rpc nvmf_create_subsystem "$nqn" -a -s SPDK00000000000001 >/dev/null
  $rpc nvmf_subsystem_add_ns "$nqn" Malloc0 >/dev/null
  $rpc nvmf_subsystem_add_listener "$nqn" -t tcp -a 127.0.0.1 -s $port >/dev/null
}

qs_target() { # starts quicksplit's target
  cat > "$work/qs.json" <<J
{"config": [
 {"method": "bdev_malloc_create", "params": {"name": "m", "size": 1073741824}},
 {"method": "nvmf_export_start", "params": {"nqn": "$nqn", "bdev": "m", "listen": "127.0.0.1:$port"}}]}
J
  QUICKSPLIT_LOG=warn "$qs" serve --config "$work/qs.json" --rpc-socket "$work/qs.sock" \
      --state-dir "$work/state" --cores "$tcore" --idle spin >"$work/qs.log" 2>&1 &
  pid=$!
  for _ in $(seq 100); do [ -S "$work/qs.sock" ] && break; sleep 0.1; done
}

stop_target() {
  kill "$pid"; wait "$pid" 2>/dev/null || true; pid=
  rm -rf "$work/spdk.sock" "$work/qs.sock" "$work/state"
}

spdk_initiator() { # WORKLOAD -> IOPS
  local iops
  iops=$("$spdk/build/bin/spdk_nvme_perf" -c $((1 << icore)) \
      -r "trtype:tcp adrfam:IPv4 traddr:127.0.0.1 trsvcid:$port subnqn:$nqn" \
      -q 32 -o 4096 -w "$1" -t "$secs" 2>/dev/null | awk '/^Total/ {print int($3)}')
  echo "${iops:-0}"
}

qs_initiator() { # WORKLOAD -> IOPS
  local iops
  iops=$(taskset -c "$icore" "$qsbench" --bdev "nvmf:127.0.0.1:$port:$nqn" --workload "$1" --bs 4096 \
      --qd 32 --time "$secs" --cores "$icore" --idle spin --json 2>/dev/null \
      | $py -c "import json,sys; print(round(json.load(sys.stdin)['iops']))")
  echo "${iops:-0}"
}

declare -A R
declare -A RATIOS
# Pairings: target/initiator. The mixed ones tell the target's share from the initiator's. The
# machine's speed changes within seconds, so the two pairings compared run next to each other,
# in the opposite order every other round, and each round gives its own ratio.
pairings="spdk/spdk qs/qs qs/spdk spdk/qs"
reversed="spdk/qs qs/spdk qs/qs spdk/spdk"
for r in $(seq "$rounds"); do
  for w in randread randwrite; do
    line="round $r $w:"
    order=$pairings; [ $((r % 2)) -eq 0 ] && order=$reversed
    declare -A THIS
    for p in $order; do
      t=${p%/*}; i=${p#*/}
      ${t}_target
      iops=$(${i}_initiator $w)
      stop_target
      R[$p,$w]="${R[$p,$w]:-} $iops"
      THIS[$p]=$iops
      line="$line $p $iops"
    done
    ratio=$($py -c "print(round(${THIS[qs/qs]}/max(${THIS[spdk/spdk]},1),2))")
    RATIOS[$w]="${RATIOS[$w]:-} $ratio"
    echo "$line  qs/qs:spdk/spdk $ratio"
  done
done
median() { tr ' ' '\n' | grep -v '^$' | sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
echo
echo "Medians of $rounds rounds, 4 KiB QD32, target core $tcore, initiator core $icore (target/initiator):"
echo
echo "| workload | SPDK/SPDK | quicksplit/quicksplit | ratio of medians | median of round ratios | rounds quicksplit ahead | quicksplit target, SPDK initiator | SPDK target, quicksplit initiator |"
echo "|---|---|---|---|---|---|---|---|"
for w in randread randwrite; do
  declare -A M
  for p in $pairings; do M[$p]=$(echo "${R[$p,$w]}" | median); done
  ahead=$(echo "${RATIOS[$w]}" | tr ' ' '\n' | grep -v '^$' | awk '$1 > 1 {n++} END {print n+0}')
  echo "| $w | ${M[spdk/spdk]} | ${M[qs/qs]} | $($py -c "print(round(${M[qs/qs]}/max(${M[spdk/spdk]},1),2))") | $(echo "${RATIOS[$w]}" | median) | $ahead of $rounds | ${M[qs/spdk]} | ${M[spdk/qs]} |"
done
