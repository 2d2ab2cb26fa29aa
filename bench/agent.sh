#!/usr/bin/env bash
# Agent benchmarks: ratios measured in one run on one machine (not timed tests).
#
# Usage: bench/agent.sh [--cluster-dir DIR] [--store DIR] [--container NAME] [--big DIR]
#                       [--big-size MiB] [--binary PATH] [--extra-only]
#   --cluster-dir  the local cluster's state (default /tmp/deis-backup-cluster); its cluster.env gives
#                  STORE_DIR and DATABASE_CONTAINER unless --store / --container are given
#   --store        directory to archive (the seeded store)
#   --container    database container to dump
#   --big          directory streamed for the peak-RSS figure; created with --big-size MiB of
#                  half text, half random data when it does not exist (default: generated under
#                  /tmp/deis-backup-bench-big, 1100 MiB)
#   --binary       the agent (default target/release/deis-backup-agent; the pull example is built)
#   --extra-only   only the sparse and xattr rows (no cluster, store or database needed)
#
# Prints a Markdown table: archive (of --store and of --big) vs `tar cpzf` and
# `tar -c | zstd -T0 -3`, dump vs `docker exec … pg_dumpall > file`, each the best of three runs
# from the page cache; agent peak RSS (VmHWM) while streaming --big. Then the sparse and xattr
# rows: archive of a 512 MiB sparse file with a 4-byte tail vs `tar -S -c | zstd -T0 -3`, and of
# 10,000 files with a user xattr each vs `tar --xattrs -c | zstd -T0 -3` (both generated in a
# temporary directory, which must keep user xattrs), with CPU seconds (user + sys, the agent's
# own included) beside wall time. The agent is driven by the
# `pull` example (agent/examples/pull.rs), which verifies each stream's trailer.
# Targets: archive ≥ 8× tar cpzf and ≥ 0.9× tar|zstd (speed), dump ≤ 1.1× docker exec (time),
# RSS ≤ 64 MiB.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cluster_dir=/tmp/deis-backup-cluster store='' container='' big='' big_mib=1100 extra_only=0
binary=$repo/target/release/deis-backup-agent
while (($#)); do
  case $1 in
    --cluster-dir) cluster_dir=$2; shift 2 ;;
    --store) store=$2; shift 2 ;;
    --container) container=$2; shift 2 ;;
    --big) big=$2; shift 2 ;;
    --big-size) big_mib=$2; shift 2 ;;
    --binary) binary=$2; shift 2 ;;
    --extra-only) extra_only=1; shift ;;
    -h | --help) sed -n '4,16s/^# \{0,1\}//p' "$0"; exit 0 ;;
    *) echo "bench/agent.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
if ((!extra_only)) && [[ -f $cluster_dir/cluster.env ]]; then
  # shellcheck disable=SC1091
  source "$cluster_dir/cluster.env"
fi
if ((extra_only)); then store=${store:-/nonexistent}; else
  store=${store:-${STORE_DIR:?no --store and no STORE_DIR in $cluster_dir/cluster.env}}
fi
container=${container:-${DATABASE_CONTAINER:-deis-database}}
big=${big:-/tmp/deis-backup-bench-big}

(cd "$repo" && cargo build -q --release -p deis-backup-agent --bin deis-backup-agent --example pull)
pull=$repo/target/release/examples/pull
work=$(mktemp -d /tmp/deis-backup-bench.XXXXXX)
agent_pid=''
cleanup() {
  [[ -n $agent_pid ]] && kill "$agent_pid" 2>/dev/null && wait "$agent_pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

if ((!extra_only)) && [[ ! -d $big ]]; then
  echo "generating $big ($big_mib MiB)" >&2
  mkdir -p "$big/text" "$big/random"
  half=$((big_mib / 2))
  # Text: log-like lines, 64 MiB per file; random: 64 MiB per file.
  for ((i = 0; i < half / 64 + 1; i++)); do
    awk -v seed="$i" 'BEGIN { srand(seed); for (n = 0; n < 760000; n++)
      printf "2016-02-29T12:%02d:%02d deis-router[%d]: GET /apps/app-%d/releases HTTP/1.1 200 %d %.3f\n",
        n % 60, (n / 60) % 60, 1000 + n % 7, int(rand() * 500), int(rand() * 90000), rand() }' >"$big/text/log-$i.log"
    head -c $((64 << 20)) /dev/urandom >"$big/random/slug-$i.tar"
  done
fi

