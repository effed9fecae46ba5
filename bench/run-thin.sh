#!/usr/bin/env bash
# Thin volumes: a sparse primary of SIZE_GIB (default 16) GiB holding DATA_MIB (default 256)
# MiB of data in 1 MiB pieces spread over it, mirrored to an empty sparse secondary on the same
# file system. Prints the time from the start until the pair is mirrored with nothing pending,
# the space the secondary takes (du) after it, and the time a verification of the pair takes
# (at VERIFY_RATE bytes/s, default no limit; 0 is the engine's default of 200 MiB/s): a thin primary should leave a thin secondary, and holes should cost
# neither the copy nor the verification any reading.
# Usage: bench/run-thin.sh [ROUNDS] (default 3)   (QS=path picks the binary)
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/common.sh
rounds=${1:-3}
size_gib=${SIZE_GIB:-16}
data_mib=${DATA_MIB:-256}
verify_rate=${VERIFY_RATE:-1099511627776}
[ -n "${QS:-}" ] || cargo build --release --locked -p engine --bin quicksplit >/dev/null 2>&1
qs=${QS:-${CARGO_TARGET_DIR:-$PWD/target}/release/quicksplit}
work=$(mktemp -d /var/tmp/qs-thin.XXXXXX)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

P=$work/p.img S=$work/s.img
truncate -s ${size_gib}G "$P"
stride=$(( size_gib * 1024 / data_mib ))
for i in $(seq 0 $(( data_mib - 1 ))); do
  dd if=/dev/urandom of="$P" bs=1M count=1 seek=$(( i * stride )) conv=notrunc status=none
done
sync
echo "primary: ${size_gib} GiB, ${data_mib} MiB of data; $(du -m "$P" | cut -f1) MiB allocated"
pair_config "$work/config.json"
for r in $(seq "$rounds"); do
  rm -rf "$work/state" "$S"
  truncate -s ${size_gib}G "$S"
  start=$(date +%s.%N)
  serve_two_cores "$work/config.json"
  wait_pair
  end=$(date +%s.%N)
  id=$(rpc pair_verify "{\"name\": \"pr\", \"rate\": $verify_rate}" | $py -c "import json,sys; print(json.load(sys.stdin)['id'])")
  while [ "$(rpc verify_get "{\"id\": $id}" | $py -c "import json,sys; print(json.load(sys.stdin)[0]['state'])")" = running ]; do
    sleep 0.05
  done
  verified=$(date +%s.%N)
  state=$(rpc verify_get "{\"id\": $id}" | $py -c "import json,sys; v=json.load(sys.stdin)[0]; print(v['state'], v['mismatched_tracks'])")
  kill "${pids[@]}"; wait 2>/dev/null || true; pids=()
  sync
  echo "round $r: mirrored in $(echo "$end - $start" | bc) s; secondary $(du -m "$S" | cut -f1) MiB allocated; verified in $(echo "$verified - $end" | bc) s ($state)"
done
