#!/usr/bin/env bash
# Keeps both cores busy the way a loaded appliance does, to run a randomized test beside it:
# a quicksplit on a RAM disk exported over NBD and NVMe/TCP, and in a loop 100 qemu-io sessions
# (64 KiB written and read back each) and 10 one-second qsbench runs through the NVMe/TCP
# initiator. Its reactors, clients and softirqs preempt the test's threads at arbitrary moments,
# which busy loops do not: races that need a thread descheduled mid-step show up. Runs until
# interrupted. Needs the release binaries (cargo build --release) and qemu-io.
#
#   scripts/background-load.sh &  QS_CUTS=3000 cargo test -p engine --test power_cut; kill %1
set -euo pipefail
cd "$(dirname "$0")/.."
bin=target/release
port=${QS_LOAD_PORT:-4431}
work=$(mktemp -d /tmp/qs-load.XXXX)
nqn=nqn.2026-11.io.quicksplit:load
cat >"$work/qs.json" <<JSON
{"config": [
 {"method": "bdev_malloc_create", "params": {"name": "ram", "size": 67108864}},
 {"method": "nbd_export_start", "params": {"name": "ram", "bdev": "ram", "socket": "$work/nbd.sock"}},
 {"method": "nvmf_export_start", "params": {"nqn": "$nqn", "bdev": "ram", "listen": "127.0.0.1:$port"}}
]}
JSON
QUICKSPLIT_LOG=warn "$bin/quicksplit" serve --config "$work/qs.json" \
    --rpc-socket "$work/rpc.sock" --state-dir "$work/state" --cores 0-1 --idle adaptive \
    >"$work/serve.log" 2>&1 &
serve=$!
trap 'kill $serve 2>/dev/null; wait $serve 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 100); do [ -S "$work/nbd.sock" ] && break; sleep 0.1; done
[ -S "$work/nbd.sock" ] || { echo "quicksplit did not start: $(cat "$work/serve.log")" >&2; exit 1; }
while kill -0 $serve 2>/dev/null; do
    for _ in $(seq 100); do
        qemu-io -f raw -c 'write -P 7 0 64k' -c 'read -P 7 0 64k' \
            "nbd+unix:///ram?socket=$work/nbd.sock" >/dev/null
    done
    for _ in $(seq 10); do
        RUST_LOG=error "$bin/qsbench" --bdev "nvmf:127.0.0.1:$port:$nqn" --workload randrw --qd 8 --time 1 \
            --cores 0 >/dev/null
    done
done
echo "quicksplit stopped: $(cat "$work/serve.log")" >&2
exit 1
