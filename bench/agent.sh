#!/usr/bin/env bash
# Agent benchmarks: ratios measured in one run on one machine (not timed tests).
#
# Usage: bench/agent.sh [--cluster-dir DIR] [--store DIR] [--container NAME] [--big DIR]
#                       [--big-size MiB] [--binary PATH]
#   --cluster-dir  the local cluster's state (default /tmp/deis-backup-cluster); its cluster.env gives
#                  STORE_DIR and DATABASE_CONTAINER unless --store / --container are given
#   --store        directory to archive (the seeded store)
#   --container    database container to dump
#   --big          directory streamed for the peak-RSS figure; created with --big-size MiB of
#                  half text, half random data when it does not exist (default: generated under
#                  /tmp/deis-backup-bench-big, 1100 MiB)
#   --binary       the agent (default target/release/deis-backup-agent; the pull example is built)
#
# Prints a Markdown table: archive (of --store and of --big) vs `tar cpzf` and
# `tar -c | zstd -T0 -3`, dump vs `docker exec … pg_dumpall > file`, each the best of three runs
# from the page cache; agent peak RSS (VmHWM) while streaming --big. The agent is driven by the
# `pull` example (agent/examples/pull.rs), which verifies each stream's trailer.
# Targets: archive ≥ 8× tar cpzf and ≥ 0.9× tar|zstd (speed), dump ≤ 1.1× docker exec (time),
# RSS ≤ 64 MiB.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cluster_dir=/tmp/deis-backup-cluster store='' container='' big='' big_mib=1100
binary=$repo/target/release/deis-backup-agent
while (($#)); do
  case $1 in
    --cluster-dir) cluster_dir=$2; shift 2 ;;
    --store) store=$2; shift 2 ;;
    --container) container=$2; shift 2 ;;
    --big) big=$2; shift 2 ;;
    --big-size) big_mib=$2; shift 2 ;;
    --binary) binary=$2; shift 2 ;;
    -h | --help) sed -n '4,15s/^# \{0,1\}//p' "$0"; exit 0 ;;
    *) echo "bench/agent.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
if [[ -f $cluster_dir/cluster.env ]]; then
  # shellcheck disable=SC1091
  source "$cluster_dir/cluster.env"
fi
store=${store:-${STORE_DIR:?no --store and no STORE_DIR in $cluster_dir/cluster.env}}
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

if [[ ! -d $big ]]; then
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

now() { date +%s.%N; }
elapsed() { echo "$2 - $1" | bc; }
size_of() { du -sb "$1" | cut -f1; }

# --- the agent, release build, on a free port
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
export DEIS_BACKUP_TOKEN=bench-token-$RANDOM$RANDOM$RANDOM
"$binary" --listen "127.0.0.1:$port" --no-register --host-id bench --database-container "$container" \
  --store-path "$store" --store-path "$big" 2>"$work/agent.log" &
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

# Peak RSS: a fresh agent streams --big once (VmHWM is the peak since it started).
kill "$agent_pid"; wait "$agent_pid" 2>/dev/null || true
"$binary" --listen "127.0.0.1:$port" --no-register --host-id bench --database-container "$container" \
  --store-path "$big" 2>>"$work/agent.log" &
agent_pid=$!
for _ in $(seq 100); do (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
t0=$(now); archive_agent "$big" rss; t_rss=$(elapsed "$t0" "$(now)")
hwm_kib=$(awk '/VmHWM/{print $2}' "/proc/$agent_pid/status")

ratio() { echo "scale=2; $1 / $2" | bc; }
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
echo "archive trailer: $(cat "$work/store.trailer")" >&2
echo "dump trailer: $(cat "$work/dump.trailer")" >&2
echo "big trailer: $(cat "$work/big.trailer")" >&2
echo "load average during the run: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
echo "machine: $(nproc) CPUs, $(uname -r)" >&2
