#!/usr/bin/env bash
# Copy of shared/tools/nbd-bench.sh with one addition for thinvol (marked "thinvol:"):
# 4k random writes are measured twice, on the fresh thin image (first writes: they pay
# allocation) and again after the prefill (provisioned blocks). Run by bench/nbd/run.sh.
#
# nbd-baseline.sh - repeatable NBD server benchmark on this machine.
#
# Serves thin (sparse) images and measures them with
#   * fio's nbd ioengine (libnbd client, one connection per job):
#     4k randwrite, 4k randread, 1M seq write, 1M seq read, at iodepth 32 and 1;
#   * nbdcopy: 1 GiB file -> NBD, NBD (1 GiB of data) -> null:, with the default
#     multi-conn and with -C 1, plus a read of a 4 GiB export holding 1 GiB of
#     data (nbdcopy skips the holes by block status).
# Prints a markdown report (machine facts + tables) to stdout and to $REPORT.
#
# Servers (FORMAT part of each config):
#   raw, qcow2     qemu-nbd on a fresh sparse image of that format
#   nbdkit-memory  nbdkit's sparse RAM plugin: a C server with no disk behind it,
#                  i.e. roughly what the clients can reach on this machine
#   custom         $SERVER_CMD (the project's server), run with eval in the
#                  background with these variables set: IMG (path of a fresh
#                  sparse raw file of the export size; the server may use the
#                  path for its own store instead), EXPORT_SIZE (bytes), SOCK,
#                  PORT, TRANSPORT. It must stay in the foreground, serve the
#                  default export "" on unix socket $SOCK (TRANSPORT=unix) or
#                  127.0.0.1:$PORT (TRANSPORT=tcp), and find its data again when
#                  restarted on the same IMG (the nbdcopy read tests restart it).
#
# Usage:  sudo bash nbd-bench.sh                       # default run (~17 min)
#         RUNTIME=5 CONFIGS="raw:unix:writeback" bash nbd-bench.sh   # quick
#         SERVER_CMD='target/release/volsrv --socket "$SOCK" --file "$IMG"' \
#         CONFIGS="raw:unix:writeback custom:unix:-" ROUNDS=3 bash nbd-bench.sh
#
# Environment knobs [defaults]:
#   CONFIGS    space-separated FORMAT:TRANSPORT:CACHE; TRANSPORT=unix|tcp;
#              CACHE=writeback|none (qemu-nbd only; none = O_DIRECT + --aio=native)
#              ["raw:unix:writeback qcow2:unix:writeback raw:tcp:writeback
#                raw:unix:none nbdkit-memory:unix:-"]
#   ROUNDS     run the whole config list this many times, interleaved (A B A B),
#              and report medians plus the IOPS range [1]. This VM is noisy:
#              single runs of the same test differ by up to 2x, so compare two
#              servers only within one invocation with ROUNDS>=3.
#   RUNTIME    seconds per fio job, measured after RAMP seconds of warm-up [15]
#   RAMP       fio ramp_time seconds [2]
#   SIZE       export size for the fio tests [4G]
#   COPY_REPS  repetitions of each nbdcopy measurement per round [3]
#   WORKDIR    scratch dir (images, sockets, json) on a real fs [/var/tmp/nbd-baseline]
#   REPORT     markdown report path [$WORKDIR/report.md]
#   PORT       TCP port on 127.0.0.1 for TRANSPORT=tcp [10809 + $$ % 500]
#   SKIP_FIO=1 / SKIP_COPY=1   skip a section
#   FIRST_WRITE_ONLY=1   fio: only 4k random writes QD32 on the fresh image (first
#              writes), to sample that row over more rounds
set -uo pipefail

