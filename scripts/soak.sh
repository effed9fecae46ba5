#!/usr/bin/env bash
# Soak: hosts write through NBD (fio) and NVMe/TCP (qsbench) while a loop splits the pair, backs
# it up in every mode to every local target kind (file, tape archive in a file), checks each
# backup against the image, resyncs (every third time in reverse) and verifies the pair. Every
# SAMPLE seconds (default 30) it samples the engine's RSS, open fds and threads.
# Fails on: a backup whose image differs from the split image, a restore that does not verify,
# a verify that finds a mismatched track, a job that fails, the engine dying, or growth past the
# bounds below from the first sample after the first round (a leak shows as steady growth).
# Usage: scripts/soak.sh MINUTES   (QS=path/to/quicksplit QSBENCH=path/to/qsbench to choose the
# build; default: this tree's debug build)
set -euo pipefail
cd "$(dirname "$0")/.."
minutes=${1:?usage: scripts/soak.sh MINUTES}
sample_every=${SAMPLE:-30}
# Growth allowed over the baseline sample.
max_rss_growth_mib=64
max_fd_growth=8
max_thread_growth=2
if [ -z "${QS:-}" ] || [ -z "${QSBENCH:-}" ]; then
  cargo build --locked --bin quicksplit --bin qsbench >/dev/null 2>&1
