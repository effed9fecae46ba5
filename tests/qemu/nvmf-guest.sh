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
#  4. DH-HMAC-CHAP (the guest's 6.12 kernel has it in nvme and nvmet): the kernel host connects
#     to quicksplit's exports with dhchap_secret= (and dhchap_ctrl_secret= for the
#     bidirectional case) and reads and writes with dd; a wrong secret and a wrong controller
#     secret are refused; our initiator authenticates to nvmet with host keys set in configfs
#     (ffdhe2048, one way and both ways), backs up to it, and is refused with a wrong key.
# Prints "ok"/"not ok" lines; exits non-zero on any failure.
set -u
fail=0
ok() { echo "ok - $*"; }
bad() { echo "not ok - $*"; fail=1; }
qs() { /bin/quicksplit rpc --socket /tmp/qs.sock "$@"; }
# An nvmet subsystem $1 with namespace 1 on /tmp/nvmet.img, open only to the hosts linked to it.
nvmet_subsystem() {
  mkdir $n/subsystems/$1 &&
    echo 0 >$n/subsystems/$1/attr_allow_any_host &&
    mkdir $n/subsystems/$1/namespaces/1 &&
    echo /tmp/nvmet.img >$n/subsystems/$1/namespaces/1/device_path &&
    echo 1 >$n/subsystems/$1/namespaces/1/buffered_io &&
    echo 1 >$n/subsystems/$1/namespaces/1/enable
}
# Starts a backup with backup_start's parameters $1 and waits for it to end: its state in
# $state, its last backup_get in $info, backup_start's reply in $out.
backup_wait() {
  out=$(qs backup_start "$1")
  id=$(echo "$out" | sed -n 's/.*"id": *\([0-9]*\).*/\1/p')
  state=none
  info=""
  [ -n "$id" ] || return 0
  state=running
  i=0
  while [ "$state" = running ] && [ $i -lt 600 ]; do
    sleep 0.2
    info=$(qs backup_get "{\"id\":$id}" | tr -d ' \n')
    state=$(echo "$info" | sed -n 's/.*"state":"\([a-z]*\)".*/\1/p')
    i=$((i + 1))
  done
}
MIB=1048576
SIZE=$((8 * MIB))
QNQN=nqn.2026-11.io.quicksplit:guest-p
LNQN=nqn.2026-11.io.linux:backup
HNQN=nqn.2026-12.io.quicksplit:guest-hosts
ALLOWED=nqn.2014-08.org.nvmexpress:uuid:aaaaaaaa-0000-0000-0000-00000000000a
OTHER=nqn.2014-08.org.nvmexpress:uuid:bbbbbbbb-0000-0000-0000-00000000000b

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
if echo "transport=tcp,traddr=127.0.0.1,trsvcid=4421,nqn=$HNQN,hostnqn=$OTHER,hostid=${OTHER##*uuid:}" >/dev/nvme-fabrics 2>/dev/null; then
  bad "nvme-tcp connected with a host NQN not allowed"
else
  ok "nvme-tcp refused with a host NQN not allowed"
fi
grep -q "not allowed.*$OTHER\|$OTHER.*not allowed" /tmp/qs.log && ok "the refusal is logged with the host NQN" ||
  bad "no log line for the refused host"
echo "transport=tcp,traddr=127.0.0.1,trsvcid=4421,nqn=$HNQN,hostnqn=$ALLOWED,hostid=${ALLOWED##*uuid:}" >/dev/nvme-fabrics &&
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
nvmet_subsystem $LNQN &&
  echo 1 >$n/subsystems/$LNQN/attr_allow_any_host &&
  mkdir $n/ports/1 &&
  echo 127.0.0.1 >$n/ports/1/addr_traddr && echo tcp >$n/ports/1/addr_trtype &&
  echo 4420 >$n/ports/1/addr_trsvcid && echo ipv4 >$n/ports/1/addr_adrfam &&
  ln -s $n/subsystems/$LNQN $n/ports/1/subsystems/$LNQN &&
  ok "nvmet target on 127.0.0.1:4420" || bad "nvmet configfs setup"
for mode in merge reflect wait; do
  dd if=/dev/zero of=/tmp/nvmet.img bs=$MIB count=8 conv=notrunc 2>/dev/null
  backup_wait "{\"pair\":\"pr\",\"mode\":\"$mode\",\"flat_sha256\":true,\"target\":{\"type\":\"nvmf\",\"traddr\":\"127.0.0.1\",\"subnqn\":\"$LNQN\"}}"
  if [ "$state" = none ]; then bad "$mode: backup_start: $out"; continue; fi
  sha=$(echo "$info" | sed -n 's/.*"sha256":"\([0-9a-f]*\)".*/\1/p')
  [ "$state" = done ] && ok "$mode: backup to nvmet done" || bad "$mode: backup ended $state: $info"
  [ "$sha" = "$want" ] && ok "$mode: manifest SHA-256 is the image's" || bad "$mode: sha256 $sha, image $want"
  sync
  cmp /tmp/model.img /tmp/nvmet.img && ok "$mode: nvmet's namespace equals the image" ||
    bad "$mode: nvmet's namespace differs from the image"