RUNTIME=${RUNTIME:-15}
RAMP=${RAMP:-2}
SIZE=${SIZE:-4G}
WORKDIR=${WORKDIR:-/var/tmp/nbd-baseline}
CONFIGS=${CONFIGS:-"raw:unix:writeback qcow2:unix:writeback raw:tcp:writeback raw:unix:none nbdkit-memory:unix:-"}
ROUNDS=${ROUNDS:-1}
COPY_REPS=${COPY_REPS:-3}
REPORT=${REPORT:-$WORKDIR/report.md}
PORT=${PORT:-$((10809 + $$ % 500))}
SERVER_CMD=${SERVER_CMD:-}
SKIP_FIO=${SKIP_FIO:-0}
SKIP_COPY=${SKIP_COPY:-0}
FIRST_WRITE_ONLY=${FIRST_WRITE_ONLY:-0}

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ---------------------------------------------------------------- tools
apt_install() {
  [[ $EUID -eq 0 ]] || die "missing packages: $* (run as root or install them)"
  log "installing: $*"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1; DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null 2>&1; } \
    || die "apt-get install $* failed"
}
need=()
for p in qemu-nbd:qemu-utils qemu-img:qemu-utils fio:fio nbdcopy:libnbd-bin nbdinfo:libnbd-bin python3:python3; do
  command -v "${p%%:*}" >/dev/null || need+=("${p##*:}")
done
[[ " $CONFIGS " == *" nbdkit-memory:"* ]] && ! command -v nbdkit >/dev/null && need+=(nbdkit)
((${#need[@]})) && apt_install $(printf '%s\n' "${need[@]}" | sort -u)
fio --enghelp 2>/dev/null | grep -qw nbd || die "this fio has no nbd ioengine"

for cfg in $CONFIGS; do
  IFS=: read -r fmt transport _ <<<"$cfg"
  [[ $fmt =~ ^(raw|qcow2|nbdkit-memory|custom)$ ]] || die "bad format in $cfg"
  [[ $transport =~ ^(unix|tcp)$ ]] || die "bad transport in $cfg"
  [[ $fmt != custom || -n $SERVER_CMD ]] || die "config $cfg needs SERVER_CMD"
done

mkdir -p "$WORKDIR" || die "cannot create $WORKDIR"
WORKDIR=$(cd "$WORKDIR" && pwd)
SOCK="$WORKDIR/nbd.sock"
ROWS_FIO="$WORKDIR/rows-fio.tsv"     # round cfg test qd iops mibs p50 p99 srvcpu clicpu
ROWS_COPY="$WORKDIR/rows-copy.tsv"   # round cfg label seconds...
: >"$ROWS_FIO"; : >"$ROWS_COPY"
CLK_TCK=$(getconf CLK_TCK)

# ---------------------------------------------------------------- server
SRV_PID=""
stop_server() {
  if [[ -n $SRV_PID ]] && kill -0 "$SRV_PID" 2>/dev/null; then
    kill "$SRV_PID" 2>/dev/null
    for _ in $(seq 50); do kill -0 "$SRV_PID" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$SRV_PID" 2>/dev/null && kill -KILL "$SRV_PID" 2>/dev/null
    wait "$SRV_PID" 2>/dev/null
  fi
  SRV_PID=""
  rm -f "$SOCK"
}
trap 'stop_server' EXIT
trap 'stop_server; exit 130' INT TERM

# CPU time (utime+stime, all threads) of the server process, in clock ticks
server_cpu_ticks() {
  [[ -n $SRV_PID && -r /proc/$SRV_PID/stat ]] || { echo 0; return; }
  awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$SRV_PID/stat"
}

# start_server FMT TRANSPORT CACHE IMG  -> sets URI, SRV_PID, SRV_DESC
start_server() {
  local fmt=$1 transport=$2 cache=$3 img=$4 args
  stop_server
  if [[ $transport == unix ]]; then URI="nbd+unix:///?socket=$SOCK"; else URI="nbd://127.0.0.1:$PORT/"; fi
  case $fmt in
    custom)
      IMG=$img EXPORT_SIZE=$(stat -c %s "$img") SOCK=$SOCK PORT=$PORT TRANSPORT=$transport \
        eval "$SERVER_CMD" >"$WORKDIR/server.log" 2>&1 &
      SRV_PID=$!; SRV_DESC="$SERVER_CMD" ;;
    nbdkit-memory)
      args=(-f)
      if [[ $transport == unix ]]; then args+=(-U "$SOCK"); else args+=(-i 127.0.0.1 -p "$PORT"); fi
      args+=(memory "size=$(stat -c %s "$img")")
      nbdkit "${args[@]}" >"$WORKDIR/server.log" 2>&1 &
      SRV_PID=$!; SRV_DESC="nbdkit ${args[*]}" ;;
    *)
      args=(-f "$fmt")
      if [[ $transport == unix ]]; then args+=(-k "$SOCK"); else args+=(-b 127.0.0.1 -p "$PORT"); fi
      # --shared=8: allow nbdcopy/nbdfuse multi-conn (and makes qemu-nbd advertise it)
      args+=(--persistent --shared=8 --discard=unmap)
      if [[ $cache == none ]]; then args+=(--cache=none --aio=native); else args+=(--cache=writeback --aio=threads); fi
      args+=("$img")
      qemu-nbd "${args[@]}" >"$WORKDIR/server.log" 2>&1 &
      SRV_PID=$!; SRV_DESC="qemu-nbd ${args[*]}" ;;
  esac
  for _ in $(seq 100); do
    nbdinfo --size "$URI" >/dev/null 2>&1 && return 0
    kill -0 "$SRV_PID" 2>/dev/null || break
    sleep 0.1
  done
  cat "$WORKDIR/server.log" >&2
  die "server did not come up: $SRV_DESC"
}