# The sparse and xattr trees: a 512 MiB file of holes with a 4-byte tail; 10,000 small files with
# a user xattr each.
sparse_dir=$work/sparse xattr_dir=$work/xattr
mkdir -p "$sparse_dir" "$xattr_dir"
truncate -s 512M "$sparse_dir/s"
printf tail >>"$sparse_dir/s"
python3 - "$xattr_dir" <<'PY'
import os, sys
d = sys.argv[1]
for i in range(10000):
    p = os.path.join(d, f"f{i:05d}")
    with open(p, "w") as f:
        f.write(f"file {i}\n")
    os.setxattr(p, "user.deis.app", f"app-{i % 97}".encode())
PY

now() { date +%s.%N; }
elapsed() { echo "$2 - $1" | bc; }
size_of() { du -sb "$1" | cut -f1; }

# --- the agent, release build, on a free port
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
export DEIS_BACKUP_TOKEN=bench-token-$RANDOM$RANDOM$RANDOM
# Plain HTTP/2 on the loopback only: `pull` speaks no TLS.
"$binary" --listen "127.0.0.1:$port" --insecure-plaintext --no-register --host-id bench \
  --database-container "$container" \
  --store-path "$store" --store-path "$big" --store-path "$sparse_dir" --store-path "$xattr_dir" \
  2>"$work/agent.log" &
