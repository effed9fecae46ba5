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
# Waits for backup $2 of the quicksplit answering on RPC socket $1 to end; prints
# "STATE MiB/s CPU_COPIED_BYTES" (the rate from the engine's own elapsed time).
backup_result() {
  local out
  while :; do
    out=$($qs rpc --socket "$1" backup_get "{\"id\": $2}" | $py -c \
      "import json,sys; b=json.load(sys.stdin)[0]; print(b['state'], round(b['bytes_total']/1048576/max(b['elapsed_ns'],1)*1e9), b['cpu_copied_bytes'])")
    case $out in
      running*) sleep 0.5 ;;
      *) echo "$out"; return ;;
    esac
  done
}
