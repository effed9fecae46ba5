#!/usr/bin/env bash
# Verification (pair_verify) on the 1 GiB pair of uring files, two figures:
#  1. what hosts see: fio 4 KiB randwrite QD32 through NBD on P for 4 s with no verification
#     and with one at its default rate, alternating which goes first in each round; p99.9 and
#     IOPS of each window, and the p99.9 ratio (verify / none) per round and pooled;
#  2. how fast it compares an idle mirrored pair: at the default rate (rate 0) and unlimited
#     (rate 1 TiB/s), against fio reading P and S at once (1 MiB QD8 each; the volume rate is
#     the two files' mean).
# Usage: bench/run-verify.sh [DIR (default /var/tmp/qs-bench)] [ROUNDS (default 3)]
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/common.sh
dir=${1:-/var/tmp/qs-bench}
rounds=${2:-3}
mkdir -p "$dir"
cargo build --release --locked --bin quicksplit >/dev/null 2>&1
qs=${CARGO_TARGET_DIR:-$PWD/target}/release/quicksplit
work=$(mktemp -d /tmp/qs-verify.XXXXXX)
P=$dir/bk-p-1g.img; S=$dir/bk-s-1g.img
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT
fill_files 1 "$P" "$S"
pair_config "$work/c.json" "$work/nbd.sock"
serve_two_cores "$work/c.json"
wait_pair
mkdir -p "$work/lat"

start_verify() { # params -> id
  rpc pair_verify "{\"name\": \"pr\"${1:+, $1}}" | $py -c "import json,sys; print(json.load(sys.stdin)['id'])"
}
# Waits for verification $1 to end; prints "STATE MiB/s MISMATCHED" (from the engine's time).
verify_result() {
  local out
  while :; do
    out=$(rpc verify_get "{\"id\": $1}" | $py -c \
      "import json,sys; v=json.load(sys.stdin)[0]; print(v['state'], round(v['bytes_total']/1048576/max(v['elapsed_ns'],1)*1e9), v['mismatched_tracks'])")
    case $out in
      running*) sleep 0.2 ;;
      *) echo "$out"; return ;;
    esac
  done
}
host_window() { # name round -> "IOPS p99.9_us"
  local id=
  [ "$1" = none ] || id=$(start_verify)
  host_randwrite 4 1 "$1.$2"
  if [ -n "$id" ]; then
    rpc verify_cancel "{\"id\": $id}" >/dev/null 2>&1 || true
    verify_result "$id" >/dev/null
  fi
  wait_pair
}

echo "1. host 4 KiB randwrite QD32 through NBD, 4 s windows"
printf '%-6s %-8s %8s %10s\n' round verify IOPS "p99.9 us"
ratios=()
for r in $(seq "$rounds"); do
  order="none verify"; [ $((r % 2)) = 0 ] && order="verify none"
  for c in $order; do
    set -- $(host_window "$c" "$r")
    printf '%-6s %-8s %8s %10s\n' "$r" "$c" "$1" "$2"
    eval "p_$c=$2"
  done
  ratios+=("$($py -c "print('%.2f' % ($p_verify / $p_none))")")
done
echo "p99.9 ratio verify/none per round: ${ratios[*]}"
$py - "$work/lat" <<'PY'
import collections, os, sys
lat = collections.defaultdict(list)
for name in os.listdir(sys.argv[1]):
    cond = name.split('.')[0]
    with open(os.path.join(sys.argv[1], name)) as f:
        lat[cond] += [int(line.split(',')[1]) for line in f if line.strip()]
def pct(v, q):
    v = sorted(v)
    return v[min(len(v) - 1, int(q * len(v)))] / 1000
p = {c: pct(v, 0.999) for c, v in lat.items()}
for c in sorted(p):
    print('pooled %-6s p99 %7.0f us  p99.9 %7.0f us  (%d writes)' % (c, pct(lat[c], 0.99), p[c], len(lat[c])))
if 'none' in p and 'verify' in p:
    print('pooled p99.9 ratio verify/none: %.2f (target <= 1.5)' % (p['verify'] / p['none']))
PY

echo "2. verifying the idle mirrored pair (1 GiB)"
set -- $(verify_result "$(start_verify)")
echo "verify at the default rate: $2 MiB/s ($1, $3 mismatched)"
set -- $(verify_result "$(start_verify '"rate": 1099511627776')")
unlimited=$2
echo "verify unlimited: $unlimited MiB/s ($1, $3 mismatched)"
fio_both=$(fio --direct="$(direct "$P")" --ioengine=io_uring --rw=read --bs=1m --iodepth=8 --size=1g \
    --name=p --filename="$P" --name=s --filename="$S" --output-format=json 2>/dev/null | $py -c \
    "import json,sys; t=sys.stdin.read(); j=json.loads(t[t.index('{'):])['jobs']; print(round(sum(x['read']['bw'] for x in j)/1024/2))")
echo "fio reading P and S at once: $fio_both MiB/s of the volume (the two files' mean)"
echo "ratio verify unlimited / fio: $($py -c "print('%.2f' % ($unlimited / $fio_both))")"