agent_pid=$!
for _ in $(seq 100); do (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done

# best TIME_VAR CMD... — the fastest of three runs (the machine may be shared), in seconds.
best() {
  local var=$1 b='' t0 t i
  shift
  for i in 1 2 3; do
    t0=$(now)
    "$@"
    t=$(elapsed "$t0" "$(now)")
    if [[ -z $b ]] || (($(echo "$t < $b" | bc))); then b=$t; fi
  done
  printf -v "$var" '%s' "$b"
}
archive_gz() { tar -C "$1" -cpzf "$work/$2.tgz" . 2>/dev/null || true; }
archive_zst() { { tar -C "$1" -cf - . 2>/dev/null || true; } | zstd -q -f -T0 -3 -o "$work/$2.tar.zst"; }
archive_agent() { "$pull" "127.0.0.1:$port" archive "$1" >"$work/$2.agent.tar.zst" 2>"$work/$2.trailer"; }
dump_exec() { docker exec -u postgres "$container" pg_dumpall >"$work/dump.sql"; }
dump_agent() { "$pull" "127.0.0.1:$port" dump >"$work/dump.sql.zst" 2>"$work/dump.trailer"; }

ticks=$(getconf CLK_TCK)
# CPU seconds (user + sys) of the agent, and of this shell's children reaped so far.
agent_cpu() { awk -v t="$ticks" '{ printf "%.2f", ($14 + $15) / t }' "/proc/$agent_pid/stat"; }
children_cpu() { awk -v t="$ticks" '{ printf "%.2f", ($16 + $17) / t }' "/proc/$1/stat"; }
# timed WALL_VAR CPU_VAR CMD... — best of three by wall time, in seconds; CPU is that run's
# user + sys, the command's processes and the agent's together.
timed() {
  local wv=$1 cv=$2 b='' bc='' t0 c0 a0 t c i me=$BASHPID
  shift 2
  for i in 1 2 3; do
    a0=$(agent_cpu) c0=$(children_cpu "$me") t0=$(now)
    "$@"
    t=$(elapsed "$t0" "$(now)")
    c=$(echo "$(children_cpu "$me") - $c0 + $(agent_cpu) - $a0" | bc)
    if [[ -z $b ]] || (($(echo "$t < $b" | bc))); then b=$t bc=$c; fi
  done
  printf -v "$wv" '%s' "$b"
  printf -v "$cv" '%s' "$bc"
}
sparse_zst() { tar -C "$1" -S -cf - . | zstd -q -f -T0 -3 -o "$work/$2.tar.zst"; }
xattr_zst() { tar -C "$1" --xattrs -cf - . | zstd -q -f -T0 -3 -o "$work/$2.tar.zst"; }

extra_rows() {
  local ts cs ts_ref cs_ref tx cx tx_ref cx_ref
  { tar -C "$sparse_dir" -S -cf - . ; tar -C "$xattr_dir" -cf - .; } | cat >/dev/null
  timed ts cs archive_agent "$sparse_dir" sparse
  timed ts_ref cs_ref sparse_zst "$sparse_dir" sparse
  timed tx cx archive_agent "$xattr_dir" xattr
  timed tx_ref cx_ref xattr_zst "$xattr_dir" xattr
  kib() { echo "scale=1; $(stat -c %s "$1") / 1024" | bc; }
  cat <<ROWS
| archive of a 512 MiB sparse file with a 4-byte tail vs \`tar -S -c \| zstd -T0 -3\` | ${ts}s, ${cs} CPU s, $(kib "$work/sparse.agent.tar.zst") KiB | ${ts_ref}s, ${cs_ref} CPU s, $(kib "$work/sparse.tar.zst") KiB | $(ratio "$ts_ref" "$ts")× as fast | ≥ 0.9× |
| archive of 10,000 files with a user xattr each vs \`tar --xattrs -c \| zstd -T0 -3\` | ${tx}s, ${cx} CPU s, $(kib "$work/xattr.agent.tar.zst") KiB | ${tx_ref}s, ${cx_ref} CPU s, $(kib "$work/xattr.tar.zst") KiB | $(ratio "$tx_ref" "$tx")× as fast | ≥ 0.9× |
ROWS
}

ratio() { echo "scale=2; $1 / $2" | bc; }
if ((extra_only)); then
  echo "| measure | agent | reference | ratio | target |"
  echo "| --- | --- | --- | --- | --- |"
  extra_rows
  echo "sparse trailer: $(cat "$work/sparse.trailer")" >&2
  echo "xattr trailer: $(cat "$work/xattr.trailer")" >&2
  echo "load average during the run: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
  echo "machine: $(nproc) CPUs, $(uname -r)" >&2
  exit 0
fi

# Every contender reads from the page cache: one untimed read of each tree first.
{ tar -C "$store" -cf - . 2>/dev/null || true; } | cat >/dev/null
{ tar -C "$big" -cf - . 2>/dev/null || true; } | cat >/dev/null
best t_gz archive_gz "$store" store
best t_zst archive_zst "$store" store
best t_agent archive_agent "$store" store
best tb_gz archive_gz "$big" big
best tb_zst archive_zst "$big" big
best tb_agent archive_agent "$big" big
best t_exec dump_exec
best t_dump dump_agent
extra_rows >"$work/extra.md"

# Peak RSS: a fresh agent streams --big once (VmHWM is the peak since it started).
kill "$agent_pid"; wait "$agent_pid" 2>/dev/null || true
"$binary" --listen "127.0.0.1:$port" --insecure-plaintext --no-register --host-id bench \
  --database-container "$container" --store-path "$big" 2>>"$work/agent.log" &
agent_pid=$!
for _ in $(seq 100); do (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
t0=$(now); archive_agent "$big" rss; t_rss=$(elapsed "$t0" "$(now)")
hwm_kib=$(awk '/VmHWM/{print $2}' "/proc/$agent_pid/status")

mib() { echo "scale=1; $1 / 1048576" | bc; }
store_bytes=$(size_of "$store")
big_bytes=$(size_of "$big")
mibf() { mib "$(stat -c %s "$1")"; }
cat <<TABLE
| measure | agent | reference | ratio | target |
| --- | --- | --- | --- | --- |
| archive of $store ($(mib "$store_bytes") MiB) vs \`tar cpzf\` | ${t_agent}s, $(mibf "$work/store.agent.tar.zst") MiB | ${t_gz}s, $(mibf "$work/store.tgz") MiB | $(ratio "$t_gz" "$t_agent")× as fast | ≥ 8× |
| same vs \`tar -c \| zstd -T0 -3\` | ${t_agent}s | ${t_zst}s, $(mibf "$work/store.tar.zst") MiB | $(ratio "$t_zst" "$t_agent")× as fast | ≥ 0.9× |
| archive of $big ($(mib "$big_bytes") MiB) vs \`tar cpzf\` | ${tb_agent}s, $(mibf "$work/big.agent.tar.zst") MiB | ${tb_gz}s, $(mibf "$work/big.tgz") MiB | $(ratio "$tb_gz" "$tb_agent")× as fast | ≥ 8× |
| same vs \`tar -c \| zstd -T0 -3\` | ${tb_agent}s | ${tb_zst}s, $(mibf "$work/big.tar.zst") MiB | $(ratio "$tb_zst" "$tb_agent")× as fast | ≥ 0.9× |
| dump of $container ($(mibf "$work/dump.sql") MiB of SQL) vs \`docker exec … pg_dumpall > file\` | ${t_dump}s, $(mibf "$work/dump.sql.zst") MiB | ${t_exec}s | $(ratio "$t_dump" "$t_exec")× the time | ≤ 1.1× |
| agent peak RSS (VmHWM) streaming $big ($(mib "$big_bytes") MiB in ${t_rss}s) | $(echo "scale=1; $hwm_kib / 1024" | bc) MiB | | | ≤ 64 MiB |
TABLE
cat "$work/extra.md"
echo "archive trailer: $(cat "$work/store.trailer")" >&2
echo "dump trailer: $(cat "$work/dump.trailer")" >&2
echo "big trailer: $(cat "$work/big.trailer")" >&2
echo "load average during the run: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
echo "machine: $(nproc) CPUs, $(uname -r)" >&2
