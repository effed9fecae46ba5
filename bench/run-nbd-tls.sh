#!/usr/bin/env bash
# NBD over TLS against plain NBD, in one run, each on TCP 127.0.0.1, through quicksplit exports
# of one 1 GiB malloc bdev (plain, x509, PSK) and to nbdkit:
# - fio 4 KiB randread and randwrite QD32, numjobs 1 and 2, plain against x509. fio's nbd
#   engine connects with libnbd's nbd_connect_uri but does not allow URIs that name local files
#   (tls-certificates=, tls-psk-file=), so its TLS export takes no client certificates and fio
#   does not verify the server (tls-verify-peer=false): the record encryption is the same, the
#   certificate checks are per connection only. PSK cannot be given to fio at all.
# - nbdcopy reading the whole export (1 MiB requests, its defaults) to null:, plain, x509 and PSK.
# - full backups of a pair of uring files to nbdkit's memory plugin without TLS, with x509
#   (client certificate verified) and with PSK, ROUNDS times each, interleaved.
# Certificates and the PSK are made for the run with openssl. quicksplit's reactors on cores
# 0-1 (REACTOR_CORES), fio, nbdcopy and nbdkit anywhere.
# QS_BEFORE=BINARY: also a build without TLS (or any other), run beside this one (both engines
# on the same cores, only one measured at a time) with the same plain export and pair, its
# plain rows interleaved with this build's: whether plain connections kept their speed.
# Usage: [FIO_ROUNDS=3] bench/run-nbd-tls.sh [DIR (default /var/tmp/qs-bench)] [SECONDS (default 6)]
#        [SIZE_GIB of the backup (default 1)] [ROUNDS of backups (default 3)]
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/common.sh
dir=${1:-/var/tmp/qs-bench}
secs=${2:-6}
gib=${3:-1}
rounds=${4:-3}
cores=${REACTOR_CORES:-0-1}
mkdir -p "$dir"
[ -n "${QS:-}" ] || cargo build --release --locked --bin quicksplit >/dev/null 2>&1
qs=${QS:-${CARGO_TARGET_DIR:-$PWD/target}/release/quicksplit}
work=$(mktemp -d /tmp/qs-nbd-tls-bench.XXXXXX)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

# Certificates: a CA, a server certificate for 127.0.0.1, a client certificate; in libnbd's
# layout ($work/client) and nbdkit's ($work/server). A PSK file for user "bench".
pki=$work/pki
mkdir -p "$pki" "$work/client" "$work/server"
ossl() { (cd "$pki" && openssl "$@" 2>/dev/null); }
ossl req -x509 -newkey rsa:2048 -nodes -days 2 -keyout ca-key.pem -out ca-cert.pem -subj /CN=bench-ca
for who in server client; do
  ossl req -newkey rsa:2048 -nodes -keyout $who-key.pem -out $who.csr -subj /CN=$who
  if [ $who = server ]; then
    printf 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' > "$pki/$who.ext"
  else
    printf 'extendedKeyUsage=clientAuth\n' > "$pki/$who.ext"
  fi
  ossl x509 -req -in $who.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial -days 2 \
    -out $who-cert.pem -extfile $who.ext
  cp "$pki/ca-cert.pem" "$pki/$who-cert.pem" "$pki/$who-key.pem" "$work/$who/"
done
psk=$work/psk.keys
printf 'bench:%s\n' "$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')" > "$psk"
chmod 600 "$psk"

free_port() { $py -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }
p_plain=$(free_port); p_x509=$(free_port); p_psk=$(free_port)
P=$dir/bk-p-${gib}g.img; S=$dir/bk-s-${gib}g.img
fill_files "$gib" "$P" "$S"
x509_tls="{\"cert_file\": \"$pki/server-cert.pem\", \"key_file\": \"$pki/server-key.pem\"}"
cat > "$work/c.json" <<JSON
{"config": [
 {"method": "keyring_file_add_key", "params": {"name": "psk", "path": "$psk"}},
 {"method": "bdev_malloc_create", "params": {"name": "ram", "size": 1073741824}},
 {"method": "nbd_export_start", "params": {"name": "ram", "bdev": "ram", "listen": "127.0.0.1:$p_plain"}},
 {"method": "nbd_export_start", "params": {"name": "ram-x509", "bdev": "ram", "listen": "127.0.0.1:$p_x509", "tls": $x509_tls}},
 {"method": "nbd_export_start", "params": {"name": "ram-psk", "bdev": "ram", "listen": "127.0.0.1:$p_psk", "tls": {"psk_key": "psk"}}},
 {"method": "bdev_uring_create", "params": {"name": "p", "filename": "$P"}},
 {"method": "bdev_uring_create", "params": {"name": "s", "filename": "$S"}},
 {"method": "pair_create", "params": {"name": "pr", "primary": "p", "secondary": "s"}}
]}
JSON
QUICKSPLIT_LOG=warn $qs serve --config "$work/c.json" --rpc-socket "$work/rpc.sock" \
  --state-dir "$work/state" --cores "$cores" --idle adaptive >/dev/null 2>&1 &