done
# Our initiator's host NQN against nvmet: a subsystem that allows one host.
RNQN=nqn.2026-12.io.linux:restricted
nvmet_subsystem $RNQN &&
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

# 4. DH-HMAC-CHAP. Fixed secrets (as `nvme gen-dhchap-key` prints them): the host's (SHA-256
# transformed), the controller's, and one nobody was given.
AHOST=nqn.2014-08.org.nvmexpress:uuid:dddddddd-0000-0000-0000-00000000000d
HKEY='DHHC-1:01:AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyAl7OaH:'
CKEY='DHHC-1:00:ZWZnaGlqa2xtbm9wcXJzdHV2d3h5ent8fX5/gIGCg4QqhWEu:'
WKEY='DHHC-1:01:ycrLzM3Oz9DR0tPU1dbX2Nna29zd3t/g4eLj5OXm5+gJTFLW:'
ANQN=nqn.2026-12.io.quicksplit:guest-auth
BNQN=nqn.2026-12.io.quicksplit:guest-auth2
for k in h:$HKEY c:$CKEY w:$WKEY; do
  printf '%s\n' "${k#*:}" >/tmp/${k%%:*}.key
  chmod 600 /tmp/${k%%:*}.key
  qs keyring_file_add_key "{\"name\":\"${k%%:*}k\",\"path\":\"/tmp/${k%%:*}.key\"}" >/dev/null ||
    bad "keyring_file_add_key ${k%%:*}k"
done
qs bdev_malloc_create "{\"name\":\"a\",\"size\":$SIZE}" >/dev/null &&
  qs nvmf_export_start "{\"nqn\":\"$ANQN\",\"bdev\":\"a\",\"listen\":\"127.0.0.1:4421\",\"hosts\":[{\"nqn\":\"$AHOST\",\"dhchap_key\":\"hk\"}]}" >/dev/null &&
  qs nvmf_export_start "{\"nqn\":\"$BNQN\",\"bdev\":\"a\",\"listen\":\"127.0.0.1:4421\",\"hosts\":[{\"nqn\":\"$AHOST\",\"dhchap_key\":\"hk\",\"dhchap_ctrlr_key\":\"ck\"}]}" >/dev/null &&
  ok "quicksplit exports with DH-HMAC-CHAP keys" || bad "exports with keys"
# Connects the kernel host with "$1" (options after nqn=); the new block device in $newdev.
kconnect() {
  old=" $(echo /dev/nvme*n1) "
  newdev=""
  # The host id must be the host NQN's UUID (the kernel refuses one host id with two NQNs);
  # duplicate_connect, or a second connection of a host to a subsystem is refused before
  # anything reaches the target.
  h=${1#*hostnqn=}; h=${h%%,*}
  echo "transport=tcp,traddr=127.0.0.1,trsvcid=4421,$1,hostid=${h##*uuid:},duplicate_connect" \
    >/dev/nvme-fabrics \
    2>/tmp/kconnect.err || return 1
  i=0
  while [ -z "$newdev" ] && [ $i -lt 100 ]; do
    for d in /dev/nvme*n1; do
      case "$old" in *" $d "*) ;; *) [ -b "$d" ] && newdev=$d ;; esac
    done
    [ -z "$newdev" ] && sleep 0.1
    i=$((i + 1))
  done
  [ -n "$newdev" ]
}
# dd a MiB of random data to $1 at MiB $2 and back; equal or not.
kdd() {
  dd if=/dev/urandom of=/tmp/auth.in bs=$MIB count=1 2>/dev/null
  dd if=/tmp/auth.in of="$1" bs=65536 seek=$(($2 * 16)) oflag=direct 2>/dev/null &&
    dd if="$1" of=/tmp/auth.out bs=65536 skip=$(($2 * 16)) count=16 iflag=direct 2>/dev/null &&
    cmp -s /tmp/auth.in /tmp/auth.out
}
if kconnect "nqn=$ANQN,hostnqn=$AHOST,dhchap_secret=$HKEY"; then
  ok "nvme-tcp authenticated to quicksplit with dhchap_secret ($newdev)"
  kdd "$newdev" 1 && ok "dd through the authenticated connection reads back what it wrote" ||
    bad "dd through the authenticated connection"
else
  bad "nvme-tcp with dhchap_secret: $(cat /tmp/kconnect.err)"
fi
grep -q "NVMe/TCP host authenticated.*$AHOST\|$AHOST.*NVMe/TCP host authenticated" /tmp/qs.log &&
  ok "quicksplit logs the host authenticated" || bad "no log line for the authenticated host"
kconnect "nqn=$ANQN,hostnqn=$AHOST,dhchap_secret=$WKEY" &&
  bad "nvme-tcp connected with a wrong secret" || ok "nvme-tcp refused with a wrong secret"
