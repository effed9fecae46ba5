#!/usr/bin/env bash
# The cost of DH-HMAC-CHAP on an NVMe/TCP Connect, in one run: quicksplit's initiator brings up
# an admin queue (TCP, ICReq, Connect, and authentication when the host has keys) N times
# against quicksplit's export, as a host without keys, a host with a key (ffdhe2048, one way)
# and a host with a key and a controller key (both ways). Prints the median and p99 of each and
# their ratio to the unauthenticated Connect.
# Usage: bench/run-nvmf-auth.sh [COUNT (default 200)]
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/common.sh
count=${1:-200}
cargo build --release --locked --bin quicksplit --bin nvmf-connect >/dev/null 2>&1
qs=$PWD/target/release/quicksplit
connect=$PWD/target/release/nvmf-connect
work=$(mktemp -d /tmp/qs-nvmf-auth.XXXXXX)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
port=$($py -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
nqn=nqn.2026-12.io.quicksplit:auth-bench
plain=nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-0000000000a0
oneway=nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-0000000000b0
both=nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-0000000000c0
# Fixed secrets (DHHC-1, as nvme gen-dhchap-key prints them).
echo 'DHHC-1:01:AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyAl7OaH:' >"$work/host.key"
echo 'DHHC-1:00:ZWZnaGlqa2xtbm9wcXJzdHV2d3h5ent8fX5/gIGCg4QqhWEu:' >"$work/ctrl.key"
chmod 600 "$work"/*.key
echo "{\"config\": [
 {\"method\": \"keyring_file_add_key\", \"params\": {\"name\": \"h\", \"path\": \"$work/host.key\"}},
 {\"method\": \"keyring_file_add_key\", \"params\": {\"name\": \"c\", \"path\": \"$work/ctrl.key\"}},
 {\"method\": \"bdev_malloc_create\", \"params\": {\"name\": \"m\", \"size\": 67108864}},
 {\"method\": \"nvmf_export_start\", \"params\": {\"nqn\": \"$nqn\", \"bdev\": \"m\",
   \"listen\": \"127.0.0.1:$port\", \"hosts\": [\"$plain\", {\"nqn\": \"$oneway\", \"dhchap_key\": \"h\"},
   {\"nqn\": \"$both\", \"dhchap_key\": \"h\", \"dhchap_ctrlr_key\": \"c\"}]}}]}" >"$work/config.json"
serve_two_cores "$work/config.json"
run() { $connect --port "$port" --nqn "$nqn" --count "$count" --json "$@"; }
a=$(run --hostnqn "$plain")
b=$(run --hostnqn "$oneway" --dhchap-key "$work/host.key")
c=$(run --hostnqn "$both" --dhchap-key "$work/host.key" --dhchap-ctrl-key "$work/ctrl.key")
$py - "$a" "$b" "$c" <<'PY'
import json, sys
rows = [("no authentication", json.loads(sys.argv[1])),
        ("DH-HMAC-CHAP, host (SHA-256, ffdhe2048)", json.loads(sys.argv[2])),
        ("DH-HMAC-CHAP, both ways", json.loads(sys.argv[3]))]
base = rows[0][1]["median_us"]
print("| admin queue Connect | median | p99 | median vs none |")
print("|---|---|---|---|")
for name, r in rows:
    print(f"| {name} | {r['median_us']/1000:.2f} ms | {r['p99_us']/1000:.2f} ms | {r['median_us']/base:.1f}x |")
PY