pids+=($!)
for _ in $(seq 100); do [ -S "$work/rpc.sock" ] && break; sleep 0.1; done
plain=(plain)
if [ -n "${QS_BEFORE:-}" ]; then
  plain+=(before)
  p_before=$(free_port)
  fill_files "$gib" "$P.before" "$S.before"
  cat > "$work/before.json" <<JSON
{"config": [
 {"method": "bdev_malloc_create", "params": {"name": "ram", "size": 1073741824}},
 {"method": "nbd_export_start", "params": {"name": "ram", "bdev": "ram", "listen": "127.0.0.1:$p_before"}},
 {"method": "bdev_uring_create", "params": {"name": "p", "filename": "$P.before"}},
 {"method": "bdev_uring_create", "params": {"name": "s", "filename": "$S.before"}},
 {"method": "pair_create", "params": {"name": "pr", "primary": "p", "secondary": "s"}}
]}
JSON
  QUICKSPLIT_LOG=warn $QS_BEFORE serve --config "$work/before.json" \
    --rpc-socket "$work/before.sock" --state-dir "$work/state-before" --cores "$cores" \
    --idle adaptive >/dev/null 2>&1 &
  pids+=($!)
  for _ in $(seq 100); do [ -S "$work/before.sock" ] && break; sleep 0.1; done
fi

declare -A U R C
U[plain]="nbd://127.0.0.1:$p_plain/ram"
U[before]="nbd://127.0.0.1:${p_before:-0}/ram"
U[x509]="nbds://127.0.0.1:$p_x509/ram-x509?tls-verify-peer=false"
measure() { # fio job file -> "IOPS CPU%"; URI, NUMJOBS from the environment
  URI=$URI RUNTIME=$secs NUMJOBS=$NUMJOBS fio --output-format=json "$1" 2>/dev/null \
    | grep -v '^fio:' | $py -c \
    "import json,sys; j=json.load(sys.stdin)['jobs'][0]; print(round(j['read']['iops']+j['write']['iops']), round(j['usr_cpu']+j['sys_cpu']))"
}
# Each fio cell FIO_ROUNDS times (default 3), the rounds interleaved; the medians reported.
med() { $py -c "import statistics,sys; print(round(statistics.median(map(int, sys.argv[1:]))))" "$@"; }
for _ in $(seq "${FIO_ROUNDS:-3}"); do
for nj in 1 2; do for w in randread randwrite; do for t in "${plain[@]}" x509; do
  set -- $(URI=${U[$t]} NUMJOBS=$nj measure bench/fio/nbd-$w.fio)
  [ "$1" -gt 0 ] || { echo "fio through $t did nothing" >&2; exit 1; }
  R[$t,$nj,$w]="${R[$t,$nj,$w]:-} $1"; R[cpu,$t,$nj,$w]="${R[cpu,$t,$nj,$w]:-} $2"
done; done; done
done
for k in "${!R[@]}"; do R[$k]=$(med ${R[$k]}); done
U[x509]="nbds://127.0.0.1:$p_x509/ram-x509?tls-certificates=$work/client"
U[psk]="nbds://bench@127.0.0.1:$p_psk/ram-psk?tls-psk-file=$psk"
for t in "${plain[@]}" x509 psk; do
  t0=$(date +%s.%N); nbdcopy "${U[$t]}" null:; t1=$(date +%s.%N)
  C[$t]=$($py -c "print(round(1024/($t1-$t0)))")
done

