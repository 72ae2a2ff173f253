#!/usr/bin/env bash
# send/receive benchmarks (issue #5), each against a peer measured in the same run:
#
#  1. incremental `thinvol send --from | thinvol receive` of CHANGED bytes in a VOLUME
#     volume, vs `cat` moving the same stream bytes through a pipe into a file (the
#     physical limit of this machine for those bytes), vs `rsync --inplace
#     --no-whole-file` between the two raw images, vs a full `nbdcopy` of the image;
#     plus a full send|receive of the same image for the nbdcopy comparison;
#  2. delta discovery (`send --dry-run`) on a BIG volume with 1 % of its blocks changed;
#  3. cheap `verify` (stored digests maintained in O(change)) against the change size.
#
#   bench/send-receive.sh            # 1 GiB changed in 64 GiB; 1 TiB with 1 % changed
#   bench/send-receive.sh --quick    # 64 MiB in 4 GiB; 16 GiB with 1 % changed
#
# Environment: THINVOL_BENCH_DIR (scratch; default /var/tmp; needs ~10 GiB real space,
# files are sparse and deleted afterwards), THINVOL_BIN (default target/release/thinvol).
# Page cache: every input file is evicted (POSIX_FADV_DONTNEED) before each timed run,
# so each side reads from the disk, after a `sync` (no write-back of earlier files
# overlaps a timed run).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

quick=0
[ "${1:-}" = "--quick" ] && quick=1
if [ "$quick" = 1 ]; then
  VOL=4G; CHANGED_MIB=64; EXTENT_MIB=4; BIG=16G; BIG_BLOCKS_STEP=100
else
  VOL=64G; CHANGED_MIB=1024; EXTENT_MIB=16; BIG=1T; BIG_BLOCKS_STEP=100
fi

if [ -z "${THINVOL_BIN:-}" ]; then
  cargo build --release --quiet -p thinvol
  THINVOL_BIN=$repo/target/release/thinvol
fi
T=$THINVOL_BIN
base=${THINVOL_BENCH_DIR:-/var/tmp}
W=$(mktemp -d "$base/thinvol-sendbench.XXXXXX")
trap 'rm -rf "$W"' EXIT
export THINVOL_HOME=$W/home

# `sync` first: write-back of files written earlier (the workload images) must not
# overlap the timed command that follows.
evict() { sync; python3 - "$@" <<'EOF'
import os, sys
for p in sys.argv[1:]:
    for root, _, files in (os.walk(p) if os.path.isdir(p) else [(os.path.dirname(p), None, [os.path.basename(p)])]):
        for f in files:
            fp = os.path.join(root, f)
            try:
                fd = os.open(fp, os.O_RDONLY)
                os.fdatasync(fd) if os.access(fp, os.W_OK) else None
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                os.close(fd)
            except OSError:
                pass
EOF
}
now() { date +%s.%N; }
secs() { python3 -c "print(f'{$2 - $1:.3f}')"; }
ratio() { python3 -c "print(f'{float(\"$1\") / $2:.2f}')"; }
mibs() { python3 -c "print(f'{$1 / 1048576 / $2:.0f}')"; }

echo "## send/receive benchmark ($(date -u +%FT%TZ), volume $VOL, changed ${CHANGED_MIB} MiB)"
echo
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo) RAM, $(uname -r), $(findmnt -no FSTYPE -T "$W") on $(findmnt -no SOURCE -T "$W")"
echo

