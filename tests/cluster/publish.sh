# shellcheck shell=bash
# What the cluster tells etcd, as the Deis v1 components do, and what its gateway holds (sourced after
# lib.sh and ceph.sh).
#
# Owns: the /deis/... and /coreos.com/... keys below, the `etcd-publisher` daemon that keeps the TTL'd
# ones alive, the seed of the gateway's buckets (seed_gateway.py; markers $D/seeded-gateway-<size>,
# manifests $D/seed/gateway-<size>.json).
# Invariants:
# - Key names, values and TTLs are those of Deis v1.13: settings without TTL; what a running component
#   announces (gateway host/port, hosts/<ip>, masterLocks, database host/port, /deis/services) with
#   TTL $ETCD_TTL, rewritten every TTL/2 by etcd-publisher, as the components' boot scripts do.
# - Cluster-specific values are made once per cluster: S3 keys by radosgw (ceph.sh), the postgres
#   password (database_password), /deis/database/initId (created only when absent).
# - Secrets go to etcd from files (never on a command line, never to stdout/stderr).
# - publish_gateway can run again at any time: it writes the same state.

ETCD_TTL=${DEIS_ETCD_TTL:-10}
DEIS_DOMAIN=local3.deisapp.com
# Application containers announced by Deis' publisher: /deis/services/<app>/<container> = host:port.
DEIS_SERVICES=(
  "go-example/go-example_v2.web.1=127.0.0.1:32768"
  "go-example/go-example_v2.web.2=127.0.0.1:32769"
  "ruby-worker/ruby-worker_v5.worker.1=127.0.0.1:32770"
)

# etcd_mk KEY VALUE — create KEY only if absent (etcdctl mk); an existing value is kept.
etcd_mk() {
  local code
  code=$(curl -sS -o /dev/null -w '%{http_code}' -X PUT "http://127.0.0.1:4001/v2/keys$1?prevExist=false" \
    --data-urlencode "value=$2")
  [[ $code == 201 || $code == 412 ]] || die "etcd mk $1 answered HTTP $code"
}

# ttl_keys_publish — one round of what running components announce (all with TTL $ETCD_TTL).
ttl_keys_publish() {
  local gw=/deis/store/gateway entry
  etcd_put_ttl "$gw/masterLock" "$GATEWAY_HOST" "$ETCD_TTL"
  etcd_put_ttl "$gw/host" "$GATEWAY_HOST" "$ETCD_TTL"
  etcd_put_ttl "$gw/port" "$GATEWAY_PORT" "$ETCD_TTL"
  etcd_put_ttl "$gw/hosts/$GATEWAY_HOST/host" "$GATEWAY_HOST" "$ETCD_TTL"
  etcd_put_ttl "$gw/hosts/$GATEWAY_HOST/port" "$GATEWAY_PORT" "$ETCD_TTL"
  etcd_put_ttl /deis/database/host 127.0.0.1 "$ETCD_TTL"
  etcd_put_ttl /deis/database/port "$DATABASE_PORT" "$ETCD_TTL"
  etcd_put_ttl /deis/registry/masterLock 127.0.0.1 "$ETCD_TTL"
  for entry in "${DEIS_SERVICES[@]}"; do
    etcd_put_ttl "/deis/services/${entry%%=*}" "${entry#*=}" "$ETCD_TTL"
  done
}

# ttl_keys_loop — the body of the etcd-publisher daemon: a round every TTL/2 until stopped.
ttl_keys_loop() {
  local sleeper=
  trap 'kill "$sleeper" 2>/dev/null; exit 0' TERM INT
  while :; do
    ttl_keys_publish || log "etcd-publisher: a write failed; retrying in $((ETCD_TTL / 2)) s"
    sleep $((ETCD_TTL / 2)) &
    sleeper=$!
    wait "$sleeper" || true
  done
}

