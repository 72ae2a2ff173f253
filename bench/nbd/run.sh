#!/usr/bin/env bash
# thinvol serve against qemu-nbd (raw and qcow2 files) in one run, unix socket:
# fio's nbd engine (4k random write on a fresh thin image = first writes, and again
# after a prefill = provisioned; 4k random read; 1M sequential read and write; QD 1 and
# 32) and nbdcopy of 1 GiB in and out. Results: docs/benchmarks.md, "NBD".
#
#   bash bench/nbd/run.sh                 # ROUNDS=2 RUNTIME=8 SIZE=2G by default
#   ROUNDS=3 RUNTIME=15 bash bench/nbd/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release -q -p thinvol
export THINVOL=$PWD/target/release/thinvol
export SERVER_CMD="exec bash $PWD/bench/nbd/serve-thinvol.sh"
export CONFIGS=${CONFIGS:-"raw:unix:writeback qcow2:unix:writeback custom:unix:-"}
export ROUNDS=${ROUNDS:-2} RUNTIME=${RUNTIME:-8} RAMP=${RAMP:-2} SIZE=${SIZE:-2G}
export COPY_REPS=${COPY_REPS:-2} WORKDIR=${WORKDIR:-/var/tmp/thinvol-nbd-bench}
exec bash bench/nbd/nbd-bench.sh
