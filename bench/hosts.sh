#!/usr/bin/env bash
# The three-host cluster beside the single-host one: what the three-host cluster costs (time to bring
# it up, memory of its daemons and containers) and a large snapshot on each, first and unchanged,
# taken by the same coordinator (wall and CPU seconds of the coordinator and its children).
#
# Usage: bench/hosts.sh            (after tests/cluster/up --size large --hosts 3)
# Env: BENCH_DIR (default /tmp/deis-backup-bench-hosts), DEIS_CLUSTER_DIR (default
#      /tmp/deis-backup-cluster).
#
# Builds the release binaries, runs one agent on the single-host cluster and one per host on the
# three-host cluster (each in its host's own Docker engine), and prints Markdown tables. Both clusters
# hold the same seed (the same size, the same seeding code); the three-host store is on CephFS
# (ceph-fuse), the single-host one on the machine's disk. Secrets stay in their 0600 files.
set -euo pipefail
shopt -s inherit_errexit

ROOT=$(cd "$(dirname "$0")/.." && pwd)
W=${BENCH_DIR:-/tmp/deis-backup-bench-hosts}
D=${DEIS_CLUSTER_DIR:-/tmp/deis-backup-cluster}
CLUSTER_ENV=$D/cluster.env
[[ -f $CLUSTER_ENV ]] && grep -q '^HOSTS_HOSTS=3$' "$CLUSTER_ENV" ||
  { echo "no three-host cluster: run tests/cluster/up --size large --hosts 3 first" >&2; exit 1; }
# shellcheck disable=SC1090
source <(sed 's/^/export /' "$CLUSTER_ENV")
ETCD=${ETCD_ENDPOINTS%%,*}

echo "building release binaries" >&2
(cd "$ROOT" && cargo build --release --workspace --bins -q)
BIN=$ROOT/target/release/deis-backup
AGENT_BIN=$ROOT/target/release/deis-backup-agent

IFS=, read -ra ADDRESSES <<<"$HOSTS_HOST_ADDRESSES"
IFS=, read -ra DOCKERS <<<"$HOSTS_HOST_DOCKERS"
IFS=, read -ra STORES <<<"$HOSTS_HOST_STORE_DIRS"

rm -rf "$W"
mkdir -p "$W"
cleanup() {
  "$ROOT/tests/cluster/agent" down bench-single >/dev/null 2>&1 || true
  local i
  for i in 0 1 2; do
    "$ROOT/tests/cluster/agent" down "bench-h$((i + 1))" --docker-host "${DOCKERS[$i]}" >/dev/null 2>&1 || true
  done
  rm -rf "$W"
}
trap cleanup EXIT

eval "$("$ROOT/tests/cluster/agent" up bench-single --etcd "$ETCD" --store "$STORE_DIR" --port 4293 \
  --database-container "$DATABASE_CONTAINER" --binary "$AGENT_BIN" | sed 's/^/export /')"
SINGLE=$AGENT_NAME@$AGENT_ADDRESS
MULTI=()
for i in 0 1 2; do
  eval "$("$ROOT/tests/cluster/agent" up "bench-h$((i + 1))" --etcd "$HOSTS_ETCD_ENDPOINTS" \
    --store "${STORES[$i]}" --port 4195 --address "${ADDRESSES[$i]}" --docker-host "${DOCKERS[$i]}" \
    --database-container "$HOSTS_DATABASE_CONTAINER" --binary "$AGENT_BIN" | sed 's/^/export /')"
  MULTI+=("$AGENT_NAME@$AGENT_ADDRESS")
done
export DEIS_BACKUP_TOKEN_FILE=$AGENT_TOKEN_FILE
export DEIS_BACKUP_TLS_CA=$AGENT_PKI_DIR/ca.pem DEIS_BACKUP_TLS_CERT=$AGENT_PKI_DIR/coordinator.pem \
  DEIS_BACKUP_TLS_KEY=$AGENT_PKI_DIR/coordinator.key