publish_gateway() {
  local t0=$EPOCHREALTIME secrets=$D/secrets
  [[ -s $GATEWAY_ACCESS_KEY_FILE && -s $GATEWAY_SECRET_KEY_FILE ]] ||
    die "no gateway keys in $secrets (ceph_up makes them)"
  database_password >/dev/null # makes the password file on first use

  # store-gateway: the S3 keys of user `deis`
  etcd_put_file /deis/store/gateway/accessKey "$GATEWAY_ACCESS_KEY_FILE"
  etcd_put_file /deis/store/gateway/secretKey "$GATEWAY_SECRET_KEY_FILE"
  # store-monitor / store-daemon / store-metadata: the Ceph cluster's own settings
  (umask 077 && awk '/^\[/ { p = ($0 == "[client.admin]") } p' "$CEPH_DIR/keyring" >"$secrets/ceph-admin-keyring")
  etcd_put_file /deis/store/adminKeyring "$secrets/ceph-admin-keyring"
  etcd_put /deis/store/fsid "$(sed -n 's/^fsid = //p' "$CEPH_CONF")"
  etcd_put /deis/store/monSetupComplete youBetcha
  etcd_put /deis/store/monSetupLock 127.0.0.1
  etcd_put /deis/store/filesystemSetupComplete youBetcha
  etcd_put /deis/store/size 1
  etcd_put /deis/store/minSize 1
  etcd_put /deis/store/pgNum 8
  etcd_put "/deis/store/hosts/127.0.0.1" "$(hostname)"
  etcd_put "/deis/store/osds/127.0.0.1" 0
  # database
  etcd_put /deis/database/bucketName db_wal
  etcd_put /deis/database/adminUser postgres
  etcd_put_file /deis/database/adminPass "$secrets/database-password"
  etcd_put /deis/database/initialBackup 0
  etcd_mk /deis/database/initId "$(uuidgen)"
  # registry, router, controller, platform
  etcd_put /deis/registry/bucketName registry
  etcd_put /deis/router/bodySize 1m
  etcd_put /deis/router/gzip on
  etcd_put /deis/controller/registrationMode enabled
  etcd_put /deis/controller/webEnabled 0
  etcd_put /deis/platform/domain "$DEIS_DOMAIN"
  # CoreOS: flannel's network and a host lease (24 h TTL, as flannel), locksmith's reboot semaphore
  etcd_put /coreos.com/network/config '{"Network":"10.244.0.0/16","SubnetLen":24,"Backend":{"Type":"vxlan"}}'
  etcd_put_ttl /coreos.com/network/subnets/10.244.35.0-24 \
    '{"PublicIP":"127.0.0.1","BackendType":"vxlan","BackendData":{"VtepMAC":"0a:58:0a:f4:23:00"}}' 86400
  etcd_put /coreos.com/updateengine/rebootlock/semaphore '{"semaphore":1,"max":1,"holders":null}'
  # what running components announce, kept alive by etcd-publisher
  ttl_keys_publish
  if ! pid_alive etcd-publisher; then
    # shellcheck disable=SC2016 # expanded by the daemon's own bash
    start_daemon etcd-publisher bash -c 'source "$1/lib.sh" && source "$1/publish.sh" && ttl_keys_loop' \
      etcd-publisher "$CLUSTER_LIB_DIR"
  fi
  log "etcd: Deis keys published in $(elapsed_since "$t0") s (etcd-publisher pid $(cat "$D/run/etcd-publisher.pid"))"
}

# publish_down — always TERM (instant): its trap also ends the pending `sleep`, which KILL would orphan.
publish_down() { stop_daemon etcd-publisher TERM; }

# seed_gateway — fills the buckets with the deterministic seed of $CLUSTER_SIZE, once per store
# (ceph_up forgets the marker when it rebuilds the store). Seeding one size removes the other's
# objects, so the buckets hold exactly what $D/seed/gateway-<size>.json lists. The registry bucket is
# etcd's; the WAL-E-shaped objects go to etcd's database bucket for the plain database flavour, and
# to $SYNTHETIC_WAL_BUCKET for wal-e, whose database writes db_wal itself (database.sh).
SYNTHETIC_WAL_BUCKET=db_wal_synthetic
seed_gateway() {
  local marker=$D/seeded-gateway-$CLUSTER_SIZE t0=$EPOCHREALTIME into=()
  if [[ ${DATABASE_FLAVOUR:-plain} == wal-e ]]; then into=(--database-bucket "$SYNTHETIC_WAL_BUCKET"); fi
  if [[ -e $marker ]]; then
    log "gateway: seed '$CLUSTER_SIZE' already there"
    return 0
  fi
  rm -f "$D"/seeded-gateway-* "$D"/seed/gateway-*
  mkdir -p "$D/seed"
  "$TOOLS_VENV/bin/python" "$CLUSTER_LIB_DIR/seed_gateway.py" --size "$CLUSTER_SIZE" "${into[@]}" \
    --manifest "$D/seed/gateway-$CLUSTER_SIZE.json" --marker "$marker" >&2 ||
    die "seeding the gateway failed"
  log "gateway: seeded '$CLUSTER_SIZE' in $(elapsed_since "$t0") s"
}
