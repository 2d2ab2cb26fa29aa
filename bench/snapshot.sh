#!/usr/bin/env bash
# Headline benchmark: the Deis docs' manual backup procedure, run as a script exactly as the docs
# give it (one step after another: `s3cmd sync` of both gateway buckets with SigV2, `tar cpzf` of the
# store directory, `docker exec deis-database sudo -u postgres pg_dumpall`), against one
# `deis-backup snapshot`, on whatever cluster `tests/cluster/up` runs (use `--size large` for the
# figures in docs/BENCHMARKS.md); then both again with nothing changed.
#
# Usage: bench/snapshot.sh            (after tests/cluster/up --size large)
# Env: VENV (default ~/.cache/deis-backup/venv, holding s3cmd), BENCH_DIR (default
#      /tmp/deis-backup-bench-snapshot), DEIS_CLUSTER_DIR (default /tmp/deis-backup-cluster).
#
# Builds the release binaries, runs the agent as its container image, prints a Markdown table of
# seconds and ratios (procedure / deis-backup), and the same snapshots into an encrypted repository
# beside the plain one, and a restore of each onto a fresh target cluster (wall and CPU seconds of the
# coordinator). Secrets go to 0600 files, never to argv or stdout.
set -euo pipefail
shopt -s inherit_errexit

ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${VENV:-$HOME/.cache/deis-backup/venv}
W=${BENCH_DIR:-/tmp/deis-backup-bench-snapshot}
CLUSTER_ENV=${DEIS_CLUSTER_DIR:-/tmp/deis-backup-cluster}/cluster.env
[[ -f $CLUSTER_ENV ]] || { echo "no cluster: run tests/cluster/up --size large first" >&2; exit 1; }
# shellcheck disable=SC1090
source <(sed 's/^/export /' "$CLUSTER_ENV")
ETCD=${ETCD_ENDPOINTS%%,*}
S3CMD=$VENV/bin/s3cmd
[[ -x $S3CMD ]] || { echo "no s3cmd in $VENV (tests/cluster/up installs it)" >&2; exit 1; }

etcd_get() {
  curl -fsS "$ETCD/v2/keys$1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["node"]["value"])'
}
DB_BUCKET=$(etcd_get /deis/database/bucketName)
REG_BUCKET=$(etcd_get /deis/registry/bucketName)
GW=$(etcd_get /deis/store/gateway/host):$(etcd_get /deis/store/gateway/port)

echo "building release binaries" >&2
(cd "$ROOT" && cargo build --release --workspace --bins -q)
BIN=$ROOT/target/release/deis-backup

rm -rf "$W"
mkdir -p "$W/manual"
cleanup() {
  "$ROOT/tests/cluster/agent" down bench-source >/dev/null 2>&1 || true
  "$ROOT/tests/cluster/agent" down bench-target >/dev/null 2>&1 || true
  "$ROOT/tests/cluster/target" down benchtarget >/dev/null 2>&1 || true
  rm -rf "$W"
}
trap cleanup EXIT
(
  umask 077
  printf '%s\n' "[default]" \
    "access_key = $(etcd_get /deis/store/gateway/accessKey)" \
    "secret_key = $(etcd_get /deis/store/gateway/secretKey)" \
    "host_base = $GW" "host_bucket = $GW" "use_https = False" "signature_v2 = True" \
    "bucket_location = us-east-1" >"$W/s3cfg"
)
eval "$("$ROOT/tests/cluster/agent" up bench-source --etcd "$ETCD" --store "$STORE_DIR" --port 4292 \
  --database-container "$DATABASE_CONTAINER" --binary "$ROOT/target/release/deis-backup-agent" | sed 's/^/export /')"

# The coordinator's certificate, which tests/cluster/agent made with the cluster's CA.
export DEIS_BACKUP_TLS_CA=$AGENT_PKI_DIR/ca.pem DEIS_BACKUP_TLS_CERT=$AGENT_PKI_DIR/coordinator.pem \
  DEIS_BACKUP_TLS_KEY=$AGENT_PKI_DIR/coordinator.key