# fresh_image FMT PATH SIZE (qcow2 for qemu-nbd qcow2; a sparse raw file otherwise,
# which for nbdkit-memory only carries the size)
fresh_image() {
  rm -f "$2"
  if [[ $1 == qcow2 ]]; then qemu-img create -q -f qcow2 "$2" "$3"; else truncate -s "$3" "$2"; fi
}

# ---------------------------------------------------------------- measurements
# run_fio ROUND CFG TEST RW BS QD
run_fio() {
  local round=$1 cfg=$2 test=$3 rw=$4 bs=$5 qd=$6
  local json="$WORKDIR/fio-r$round-${cfg//:/-}-$test-qd$qd.json" t0 t1 rc
  t0=$(server_cpu_ticks)
  fio --name="$test" --ioengine=nbd --uri="$URI" --rw="$rw" --bs="$bs" \
      --iodepth="$qd" --numjobs=1 --direct=1 --time_based --runtime="$RUNTIME" \
      --ramp_time="$RAMP" --norandommap --randrepeat=0 --lat_percentiles=1 \
      --output-format=json --output="$json" >"$WORKDIR/fio.stderr" 2>&1
  rc=$?
  t1=$(server_cpu_ticks)
  if ((rc != 0)); then
    log "fio failed ($cfg $test qd$qd): $(tail -3 "$WORKDIR/fio.stderr")"
    return
  fi
  python3 - "$json" "$round" "$cfg" "$test" "$qd" "$t0" "$t1" "$CLK_TCK" "$RUNTIME" "$RAMP" >>"$ROWS_FIO" <<'EOF'
import json, sys
path, rnd, cfg, test, qd, t0, t1, tck, runtime, ramp = sys.argv[1:]
s = open(path).read()
d = json.loads(s[s.index('{'):])          # fio's nbd engine prints a line before the JSON
j = d['jobs'][0]
side = j['write'] if j['write']['io_bytes'] > 0 else j['read']
pct = side['lat_ns'].get('percentile', {})
srv = (int(t1) - int(t0)) / int(tck) / (float(runtime) + float(ramp)) * 100
print("\t".join(map(str, [rnd, cfg, test, qd, round(side['iops']), round(side['bw_bytes'] / 1048576, 1),
      round(pct.get('50.000000', 0) / 1000), round(pct.get('99.000000', 0) / 1000),
      round(srv), round(j['usr_cpu'] + j['sys_cpu'])])))
EOF
  log "  $(tail -1 "$ROWS_FIO")"
}

# elapsed CMD... -> prints seconds, or ERR
elapsed() {
  local a b
  a=$(date +%s%N)
  if "$@" >"$WORKDIR/cmd.out" 2>&1; then
    b=$(date +%s%N); echo "$(( (b - a) / 1000000 ))" | awk '{printf "%.3f", $1/1000}'
  else
    log "command failed: $* : $(tail -2 "$WORKDIR/cmd.out")"; echo ERR
  fi
}

