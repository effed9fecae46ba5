#!/usr/bin/env bash
# Backup figures in one run, on uring files: each mode's throughput to a file target (right after
# a split with nearly every track pending, and right after a split of a mirrored pair) next to
# fio's sequential read of the source and sequential write of the target; host 4 KiB randwrite
# (fio through NBD on P) during each mode against idle; the CPU-copied payload bytes of each.
# Usage: bench/run-backup.sh [DIR (default /var/tmp/qs-bench)] [SIZE_GIB (default 1)]
#        [TARGET_DIR (default DIR; /dev/shm puts the target on another device than the source)]
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/common.sh
dir=${1:-/var/tmp/qs-bench}
gib=${2:-1}
mkdir -p "$dir"
cargo build --release --locked --bin quicksplit >/dev/null 2>&1
qs=$PWD/target/release/quicksplit
work=$(mktemp -d /tmp/qs-backup-bench.XXXXXX)
pids=()
cleanup() {
  kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"
  [ "$tdir" = "$dir" ] || rm -f "$T" "$T.partial"
}
trap cleanup EXIT
tdir=${3:-$dir}
P=$dir/bk-p.img; S=$dir/bk-s.img; T=$tdir/bk-target.img
direct() { [ "$(stat -f -c %T "$(dirname "$1")")" = tmpfs ] && echo 0 || echo 1; }
for f in "$P" "$S" "$T"; do
  fio --name=fill --filename="$f" --size=${gib}g --rw=write --bs=1m --direct="$(direct "$f")" \
      --ioengine=io_uring --iodepth=8 >/dev/null
done
seq_mibs() { # rw file -> MiB/s
  fio --name=s --filename="$2" --size=${gib}g --rw=$1 --bs=1m --direct="$(direct "$2")" \
      --ioengine=io_uring --iodepth=8 --output-format=json 2>/dev/null | $py -c \
      "import json,sys; j=json.load(sys.stdin)['jobs'][0]; print(round((j['read']['bw']+j['write']['bw'])/1024))"
}
read_s=$(seq_mibs read "$S"); write_t=$(seq_mibs write "$T")
slower=$(( read_s < write_t ? read_s : write_t ))
echo "fio sequential 1 MiB QD8: read of the source $read_s MiB/s, write of the target $write_t MiB/s"
# Both at once, as a copy needs them: where source and target share a device this is what the
# device gives a copy, below either figure alone.
set -- $(fio --name=r --filename="$S" --size=${gib}g --rw=read --bs=1m --direct="$(direct "$S")" \
    --ioengine=io_uring --iodepth=8 --name=w --filename="$T" --size=${gib}g --rw=write --bs=1m \
    --direct="$(direct "$T")" --ioengine=io_uring --iodepth=8 --output-format=json 2>/dev/null \
  | sed -n '/^{/,$p' \
  | $py -c "import json,sys; j=json.load(sys.stdin)['jobs']; print(round(j[0]['read']['bw']/1024), round(j[1]['write']['bw']/1024))")
both_r=$1; both_w=$2; together=$(( both_r < both_w ? both_r : both_w ))
echo "fio both at once: read of the source $both_r MiB/s, write of the target $both_w MiB/s"

