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
# Prints a Markdown table: archive vs `tar cpzf` and `tar -c | zstd -T0 -3`, dump vs
# `docker exec … pg_dumpall > file`, agent peak RSS (VmHWM) while streaming --big.
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
sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true

# Each contender reads the tree once first so all run from the page cache.
tar -C "$store" -cf - . >/dev/null
t0=$(now); tar -C "$store" -cpzf "$work/store.tgz" . 2>/dev/null || true; t_gz=$(elapsed "$t0" "$(now)")
t0=$(now); tar -C "$store" -cf - . 2>/dev/null | zstd -q -T0 -3 -o "$work/store.tar.zst"; t_zst=$(elapsed "$t0" "$(now)")
t0=$(now); "$pull" "127.0.0.1:$port" archive "$store" >"$work/store.agent.tar.zst" 2>"$work/archive.trailer"; t_agent=$(elapsed "$t0" "$(now)")

docker exec -u postgres "$container" pg_dumpall >/dev/null
t0=$(now); docker exec -u postgres "$container" pg_dumpall >"$work/dump.sql"; t_exec=$(elapsed "$t0" "$(now)")
t0=$(now); "$pull" "127.0.0.1:$port" dump >"$work/dump.sql.zst" 2>"$work/dump.trailer"; t_dump=$(elapsed "$t0" "$(now)")

# Peak RSS: a fresh agent streams --big (VmHWM is the peak since it started).
kill "$agent_pid"; wait "$agent_pid" 2>/dev/null || true
"$binary" --listen "127.0.0.1:$port" --no-register --host-id bench --database-container "$container" \
  --store-path "$big" 2>>"$work/agent.log" &
agent_pid=$!
for _ in $(seq 100); do (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
t0=$(now); "$pull" "127.0.0.1:$port" archive "$big" >/dev/null 2>"$work/big.trailer"; t_big=$(elapsed "$t0" "$(now)")
hwm_kib=$(awk '/VmHWM/{print $2}' "/proc/$agent_pid/status")

ratio() { echo "scale=2; $1 / $2" | bc; }
mib() { echo "scale=1; $1 / 1048576" | bc; }
store_bytes=$(size_of "$store")
big_bytes=$(size_of "$big")
cat <<TABLE
| measure | agent | reference | ratio | target |
| --- | --- | --- | --- | --- |
| archive of $store ($(mib "$store_bytes") MiB) vs \`tar cpzf\` | ${t_agent}s, $(mib "$(stat -c %s "$work/store.agent.tar.zst")") MiB | ${t_gz}s, $(mib "$(stat -c %s "$work/store.tgz")") MiB | $(ratio "$t_gz" "$t_agent")× faster | ≥ 8× |
| same vs \`tar -c \| zstd -T0 -3\` | ${t_agent}s | ${t_zst}s, $(mib "$(stat -c %s "$work/store.tar.zst")") MiB | $(ratio "$t_zst" "$t_agent")× as fast | ≥ 0.9× |
| dump of $container ($(mib "$(stat -c %s "$work/dump.sql")") MiB of SQL) vs \`docker exec … pg_dumpall > file\` | ${t_dump}s, $(mib "$(stat -c %s "$work/dump.sql.zst")") MiB | ${t_exec}s | $(ratio "$t_dump" "$t_exec")× the time | ≤ 1.1× |
| peak RSS (VmHWM) streaming $big ($(mib "$big_bytes") MiB, ${t_big}s) | $(echo "scale=1; $hwm_kib / 1024" | bc) MiB | | | ≤ 64 MiB |
TABLE
echo "archive trailer: $(cat "$work/archive.trailer")" >&2
echo "dump trailer: $(cat "$work/dump.trailer")" >&2
echo "big trailer: $(cat "$work/big.trailer")" >&2
echo "machine: $(nproc) CPUs, $(uname -r)" >&2