fi
qs=${QS:-$PWD/target/debug/quicksplit}
qsbench=${QSBENCH:-$PWD/target/debug/qsbench}
if [ -x /usr/bin/python3 ]; then py=/usr/bin/python3; else py=python3; fi
work=$(mktemp -d /var/tmp/qs-soak.XXXXXX)
pids=()
engine=
cleanup() {
  kill "${pids[@]}" 2>/dev/null || true
  [ -n "$engine" ] && kill "$engine" 2>/dev/null
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
fail() { echo "SOAK FAILED: $*" >&2; tail -20 "$work/engine.log" >&2 || true; exit 1; }

size=$((128 << 20))
port=$($py -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
nqn=nqn.2026-12.io.quicksplit:soak
cat > "$work/config.json" <<J
{"config": [
 {"method": "bdev_uring_create", "params": {"name": "p", "filename": "$work/p.img", "size": $size}},
 {"method": "bdev_uring_create", "params": {"name": "s", "filename": "$work/s.img", "size": $size}},
 {"method": "pair_create", "params": {"name": "soak", "primary": "p", "secondary": "s"}},
 {"method": "nbd_export_start", "params": {"name": "p", "bdev": "p", "socket": "$work/nbd.sock"}},
 {"method": "nvmf_export_start", "params": {"nqn": "$nqn", "bdev": "p", "listen": "127.0.0.1:$port"}}]}
J
QUICKSPLIT_LOG=warn NO_COLOR=1 "$qs" serve --config "$work/config.json" --rpc-socket "$work/rpc.sock" \
  --state-dir "$work/state" --cores 0-1 --idle adaptive >"$work/engine.log" 2>&1 &
engine=$!
for _ in $(seq 100); do [ -S "$work/rpc.sock" ] && break; sleep 0.1; done
rpc() { "$qs" rpc --socket "$work/rpc.sock" "$@"; }
field() { $py -c "import json,sys; v=json.load(sys.stdin); v=v[0] if isinstance(v, list) else v; print(v$1)"; }
alive() { kill -0 "$engine" 2>/dev/null || fail "the engine exited"; }
pair_state() { rpc pair_get '{"name": "soak"}' | field "['state'], v['pending_tracks']"; }
wait_pair_state() { # "STATE PENDING" to reach, within 600 s
  local end=$((SECONDS + 600))
  while [ "$(pair_state | tr -d "(),'")" != "$1" ]; do
    alive; [ $SECONDS -lt $end ] || fail "pair never reached $1: $(pair_state)"; sleep 0.2
  done
}
wait_job() { # method id -> final JSON record
  local out
  while :; do
    alive
    out=$(rpc "$1" "{\"id\": $2}")
    case $(echo "$out" | field "['state']") in running) sleep 0.3 ;; *) echo "$out"; return ;; esac
  done
}
wait_pair_state "PAIR 0"

end=$((SECONDS + minutes * 60))
# Hosts: fio through NBD for the whole run; qsbench through NVMe/TCP in bursts, both at a modest
# depth so the 2 cores also serve the loop.
# P is read-only while a reverse resync restores it, so fio stops for those and starts again
# after; each run has a log of its own, all checked at the end.
fio_runs=0
fio_pid=
start_fio() {
  fio_runs=$((fio_runs + 1))
  fio --name=soak --ioengine=nbd --uri="nbd+unix:///p?socket=$work/nbd.sock" --rw=randwrite \
    --bs=4k --iodepth=4 --size="$size" --time_based --runtime=$((minutes * 60 + 30)) \
    --rate_iops=2000 >"$work/fio-$fio_runs.log" 2>&1 &
  fio_pid=$!
  pids+=($fio_pid)
}
stop_fio() {
  kill -INT "$fio_pid" 2>/dev/null || true
  wait "$fio_pid" 2>/dev/null || true
}
start_fio
( while [ $SECONDS -lt $end ]; do
    nice "$qsbench" --bdev "nvmf:127.0.0.1:$port:$nqn" --workload randrw --bs 4096 --qd 2 \
      --time 3 --cores 1 --idle adaptive >/dev/null 2>>"$work/qsbench.log" || true
    sleep 2
  done ) &
pids+=($!)

sample() { # t -> "rss_kib fds threads"
  local rss threads fds
  rss=$(awk '/^VmRSS/ {print $2}' /proc/$engine/status)
  threads=$(awk '/^Threads/ {print $2}' /proc/$engine/status)
  fds=$(ls /proc/$engine/fd | wc -l)
  echo "$rss $fds $threads"
}
echo "t_s rss_mib fds threads rounds backups verifies"
base=
next_sample=$SECONDS
rounds=0 backups=0 verifies=0
check_sample() {
  [ $SECONDS -ge $next_sample ] || return 0
  set -- $(sample)
  echo "$SECONDS $(($1 / 1024)) $2 $3 $rounds $backups $verifies"
  if [ -z "$base" ] && [ $rounds -ge 1 ]; then base="$1 $2 $3"; fi
  if [ -n "$base" ]; then
    set -- "$@" $base
    [ $(( ($1 - $4) / 1024 )) -le $max_rss_growth_mib ] || fail "RSS grew from $(($4 / 1024)) to $(($1 / 1024)) MiB"
    [ $(($2 - $5)) -le $max_fd_growth ] || fail "open fds grew from $5 to $2"
    [ $(($3 - $6)) -le $max_thread_growth ] || fail "threads grew from $6 to $3"
  fi
  next_sample=$((SECONDS + sample_every))
}

while [ $SECONDS -lt $end ] || [ $rounds -eq 0 ]; do
  check_sample
  rpc pair_split '{"name": "soak"}' >/dev/null
  n=0
  for mode in wait reflect merge; do
    for kind in file tape; do
      n=$((n + 1))
      out=$work/backup-$n
      id=$(rpc backup_start "{\"pair\": \"soak\", \"mode\": \"$mode\", \"flat_sha256\": true, \"target\": {\"type\": \"$kind\", \"path\": \"$out\"}}" | field "['id']")
      rec=$(wait_job backup_get "$id")
      [ "$(echo "$rec" | field "['state']")" = done ] || fail "backup $id ($mode to $kind): $rec"
      sha=$(echo "$rec" | field "['sha256']")
      eval "sha_$n=$sha"
      if [ "$kind" = file ]; then
        got=$(sha256sum "$out" | cut -d' ' -f1)
      else
        "$qs" restore "$out" --to "$out.img" >/dev/null 2>"$work/restore.log" || fail "restore of backup $id: $(cat "$work/restore.log")"
        got=$(sha256sum "$out.img" | cut -d' ' -f1)
        rm -f "$out.img"
      fi
      [ "$got" = "$sha" ] || fail "backup $id ($mode to $kind): the target holds $got, the engine says $sha"
      rm -f "$out"
      backups=$((backups + 1))
      check_sample
    done
  done
  # Every backup is the one image; and that image is S once the background copy is done.
  for i in 2 3 4 5 6; do
    eval "[ \"\$sha_$i\" = \"\$sha_1\" ]" || fail "round $rounds: backups of one split differ"
  done
  wait_pair_state "PSUS 0"
  s_sha=$(sha256sum "$work/s.img" | cut -d' ' -f1)
  [ "$s_sha" = "$sha_1" ] || fail "round $rounds: the backups ($sha_1) are not S ($s_sha)"
  if [ $((rounds % 3)) -eq 2 ]; then dir=reverse; else dir=forward; fi
  if [ $dir = reverse ]; then stop_fio; fi
  rpc pair_resync "{\"name\": \"soak\", \"direction\": \"$dir\"}" >/dev/null
  wait_pair_state "PAIR 0"
  if [ $dir = reverse ]; then start_fio; fi
  id=$(rpc pair_verify '{"name": "soak"}' | field "['id']")
  rec=$(wait_job verify_get "$id")
  [ "$(echo "$rec" | field "['state']")" = done ] || fail "verify $id: $rec"
  [ "$(echo "$rec" | field "['mismatched_tracks']")" = 0 ] || fail "verify $id found mismatched tracks: $rec"
  verifies=$((verifies + 1))
  rounds=$((rounds + 1))
done
next_sample=0
check_sample
alive
# fio runs past the loop's end (its runtime has a margin): stopped now, its log has its summary.
stop_fio
for log in "$work"/fio-*.log; do
  grep -q "err= 0" "$log" || fail "fio reported errors: $(tail -5 "$log")"
done
echo "soak passed: $rounds rounds, $backups backups, $verifies verifies in $minutes min"