# ---- workload: base image with CHANGED of data, new image with the same extents rewritten
python3 - "$W" "$VOL" "$CHANGED_MIB" "$EXTENT_MIB" <<'EOF'
import os, sys
w, vol, changed, ext = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
units = {"G": 1 << 30, "T": 1 << 40}
size = int(vol[:-1]) * units[vol[-1]]
n = changed // ext
stride = size // n
for name in ("a.raw", "b.raw"):
    with open(os.path.join(w, name), "wb") as f:
        f.truncate(size)
        for i in range(n):
            f.seek(i * stride + (stride // 3 if name == "b.raw" and i % 2 else 0))
            for _ in range(ext):
                f.write(os.urandom(1 << 20))
EOF
# b.raw: half of the extents overwrite a.raw's, half are new areas; a.raw's other half
# is discarded in b: CHANGED MiB of data written, CHANGED/2 MiB unmapped.
pool_size=$(( CHANGED_MIB * 3 + 512 ))M
$T pool create src --dir "$W/src" --size "$pool_size" >/dev/null
$T pool create dst --dir "$W/dst" --size "$pool_size" >/dev/null
$T import src/vm "$W/a.raw" -q >/dev/null
$T snapshot src/vm@a >/dev/null
$T write-image src/vm "$W/b.raw" -q >/dev/null
$T snapshot src/vm@b >/dev/null
$T send -q src/vm@a | $T receive -q dst/vm
stream_bytes=$($T send src/vm@b --from @a --dry-run 2>/dev/null)

# ---- 1. incremental send | receive
evict "$W/src" "$W/dst"
t0=$(now); $T send -q src/vm@b --from @a | $T receive -q dst/vm; t1=$(now)
t_tv=$(secs "$t0" "$t1")
echo "# thinvol incremental: $t_tv s" >&2
# The same bytes through a pipe into a file, fsynced (the receive commits too).
$T send -q src/vm@b --from @a -o "$W/stream.bin"
evict "$W/stream.bin"
t0=$(now); cat "$W/stream.bin" | cat | dd of="$W/cat.out" bs=1M conv=fsync status=none; t1=$(now)
t_cat=$(secs "$t0" "$t1")
echo "# cat: $t_cat s" >&2
rm -f "$W/cat.out"
$T verify --full src/vm@b dst/vm@b >/dev/null
# rsync between the raw images (dst.raw starts as a copy of a.raw).
if [ "${THINVOL_BENCH_SKIP_RSYNC:-0}" = 1 ]; then
  t_rsync=nan   # skipped (THINVOL_BENCH_SKIP_RSYNC=1)
else
  cp --sparse=always "$W/a.raw" "$W/dst.raw"
  evict "$W/a.raw" "$W/b.raw" "$W/dst.raw"
  t0=$(now); rsync --inplace --no-whole-file "$W/b.raw" "$W/dst.raw"; sync -f "$W/dst.raw"; t1=$(now)
  t_rsync=$(secs "$t0" "$t1")
  cmp "$W/b.raw" "$W/dst.raw"
  rm -f "$W/dst.raw"
fi
# Full copies: nbdcopy of the image vs a full send | receive.
evict "$W/b.raw"
t0=$(now); nbdcopy "$W/b.raw" "$W/nbd.out"; sync -f "$W/nbd.out"; t1=$(now)
t_nbd=$(secs "$t0" "$t1")
rm -f "$W/nbd.out"
$T pool create dst2 --dir "$W/dst2" --size "$pool_size" >/dev/null
evict "$W/src"
t0=$(now); $T send -q src/vm@b | $T receive -q dst2/vm; t1=$(now)
t_full=$(secs "$t0" "$t1")
full_bytes=$($T send src/vm@b --dry-run 2>/dev/null)
$T pool destroy dst2 --force >/dev/null 2>&1 || true

echo "### Incremental: $CHANGED_MIB MiB changed in a $VOL volume"
echo
echo "| what | bytes moved | seconds | MiB/s | thinvol speed-up (peer time / thinvol time) |"
echo "|---|---|---|---|---|"
echo "| thinvol send --from \| receive | $stream_bytes | $t_tv | $(mibs "$stream_bytes" "$t_tv") | 1.00 |"
echo "| cat \| cat \| dd conv=fsync of the same stream bytes | $stream_bytes | $t_cat | $(mibs "$stream_bytes" "$t_cat") | $(ratio "$t_cat" "$t_tv") |"
echo "| rsync --inplace --no-whole-file b.raw dst.raw | (reads both $VOL images) | $t_rsync | - | $(ratio "$t_rsync" "$t_tv") |"
echo "| nbdcopy b.raw (full, sparse-aware) | $full_bytes | $t_nbd | $(mibs "$full_bytes" "$t_nbd") | $(ratio "$t_nbd" "$t_tv") |"
echo "| thinvol send (full) \| receive | $full_bytes | $t_full | $(mibs "$full_bytes" "$t_full") | $(ratio "$t_nbd" "$t_full") vs nbdcopy |"
echo
echo "SUMMARY send-receive incremental: thinvol/cat = $(ratio "$t_cat" "$t_tv")x (goal >= 0.8), $(ratio "$t_rsync" "$t_tv")x faster than rsync, full send|receive $(ratio "$t_nbd" "$t_full")x of nbdcopy"
rm -f "$W/a.raw" "$W/b.raw" "$W/stream.bin"
if [ "${THINVOL_BENCH_ONLY_TRANSFER:-0}" = 1 ]; then exit 0; fi

# ---- 3. cheap verify against the change size (digests maintained in O(change))
echo
echo "### Cheap verify: digest of a new snapshot from its predecessor's, by change size"
echo
echo "| changed | first verify (derives the digest) s | second verify (stored) s | verify --full s |"
echo "|---|---|---|---|"
prev=b
for mib in 16 128 $CHANGED_MIB; do
  python3 - "$W/chg.raw" "$mib" <<'EOF'
import os, sys
with open(sys.argv[1], "wb") as f:
    f.write(os.urandom(int(sys.argv[2]) << 20))
EOF
  # Overwrite the start of the volume (through the thin-level import would recreate; use
  # write-image on a same-size sparse image holding only the changed range).
  python3 - "$W/img.raw" "$VOL" "$W/chg.raw" <<'EOF'
import sys, shutil
units = {"G": 1 << 30, "T": 1 << 40}
size = int(sys.argv[2][:-1]) * units[sys.argv[2][-1]]
with open(sys.argv[1], "wb") as f, open(sys.argv[3], "rb") as c:
    f.truncate(size)
    shutil.copyfileobj(c, f)
EOF
  $T write-image src/vm "$W/img.raw" -q >/dev/null
  s=v$mib; $T snapshot "src/vm@$s" >/dev/null
  evict "$W/src"
  t0=$(now); $T verify "src/vm@$s" "src/vm@$s" >/dev/null; t1=$(now)
  t0b=$(now); $T verify "src/vm@$s" "src/vm@$s" >/dev/null; t1b=$(now)
  t0c=$(now); $T verify --full "src/vm@$s" "src/vm@$s" >/dev/null; t1c=$(now)
  echo "| $mib MiB | $(secs "$t0" "$t1") | $(secs "$t0b" "$t1b") | $(secs "$t0c" "$t1c") |"
  prev=$s
done
rm -f "$W/chg.raw" "$W/img.raw"
$T destroy -r src/vm >/dev/null 2>&1 || true
$T destroy -r dst/vm >/dev/null 2>&1 || true
rm -rf "$W/src" "$W/dst"

# ---- 2. delta discovery on a BIG volume with 1 % of its blocks changed
python3 - "$W/big.raw" "$BIG" "$BIG_BLOCKS_STEP" <<'EOF'
import os, sys
units = {"G": 1 << 30, "T": 1 << 40}
size = int(sys.argv[2][:-1]) * units[sys.argv[2][-1]]
step = int(sys.argv[3])
bs = 64 << 10
blk = os.urandom(4096)
with open(sys.argv[1], "wb") as f:
    f.truncate(size)
    for b in range(0, size // bs, step):
        f.seek(b * bs)
        f.write(blk)
EOF
nblocks=$(python3 -c "u={'G':1<<30,'T':1<<40}; s=int('$BIG'[:-1])*u['$BIG'[-1]]; print(len(range(0, s//65536, $BIG_BLOCKS_STEP)))")
big_pool=$(python3 -c "print(($nblocks * 65536 * 11 // 10 >> 20) + 1024)")M
$T pool create big --dir "$W/big" --size "$big_pool" >/dev/null
$T create big/vm --size "$BIG" >/dev/null
$T snapshot big/vm@a >/dev/null
t0=$(now); $T write-image big/vm "$W/big.raw" -q >/dev/null; t1=$(now)
t_fill=$(secs "$t0" "$t1")
rm -f "$W/big.raw"
$T snapshot big/vm@b >/dev/null
evict "$W/big"
t0=$(now); big_bytes=$($T send big/vm@b --from @a --dry-run 2>/dev/null); t1=$(now)
t_dry=$(secs "$t0" "$t1")
t0=$(now); $T send big/vm@b --from @a --dry-run >/dev/null 2>&1; t1=$(now)
t_dry_warm=$(secs "$t0" "$t1")
echo
echo "### Delta discovery: $BIG volume, $nblocks of its 64 KiB blocks changed (1 %)"
echo
echo "| what | seconds |"
echo "|---|---|"
echo "| writing the change (write-image, setup) | $t_fill |"
echo "| send --dry-run (open, delta, plan: $big_bytes stream bytes), metadata evicted | $t_dry |"
echo "| the same, warm | $t_dry_warm |"
echo
echo "SUMMARY send-receive delta discovery: $BIG with 1 % changed in $t_dry s cold, $t_dry_warm s warm (goal < 1 s)"