now() { date +%s.%N; }
# The procedure of the Deis docs, step by step, into $W/manual.
procedure() {
  local t0 rc=0
  t0=$(now)
  for b in "$DB_BUCKET" "$REG_BUCKET"; do
    mkdir -p "$W/manual/$b"
    "$S3CMD" -c "$W/s3cfg" --no-progress sync "s3://$b/" "$W/manual/$b/" >/dev/null
  done
  # tar exits 1 for "file changed as we read it" (the live logs), as the docs show.
  (cd "$STORE_DIR" && tar cpzf "$W/manual/store_file_backup.tar.gz" . 2>/dev/null) || rc=$?
  ((rc <= 1)) || { echo "tar failed ($rc)" >&2; exit 1; }
  docker exec "$DATABASE_CONTAINER" sudo -u postgres pg_dumpall >"$W/manual/dump_all.sql"
  echo "$(now) - $t0" | bc
}
# shellcheck source=lib.sh
source "$ROOT/bench/lib.sh"
# ours REPO OUT [ARGS...] — one snapshot into REPO, its JSON to OUT; prints "wall cpu".
ours() {
  local repo=$1 out=$2
  shift 2
  DEIS_BACKUP_TOKEN_FILE=$AGENT_TOKEN_FILE timed sh -c '"$@" >"$0"' "$out" "$BIN" snapshot \
    --etcd "$ETCD" --agent "$AGENT_NAME@$AGENT_ADDRESS" -r "$repo" --json "$@"
}
# restore_into REPO [ARGS...] — `restore latest --database-sql` of REPO onto a fresh target cluster
# (its etcd, gateway tenant, store, database and agent, gone afterwards); prints "wall cpu".
restore_into() {
  local repo=$1
  shift
  (
    eval "$("$ROOT/tests/cluster/target" up benchtarget | sed 's/^/export /')"
    "$ROOT/tests/cluster/agent" up bench-target --etcd "$TARGET_ETCD_ENDPOINTS" \
      --store "$TARGET_STORE_DIR" --port 4293 --database-container "$TARGET_DATABASE_CONTAINER" \
      --binary "$ROOT/target/release/deis-backup-agent" >/dev/null
    DEIS_BACKUP_TOKEN_FILE=$AGENT_TOKEN_FILE timed sh -c '"$@" >/dev/null' restore "$BIN" restore latest \
      --etcd "$TARGET_ETCD_ENDPOINTS" -r "$repo" --database-sql "$@"
  )
  "$ROOT/tests/cluster/agent" down bench-target >/dev/null 2>&1 || true
  "$ROOT/tests/cluster/target" down benchtarget >/dev/null 2>&1 || true
}
# A plain repository, and an encrypted one (an operator's age key; the host key only to write).
"$BIN" init --plain -r "$W/repository" >/dev/null
age-keygen -o "$W/operator.key" 2>/dev/null
age-keygen -y "$W/operator.key" >"$W/recipients.txt"
"$BIN" init -r "$W/encrypted" --recipients-file "$W/recipients.txt" --host-key-file "$W/host.key" >/dev/null
sealed=(--host-key-file "$W/host.key")

echo "first run: the procedure" >&2
p1=$(procedure)
echo "first run: deis-backup snapshot, plain and encrypted" >&2
read -r o1 c1 < <(ours "$W/repository" "$W/ours.json")
read -r e1 ec1 < <(ours "$W/encrypted" "$W/encrypted.json" "${sealed[@]}")
echo "nothing changed: the procedure" >&2
p2=$(procedure)
echo "nothing changed: deis-backup snapshot, plain and encrypted" >&2
read -r o2 c2 < <(ours "$W/repository" "$W/ours.json")
read -r e2 ec2 < <(ours "$W/encrypted" "$W/encrypted.json" "${sealed[@]}")
echo "restore onto a fresh cluster: plain and encrypted" >&2
# Captured whole first: each restore's target is gone before the next one's comes up.
restored=$(restore_into "$W/repository")
read -r r1 rc1 <<<"$restored"
restored=$(restore_into "$W/encrypted" --identity-file "$W/operator.key")
read -r r2 rc2 <<<"$restored"

sum() { python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(sum(b[sys.argv[2]] for b in d["buckets"].values()))' "$W/ours.json" "$1"; }
objects=$(sum objects)
downloaded=$(sum downloaded_objects)
bucket_bytes=$(du -sb --exclude=store_file_backup.tar.gz --exclude=dump_all.sql "$W/manual" | cut -f1)
store_bytes=$(du -sb "$STORE_DIR" | cut -f1)
dump_bytes=$(stat -c %s "$W/manual/dump_all.sql")
ratio() { printf '%.1fx' "$(echo "$1 / $2" | bc -l)"; }
secs() { printf '%.1f' "$1"; }
echo "Cluster: $CLUSTER_SIZE seed: $objects gateway objects ($((bucket_bytes / 1048576)) MiB), store $((store_bytes / 1048576)) MiB, pg_dumpall $((dump_bytes / 1048576)) MiB; $(nproc) cores."
echo
echo "| run | Deis docs' procedure (s) | deis-backup snapshot (s) | speed-up |"
echo "|---|---|---|---|"
echo "| first snapshot | $(secs "$p1") | $(secs "$o1") | $(ratio "$p1" "$o1") |"
echo "| nothing changed | $(secs "$p2") | $(secs "$o2") | $(ratio "$p2" "$o2") |"
echo
echo "Encrypted repository (age X25519 + zstd, keyed names; the coordinator's CPU, the agent's is the same):"
echo
echo "| run | plain: wall / CPU (s) | encrypted: wall / CPU (s) | encrypted / plain (wall) |"
echo "|---|---|---|---|"
echo "| first snapshot | $(secs "$o1") / $(secs "$c1") | $(secs "$e1") / $(secs "$ec1") | $(ratio "$e1" "$o1") |"
echo "| nothing changed | $(secs "$o2") / $(secs "$c2") | $(secs "$e2") / $(secs "$ec2") | $(ratio "$e2" "$o2") |"
echo "| restore --database-sql | $(secs "$r1") / $(secs "$rc1") | $(secs "$r2") / $(secs "$rc2") | $(ratio "$r2" "$r1") |"
echo
echo "The unchanged deis-backup run downloaded $downloaded of $objects objects; $(python3 - "$W/ours.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))["manifest"]
info, parts = m["part-info"], m["parts"]
db = info.get("database/pg_dumpall.sql.zst", {})
out = ["the database dump was " + ("reused (state unchanged)" if "taken-in" in db else "taken again")]
for name, p in parts.items():
    if name.startswith("store/"):
        out.append(f"{info[name].get('segments-reused', 0)} of {len(p['segments'])} store segments reused")
print("; ".join(out) + ".")
PY
)"
