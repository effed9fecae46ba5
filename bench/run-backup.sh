#!/usr/bin/env bash
# Backup figures in one run, on uring files, in paired rounds: each mode's throughput to the
# target (right after a split with nearly every track pending, and right after a split of a
# mirrored pair) next to fio's sequential read of the source and sequential write of the target;
# host 4 KiB randwrite (fio QD32 through NBD on P) during each mode, right after a split with
# nearly every track pending and right after a split of a mirrored pair, next to the same host
# with no backup after a split made the same way and in PAIR; the CPU-copied payload bytes of
# each. Every round measures its own references, because the virtual disks this was written on
# change rate within a minute; the summary gives each ratio's median over the rounds.
# The target is by default a RAM-backed block device made for the run (bench/common.sh,
# ram_device_start; needs root), another device than the source; TARGET may be a block device
# (overwritten) or a directory (the backup writes a new file there; DIR itself puts the target on
# the source's disk).
# Usage: [QS=BINARY] bench/run-backup.sh [DIR (default /var/tmp/qs-bench)] [SIZE_GIB (default 1)] [TARGET]
#        [ROUNDS (default 3)]
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/common.sh
dir=${1:-/var/tmp/qs-bench}
gib=${2:-1}
target=${3:-}
rounds=${4:-3}
mkdir -p "$dir"
# QS=path runs another build (to compare two builds in the same session).
[ -n "${QS:-}" ] || cargo build --release --locked --bin quicksplit >/dev/null 2>&1
qs=${QS:-$PWD/target/release/quicksplit}
work=$(mktemp -d /tmp/qs-backup-bench.XXXXXX)
pids=()
T=
cleanup() {
  kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"
  [ -z "$T" ] || [ -b "$T" ] || rm -f "$T" "$T.partial"
  ram_device_stop
}
trap cleanup EXIT
if [ -z "$target" ]; then ram_device_start "$gib"; T=$ram_dev
elif [ -b "$target" ]; then T=$target
else T=$target/bk-target.img
fi
P=$dir/bk-p-${gib}g.img; S=$dir/bk-s-${gib}g.img
fill_files "$gib" "$P" "$S"
pair_config "$work/c.json" "$work/nbd.sock"
serve_two_cores "$work/c.json"
mkdir -p "$work/lat"
host() { host_randwrite "$1" "$gib" "${2:-}"; }  # seconds [latency log name] -> "IOPS p99.9us"
backup() { # mode [host_rate (default: the engine's)] -> id
  [ -b "$T" ] || rm -f "$T" "$T.partial"
  start_file_backup "$1" "$T" "${2:+\"host_rate\": $2}"
}
wait_backup() { # id -> "MiB/s cpu_copied state"
  set -- $(backup_result "$work/rpc.sock" "$1")
  [ "$1" = done ] || { echo "backup $id ended $1" >&2; exit 1; }
  echo "$2 $3 $1"
}
# Dirties nearly every track, then splits with the copy still behind: the state every backup
# "right after a split" starts from, and the modes differ on the tracks still pending.
dirty_split() { wait_pair; host 1 >/dev/null; rpc pair_split '{"name": "pr"}' >/dev/null; }
echo "source: $S; target: $T"
printf '%-5s %-8s %7s %7s %7s %7s %7s %7s %9s %9s %9s %7s %7s %7s\n' round mode "rd MiB" "wr MiB" \
  "alone" "mirr." "vs fio" "w/host" "host IOPS" "p99.9 us" "ref us" "vs ref" "vs PAIR" copied
