#!/usr/bin/env bash
# What each pair costs, measured as a user would: the release build on 2 reactors
# (`--idle adaptive`), N pairs of uring bdevs on sparse 16 MiB files (in a directory on the
# state directory's file system), created over one RPC connection (3 requests a pair, sent one
# after the other). Prints, for each N: the creation time, the engine's RSS, its descriptors
# and the files it holds without one (in io_uring holding rings, Linux 6.8+), the
# reactors' busy share while everything is idle (5 s, once every pair is mirrored), the round
# trip of a group split of the first 1,000 pairs (all of them when fewer; median and max of 10,
# each followed by a resync), and of one pair's split (median of 10), host 4 KiB randwrite IOPS
# through one pair's NBD export (fio, QD32, 5 s), the time a clean stop takes (SIGTERM to exit)
# and a start on the state directory it left (until the last pair answers).
# Usage: bench/run-scale.sh [N...] (default: 10 1000)   (QS=path picks the binary;
# SIZE_MIB=n sets the volume size, default 16; the volumes are empty and stay thin, the initial
# copy writes nothing to a secondary where its primary has holes)
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/common.sh
counts=("$@"); [ ${#counts[@]} -gt 0 ] || counts=(10 1000)
size_mib=${SIZE_MIB:-16}
# Three open files a pair (P, S, its metadata). Held files need no descriptor; where the kernel
# cannot hold them, 10,000 pairs need a hard limit above 30,000 (raising it needs
# CAP_SYS_RESOURCE).
ulimit -Hn 65536 2>/dev/null || echo "open file limit: $(ulimit -Hn) (could not raise it)"
ulimit -n "$(ulimit -Hn)"
[ -n "${QS:-}" ] || cargo build --release --locked -p engine --bin quicksplit >/dev/null 2>&1
qs=${QS:-${CARGO_TARGET_DIR:-$PWD/target}/release/quicksplit}
work=$(mktemp -d /var/tmp/qs-scale.XXXXXX)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

# A JSON-RPC client over one connection: runs the phase named $1 with $2 pairs, prints results.
drive() {
  $py - "$work/rpc.sock" "$1" "$2" "$work/files" "$size_mib" <<'PY'
import json, socket, statistics, sys, time
sock, phase, n, files, size_mib = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
s = socket.socket(socket.AF_UNIX); s.connect(sock); f = s.makefile("rwb")
seq = 0
def call(method, params=None):
    global seq
    seq += 1
    f.write(json.dumps({"jsonrpc": "2.0", "id": seq, "method": method, "params": params or {}}).encode() + b"\n")
    f.flush()
    r = json.loads(f.readline())
    if "error" in r:
        sys.exit(f"{method}: {r['error']}")
    return r["result"]
names = [f"pr{i}" for i in range(n)]
def wait_pair(which):
    while True:
        # One pair is asked for by name: listing 10,000 pairs between splits is not what a
        # split costs.
        got = call("pair_get", {"name": which[0]}) if len(which) == 1 else call("pair_get")
        st = {p["name"]: (p["state"], p["pending_tracks"]) for p in got}
        if all(st[w] == ("PAIR", 0) for w in which):
            return
        time.sleep(0.05)
if phase == "create":
    t = time.monotonic()
    for i, name in enumerate(names):
        for side in "ps":
            call("bdev_uring_create", {"name": f"{side}{i}", "filename": f"{files}/{side}{i}.img", "size": size_mib << 20})
        call("pair_create", {"name": name, "primary": f"p{i}", "secondary": f"s{i}"})
    print(f"{time.monotonic() - t:.2f}")
elif phase == "splits":
    wait_pair(names)
    group, single, inside = [], [], []
    members = names[:1000]
    for _ in range(10):
        t = time.monotonic(); r = call("pair_split", {"names": members}); group.append(time.monotonic() - t)
        inside.append(r["engine_ns"] / 1e9)
        for name in members:
            call("pair_resync", {"name": name})
        wait_pair(members)
    for _ in range(10):
        t = time.monotonic(); call("pair_split", {"name": names[0]}); single.append(time.monotonic() - t)
        call("pair_resync", {"name": names[0]}); wait_pair(names[:1])
    ms = lambda v: v * 1e3
    print(f"{ms(statistics.median(group)):.1f} {ms(max(group)):.1f} {ms(statistics.median(single)):.2f} {ms(statistics.median(inside)):.1f}")
elif phase == "busy":
    # Idle means mirrored: the initial copies are done first.
    wait_pair(names)
    def busy():
        r = call("framework_get_reactors")
        return sum(x["busy_ns"] for x in r), sum(x["busy_ns"] + x["idle_ns"] for x in r)
    b0, t0 = busy(); time.sleep(5); b1, t1 = busy()
    print(f"{(b1 - b0) / max(t1 - t0, 1):.3f}")
PY
}

# Files held by the holding rings (short submission queues) of process $1.
held_files() {
  $py - "$1" <<'PY'
import os, sys
base = f"/proc/{sys.argv[1]}"
held = 0
for fd in os.listdir(f"{base}/fd"):
    try:
        if "io_uring" not in os.readlink(f"{base}/fd/{fd}"):
            continue
        lines = open(f"{base}/fdinfo/{fd}").read().splitlines()
    except OSError:
        continue
    if not any(l.startswith("SqMask:") and l.split()[-1] == "0x3" for l in lines):
        continue
    start = next((i for i, l in enumerate(lines) if l.startswith("UserFiles")), None)
    if start is None:
        continue
    for l in lines[start + 1:]:
        if not l[:1].isspace():
            break
        held += 1
print(held)
PY
}

echo "load before: $(uptime)"
printf '%8s %10s %10s %8s %8s %10s %16s %16s %14s\n' pairs create_s rss_mib fds held idle_busy "group split ms" "(max)" "one split ms"
# (the group: the first 1,000 pairs, or all when fewer)
for n in "${counts[@]}"; do
  rm -rf "$work/state" "$work/files" "$work/rpc.sock"; mkdir -p "$work/files"
  echo '{"config": []}' > "$work/empty.json"
  serve_two_cores "$work/empty.json"
  pid=${pids[-1]}
  create=$(drive create "$n")
  rss=$(awk '/VmRSS/ {print int($2/1024)}' "/proc/$pid/status")
  fds=$(ls "/proc/$pid/fd" | wc -l)
  held=$(held_files "$pid")
  busy=$(drive busy "$n")
  read -r gmed gmax one ginside < <(drive splits "$n")
  printf '%8d %10s %10s %8s %8s %10s %16s %16s %14s\n' "$n" "$create" "$rss" "$fds" "$held" "$busy" "$gmed" "$gmax" "$one"
  rpc nbd_export_start '{"name": "p0", "bdev": "p0", "socket": "'"$work"'/nbd.sock"}' >/dev/null
  iops=$(URI="nbd+unix:///p0?socket=$work/nbd.sock" RUNTIME=5 NUMJOBS=1 fio --output-format=json \
    bench/fio/nbd-randwrite.fio 2>/dev/null | grep -v '^fio:' \
    | $py -c "import json,sys; print(round(json.load(sys.stdin)['jobs'][0]['write']['iops']))")
  echo "         group split: median ${ginside} ms of it inside the engine (engine_ns)"
  echo "         host 4 KiB randwrite IOPS through pair 0 with $n pairs: $iops"
  # A clean stop writes every pair's metadata out; a start on the state directory brings the
  # configuration and every pair back (until the RPC socket answers with the last pair).
  t=$(date +%s.%N); kill "$pid"; wait "$pid" 2>/dev/null || true; pids=()
  stop=$($py -c "import sys,time; print(f'{time.time() - float(sys.argv[1]):.2f}')" "$t")
  rm -f "$work/rpc.sock"; t=$(date +%s.%N)
  QUICKSPLIT_LOG=warn $qs serve --rpc-socket "$work/rpc.sock" --state-dir "$work/state" \
    --cores 0-1 --idle adaptive >/dev/null 2>&1 &
  pid=$!; pids+=("$pid")
  until [ -S "$work/rpc.sock" ] && rpc pair_get "{\"name\": \"pr$((n - 1))\"}" >/dev/null 2>&1; do
    kill -0 "$pid" 2>/dev/null || { echo "the restart on the state directory failed" >&2; exit 1; }
    sleep 0.05
  done
  start=$($py -c "import sys,time; print(f'{time.time() - float(sys.argv[1]):.2f}')" "$t")
  echo "         clean stop (SIGTERM to exit): $stop s; start on the saved state: $start s"
  kill "$pid"; wait "$pid" 2>/dev/null || true; pids=()
done
echo "load after: $(uptime)"
