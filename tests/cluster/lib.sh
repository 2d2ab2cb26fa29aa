# shellcheck shell=bash
# Shared helpers for the local Deis-like cluster scripts (sourced, never run).
#
# Invariants:
# - Every piece of state lives under $D (DEIS_CLUSTER_DIR, default /tmp/deis-backup-cluster).
# - Every daemon is started in its own session (setsid) with its PID recorded in $D/run/<name>.pid
#   and the process's start time beside it (<name>.started); it is stopped by that PID only, never by
#   name, and only while the PID is still that process. A record left by a restarted machine, or
#   whose PID another process now has, counts as stopped and is dropped.
# - Every wait has a timeout; a component that does not come up is a failure with its log tail printed.
# - Progress goes to stderr; stdout is reserved for the KEY=value lines printed by `up`.

set -euo pipefail

CLUSTER_LIB_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export D=${DEIS_CLUSTER_DIR:-/tmp/deis-backup-cluster}
# small: quick tests; large: benchmarks. Read by every seeding step.
export CLUSTER_SIZE=${DEIS_CLUSTER_SIZE:-small}
# Python tools (s3 seeding, peers for benchmarks) live outside $D so `down` keeps them.
export TOOLS_VENV=${DEIS_TOOLS_VENV:-$HOME/.cache/deis-backup/venv}

# Fixed loopback endpoints, as Deis publishes them.
export ETCD_CLIENT_PORTS="4001 2379"
export ETCD_PEER_PORT=${DEIS_ETCD_PEER_PORT:-2380}
export GATEWAY_HOST=127.0.0.1
export GATEWAY_PORT=${DEIS_GATEWAY_PORT:-8888}
export DATABASE_CONTAINER=${DEIS_DATABASE_CONTAINER:-deis-database}
export DATABASE_IMAGE=${DEIS_DATABASE_IMAGE:-deis-database:local}
export DATABASE_PORT=${DEIS_DATABASE_PORT:-5432}
export STORE_DIR=$D/store

case "$CLUSTER_SIZE" in small | large) ;; *)
  echo "DEIS_CLUSTER_SIZE must be small or large, not '$CLUSTER_SIZE'" >&2
  exit 2
  ;;
esac

log() { printf '[cluster %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}

# wait_for SECONDS DESCRIPTION CMD... — polls CMD every 0.2 s until it succeeds or time runs out.
wait_for() {
  local secs=$1 what=$2
  shift 2
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
      log "timed out after ${secs}s waiting for $what"
      return 1
    fi
    sleep 0.2
  done
}

# pid_running PID — the process exists and is not a zombie. (A daemon whose parent, `up`, has exited is
# reaped by PID 1, which here can take a second or more: until then kill -0 still succeeds.)
pid_running() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  [[ ${stat:0:1} != Z ]]
}

# pid_started PID — the process's start time (clock ticks after boot, /proc/PID/stat field 22).
pid_started() {
  local stat fields
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  read -ra fields <<<"${stat##*) }"
  echo "${fields[19]}"
}

# daemon_pid NAME — prints the PID recorded for NAME while it is still the process started as NAME
# (running, same start time). Otherwise forgets the record and fails.
daemon_pid() {
  local f=$D/run/$1.pid pid
  [[ -s $f ]] || return 1
  pid=$(cat "$f")
  if pid_running "$pid" && [[ -s $D/run/$1.started && $(pid_started "$pid") == "$(cat "$D/run/$1.started")" ]]; then
    echo "$pid"
    return 0
  fi
  rm -f "$f" "$D/run/$1.started"
  return 1
}

# pid_alive NAME — the daemon recorded as NAME is running.
pid_alive() { daemon_pid "$1" >/dev/null; }

# start_daemon NAME CMD... — runs CMD in its own session, output to $D/log/NAME.out, PID to $D/run/NAME.pid.
# The daemon inherits no descriptor beyond stdin/stdout/stderr: one that kept the caller's $D.lock
# open would hold the cluster lock for as long as it runs.
start_daemon() {
  local name=$1
  shift
  mkdir -p "$D/run" "$D/log"
  (
    local fd
    for fd in /proc/$BASHPID/fd/*; do
      fd=${fd##*/}
      if ((fd > 2)); then eval "exec $fd>&-"; fi
    done
    exec setsid "$@" >"$D/log/$name.out" 2>&1 </dev/null
  ) &
  echo $! >"$D/run/$name.pid"
  pid_started $! >"$D/run/$name.started"
}

# stop_daemon NAME [SIGNAL] — stops the recorded PID (TERM, then KILL after 10 s) and forgets it.
stop_daemon() {
  local name=$1 sig=${2:-${SIG:-TERM}} pid
  pid=$(daemon_pid "$name") || return 0
  kill "-$sig" "$pid" 2>/dev/null || true
  local deadline=$((SECONDS + 10))
  while pid_running "$pid" && ((SECONDS < deadline)); do sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$D/run/$name.pid" "$D/run/$name.started"
}