# Backups: nbdkit's memory plugin, one per kind, the same pair split once.
nk() { # port args...
  local port=$1; shift
  nbdkit -f --exit-with-parent -i 127.0.0.1 -p "$port" "$@" memory "$((gib << 30))" &
  pids+=($!)
  for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/"$port") 2>/dev/null && break; sleep 0.1; done
}
k_plain=$(free_port); k_x509=$(free_port); k_psk=$(free_port)
nk "$k_plain"
nk "$k_x509" --tls=require --tls-certificates="$work/server" --tls-verify-peer
nk "$k_psk" --tls=require --tls-psk="$psk"
declare -A T
T[plain]="{\"type\": \"nbd\", \"uri\": \"nbd://127.0.0.1:$k_plain/\"}"
T[x509]="{\"type\": \"nbd\", \"uri\": \"nbds://127.0.0.1:$k_x509/\", \"tls\": {\"ca_file\": \"$pki/ca-cert.pem\", \"cert_file\": \"$pki/client-cert.pem\", \"key_file\": \"$pki/client-key.pem\"}}"
T[psk]="{\"type\": \"nbd\", \"uri\": \"nbds://127.0.0.1:$k_psk/\", \"tls\": {\"psk_key\": \"psk\", \"username\": \"bench\"}}"
T[before]=${T[plain]}
declare -A SOCK=([plain]=$work/rpc.sock [x509]=$work/rpc.sock [psk]=$work/rpc.sock [before]=$work/before.sock)
for t in "${plain[@]}"; do
  while [ "$($qs rpc --socket "${SOCK[$t]}" pair_get '{"name":"pr"}' | $py -c "import json,sys; p=json.load(sys.stdin)[0]; print(p['state'], p['pending_tracks'])")" != "PAIR 0" ]; do
    sleep 0.2
  done
  $qs rpc --socket "${SOCK[$t]}" pair_split '{"name": "pr"}' >/dev/null
done
declare -A B
for r in $(seq "$rounds"); do for t in "${plain[@]}" x509 psk; do
  id=$($qs rpc --socket "${SOCK[$t]}" backup_start "{\"pair\": \"pr\", \"mode\": \"merge\", \"target\": ${T[$t]}}" | $py -c "import json,sys; print(json.load(sys.stdin)['id'])")
  set -- $(backup_result "${SOCK[$t]}" "$id" 0.2)
  [ "$1" = done ] || { echo "backup $id to $t ended $1" >&2; exit 1; }
  B[$t]="${B[$t]:-}$2 "
done; done

printf '%-9s %-7s %9s %9s %7s %14s\n' workload numjobs plain x509 x509/pl "fio cpu% p/x"
for nj in 1 2; do for w in randread randwrite; do
  $py -c "p,x=${R[plain,$nj,$w]},${R[x509,$nj,$w]}; print('%-9s %-7d %9d %9d %7.2f %14s' % ('$w',$nj,p,x,x/p,'${R[cpu,plain,$nj,$w]}/${R[cpu,x509,$nj,$w]}'))"
done; done
if [ -n "${QS_BEFORE:-}" ]; then
  echo "plain, this build against QS_BEFORE (IOPS):"
  for nj in 1 2; do for w in randread randwrite; do
    $py -c "p,b=${R[plain,$nj,$w]},${R[before,$nj,$w]}; print('%-9s %-7d %9d %9d %7.2f' % ('$w',$nj,p,b,p/b))"
  done; done
  echo "nbdcopy plain before: ${C[before]} MiB/s"
fi
echo "nbdcopy of the 1 GiB export to null:, MiB/s: plain ${C[plain]}, x509 ${C[x509]}, psk ${C[psk]}"
echo "backup of ${gib} GiB to nbdkit memory, MiB/s per round:"
for t in "${plain[@]}" x509 psk; do echo "  $t: ${B[$t]:-}"; done
$py -c "
import statistics as s
b={k: [int(x) for x in v.split()] for k, v in (('plain','${B[plain]}'),('x509','${B[x509]}'),('psk','${B[psk]}'))}
m={k: s.median(v) for k, v in b.items()}
print('  medians: plain %d, x509 %d (%.2f), psk %d (%.2f)' % (m['plain'], m['x509'], m['x509']/m['plain'], m['psk'], m['psk']/m['plain']))
if '${B[before]:-}':
    before = s.median(int(x) for x in '${B[before]:-}'.split())
    print('  plain before: %d (this build %.2f of it)' % (before, m['plain']/before))"
