#!/bin/sh
# NVMe/TCP in the guest, against the Linux kernel's own NVMe/TCP host and target:
#  1. the kernel host (nvme-tcp) connects to quicksplit's nvmf export of a pair's P through
#     /dev/nvme-fabrics and writes and reads the block device with dd, compared with a model;
#  2. an export with `hosts`: the kernel host connects with an allowed --hostnqn and is refused
#     with another one;
#  3. the kernel target (nvmet, set up through configfs on loopback) receives a backup of the
#     pair's image in every mode; its backing file must equal the image, and the backup's
#     SHA-256 the image's; a subsystem allowing one host takes our initiator with that host
#     NQN and refuses it with another.
# Prints "ok"/"not ok" lines; exits non-zero on any failure.
set -u
fail=0
ok() { echo "ok - $*"; }
bad() { echo "not ok - $*"; fail=1; }
qs() { /bin/quicksplit rpc --socket /tmp/qs.sock "$@"; }
MIB=1048576
SIZE=$((8 * MIB))
QNQN=nqn.2026-11.io.quicksplit:guest-p
LNQN=nqn.2026-11.io.linux:backup
HNQN=nqn.2026-12.io.quicksplit:guest-hosts
ALLOWED=nqn.2014-08.org.nvmexpress:uuid:aaaaaaaa-0000-0000-0000-00000000000a
OTHER=nqn.2014-08.org.nvmexpress:uuid:bbbbbbbb-0000-0000-0000-00000000000b

for m in crct10dif_common crct10dif_generic crc-t10dif crc64 crc64_rocksoft_generic \
  crc64-rocksoft t10-pi configfs crc32c_generic nvme-core nvme-fabrics nvme-tcp nvmet nvmet-tcp; do
  [ -f /lib/modules/$m.ko ] && { insmod /lib/modules/$m.ko 2>/dev/null || echo "# insmod $m: already there or failed"; }
done
mount -t configfs none /sys/kernel/config 2>/dev/null
ip link set lo up

echo '{"config": []}' > /tmp/empty.json
/bin/quicksplit serve --config /tmp/empty.json --rpc-socket /tmp/qs.sock --state-dir /tmp/qs \
  --cores 0-1 --idle adaptive >/tmp/qs.log 2>&1 &