# shellcheck source=lib.sh
source "$ROOT/bench/lib.sh"
# snap ETCD AGENTS REPO OUT — one snapshot, its JSON to OUT; prints "wall cpu".
snap() {
  timed sh -c '"$@" >"$0"' "$4" "$BIN" snapshot --etcd "$1" --agent "$2" -r "$3" --json
}
# sizes OUT — "objects, GiB of objects, store raw MiB, dump raw MiB" of a snapshot's JSON.
sizes() {
  python3 - "$1" <<'PY'
import json, sys
o = json.load(open(sys.argv[1]))
m = o["manifest"]
objects = sum(b["objects"] for b in o["buckets"].values())
gib = sum(b["bytes"] for b in o["buckets"].values()) / 2**30
info = m["part-info"]
store = sum(i.get("raw-bytes", 0) for n, i in info.items() if n.startswith("store/")) / 2**20
dump = info.get("database/pg_dumpall.sql.zst", {}).get("raw-bytes", 0) / 2**20
stores = sum(1 for n in m["parts"] if n.startswith("store/"))
gw = ", ".join(f'{g["requests"]}' for g in o["gateways"])
print(f"{objects} objects, {gib:.2f} GiB; {stores} store archive(s), {store:.0f} MiB; dump {dump:.0f} MiB; requests per gateway {gw}")
PY
}

row() {
  local name=$1 etcd=$2 agents=$3 repo=$W/$1
  "$BIN" init --plain -r "$repo" >/dev/null
  local first unchanged
  first=$(snap "$etcd" "$agents" "$repo" "$W/$name-first.json")
  unchanged=$(snap "$etcd" "$agents" "$repo" "$W/$name-unchanged.json")
  echo "| $name | ${first% *} / ${first#* } | ${unchanged% *} / ${unchanged#* } | $(sizes "$W/$name-first.json") |"
}

echo
echo "| cluster | first snapshot: wall / CPU (s) | unchanged: wall / CPU (s) | what it held |"
echo "|---|---|---|---|"
row single "$ETCD" "$SINGLE"
row three-hosts "$HOSTS_ETCD_ENDPOINTS" "$(IFS=,; echo "${MULTI[*]}")"

# Memory of the three-host cluster: its daemons' process trees, and its containers (their shims' trees).
echo
python3 - "$D" <<'PY'
import os, re, sys
d = sys.argv[1]
children = {}
for p in os.listdir("/proc"):
    if p.isdigit():
        try:
            ppid = int(open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        children.setdefault(ppid, []).append(int(p))
def rss(pid):
    try:
        kb = int(re.search(r"VmRSS:\s+(\d+)", open(f"/proc/{pid}/status").read()).group(1))
    except (OSError, AttributeError):
        kb = 0
    return kb + sum(rss(c) for c in children.get(pid, []))
rows = []
run = f"{d}/run"
for f in sorted(os.listdir(run)):
    if f.endswith(".pid") and (f.startswith("hosts-") or f in ("target-hosts-etcd.pid", "cephfs-mds.pid", "cephfs-admin.pid")):
        rows.append((f[:-4], rss(int(open(f"{run}/{f}").read()))))
for h in ("h1", "h2", "h3"):
    exec_root = f"{d}/targets/hosts/hosts/{h}/docker/exec"
    kb = 0
    for p in {c for v in children.values() for c in v}:
        try:
            cmd = open(f"/proc/{p}/cmdline", "rb").read()
        except OSError:
            continue
        if b"containerd-shim" in cmd and exec_root.encode() in cmd:
            kb += rss(p)
    rows.append((f"containers on {h}", kb))
print("| three-host cluster part | RSS (MiB) |")
print("|---|---|")
for name, kb in rows:
    print(f"| {name} | {kb // 1024} |")
print(f"| **total** | **{sum(kb for _, kb in rows) // 1024}** |")
PY
