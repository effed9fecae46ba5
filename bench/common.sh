# Sourced by the bench scripts.
# A Python that starts fast for the scripts' JSON parsing: the system's. A pyenv shim first in
# PATH costs about 90 ms of CPU per call, and a loop polling backup_get every 100 ms with it took
# half a core from the engine it was measuring.
if [ -x /usr/bin/python3 ]; then py=/usr/bin/python3; else py=python3; fi

# Starts quicksplit ($qs) on cores 0-1 from the configuration file $1, with its RPC socket and
# state in $work, and waits for the socket; its pid joins $pids.
serve_two_cores() {
  QUICKSPLIT_LOG=warn $qs serve --config "$1" --rpc-socket "$work/rpc.sock" \
    --state-dir "$work/state" --cores 0-1 --idle adaptive >/dev/null 2>&1 &
  pids+=($!)
  for _ in $(seq 100); do [ -S "$work/rpc.sock" ] && break; sleep 0.1; done
}
rpc() { $qs rpc --socket "$work/rpc.sock" "$@"; }
# Waits until the pair "pr" is mirrored with nothing pending.
wait_pair() {
  while [ "$(rpc pair_get '{"name":"pr"}' | $py -c "import json,sys; p=json.load(sys.stdin)[0]; print(p['state'], p['pending_tracks'])")" != "PAIR 0" ]; do
    sleep 0.2
  done
}
# Waits for backup $2 of the quicksplit answering on RPC socket $1 to end, asking every $3
# seconds (default 0.5); prints "STATE MiB/s CPU_COPIED_BYTES" (the rate from the engine's own
# elapsed time).
backup_result() {
  local out
  while :; do
    out=$($qs rpc --socket "$1" backup_get "{\"id\": $2}" | $py -c \
      "import json,sys; b=json.load(sys.stdin)[0]; print(b['state'], round(b['bytes_total']/1048576/max(b['elapsed_ns'],1)*1e9), b['cpu_copied_bytes'])")
    case $out in
      running*) sleep "${3:-0.5}" ;;
      *) echo "$out"; return ;;
    esac
  done
}

# A RAM-backed block device to stand for a second device as a backup target: a loop device over
# a file in a tmpfs of its own, written once in full so its pages stay allocated. A backup to a
# new file on /dev/shm instead pays for fresh pages on every write: tmpfs allocates and zeroes
# them in io_uring's kernel workers, and a virtual machine that reports freed guest pages to its
# host (free page reporting) faults each one in again; that cost is the machine's, not the
# target's, and it made such runs swing by 4x. The loop device is overwritten in place, and fio
# writes it the same way the backup does. Sets ram_dev; ram_device_stop undoes it.
ram_device_start() { # size in GiB
  ram_mnt=$(mktemp -d /tmp/qs-ramdev.XXXXXX)
  mount -t tmpfs -o size=$(( $1 + 1 ))g,huge=always tmpfs "$ram_mnt"
  dd if=/dev/zero of="$ram_mnt/dev.img" bs=1M count=$(( $1 * 1024 )) status=none
  ram_dev=$(losetup --show -f "$ram_mnt/dev.img")
}
ram_device_stop() {
  if [ -n "${ram_dev:-}" ]; then losetup -d "$ram_dev" || true; fi
  if [ -n "${ram_mnt:-}" ]; then umount "$ram_mnt" || true; rmdir "$ram_mnt" || true; fi
  ram_dev=; ram_mnt=
}

# Fills each FILE to SIZE_GIB with fio (data, not holes) unless it is that large already.
fill_files() { # size_gib file...
  local gib=$1 f; shift
  for f in "$@"; do
    [ -f "$f" ] && [ "$(stat -c %s "$f")" -ge $((gib << 30)) ] && continue
    fio --name=fill --filename="$f" --size=${gib}g --rw=write --bs=1m --direct=1 \
        --ioengine=io_uring --iodepth=8 >/dev/null
  done
}

# Writes to $1 a configuration with the pair "pr" of the uring files $P and $S; with a second
# argument, P is exported over NBD on that Unix socket as "p".
pair_config() { # file [nbd_socket]
  local nbd=""
  [ -z "${2:-}" ] || nbd=",
 {\"method\": \"nbd_export_start\", \"params\": {\"name\": \"p\", \"bdev\": \"p\", \"socket\": \"$2\"}}"
  cat > "$1" <<JSON
{"config": [
 {"method": "bdev_uring_create", "params": {"name": "p", "filename": "$P"}},
 {"method": "bdev_uring_create", "params": {"name": "s", "filename": "$S"}},
 {"method": "pair_create", "params": {"name": "pr", "primary": "p", "secondary": "s"}}$nbd
]}
JSON
}

# O_DIRECT for fio on FILE: yes on block devices and disk files, no on tmpfs (which refuses it).
direct() { [ -b "$1" ] || [ "$(stat -f -c %T "$(dirname "$1")")" != tmpfs ] && echo 1 || echo 0; }

# fio's sequential rate on FILE in MiB/s, 1 MiB QD8 as a backup's pieces; a written regular file
# is removed after (a backup writes a new one).
seq_mibs() { # read|write file size_gib
  fio --name=s --filename="$2" --size="$3"g --rw="$1" --bs=1m --direct="$(direct "$2")" \
      --ioengine=io_uring --iodepth=8 --output-format=json 2>/dev/null | $py -c \
      "import json,sys; j=json.load(sys.stdin)['jobs'][0]; print(round((j['read']['bw']+j['write']['bw'])/1024))"
  [ -b "$2" ] || [ "$1" = read ] || rm -f "$2"
}

# Resyncs the pair "pr" and waits until it is mirrored again.
resync() { rpc pair_resync '{"name": "pr"}' >/dev/null; wait_pair; }

# A host writing the pair's P: fio 4 KiB randwrite QD32 through the NBD export on
# $work/nbd.sock over SIZE_GIB for SECONDS; with a name, every write's latency is logged to
# $work/lat/NAME_clat.*. Prints "IOPS p99.9_us".
host_randwrite() { # seconds size_gib [latency log name]
  local log=()
  [ -z "${3:-}" ] || log=(--write_lat_log="$work/lat/$3" --log_avg_msec=0)
  fio --name=h --ioengine=nbd --uri="nbd+unix:///p?socket=$work/nbd.sock" --rw=randwrite --bs=4k \
      --iodepth=32 --size="$2"g --time_based --runtime="$1" "${log[@]}" --output-format=json 2>/dev/null \
      | grep -v '^fio:' | $py -c \
      "import json,sys; w=json.load(sys.stdin)['jobs'][0]['write']; print(round(w['iops']), round(w['clat_ns']['percentile']['99.900000']/1000))"
}

# Starts a backup of the pair "pr" in mode $1 to the raw file or block device $2; $3 adds
# backup_start parameters (JSON members, such as `"rate": 1048576`). Prints the backup's id.
start_file_backup() { # mode target [params]
  rpc backup_start "{\"pair\": \"pr\", \"mode\": \"$1\"${3:+, $3}, \"target\": {\"type\": \"file\", \"path\": \"$2\"}}" \
    | $py -c "import json,sys; print(json.load(sys.stdin)['id'])"
}
