# shellcheck shell=bash
# The pieces that make several Deis hosts on this one machine (sourced after lib.sh, and ceph.sh for
# the CephFS and gateway functions; never run): a real CephFS for /var/lib/deis/store, and per host
# its own address, Docker engine, CephFS mount and (on the first two hosts) its own store-gateway.
# `tests/cluster/target up NAME --hosts N` puts them together into a cluster; tests/cluster/agent
# copies its image into a host's engine with engine_image. Recipes: shared/notes/cephfs.md.
#
# Owns:
# - the CephFS `deisfs` of the local Ceph (pools deisfs_meta, deisfs_data), its MDS (daemon
#   cephfs-mds, data in $CEPH_DIR/mds) and the admin mount $D/cephfs (daemon cephfs-admin) through
#   which cluster directories are made and removed; made once, on first use;
# - per host (a name such as NAME-h1): the daemons NAME-hI-docker (dockerd, everything under
#   DIR/docker), NAME-hI-store (ceph-fuse of /clusters/NAME at DIR/store) and NAME-hI-rgw (radosgw
#   on the host's address, port $GATEWAY_PORT, as Deis runs store-gateway on every host).
# Invariants:
# - A host's address is 127.0.K.I (K per cluster, I per host): all loopback, nothing leaves the
#   machine. Everything a host serves binds that address only.
# - A host's Docker engine sees only its own containers: its own socket, data root and exec root,
#   its own bridge (never `--bridge none`: dockerd then deletes docker0, the machine engine's
#   bridge, in the network namespace they share), no iptables; images are copied in from the
#   machine's engine (docker save | load) when the engine lacks that image id.
# - Every host of a cluster mounts the same CephFS directory with its own ceph-fuse (the kernel
#   client is not available here), as store-volume mounts the one CephFS on every Deis host.
# - Every daemon has its PID in $D/run; mounts are recorded in $D/run/<daemon>.mountpoint so that
#   hosts_down_all (the cluster's `down`) unmounts them before Ceph stops.

CEPHFS_NAME=deisfs
PLATFORM_STANDIN_IMAGE=deis-backup/platform-standin:local
CEPHFS_ADMIN_MOUNT=$D/cephfs

cephfs_active() { ceph_cli mds stat 2>/dev/null | grep -q 'up:active'; }
cephfs_mounted() { mountpoint -q "$1" && stat -f -c %T "$1" 2>/dev/null | grep -q fuse; }

# fuse_mount DAEMON MOUNTPOINT CEPHFS-DIR — ceph-fuse of CEPHFS-DIR at MOUNTPOINT as daemon DAEMON.
fuse_mount() {
  local name=$1 point=$2 root=$3
  if pid_alive "$name" && cephfs_mounted "$point"; then return 0; fi
  stop_daemon "$name"
  fusermount -u -z "$point" 2>/dev/null || true
  mkdir -p "$point"
  echo "$point" >"$D/run/$name.mountpoint"
  start_daemon "$name" ceph-fuse -f -c "$CEPH_CONF" -n client.admin --keyring "$CEPH_DIR/keyring" \
    --admin_socket "$CEPH_DIR/run/$name.asok" --client_mountpoint "$root" "$point"
  wait_for 30 "ceph-fuse at $point" cephfs_mounted "$point" || {
    show_log "$name"
    die "ceph-fuse did not mount $root at $point"
  }
}

# host_docker_down NAME — removes host NAME's containers (at once: a stand-in ignores SIGTERM, and an
# engine killed while it waits leaves them running), stops its dockerd and removes its bridge.
host_docker_down() {
  local f=$D/run/$1-docker.bridge socket=$D/run/$1-docker.socket ids
  if [[ -s $socket ]] && ids=$(docker -H "$(cat "$socket")" ps -aq 2>/dev/null) && [[ -n $ids ]]; then
    # shellcheck disable=SC2086 # one id per word
    docker -H "$(cat "$socket")" rm -f $ids >/dev/null 2>&1 || true
  fi
  rm -f "$socket"
  stop_daemon "$1-docker"
  if [[ -s $f ]]; then
    ip link del "$(cat "$f")" 2>/dev/null || true
    rm -f "$f"
  fi
}

# fuse_unmount DAEMON — unmounts what DAEMON mounted and stops it.
fuse_unmount() {
  local f=$D/run/$1.mountpoint
  if [[ -s $f ]]; then
    fusermount -u "$(cat "$f")" 2>/dev/null || fusermount -u -z "$(cat "$f")" 2>/dev/null || true
  fi
  stop_daemon "$1"
  rm -f "$f"
}