cat > "$work/c.json" <<JSON
{"config": [
 {"method": "bdev_uring_create", "params": {"name": "p", "filename": "$P"}},
 {"method": "bdev_uring_create", "params": {"name": "s", "filename": "$S"}},
 {"method": "pair_create", "params": {"name": "pr", "primary": "p", "secondary": "s"}},
 {"method": "nbd_export_start", "params": {"name": "p", "bdev": "p", "socket": "$work/nbd.sock"}}
]}
JSON
serve_two_cores "$work/c.json"
host() { # seconds -> "IOPS p99.9us"
  fio --name=h --ioengine=nbd --uri="nbd+unix:///p?socket=$work/nbd.sock" --rw=randwrite --bs=4k \
      --iodepth=32 --size=${gib}g --time_based --runtime=$1 --output-format=json 2>/dev/null \
      | grep -v '^fio:' | $py -c \
      "import json,sys; w=json.load(sys.stdin)['jobs'][0]['write']; print(round(w['iops']), round(w['clat_ns']['percentile']['99.900000']/1000))"
}
backup() { # mode [host_rate (default: the engine's)] -> id
  rm -f "$T.partial"
  hr=${2:+, \"host_rate\": $2}
  rpc backup_start "{\"pair\": \"pr\", \"mode\": \"$1\"$hr, \"target\": {\"type\": \"file\", \"path\": \"$T\"}}" \
    | $py -c "import json,sys; print(json.load(sys.stdin)['id'])"
}
wait_backup() { # id -> "MiB/s cpu_copied state"
  set -- $(backup_result "$work/rpc.sock" "$1")
  echo "$2 $3 $1"
}
wait_pair
set -- $(host 4); idle_iops=$1; idle_p999=$2
echo "host randwrite through NBD, idle (PAIR): $idle_iops IOPS, p99.9 $idle_p999 us"
# The same right after a split made the same way, with no backup (copy before write on most
# tracks): what the host does during a backup compares with this.
wait_pair; host 1 >/dev/null; rpc pair_split '{"name": "pr"}' >/dev/null
set -- $(host 4); split_iops=$1; split_p999=$2
rpc pair_resync '{"name": "pr"}' >/dev/null
echo "host randwrite through NBD right after a split, no backup: $split_iops IOPS, p99.9 $split_p999 us"
printf '%-8s %12s %9s %12s %9s %9s %14s %12s %8s %8s %10s\n' mode "MiB/s alone" "vs fio" \
  "MiB/s mirr." "vs fio" "vs both" "MiB/s w/ host" "host IOPS" "p99.9us" "vs split" "cpu copied"
for mode in merge reflect wait; do
  # Split of a mirrored pair (nothing pending): the backup's own streaming rate, next to fio
  # reading the source just before (the virtual disk's rate drifts within a minute).
  wait_pair
  read_now=$(seq_mibs read "$S"); slower_now=$(( read_now < write_t ? read_now : write_t ))
  rpc pair_split '{"name": "pr"}' >/dev/null
  id=$(backup $mode); set -- $(wait_backup $id); mirrored=$1
  rpc pair_resync '{"name": "pr"}' >/dev/null; wait_pair
  # Dirty every track, then split with the copy still behind: modes differ on pending tracks.
  host 1 >/dev/null
  rpc pair_split '{"name": "pr"}' >/dev/null
  id=$(backup $mode); set -- $(wait_backup $id); alone=$1; copied=$2
  rpc pair_resync '{"name": "pr"}' >/dev/null; wait_pair
  host 1 >/dev/null
  rpc pair_split '{"name": "pr"}' >/dev/null
  id=$(backup $mode)
  set -- $(host 4); h_iops=$1; h_p999=$2
  set -- $(wait_backup $id); loaded=$1
  rpc pair_resync '{"name": "pr"}' >/dev/null
  $py -c "print('%-8s %12d %9.2f %12d %9.2f %9.2f %14d %12d %8d %8.2f %10d' % ('$mode', $alone, $alone/$slower, $mirrored, $mirrored/$slower_now, $mirrored/$together, $loaded, $h_iops, $h_p999, $h_p999/$split_p999, $copied))"
done
# merge again without yielding to the host (host_rate 0): what the yield buys (host for 2 s: the
# backup ends sooner at full speed).
wait_pair; host 1 >/dev/null; rpc pair_split '{"name": "pr"}' >/dev/null
id=$(backup merge 0)
set -- $(host 2); h_iops=$1; h_p999=$2
set -- $(wait_backup $id); loaded=$1; copied=$2
rpc pair_resync '{"name": "pr"}' >/dev/null
$py -c "print('%-8s %12s %9s %12s %9s %9s %14d %12d %8d %8.2f %10d' % ('merge/0', '-', '-', '-', '-', '-', $loaded, $h_iops, $h_p999, $h_p999/$split_p999, $copied))"
echo "alone: right after a split with nearly every track pending; mirr.: right after a split of a"
echo "mirrored pair (nothing pending); vs fio: that throughput / the slower of fio's source read and"
echo "target write (for mirr., with the source read again just before that backup); vs both: mirr. /"
echo "the slower of the two when fio runs them at once"
echo "vs split: host p99.9 during the backup / host p99.9 right after a split with no backup"
