#!/bin/bash
# Guest script (lvm-vm): have the real kernel's dm-thin change a pool.
#
#   write-pool.sh [--fresh] [--pool-sectors N] BLOCK_SECTORS DEV_ID:SIZE_SECTORS... -- OP...
#
# /dev/vda = pool metadata, /dev/vdb = pool data (both --disk, read-write),
# /dev/vdc = optional payload disk for `write` ops with a source offset.
# --fresh: the metadata disk's first 4 KiB must be zero; the kernel then
# formats new metadata (this is "kernel-pool": a pool written only by dm-thin).
# Without --fresh the pool's existing devices are listed with
# `thin_dump --skip-mappings` before activation.
# --pool-sectors: table length (default: data disk size rounded down to a
# block). Longer than the metadata's nr_data_blocks grows the pool.
# DEV_ID:SIZE_SECTORS gives the thin table length for every device that gets
# activated (written, discarded, hashed); devices not listed are not hashed.
#
# OPs, one argument each (offsets and lengths in bytes, multiples of 512):
#   create:DEV                    create_thin DEV
#   snap:DEV:ORIGIN               create_snap DEV ORIGIN (origin suspended if active)
#   delete:DEV                    delete DEV (deactivated first if active)
#   write:DEV:OFF:LEN:SRC_OFF     copy LEN bytes from /dev/vdc at SRC_OFF to DEV at OFF
#   write:DEV:OFF:LEN             write LEN random bytes (their sha256 goes to stderr)
#   discard:DEV:OFF:LEN           blkdiscard (dm-thin unmaps whole blocks only)
#   reserve_metadata_snap | release_metadata_snap
#   set_transaction_id:OLD:NEW
#
# stdout: "DEV_ID SHA256" for every existing listed device at the end, then
# "pool-status <dmsetup status pool>"; stderr: log. Then all devices are
# removed, which makes dm-thin commit its metadata to /dev/vda.
set -euo pipefail
META=/dev/vda DATA=/dev/vdb PAYLOAD=/dev/vdc
log() { echo "write-pool: $*" >&2; }
fail() {
    log "FAILED: $*"
    dmesg | grep -iE 'device-mapper|thin|dm-' | tail -n 30 | sed 's/^/  dmesg: /' >&2
    exit 1
}
msg() {  # msg TEXT: a pool message
    log "message: $1"
    dmsetup message /dev/mapper/pool 0 "$1" || fail "pool message '$1'"
}

fresh=0 pool_sectors=
while (($#)); do
    case $1 in
        --fresh) fresh=1; shift ;;
        --pool-sectors) pool_sectors=$2; shift 2 ;;
        *) break ;;
    esac
