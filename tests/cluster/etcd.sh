# shellcheck shell=bash
# The cluster's etcd, as Deis v1 has it (sourced after lib.sh).
#
# Owns: the `etcd` daemon (PID $D/run/etcd.pid) and its data in $D/etcd.
# Invariants:
# - One member, v2 API enabled, clients on http://127.0.0.1:4001 and http://127.0.0.1:2379, peer on
#   127.0.0.1:$ETCD_PEER_PORT; only loopback.
# - etcd_up returns only once the v2 API answers (keys written, read back, TTLs honoured).
# - A running etcd of ours is reused with its data; one we did not start is never touched.

ETCD_NAME=deis-local

etcd_healthy() { curl -fs -m 2 -o /dev/null http://127.0.0.1:4001/v2/keys/; }

# etcd_check_v2 — a TTL'd write, and a recursive read that sees it, through the v2 API on both ports.
etcd_check_v2() {
  local port
  curl -fsS -m 5 -X PUT http://127.0.0.1:4001/v2/keys/_harness/probe -d value=ok -d ttl=5 >/dev/null
  for port in $ETCD_CLIENT_PORTS; do
    curl -fsS -m 5 "http://127.0.0.1:$port/v2/keys/_harness?recursive=true" |
      grep -q '"key":"/_harness/probe","value":"ok","expiration":"[^"]*","ttl":[0-9]' ||
      return 1
  done
  curl -fsS -m 5 -X DELETE 'http://127.0.0.1:4001/v2/keys/_harness?recursive=true' >/dev/null
}

etcd_up() {
  if pid_alive etcd; then
    wait_for 60 "etcd (running) to answer" etcd_healthy || {
      show_log etcd
      die "etcd (pid $(cat "$D/run/etcd.pid")) runs but does not answer on 127.0.0.1:4001"
    }
    log "etcd: reusing pid $(cat "$D/run/etcd.pid")"
    return 0
  fi
  if etcd_healthy; then
    die "something not started by this harness answers on 127.0.0.1:4001; stop it first"
  fi
  mkdir -p "$D/etcd"
  local clients=http://127.0.0.1:4001,http://127.0.0.1:2379 peer=http://127.0.0.1:$ETCD_PEER_PORT
  start_daemon etcd etcd \
    --name "$ETCD_NAME" \
    --data-dir "$D/etcd" \
    --enable-v2=true \
    --listen-client-urls "$clients" \
    --advertise-client-urls "$clients" \
    --listen-peer-urls "$peer" \
    --initial-advertise-peer-urls "$peer" \
    --initial-cluster "$ETCD_NAME=$peer" \
    --initial-cluster-state new \
    --logger zap \
    --log-outputs stderr
  wait_for 60 "etcd v2 API on 127.0.0.1:4001" etcd_healthy || {
    show_log etcd
    die "etcd did not come up"
  }
  etcd_check_v2 || {
    show_log etcd
    die "etcd answers but its v2 API does not keep TTL'd keys"
  }
  log "etcd: up, pid $(cat "$D/run/etcd.pid")"
}

etcd_down() { stop_daemon etcd; }