qspid=$!
i=0
while [ ! -S /tmp/qs.sock ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
qs bdev_malloc_create "{\"name\":\"p\",\"size\":$SIZE}" >/dev/null &&
  qs bdev_malloc_create "{\"name\":\"s\",\"size\":$SIZE}" >/dev/null &&
  qs pair_create '{"name":"pr","primary":"p","secondary":"s","copy_rate":1}' >/dev/null &&
  qs nvmf_export_start "{\"nqn\":\"$QNQN\",\"bdev\":\"p\",\"listen\":\"127.0.0.1:4421\"}" >/dev/null &&
  ok "quicksplit exports P over NVMe/TCP" || bad "quicksplit setup"

# 1. The kernel's host on quicksplit's target.
echo "transport=tcp,traddr=127.0.0.1,trsvcid=4421,nqn=$QNQN" >/dev/nvme-fabrics &&
  ok "nvme-tcp connected to quicksplit" || bad "nvme-tcp connect to quicksplit"
dev=""
i=0
while [ -z "$dev" ] && [ $i -lt 100 ]; do
  for d in /dev/nvme*n1; do [ -b "$d" ] && dev=$d; done
  [ -z "$dev" ] && sleep 0.1
  i=$((i + 1))
done
if [ -n "$dev" ]; then
  ok "block device $dev appeared ($(cat /sys/block/${dev#/dev/}/size) sectors)"
  dd if=/dev/urandom of=/tmp/model.img bs=$MIB count=8 2>/dev/null
  dd if=/tmp/model.img of="$dev" bs=65536 oflag=direct 2>/dev/null && ok "dd wrote 8 MiB" || bad "dd write"
  # Small writes at odd places, in the model too.
  for off in 3 77 1000 2047; do
    dd if=/dev/urandom of=/tmp/patch bs=4096 count=1 2>/dev/null
    dd if=/tmp/patch of=/tmp/model.img bs=4096 seek=$off conv=notrunc 2>/dev/null
    dd if=/tmp/patch of="$dev" bs=4096 seek=$off oflag=direct 2>/dev/null || bad "dd write at block $off"
  done
  dd if="$dev" of=/tmp/back.img bs=131072 iflag=direct 2>/dev/null
  cmp /tmp/model.img /tmp/back.img && ok "dd read back equals the model" || bad "read back differs from the model"
else
  bad "no NVMe/TCP block device appeared"
fi

# 2. Allowed hosts: the kernel host with an allowed host NQN, and with another one.
qs bdev_malloc_create "{\"name\":\"h\",\"size\":$SIZE}" >/dev/null &&
  qs nvmf_export_start "{\"nqn\":\"$HNQN\",\"bdev\":\"h\",\"listen\":\"127.0.0.1:4421\",\"hosts\":[\"$ALLOWED\"]}" >/dev/null &&
  ok "quicksplit exports h to one host" || bad "export with hosts"
before=$(ls /dev/nvme*n1 2>/dev/null | wc -l)
if echo "transport=tcp,traddr=127.0.0.1,trsvcid=4421,nqn=$HNQN,hostnqn=$OTHER" >/dev/nvme-fabrics 2>/dev/null; then
  bad "nvme-tcp connected with a host NQN not allowed"
else
  ok "nvme-tcp refused with a host NQN not allowed"
fi
grep -q "not allowed.*$OTHER\|$OTHER.*not allowed" /tmp/qs.log && ok "the refusal is logged with the host NQN" ||
  bad "no log line for the refused host"
echo "transport=tcp,traddr=127.0.0.1,trsvcid=4421,nqn=$HNQN,hostnqn=$ALLOWED" >/dev/nvme-fabrics &&
  ok "nvme-tcp connected with the allowed host NQN" || bad "nvme-tcp connect with the allowed host NQN"
i=0
while [ "$(ls /dev/nvme*n1 2>/dev/null | wc -l)" -le "$before" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
[ "$(ls /dev/nvme*n1 2>/dev/null | wc -l)" -gt "$before" ] && ok "the allowed host's block device appeared" ||
  bad "no block device for the allowed host"

# 3. The kernel's target receives backups of the image.
qs pair_split '{"name":"pr"}' >/dev/null && ok "pair split" || bad "pair split"
[ -n "$dev" ] && dd if=/dev/urandom of="$dev" bs=65536 count=4 oflag=direct 2>/dev/null # P moves on
want=$(sha256sum /tmp/model.img | cut -d' ' -f1)
n=/sys/kernel/config/nvmet
truncate -s $SIZE /tmp/nvmet.img
mkdir $n/subsystems/$LNQN &&
  echo 1 >$n/subsystems/$LNQN/attr_allow_any_host &&
  mkdir $n/subsystems/$LNQN/namespaces/1 &&
  echo /tmp/nvmet.img >$n/subsystems/$LNQN/namespaces/1/device_path &&
  echo 1 >$n/subsystems/$LNQN/namespaces/1/buffered_io &&
  echo 1 >$n/subsystems/$LNQN/namespaces/1/enable &&
  mkdir $n/ports/1 &&
  echo 127.0.0.1 >$n/ports/1/addr_traddr && echo tcp >$n/ports/1/addr_trtype &&
  echo 4420 >$n/ports/1/addr_trsvcid && echo ipv4 >$n/ports/1/addr_adrfam &&
  ln -s $n/subsystems/$LNQN $n/ports/1/subsystems/$LNQN &&
  ok "nvmet target on 127.0.0.1:4420" || bad "nvmet configfs setup"
for mode in merge reflect wait; do
  dd if=/dev/zero of=/tmp/nvmet.img bs=$MIB count=8 conv=notrunc 2>/dev/null
  out=$(qs backup_start "{\"pair\":\"pr\",\"mode\":\"$mode\",\"flat_sha256\":true,\"target\":{\"type\":\"nvmf\",\"traddr\":\"127.0.0.1\",\"subnqn\":\"$LNQN\"}}")
  id=$(echo "$out" | sed -n 's/.*"id": *\([0-9]*\).*/\1/p')
  if [ -z "$id" ]; then bad "$mode: backup_start: $out"; continue; fi
  state=running
  i=0
  while [ "$state" = running ] && [ $i -lt 600 ]; do
    sleep 0.2
    info=$(qs backup_get "{\"id\":$id}" | tr -d ' \n')
    state=$(echo "$info" | sed -n 's/.*"state":"\([a-z]*\)".*/\1/p')
    i=$((i + 1))
  done
  sha=$(echo "$info" | sed -n 's/.*"sha256":"\([0-9a-f]*\)".*/\1/p')
  [ "$state" = done ] && ok "$mode: backup to nvmet done" || bad "$mode: backup ended $state: $info"
  [ "$sha" = "$want" ] && ok "$mode: manifest SHA-256 is the image's" || bad "$mode: sha256 $sha, image $want"
  sync
  cmp /tmp/model.img /tmp/nvmet.img && ok "$mode: nvmet's namespace equals the image" ||
    bad "$mode: nvmet's namespace differs from the image"
done
# Our initiator's host NQN against nvmet: a subsystem that allows one host.
RNQN=nqn.2026-12.io.linux:restricted
mkdir $n/subsystems/$RNQN &&
  echo 0 >$n/subsystems/$RNQN/attr_allow_any_host &&
  mkdir $n/subsystems/$RNQN/namespaces/1 &&
  echo /tmp/nvmet.img >$n/subsystems/$RNQN/namespaces/1/device_path &&
  echo 1 >$n/subsystems/$RNQN/namespaces/1/buffered_io &&
  echo 1 >$n/subsystems/$RNQN/namespaces/1/enable &&
  mkdir $n/hosts/$ALLOWED &&
  ln -s $n/hosts/$ALLOWED $n/subsystems/$RNQN/allowed_hosts/$ALLOWED &&
  ln -s $n/subsystems/$RNQN $n/ports/1/subsystems/$RNQN &&
  ok "nvmet subsystem allowing one host" || bad "nvmet restricted subsystem setup"
out=$(qs bdev_nvme_attach_controller "{\"name\":\"kr\",\"trtype\":\"tcp\",\"traddr\":\"127.0.0.1\",\"subnqn\":\"$RNQN\",\"hostnqn\":\"$OTHER\"}" 2>&1)
case "$out" in
  *"does not allow host NQN"*) ok "our initiator is told nvmet refuses its host NQN" ;;
  *) bad "attach with a host NQN nvmet does not allow: $out" ;;
esac
qs bdev_nvme_attach_controller "{\"name\":\"ka\",\"trtype\":\"tcp\",\"traddr\":\"127.0.0.1\",\"subnqn\":\"$RNQN\",\"hostnqn\":\"$ALLOWED\"}" >/dev/null &&
  ok "our initiator attaches to nvmet with the allowed host NQN" || bad "attach with the allowed host NQN"
kill $qspid 2>/dev/null
[ $fail = 0 ] || tail -20 /tmp/qs.log
exit $fail