grep -q "DH-HMAC-CHAP authentication failed" /tmp/qs.log &&
  ok "quicksplit logs the failed authentication" || bad "no log line for the wrong secret"
kconnect "nqn=$ANQN,hostnqn=$OTHER,dhchap_secret=$HKEY" &&
  bad "nvme-tcp connected with a host NQN not in hosts" || ok "a host NQN not in hosts is refused"
if kconnect "nqn=$BNQN,hostnqn=$AHOST,dhchap_secret=$HKEY,dhchap_ctrl_secret=$CKEY"; then
  ok "bidirectional: nvme-tcp and quicksplit authenticated each other ($newdev)"
  kdd "$newdev" 2 && ok "bidirectional: dd reads back what it wrote" || bad "bidirectional: dd"
else
  bad "bidirectional connect: $(cat /tmp/kconnect.err)"
fi
before=$(dmesg | grep -c "controller authentication failed")
kconnect "nqn=$BNQN,hostnqn=$AHOST,dhchap_secret=$HKEY,dhchap_ctrl_secret=$WKEY" &&
  bad "the kernel host accepted a controller that does not hold its key" ||
  ok "the kernel host refuses a controller that does not hold its key"
[ "$(dmesg | grep -c "controller authentication failed")" -gt "$before" ] &&
  ok "the kernel says the controller failed to authenticate" ||
  bad "no kernel message for the controller's failed authentication: $(dmesg | tail -5)"

# Our initiator against nvmet with host keys in configfs (ffdhe2048).
KNQN=nqn.2026-12.io.linux:auth
nvmet_subsystem $KNQN &&
  mkdir $n/hosts/$AHOST &&
  echo "$HKEY" >$n/hosts/$AHOST/dhchap_key &&
  echo "hmac(sha256)" >$n/hosts/$AHOST/dhchap_hash &&
  echo ffdhe2048 >$n/hosts/$AHOST/dhchap_dhgroup &&
  ln -s $n/hosts/$AHOST $n/subsystems/$KNQN/allowed_hosts/$AHOST &&
  ln -s $n/subsystems/$KNQN $n/ports/1/subsystems/$KNQN &&
  ok "nvmet subsystem with a DH-HMAC-CHAP host key" || bad "nvmet auth subsystem setup"
dd if=/dev/zero of=/tmp/nvmet.img bs=$MIB count=8 conv=notrunc 2>/dev/null
backup_wait "{\"pair\":\"pr\",\"mode\":\"merge\",\"flat_sha256\":true,\"target\":{\"type\":\"nvmf\",\"traddr\":\"127.0.0.1\",\"subnqn\":\"$KNQN\",\"hostnqn\":\"$AHOST\",\"dhchap_key\":\"hk\"}}"
[ "$state" = done ] && ok "backup to nvmet as an authenticated host done" || bad "authenticated backup: $out ${info:-}"
sync
cmp -s /tmp/model.img /tmp/nvmet.img && ok "nvmet's namespace equals the image (authenticated backup)" ||
  bad "nvmet's namespace differs after the authenticated backup"
out=$(qs bdev_nvme_attach_controller "{\"name\":\"kw\",\"trtype\":\"tcp\",\"traddr\":\"127.0.0.1\",\"subnqn\":\"$KNQN\",\"hostnqn\":\"$AHOST\",\"dhchap_key\":\"wk\"}" 2>&1)
case "$out" in
  *"DH-HMAC-CHAP authentication"*) ok "our initiator with a wrong key is refused by nvmet" ;;
  *) bad "attach to nvmet with a wrong key: $out" ;;
esac
echo "$CKEY" >$n/hosts/$AHOST/dhchap_ctrl_key &&
  qs bdev_nvme_attach_controller "{\"name\":\"kb\",\"trtype\":\"tcp\",\"traddr\":\"127.0.0.1\",\"subnqn\":\"$KNQN\",\"hostnqn\":\"$AHOST\",\"dhchap_key\":\"hk\",\"dhchap_ctrlr_key\":\"ck\"}" >/dev/null &&
  ok "bidirectional: our initiator and nvmet authenticated each other" || bad "bidirectional attach to nvmet"
out=$(qs bdev_nvme_attach_controller "{\"name\":\"kc\",\"trtype\":\"tcp\",\"traddr\":\"127.0.0.1\",\"subnqn\":\"$KNQN\",\"hostnqn\":\"$AHOST\",\"dhchap_key\":\"hk\",\"dhchap_ctrlr_key\":\"wk\"}" 2>&1)
case "$out" in
  *"failed to authenticate itself"*) ok "our initiator refuses nvmet when it does not hold the controller key" ;;
  *) bad "attach expecting another controller key: $out" ;;
esac
grep -q "DHHC-1" /tmp/qs.log && bad "a secret in quicksplit's log" || ok "no secret in quicksplit's log"

kill $qspid 2>/dev/null
[ $fail = 0 ] || tail -20 /tmp/qs.log
exit $fail