# show_log NAME — last lines of a daemon's output, for failure messages.
show_log() { tail -n 30 "$D/log/$1.out" >&2 2>/dev/null || true; }

# etcd_put KEY VALUE — v2 API write (the same API Deis components use).
etcd_put() {
  curl -fsS -X PUT "http://127.0.0.1:4001/v2/keys$1" --data-urlencode "value=$2" >/dev/null
}

# need_cmds CMD... — names of the given commands that are missing.
missing_cmds() {
  local c
  for c in "$@"; do command -v "$c" >/dev/null 2>&1 || echo "$c"; done
}

# database_password — prints the postgres superuser password of this cluster. The first call creates
# $D/secrets/database-password (mode 600, random); concurrent first calls agree (first link wins).
database_password() {
  local f=$D/secrets/database-password tmp
  if [[ ! -s $f ]]; then
    mkdir -p "$D/secrets"
    chmod 700 "$D/secrets"
    tmp=$(mktemp "$D/secrets/.database-password.XXXXXX")
    head -c 24 /dev/urandom | base64 | tr -d '/+=\n' | head -c 24 >"$tmp"
    ln "$tmp" "$f" 2>/dev/null || true
    rm -f "$tmp"
  fi
  cat "$f"
}

# etcd_put_file KEY FILE [TTL] — v2 API write of a file's exact bytes; keeps secrets off command lines.
etcd_put_file() {
  local ttl=()
  [[ -z ${3:-} ]] || ttl=(--data "ttl=$3")
  curl -fsS -X PUT "http://127.0.0.1:4001/v2/keys$1" --data-urlencode "value@$2" "${ttl[@]}" >/dev/null
}

# etcd_put_ttl KEY VALUE TTL — v2 API write of a key that expires unless written again (Deis' publishers).
etcd_put_ttl() {
  curl -fsS -X PUT "http://127.0.0.1:4001/v2/keys$1" --data-urlencode "value=$2" --data "ttl=$3" >/dev/null
}

# elapsed_since T0 — seconds (2 decimals) since T0, a value of $EPOCHREALTIME.
elapsed_since() {
  local now=${EPOCHREALTIME/[.,]/} then=${1/[.,]/} us
  us=$((10#$now - 10#$then))
  printf '%d.%02d' $((us / 1000000)) $((us % 1000000 / 10000))
}

# hold_cluster_lock SCRIPT ARGS... — makes the calling script (up, down) run alone for this $D: re-executes
# it under an exclusive flock on $D.lock, held by flock itself (-o) so daemons started meanwhile never
# inherit the lock. Returns at once inside the re-executed script.
hold_cluster_lock() {
  if [[ ${DEIS_CLUSTER_LOCK_HELD:-} == "$D" ]]; then
    unset DEIS_CLUSTER_LOCK_HELD
    return 0
  fi
  mkdir -p "$(dirname "$D")"
  DEIS_CLUSTER_LOCK_HELD=$D exec flock -o -w 1800 "$D.lock" "$@"
}

# hold_lock LOCKFILE [--shared-cluster] SCRIPT ARGS... — hold_cluster_lock for any lock file: re-executes
# SCRIPT under an exclusive flock on LOCKFILE (held by flock itself, -o). With --shared-cluster, also
# under a shared flock on $D.lock, so it never runs while `up` or `down` of the cluster does.
# Returns at once inside the re-executed script.
hold_lock() {
  local lock=$1
  shift
  if [[ ${DEIS_LOCK_HELD:-} == "$lock" ]]; then
    unset DEIS_LOCK_HELD
    return 0
  fi
  mkdir -p "$(dirname "$lock")"
  if [[ ${1:-} == --shared-cluster ]]; then
    shift
    DEIS_LOCK_HELD=$lock exec flock -o -s -w 1800 "$D.lock" flock -o -w 1800 "$lock" "$@"
  fi
  DEIS_LOCK_HELD=$lock exec flock -o -w 1800 "$lock" "$@"
}

# free_port RESERVED... — prints a loopback TCP port in 20000-29999 that nothing listens on and that
# is not among RESERVED (ports handed out but maybe not bound yet). Callers serialise with a lock.
free_port() {
  python3 - "$@" <<'PY'
import random, socket, sys
reserved = {int(p) for p in sys.argv[1:] if p.isdigit()}
candidates = [p for p in range(20000, 30000) if p not in reserved]
random.shuffle(candidates)
for port in candidates:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            continue
    print(port)
    break
else:
    sys.exit("no free port in 20000-29999")
PY
}

# etcd_put_at ENDPOINT KEY VALUE / etcd_put_file_at ENDPOINT KEY FILE — etcd_put / etcd_put_file
# against another etcd (a target cluster's).
etcd_put_at() {
  curl -fsS -X PUT "$1/v2/keys$2" --data-urlencode "value=$3" >/dev/null
}
etcd_put_file_at() {
  curl -fsS -X PUT "$1/v2/keys$2" --data-urlencode "value@$3" >/dev/null
}