done
(($# >= 1)) || fail "usage: write-pool.sh [--fresh] [--pool-sectors N] BLOCK_SECTORS DEV:SIZE... -- OP..."
bs=$1; shift
[[ $bs =~ ^[0-9]+$ ]] && ((bs > 0)) || fail "bad block size: $bs"
declare -A size=() exists=() active=()
order=()
while (($#)) && [[ $1 != -- ]]; do
    [[ $1 =~ ^([0-9]+):([0-9]+)$ ]] || fail "bad device spec: $1 (want DEV_ID:SIZE_SECTORS)"
    size[${BASH_REMATCH[1]}]=${BASH_REMATCH[2]}
    order+=("${BASH_REMATCH[1]}")
    shift
done
[[ ${1:-} == -- ]] && shift

data_sectors=$(blockdev --getsz $DATA)
[[ -n $pool_sectors ]] || pool_sectors=$((data_sectors / bs * bs))
((pool_sectors > 0 && pool_sectors % bs == 0)) || fail "bad pool length $pool_sectors (block $bs)"
((pool_sectors <= data_sectors)) || fail "pool length $pool_sectors > data disk $data_sectors sectors"

if ((fresh)); then
    cmp -s -n 4096 $META /dev/zero || fail "--fresh: the first 4 KiB of $META are not zero"
else
    # Existing devices, from the committed metadata (pool not active yet).
    if ids=$(thin_dump --skip-mappings $META 2>/tmp/thin_dump.err); then
        for id in $(sed -n 's/.*<device dev_id="\([0-9]*\)".*/\1/p' <<<"$ids"); do exists[$id]=1; done
        log "existing devices: ${!exists[*]}"
    else
        log "thin_dump failed ($(head -c 300 /tmp/thin_dump.err)); will probe listed devices"
        for id in "${order[@]}"; do exists[$id]=maybe; done
    fi
fi

table="0 $pool_sectors thin-pool $META $DATA $bs 0 0"
log "dmsetup create pool: $table"
dmsetup create pool --table "$table" || fail "pool activation"
log "pool status: $(dmsetup status pool)"

activate() {  # activate DEV: make /dev/mapper/thinDEV
    local dev=$1
    [[ -n ${active[$dev]:-} ]] && return 0
    [[ -n ${size[$dev]:-} ]] || fail "device $dev has no DEV:SIZE argument"
    dmsetup create "thin$dev" --table "0 ${size[$dev]} thin /dev/mapper/pool $dev" ||
        fail "activating thin device $dev"
    active[$dev]=1
}
deactivate() {
    local dev=$1
    [[ -z ${active[$dev]:-} ]] && return 0
    dmsetup remove "thin$dev" || fail "removing thin$dev"
    unset "active[$dev]"
}
copy() {  # copy SRC SRC_OFF DST DST_OFF LEN (bytes; with the largest block size that fits)
    local src=$1 soff=$2 dst=$3 doff=$4 len=$5 b=1048576
    while ((b > 512 && (soff % b || doff % b || len % b))); do b=$((b / 2)); done
    ((soff % b == 0 && doff % b == 0 && len % b == 0)) || fail "offsets/length not multiples of 512"
    dd if="$src" of="$dst" bs=$b skip=$((soff / b)) seek=$((doff / b)) count=$((len / b)) \
        iflag=fullblock conv=notrunc,fsync status=none || fail "dd $src -> $dst"
}

n=0
for op in "$@"; do
    n=$((n + 1))
    IFS=: read -r -a a <<<"$op"
    log "op $n: $op"
    case ${a[0]}:${#a[@]} in
        create:2)
            msg "create_thin ${a[1]}"
            exists[${a[1]}]=1 ;;
        snap:3)
            dev=${a[1]} origin=${a[2]}
            # The kernel wants an active origin suspended while the snapshot is taken.
            if [[ -n ${active[$origin]:-} ]]; then
                dmsetup suspend "thin$origin" || fail "suspend thin$origin"
                msg "create_snap $dev $origin"
                dmsetup resume "thin$origin" || fail "resume thin$origin"
            else
                msg "create_snap $dev $origin"
            fi
            exists[$dev]=1 ;;
        delete:2)
            deactivate "${a[1]}"
            msg "delete ${a[1]}"
            unset "exists[${a[1]}]" ;;
        write:5)
            activate "${a[1]}"
            [[ -b $PAYLOAD ]] || fail "write with a source offset needs the payload disk $PAYLOAD"
            copy $PAYLOAD "${a[4]}" "/dev/mapper/thin${a[1]}" "${a[2]}" "${a[3]}" ;;
        write:4)
            activate "${a[1]}"
            dd if=/dev/urandom of=/tmp/payload bs=${a[3]} count=1 iflag=fullblock status=none
            log "random write $op sha256 $(sha256sum </tmp/payload | cut -d' ' -f1)"
            copy /tmp/payload 0 "/dev/mapper/thin${a[1]}" "${a[2]}" "${a[3]}" ;;
        discard:4)
            activate "${a[1]}"
            if command -v blkdiscard >/dev/null; then
                blkdiscard -o "${a[2]}" -l "${a[3]}" "/dev/mapper/thin${a[1]}" || fail "blkdiscard $op"
            else
                log "no blkdiscard in the guest: skipping $op"
            fi ;;
        reserve_metadata_snap:1 | release_metadata_snap:1)
            msg "${a[0]}" ;;
        set_transaction_id:3)
            msg "set_transaction_id ${a[1]} ${a[2]}" ;;
        *) fail "unknown op: $op" ;;
    esac
done

# Report every listed device that exists, in argument order.
for dev in "${order[@]}"; do
    case ${exists[$dev]:-} in
        1) activate "$dev" ;;
        maybe)
            dmsetup create "thin$dev" --table "0 ${size[$dev]} thin /dev/mapper/pool $dev" 2>/dev/null ||
                { log "device $dev does not open: not reported"; continue; }
            active[$dev]=1 ;;
        *) continue ;;
    esac
    sum=$(sha256sum </dev/mapper/thin$dev) || fail "reading thin device $dev"
    echo "$dev ${sum%% *}"
done
for dev in "${!exists[@]}"; do
    [[ -n ${size[$dev]:-} ]] || log "device $dev exists but was not listed: not reported"
done

for dev in "${!active[@]}"; do deactivate "$dev"; done
status=$(dmsetup status pool)
echo "pool-status $status"
log "pool status: $status"
dmsetup remove pool || fail "removing pool (metadata commit)"
case $status in
    *Fail* | *needs_check* | *" ro "* | *out_of_data_space*) fail "pool not healthy: $status" ;;
esac
log "done: pool removed, metadata committed"
