#!/usr/bin/env bash
# Run every thinvol benchmark once and print a summary of ratios and goals.
#
#   bench/run-all.sh            # full run (10-40 minutes on 2 cores, depending on load:
#                               # the 60,000-iteration soak is most of it)
#   bench/run-all.sh --quick    # small sizes: checks that everything works (~1 minute)
#
# Environment: THINVOL_BENCH_DIR  directory for the scratch pools and files
#                                 (default: the system temp dir; needs ~3 GiB of space,
#                                 the 4 M-mapping delta fixture is a sparse 256 GiB file)
#              THINVOL_BENCH_OUT  where the full reports go
#                                 (default: target/bench-results/<UTC timestamp>)
#
# Each benchmark compares thinvol against a peer measured in the same run (plain file,
# thin_delta, smaller size) and prints markdown tables plus "SUMMARY" lines; this
# script keeps the full reports and prints the SUMMARY lines at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

quick=0
[ "${1:-}" = "--quick" ] && quick=1

if ! command -v thin_delta >/dev/null 2>&1 && [ ! -x /usr/sbin/thin_delta ]; then
  echo "thin-provisioning-tools are required (apt-get install thin-provisioning-tools)" >&2
  exit 1
fi

out=${THINVOL_BENCH_OUT:-target/bench-results/$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$out"

echo "== building (release)"
cargo build --release --quiet -p thinvol-bench
bin=target/release

if [ "$quick" = 1 ]; then
  runs=(
    "engine-io --ops 20000 --size-mib 64 --slices 4"
    "cold-read --ops 2000 --size-mib 64 --rounds 2"
    "snapshot --mapped 1K,100K --snaps 10"
    "delta --mapped 20K,100K --changed 1000 --reps 2"
    "open --mapped 1K,100K --reps 3"
    "soak --iters 3000"
    "archive-cost --mapped 1K,20K --reps 3"
  )
else
  runs=(
    "engine-io --ops 200000"
    "cold-read --ops 20000"
    "snapshot --mapped 1K,100K,1M --snaps 50"
    "delta --mapped 100K,1M,4M --changed 10000 --reps 9 --reps-large 3"
    "open --mapped 1K,1M --reps 10"
    "soak --iters 60000"
    "archive-cost --mapped 1K,100K,1M --reps 10"
  )
fi

start=$SECONDS
for r in "${runs[@]}"; do
  name=${r%% *}
  args=${r#* }
  echo "== $name $args"
  t0=$SECONDS
  # shellcheck disable=SC2086
  "$bin/$name" $args >"$out/$name.md" 2>"$out/$name.err" || {
    echo "$name failed:"; tail -20 "$out/$name.err"; tail -20 "$out/$name.md"; exit 1; }
  echo "   done in $((SECONDS - t0)) s -> $out/$name.md"
done

echo
echo "== summary (full reports in $out, total $((SECONDS - start)) s)"
grep -h '^SUMMARY' "$out"/*.md | sed 's/^SUMMARY //'
missed=$(grep -h '^SUMMARY' "$out"/*.md | grep -c 'MISSED' || true)
echo
echo "goals missed: $missed"