# copy_read ROUND CFG LABEL nbdcopy-args...   (COPY_REPS times on the running server)
copy_read() {
  local round=$1 cfg=$2 label=$3; shift 3
  local ts=()
  for _ in $(seq "$COPY_REPS"); do ts+=("$(elapsed nbdcopy "$@")"); done
  printf '%s\t%s\t%s\t%s\n' "$round" "$cfg" "$label" "${ts[*]}" >>"$ROWS_COPY"
  log "  $cfg $label: ${ts[*]} s"
}

# copy_write ROUND CFG LABEL FMT TRANSPORT CACHE IMG [nbdcopy opts]
# each repetition: fresh thin image + fresh server, so each pays allocation
copy_write() {
  local round=$1 cfg=$2 label=$3 fmt=$4 transport=$5 cache=$6 img=$7; shift 7
  local ts=()
  for _ in $(seq "$COPY_REPS"); do
    fresh_image "$fmt" "$img" 1G
    start_server "$fmt" "$transport" "$cache" "$img"
    ts+=("$(elapsed nbdcopy "$@" "$SRC" "$URI")")
    stop_server
    sync -f "$img" 2>/dev/null    # keep this run's dirty pages out of the next one
  done
  printf '%s\t%s\t%s\t%s\n' "$round" "$cfg" "$label" "${ts[*]}" >>"$ROWS_COPY"
  log "  $cfg $label: ${ts[*]} s"
}

# ---------------------------------------------------------------- run
SRC="$WORKDIR/src-1g.bin"
if [[ $SKIP_COPY != 1 ]]; then
  if [[ ! -f $SRC || $(stat -c %s "$SRC") -ne 1073741824 ]]; then
    log "creating 1 GiB random source file $SRC"
    head -c 1G /dev/urandom >"$SRC"
  fi
  cat "$SRC" >/dev/null   # in page cache: measure the NBD side, not the source disk
fi

declare -A SRV_USED
for round in $(seq "$ROUNDS"); do
  for cfg in $CONFIGS; do
    IFS=: read -r fmt transport cache <<<"$cfg"
    img="$WORKDIR/disk.$fmt"

    if [[ $SKIP_FIO != 1 ]]; then
      log "== round $round, $cfg: fio on a fresh sparse $SIZE image"
      fresh_image "$fmt" "$img" "$SIZE"
      start_server "$fmt" "$transport" "$cache" "$img"
      SRV_USED[$cfg]="$SRV_DESC"
      # writes first, on the fresh (thin) image: they include the allocation cost
      run_fio "$round" "$cfg" randwrite-4k randwrite 4k 32
      if [[ $FIRST_WRITE_ONLY == 1 ]]; then stop_server; continue; fi
      run_fio "$round" "$cfg" randwrite-4k randwrite 4k 1
      run_fio "$round" "$cfg" seqwrite-1M  write     1M 32
      run_fio "$round" "$cfg" seqwrite-1M  write     1M 1
      # then fill the whole export so that reads are not answered from holes
      log "  prefill $SIZE"
      fio --name=prefill --ioengine=nbd --uri="$URI" --rw=write --bs=1M --iodepth=32 \
          --size=100% --output="$WORKDIR/prefill.json" --output-format=json >/dev/null 2>&1 \
          || log "prefill failed"
      # thinvol: the same random writes again, now into provisioned blocks
      run_fio "$round" "$cfg" randwrite-4k-prov randwrite 4k 32
      run_fio "$round" "$cfg" randwrite-4k-prov randwrite 4k 1
      run_fio "$round" "$cfg" randread-4k randread 4k 32
      run_fio "$round" "$cfg" randread-4k randread 4k 1
      run_fio "$round" "$cfg" seqread-1M  read     1M 32
      run_fio "$round" "$cfg" seqread-1M  read     1M 1
      stop_server
    fi

    if [[ $SKIP_COPY != 1 ]]; then
      log "== round $round, $cfg: nbdcopy"
      copy_write "$round" "$cfg" "file(1G)->nbd, default conns" "$fmt" "$transport" "$cache" "$img"
      copy_write "$round" "$cfg" "file(1G)->nbd, -C 1"          "$fmt" "$transport" "$cache" "$img" -C 1
      # the image now holds 1 GiB of data (nbdkit-memory starts empty: seed it)
      start_server "$fmt" "$transport" "$cache" "$img"
      [[ -n ${SRV_USED[$cfg]:-} ]] || SRV_USED[$cfg]="$SRV_DESC"
      [[ $fmt == nbdkit-memory ]] && nbdcopy "$SRC" "$URI" >/dev/null 2>&1
      copy_read "$round" "$cfg" "nbd(1G data)->null:, default conns" "$URI" null:
      copy_read "$round" "$cfg" "nbd(1G data)->null:, -C 1" -C 1 "$URI" null:
      stop_server
      # 4 GiB thin export holding 1 GiB of data: 3 GiB of holes to skip
      fresh_image "$fmt" "$img" 4G
      start_server "$fmt" "$transport" "$cache" "$img"
      nbdcopy "$SRC" "$URI" >/dev/null 2>&1 || log "seeding the 4G export failed"
      copy_read "$round" "$cfg" "nbd(4G virt, 1G data)->null:" "$URI" null:
      stop_server
    fi
    rm -f "$img"
  done
