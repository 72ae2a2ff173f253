#!/usr/bin/env bash
# The whole test suite on a fresh Debian 12 machine: installs what the tests need
# (thin-provisioning-tools, qemu, libnbd tools incl. nbdfuse + fuse3, the lvm-vm kernel harness), then runs
# formatting and lint checks and every test. Used as-is by .ci/run.
#
# Environment: THINVOL_SKIP_VM=1 skips the real-kernel tests (lvm-vm);
#              THINVOL_SHARED_DIR points at shared/ (default: ../shared beside the repo).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
export THINVOL_SHARED_DIR=${THINVOL_SHARED_DIR:-$(cd "$repo/.." && pwd)/shared}
export CARGO_TERM_COLOR=never

step() { printf '\n== %s (%ss)\n' "$*" "$SECONDS"; }

step "installing Debian packages"
need=()
for p in thin-provisioning-tools libnbd-bin qemu-utils e2fsprogs util-linux mount fuse3 openssh-server openssh-client rsync zstd; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  sudo_cmd=""; [ "$(id -u)" -ne 0 ] && sudo_cmd=sudo
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${need[@]}" >/dev/null
fi

if [ "${THINVOL_SKIP_VM:-0}" != 1 ] && [ -x "$THINVOL_SHARED_DIR/lvm-vm/setup" ]; then
  step "preparing the lvm-vm kernel harness"
  "$THINVOL_SHARED_DIR/lvm-vm/setup" >/tmp/thinvol-lvmvm-setup.log 2>&1 || {
    tail -30 /tmp/thinvol-lvmvm-setup.log; echo "lvm-vm setup failed"; exit 1; }
elif [ "${THINVOL_SKIP_VM:-0}" != 1 ]; then
  echo "note: $THINVOL_SHARED_DIR/lvm-vm not found; kernel tests will skip"
fi

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --quiet -- -D warnings

step "cargo test"
cargo test --workspace --no-fail-fast 2>&1 | tee /tmp/thinvol-test.log | grep -E '^(test result|running|error|failures:|    [a-z_:]+$)|panicked|FAILED' || true
status=${PIPESTATUS[0]}

step "demo"
cargo run --quiet --release -p thinvol -- demo >/tmp/thinvol-demo.log 2>&1 || { cat /tmp/thinvol-demo.log; exit 1; }
tail -1 /tmp/thinvol-demo.log

passed=$(grep -Eo '[0-9]+ passed' /tmp/thinvol-test.log | awk '{s+=$1} END {print s+0}')
failed=$(grep -Eo '[0-9]+ failed' /tmp/thinvol-test.log | awk '{s+=$1} END {print s+0}')
step "done"
echo "$passed passed, $failed failed"
exit "$status"
