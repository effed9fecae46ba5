#!/usr/bin/env bash
# What saving the running configuration costs as it grows: N keyring keys added one after the
# other over one RPC connection (each call changes the configuration, which is made durable in
# the state directory before the reply), the round trip of the first 200 calls and of the last
# 200 compared. The objects are keys so that nothing but the configuration grows.
# Usage: bench/run-config.sh [N (default 5000)]   (QS=path picks the binary)
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/common.sh
n=${1:-5000}
if [ -z "${QS:-}" ]; then cargo build --release --locked -p engine --bin quicksplit >/dev/null 2>&1; fi
qs=${QS:-${CARGO_TARGET_DIR:-$PWD/target}/release/quicksplit}
work=$(mktemp -d /var/tmp/qs-config.XXXXXX)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
echo '{"config": []}' >"$work/empty.json"
serve_two_cores "$work/empty.json"
printf 'x%.0s' $(seq 32) >"$work/secret"
chmod 600 "$work/secret"
$py - "$work/rpc.sock" "$n" "$work/secret" <<'PY'
import json, socket, statistics, sys, time
sock, n, secret = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.socket(socket.AF_UNIX); s.connect(sock); f = s.makefile("rwb")
times = []
for i in range(n):
    req = {"jsonrpc": "2.0", "id": i, "method": "keyring_file_add_key",
           "params": {"name": f"key{i}", "path": secret}}
    t = time.perf_counter()
    f.write(json.dumps(req).encode() + b"\n"); f.flush()
    r = json.loads(f.readline())
    times.append(time.perf_counter() - t)
    assert "error" not in r, r
first, last = statistics.median(times[:200]) * 1e3, statistics.median(times[-200:]) * 1e3
print(f"{n} changes: median round trip of the first 200 {first:.2f} ms, of the last 200 {last:.2f} ms ({last/first:.1f}x); total {sum(times):.1f} s")
PY