results=()
wait_pair
for r in $(seq "$rounds"); do
  read_s=$(seq_mibs read "$S" "$gib"); write_t=$(seq_mibs write "$T" "$gib")
  slower=$(( read_s < write_t ? read_s : write_t ))
  wait_pair; host 1 >/dev/null
  set -- $(host 4 "PAIR.$r"); pair_iops=$1; pair_p999=$2
  dirty_split; set -- $(host 4 "split.$r"); split_iops=$1; split_p999=$2; resync
  rpc pair_split '{"name": "pr"}' >/dev/null
  set -- $(host 4 "psus.$r"); psus_iops=$1; psus_p999=$2; resync
  printf '%-5s %-8s %7d %7d %7s %7s %7s %7s %9d %9d %9s %7s %7s %7s\n' "$r" "(PAIR)" "$read_s" \
    "$write_t" - - - - "$pair_iops" "$pair_p999" - - - -
  printf '%-5s %-8s %7s %7s %7s %7s %7s %7s %9d %9d %9s %7s %7s %7s\n' "$r" "(split)" - - - - - - \
    "$split_iops" "$split_p999" - - - -
  printf '%-5s %-8s %7s %7s %7s %7s %7s %7s %9d %9d %9s %7s %7s %7s\n' "$r" "(psus)" - - - - - - \
    "$psus_iops" "$psus_p999" - - - -
  for mode in merge reflect wait; do
    # A split of a mirrored pair (nothing pending): the backup's own streaming rate.
    wait_pair; rpc pair_split '{"name": "pr"}' >/dev/null
    set -- $(wait_backup "$(backup $mode)"); mirrored=$1; resync
    dirty_split; set -- $(wait_backup "$(backup $mode)"); alone=$1; copied=$2; resync
    dirty_split; id=$(backup $mode)
    set -- $(host 4 "$mode.$r"); h_iops=$1; h_p999=$2
    set -- $(wait_backup "$id"); loaded=$1; resync
    line=$($py -c "print('%-5s %-8s %7s %7s %7d %7d %7.2f %7d %9d %9d %9d %7.2f %7.2f %7d' % ('$r', '$mode', '-', '-', $alone, $mirrored, $mirrored/$slower, $loaded, $h_iops, $h_p999, $split_p999, $h_p999/$split_p999, $h_p999/$pair_p999, $copied))")
    echo "$line"; results+=("$(echo "$line" | tr -s ' ' ',')")
    # The host during a backup of a mirrored split: the backup's own cost, no copy before write.
    wait_pair; rpc pair_split '{"name": "pr"}' >/dev/null; id=$(backup $mode)
    set -- $(host 4 "$mode-m.$r"); h_iops=$1; h_p999=$2
    set -- $(wait_backup "$id"); loaded=$1; copied=$2; resync
    line=$($py -c "print('%-5s %-8s %7s %7s %7s %7s %7s %7d %9d %9d %9d %7.2f %7.2f %7d' % ('$r', '$mode-m', '-', '-', '-', '-', '-', $loaded, $h_iops, $h_p999, $psus_p999, $h_p999/$psus_p999, $h_p999/$pair_p999, $copied))")
    echo "$line"; results+=("$(echo "$line" | tr -s ' ' ',')")
  done
done
# merge once more without yielding to the host (host_rate 0): what the yield buys.
dirty_split; id=$(backup merge 0)
set -- $(host 4); h_iops=$1; h_p999=$2
set -- $(wait_backup "$id"); loaded=$1; resync
printf '%-5s %-8s %7s %7s %7s %7s %7s %7d %9d %9d %9d %7.2f %7.2f %7s\n' - merge/0 - - - - - \
  "$loaded" "$h_iops" "$h_p999" "$split_p999" \
  "$($py -c "print($h_p999/$split_p999)")" "$($py -c "print($h_p999/$pair_p999)")" -
$py - "$work/lat" "${results[@]}" <<'PY'
import collections, os, statistics, sys
# Every host write of every round, pooled per condition: one round's p99.9 is set by a few
# stalls of the virtual disk, and the no-backup reference swings as much as the rest.
lat = collections.defaultdict(list)
for name in os.listdir(sys.argv[1]):
    if '_clat.' not in name:
        continue
    kind = name.split('.')[0]
    with open(os.path.join(sys.argv[1], name)) as f:
        lat[kind].extend(int(line.split(',')[1]) for line in f)
def p999(kind):
    v = sorted(lat[kind])
    return v[min(len(v) - 1, int(len(v) * 0.999))] / 1000 if v else float('nan')
print('host p99.9 over every write of every round (us): PAIR %d, right after a split %d, after a mirrored split %d'
      % (p999('PAIR'), p999('split'), p999('psus')))
for mode in ('merge', 'reflect', 'wait'):
    for kind, ref, what in ((mode, 'split', 'right after a split'), (mode + '-m', 'psus', 'after a mirrored split')):
        if lat[kind]:
            print('  during %-10s %7d us: %.2f x %s, %.2f x PAIR (writes: %d)'
                  % (kind, p999(kind), p999(kind) / p999(ref), what, p999(kind) / p999('PAIR'), len(lat[kind])))
rows = {}
for line in sys.argv[2:]:
    f = line.split(',')
    rows.setdefault(f[1], []).append(f)
print('medians over the rounds:')
for mode, rs in rows.items():
    med = lambda i: statistics.median(float(f[i]) for f in rs)
    if mode.endswith('-m'):
        print('  %-8s host p99.9 vs after a mirrored split %.2f, vs PAIR %.2f, CPU-copied bytes %d'
              % (mode, med(11), med(12), max(int(f[13]) for f in rs)))
    else:
        print('  %-8s mirr. vs fio %.2f, alone %d MiB/s, host p99.9 vs right after a split %.2f, vs PAIR %.2f, CPU-copied bytes %d'
              % (mode, med(6), med(4), med(11), med(12), max(int(f[13]) for f in rs)))
PY
cat <<'TXT'
rd/wr MiB: fio sequential 1 MiB QD8 read of the source and write of the target, this round.
alone: MiB/s right after a split with nearly every track pending, no host; mirr.: right after a
split of a mirrored pair (nothing pending); vs fio: mirr. / the slower of rd and wr; w/host: MiB/s
while the host writes. p99.9 us: the host's during that backup; ref us: the host's right after a
split made the same way, with no backup ("(split)" row); vs ref and vs PAIR: p99.9 / that
reference and / the host's in PAIR ("(PAIR)" row). MODE-m rows: the host during a backup of a
mirrored split (nothing pending, so no copy before write), against the host right after such a
split with no backup ("(psus)" row). copied: payload bytes the CPU copied.
TXT