done

# ---------------------------------------------------------------- report
{
  echo "## Machine"
  echo
  echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'); rounds: $ROUNDS"
  echo "- kernel $(uname -r); CPU: $(lscpu | sed -n 's/^Model name: *//p') x $(nproc) ($(lscpu | sed -n 's/^Hypervisor vendor: *//p') guest); RAM $(awk '/MemTotal/{printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
  echo "- workdir fs: $(df -T "$WORKDIR" | awk 'NR==2{print $2" on "$1}') ($(findmnt -no OPTIONS -T "$WORKDIR"))"
  echo "- $(qemu-nbd --version | head -1); $(fio --version); $(nbdcopy --version | tr '\n' ' ')$(command -v nbdkit >/dev/null && nbdkit --version)"
  echo "- fio: ioengine=nbd, 1 job = 1 connection, time_based runtime=${RUNTIME}s after ramp=${RAMP}s, direct=1, norandommap; latency = lat_ns (submit to completion)"
  echo "- srv CPU% = server process CPU time / wall time (100% = one core); cli CPU% = fio usr+sys"
  for cfg in $CONFIGS; do [[ -n ${SRV_USED[$cfg]:-} ]] && echo "- \`$cfg\`: \`${SRV_USED[$cfg]}\`"; done
  echo
  python3 - "$ROWS_FIO" "$ROWS_COPY" "$ROUNDS" <<'EOF'
import sys, statistics as st
fio_rows, copy_rows, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
med = lambda v: st.median(v) if v else float('nan')
fio = {}
for line in open(fio_rows):
    r = line.rstrip('\n').split('\t')
    fio.setdefault((r[1], r[2], r[3]), []).append([float(x) for x in r[4:]])
if fio:
    print("## fio (nbd engine)\n")
    rng = " | IOPS min-max" if rounds > 1 else ""
    print(f"| config | test | QD | IOPS | MiB/s | p50 µs | p99 µs | srv CPU% | cli CPU%{rng} |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|" + ("---|" if rounds > 1 else ""))
    for (cfg, test, qd), v in fio.items():
        col = lambda i: med([x[i] for x in v])
        extra = f" | {min(x[0] for x in v):.0f}-{max(x[0] for x in v):.0f}" if rounds > 1 else ""
        print(f"| {cfg} | {test} | {qd} | {col(0):.0f} | {col(1):.1f} | {col(2):.0f} | {col(3):.0f} | {col(4):.0f} | {col(5):.0f}{extra} |")
    if rounds > 1:
        print(f"\nMedians over {rounds} rounds.")
    print()
cp = {}
for line in open(copy_rows):
    r = line.rstrip('\n').split('\t')
    cp.setdefault((r[1], r[2]), []).extend(r[3].split())
if cp:
    print("## nbdcopy (1024 MiB of data; median of all repetitions)\n")
    print("| config | copy | median s | MiB/s | runs (s) |")
    print("|---|---|---:|---:|---|")
    for (cfg, label), ts in cp.items():
        ok = [float(t) for t in ts if t != 'ERR']
        m = med(ok)
        print(f"| {cfg} | {label} | {m:.2f} | {1024 / m:.0f} | {' '.join(ts)} |")
    print()
EOF
} | tee "$REPORT"
log "report written to $REPORT"