# cephfs_up — the filesystem, its MDS and the admin mount, once per Ceph (one at a time).
cephfs_up() {
  local fd t0=$EPOCHREALTIME
  exec {fd}>"$D/cephfs.lock"
  flock -w 300 "$fd" || die "cannot lock $D/cephfs.lock"
  if ! ceph_cli fs ls 2>/dev/null | grep -q "name: $CEPHFS_NAME,"; then
    ceph_cli osd pool create "${CEPHFS_NAME}_meta" 8 >/dev/null 2>&1 || die "cannot create pool ${CEPHFS_NAME}_meta"
    ceph_cli osd pool create "${CEPHFS_NAME}_data" 8 >/dev/null 2>&1 || die "cannot create pool ${CEPHFS_NAME}_data"
    ceph_cli fs new "$CEPHFS_NAME" "${CEPHFS_NAME}_meta" "${CEPHFS_NAME}_data" >/dev/null 2>&1 ||
      die "ceph fs new $CEPHFS_NAME failed"
  fi
  if ! pid_alive cephfs-mds; then
    mkdir -p "$CEPH_DIR/mds"
    ceph_cli auth get-or-create mds.a mon 'allow profile mds' osd 'allow rwx' mds 'allow' \
      -o "$CEPH_DIR/mds/keyring" >/dev/null 2>&1 || die "cannot make the MDS keyring"
    start_daemon cephfs-mds ceph-mds -f -i a -c "$CEPH_CONF" --mds-data "$CEPH_DIR/mds" --keyring "$CEPH_DIR/mds/keyring"
  fi
  wait_for 60 "the CephFS MDS to be active" cephfs_active || {
    show_log cephfs-mds
    die "ceph-mds did not become active"
  }
  fuse_mount cephfs-admin "$CEPHFS_ADMIN_MOUNT" /
  mkdir -p "$CEPHFS_ADMIN_MOUNT/clusters"
  exec {fd}>&-
  log "cephfs: $CEPHFS_NAME active, admin mount $CEPHFS_ADMIN_MOUNT ($(elapsed_since "$t0") s)"
}

# host_engine DIR — the address of host DIR's Docker engine (unix://...).
host_engine() { echo "unix://$1/docker/docker.sock"; }

# host_docker — the docker CLI of host DIR: `host_docker DIR ARGS...`.
host_docker() {
  local dir=$1
  shift
  docker -H "$(host_engine "$dir")" "$@"
}

host_docker_answers() { host_docker "$1" version >/dev/null 2>&1; }

# host_docker_up NAME DIR BRIDGE CIDR — dockerd of host NAME with everything under DIR/docker, its
# default network on the bridge BRIDGE (made with address CIDR when missing).
host_docker_up() {
  local name=$1 dir=$2 bridge=$3 cidr=$4
  if pid_alive "$name-docker" && host_docker_answers "$dir"; then return 0; fi
  stop_daemon "$name-docker"
  if ! ip link show "$bridge" >/dev/null 2>&1; then
    ip link add name "$bridge" type bridge && ip addr add "$cidr" dev "$bridge" && ip link set "$bridge" up ||
      die "cannot make the bridge $bridge"
  fi
  echo "$bridge" >"$D/run/$name-docker.bridge"
  host_engine "$dir" >"$D/run/$name-docker.socket"
  mkdir -p "$dir/docker/data" "$dir/docker/exec"
  echo '{}' >"$dir/docker/daemon.json"
  # no dockerd of ours runs here (stopped above): a pid file left by a restarted machine would make
  # dockerd refuse to start when its PID now belongs to another process
  rm -f "$dir/docker/docker.pid"
  start_daemon "$name-docker" dockerd --config-file "$dir/docker/daemon.json" \
    --host "$(host_engine "$dir")" --data-root "$dir/docker/data" --exec-root "$dir/docker/exec" \
    --pidfile "$dir/docker/docker.pid" --bridge "$bridge" --iptables=false --ip6tables=false \
    --storage-driver fuse-overlayfs
  wait_for 60 "dockerd of $name" host_docker_answers "$dir" || {
    show_log "$name-docker"
    die "dockerd of $name did not come up"
  }
}

