#!/bin/bash
# Guest script (lvm-vm): let the real kernel's dm-thin read a pool READ-ONLY.
#
#   read-pool.sh [--pool-sectors N] BLOCK_SECTORS DEV_ID:SIZE_SECTORS...
#
# /dev/vda = pool metadata, /dev/vdb = pool data (give both as --ro-disk).
# The pool table uses the `read_only` feature (a thin-pool table itself cannot
# be loaded with `dmsetup --readonly`); each thin device is activated
# read-only, hashed whole, and removed again.
#
# stdout: one line "DEV_ID SHA256" per device, in argument order; nothing else.
# stderr: log (table, status, errors, dm kernel messages on failure).
# --pool-sectors: the pool table's length. It must equal nr_data_blocks of the
# metadata times BLOCK_SECTORS (the kernel refuses a shorter table and cannot
# grow a read-only pool); default: the data disk's size rounded down to a block.
set -euo pipefail
META=/dev/vda DATA=/dev/vdb
log() { echo "read-pool: $*" >&2; }
fail() {
    log "FAILED: $*"
    dmesg | grep -iE 'device-mapper|thin|dm-' | tail -n 30 | sed 's/^/  dmesg: /' >&2
    exit 1
}

pool_sectors=
if [[ ${1:-} == --pool-sectors ]]; then pool_sectors=$2; shift 2; fi
(($# >= 1)) || fail "usage: read-pool.sh [--pool-sectors N] BLOCK_SECTORS DEV_ID:SIZE_SECTORS..."
bs=$1; shift
[[ $bs =~ ^[0-9]+$ ]] && ((bs > 0)) || fail "bad block size: $bs"
data_sectors=$(blockdev --getsz $DATA)
[[ -n $pool_sectors ]] || pool_sectors=$((data_sectors / bs * bs))
((pool_sectors > 0 && pool_sectors % bs == 0)) || fail "bad pool length $pool_sectors (block $bs)"
((pool_sectors <= data_sectors)) || fail "pool length $pool_sectors > data disk $data_sectors sectors"

table="0 $pool_sectors thin-pool $META $DATA $bs 0 1 read_only"
log "dmsetup create pool: $table"
dmsetup create pool --table "$table" || fail "pool activation"
log "pool status: $(dmsetup status pool)"

for spec in "$@"; do
    [[ $spec =~ ^([0-9]+):([0-9]+)$ ]] || fail "bad device spec: $spec (want DEV_ID:SIZE_SECTORS)"
    dev=${BASH_REMATCH[1]} size=${BASH_REMATCH[2]}
    name=thin$dev
    dmsetup create --readonly "$name" --table "0 $size thin /dev/mapper/pool $dev" ||
        fail "activating thin device $dev ($size sectors)"
    sum=$(sha256sum </dev/mapper/$name) || fail "reading thin device $dev"
    echo "$dev ${sum%% *}"
    dmsetup remove "$name" || fail "removing $name"
done

status=$(dmsetup status pool)
log "pool status: $status"
dmsetup remove pool || fail "removing pool"
case $status in
    *Fail* | *needs_check*) fail "pool not healthy: $status" ;;
esac
