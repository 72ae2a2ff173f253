#!/usr/bin/env bash
# SERVER_CMD for /work/shared/tools/nbd-bench.sh: serve a thinvol volume of
# $EXPORT_SIZE as the default export on $SOCK (or 127.0.0.1:$PORT).
#
# The pool lives beside the benchmark's image: $IMG.thinvol (THINVOL_HOME
# $IMG.home). The bench recreates $IMG (rm + truncate) when it wants a fresh thin
# image, so a new $IMG means "start from an empty volume" (of the new size); the
# same $IMG means "restarted on the same data" (the nbdcopy read tests). "Same" is
# inode + birth time + ctime (nanoseconds) + size: the inode number alone is not
# enough, ext4 hands the freed inode straight back to the next file created after
# `rm` (an earlier version keyed on it and kept serving the first 2 GiB volume,
# fio-prefilled, in every later test of the run).
#
# Use:  SERVER_CMD='exec bash bench/nbd/serve-thinvol.sh' (THINVOL=path to binary)
set -euo pipefail
THINVOL=${THINVOL:-$(dirname "$0")/../../target/release/thinvol}
export THINVOL_HOME="$IMG.home"
pool="$IMG.thinvol"
id=$(stat -c '%i %.9W %.9Z %s' "$IMG")
if [[ ! -f $pool/.img-id || $(cat "$pool/.img-id") != "$id" ]]; then
  rm -rf "$pool" "$THINVOL_HOME"
  # data: the export plus 1/16 for metadata-free slack; 64 KiB blocks (the default)
  "$THINVOL" pool create bench --dir "$pool" --size $((EXPORT_SIZE + EXPORT_SIZE / 16)) >/dev/null
  "$THINVOL" create bench/v --size "$EXPORT_SIZE" >/dev/null
  echo "$id" >"$pool/.img-id"
fi
if [[ ${TRANSPORT:-unix} == unix ]]; then
  exec "$THINVOL" serve bench/v --socket "$SOCK" ${SERVE_ARGS:-}
else
  exec "$THINVOL" serve bench/v --listen "127.0.0.1:$PORT" ${SERVE_ARGS:-}
fi