# engine_image ENGINE IMAGE — copies IMAGE from the machine's engine into the Docker engine ENGINE
# (unix://...) unless it holds that image id already.
engine_image() {
  local engine=$1 image=$2 want
  want=$(env -u DOCKER_HOST docker image inspect -f '{{.Id}}' "$image") || die "no image $image in the machine's engine"
  [[ $(docker -H "$engine" image inspect -f '{{.Id}}' "$image" 2>/dev/null) == "$want" ]] && return 0
  env -u DOCKER_HOST docker save "$image" | docker -H "$engine" load >/dev/null ||
    die "cannot load $image into $engine"
}

# platform_standin_image — a one-file image (Debian's static busybox) whose containers stand in for
# Deis' platform components on the hosts (they only sleep: the restore preflight finds them by name).
platform_standin_image() {
  env -u DOCKER_HOST docker image inspect "$PLATFORM_STANDIN_IMAGE" >/dev/null 2>&1 && return 0
  local ctx
  ctx=$(mktemp -d)
  mkdir -p "$ctx/bin"
  cp "$(command -v busybox)" "$ctx/bin/busybox"
  tar -C "$ctx" -c . | env -u DOCKER_HOST docker import -c 'ENTRYPOINT ["/bin/busybox"]' - "$PLATFORM_STANDIN_IMAGE" >/dev/null ||
    die "cannot import $PLATFORM_STANDIN_IMAGE"
  rm -rf "$ctx"
}

# host_platform_up DIR NAME... — stand-ins for the platform containers NAME... on host DIR (its
# engine holds the stand-in image: target_hosts_up copies it to every host).
host_platform_up() {
  local dir=$1 n
  shift
  for n in "$@"; do
    [[ $(host_docker "$dir" inspect -f '{{.State.Running}}' "$n" 2>/dev/null) == true ]] && continue
    host_docker "$dir" rm -f "$n" >/dev/null 2>&1 || true
    host_docker "$dir" run -d --name "$n" --network none "$PLATFORM_STANDIN_IMAGE" sleep 2147483647 >/dev/null ||
      die "cannot start the stand-in $n on $dir"
  done
}

rgw_answers() { curl -s -m 2 -o /dev/null "http://$1:$GATEWAY_PORT/"; }

# host_rgw_up NAME ADDRESS — a radosgw of the local Ceph serving ADDRESS:$GATEWAY_PORT.
host_rgw_up() {
  local name=$1 address=$2 keyring=$CEPH_DIR/rgw/$1.keyring
  if pid_alive "$name-rgw" && rgw_answers "$address"; then return 0; fi
  stop_daemon "$name-rgw"
  ceph_cli auth get-or-create "client.rgw.$name" mon 'allow rw' osd 'allow rwx' mgr 'allow rw' \
    -o "$keyring" >/dev/null 2>&1 || die "cannot make the keyring of gateway $name"
  start_daemon "$name-rgw" radosgw -f -c "$CEPH_CONF" -n "client.rgw.$name" --keyring "$keyring" \
    --rgw_frontends "beast endpoint=$address:$GATEWAY_PORT" --rgw_relaxed_s3_bucket_names true \
    --rgw_gc_obj_min_wait 10 --rgw_gc_processor_period 10 --rgw_data "$CEPH_DIR/rgw"
  wait_for 60 "gateway $name on $address:$GATEWAY_PORT" rgw_answers "$address" || {
    show_log "$name-rgw"
    die "radosgw $name did not come up"
  }
}

# hosts_down_all — every host piece of every cluster under $D (the cluster's `down`): log writers,
# engines (their containers first, which hold the store mounts), mounts, gateways, the MDS.
hosts_down_all() {
  local f name
  for f in "$D"/run/*-store-writer.pid; do
    [[ -e $f ]] || continue
    name=${f##*/}
    stop_daemon "${name%.pid}"
  done
  for f in "$D"/run/*-docker.pid; do
    [[ -e $f ]] || continue
    name=${f##*/}
    host_docker_down "${name%-docker.pid}"
  done
  for f in "$D"/run/*-store.pid "$D"/run/cephfs-admin.pid; do
    [[ -e $f ]] || continue
    name=${f##*/}
    fuse_unmount "${name%.pid}"
  done
  for f in "$D"/run/*-rgw.pid "$D"/run/cephfs-mds.pid; do
    [[ -e $f ]] || continue
    name=${f##*/}
    stop_daemon "${name%.pid}"
  done
  # whatever an engine left mounted (network namespaces, image layers) under $D
  awk -v t="$D/" 'index($2, t) == 1 { print $2 }' /proc/mounts | sort -r | xargs -r -n1 umount -l
}
