#!/usr/bin/env bash
# Build thinvol and run the end-to-end demo on the embedded default (a pool in a
# directory of plain files). Usage: scripts/demo.sh [DIR]  (DIR keeps the pool).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet -p thinvol
exec ./target/release/thinvol demo "$@"
