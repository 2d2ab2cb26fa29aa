# shellcheck shell=bash
# The local stand-in for the Deis v1 `deis-database` container (sourced after lib.sh, never run).
#
# Flavours ($DEIS_DATABASE_FLAVOUR, or `up --database-flavour`):
# - wal-e (the source cluster's default): Debian bullseye, PostgreSQL 13, WAL-E 1.1.1 (PyPI),
#   built from tests/cluster/database-wal-e/, image deis-database:wal-e. Boots as Deis v1.13's
#   database: archives every WAL segment to the bucket named in etcd (db_wal), pushes base backups
#   on a timer, and on a first boot restores itself from that bucket's LATEST base backup when
#   there is one (docs/DATABASE.md). So the source's db_wal is real WAL-E output; the gateway seed
#   puts its synthetic WAL-E-shaped objects in a bucket of their own (publish.sh).
# - plain (the target clusters' default, tests/cluster/target): Debian bookworm, PostgreSQL 15,
#   built from tests/cluster/database/, image deis-database:local. Only the database server: no
#   WAL-E, nothing archived, no bucket touched; a `--database-sql` restore loads into it.
#   `up` builds the other flavour's image as well (database_image_other).
# Owns:
# - the images $DATABASE_BASE_IMAGE (a Debian rootfs made by mmdebstrap with the flavour's
#   packages; the tarball is cached under $DEIS_CACHE, and the wal-e flavour's pip downloads too)
#   and $DATABASE_IMAGE (built from the flavour's directory, labelled with a hash of it: a change
#   rebuilds it and recreates the container). database_down keeps both images as a cache.
# - the container $DATABASE_CONTAINER (host network, 127.0.0.1:$DATABASE_PORT), labelled
#   com.deis-backup.cluster=$D;
# - $D/secrets/database.env (mode 600, the password hash handed to the container) and the seed
#   markers $D/seeded-database-<size>.
# Invariants:
# - Only a container carrying our label for this $D is ever removed; a container of that name
#   without it is someone else's and makes database_up fail instead.
# - database_up reuses a running container whose pg_isready answers (about 0.3 s); a stopped one,
#   or one of an older image, is removed and created again (data lost, seeded again).
# - The superuser `postgres` has the password of `database_password` (lib.sh), stored as an md5
#   hash (no random salt: the same password gives the same pg_dumpall output). Local socket auth
#   is peer, so `docker exec deis-database sudo -u postgres pg_dumpall` and
#   `docker exec -u postgres deis-database pg_dumpall` work as in the Deis docs (plain
#   `docker exec deis-database psql -U postgres` does not: root is not postgres). TCP is md5.
# - The seed is deterministic for a given $CLUSTER_SIZE and is applied once per container: the
#   marker holds the container id and a hash of the seed SQL; anything else means "seed again"
#   (which drops and recreates the seeded databases and roles). What it makes:
#     roles deis, registry (md5 passwords 'deis-seed', 'registry-seed');
#     deis (owner deis): Deis controller tables auth_user, api_app, api_key, api_domain,
#       api_config (JSON text, non-ASCII values), api_build, api_release, api_container,
#       api_certificate, a view;
#     registry_meta (owner registry): schema meta, an enum, non-ASCII text and comments;
#     wal_test: large objects 424201-424203 (4.8 KB text, 64 KiB, 2 MiB; md5s in table
#       large_objects) and table bulk (small: 20k rows, ~4 MiB; large: 2.5M rows, ~510 MiB,
#       pg_dumpall ~430 MB).
# - The data lives in the container only (no volume): removing the container forgets it.
# Pitfall: PostgreSQL 15.14+ pg_dump(all) writes `\restrict <random key>` / `\unrestrict` lines, so
# two dumps of the same data differ there (filter them before comparing), and only a psql of the
# same patch level or newer can replay such a dump. Deis' own 9.3 dumps have no such lines.

DATABASE_FLAVOUR=${DEIS_DATABASE_FLAVOUR:-wal-e}
DATABASE_LABEL=com.deis-backup.cluster
DEIS_CACHE=${DEIS_CACHE:-$HOME/.cache/deis-backup}
# Per flavour: the Debian suite, the packages of the base rootfs (the cached tarball's name carries
# a hash of the suite, this list and the hook), the image's build context.
case $DATABASE_FLAVOUR in
plain)
  DATABASE_SUITE=bookworm
  DATABASE_ROOTFS_PACKAGES=postgresql-15,sudo,locales,daemontools
  DATABASE_CONTEXT=$CLUSTER_LIB_DIR/database
  DATABASE_BASE_IMAGE=${DEIS_DATABASE_BASE_IMAGE:-deis-backup/debian-postgres:bookworm}
  DATABASE_READY_TIMEOUT=60
  ;;
wal-e)
  DATABASE_SUITE=bullseye
  # curl: etcd's v2 API; lzop, pv: WAL-E's compression and rate limit; python3-venv: WAL-E's venv.
  DATABASE_ROOTFS_PACKAGES=postgresql-13,sudo,locales,daemontools,lzop,pv,curl,ca-certificates,python3-venv
  DATABASE_CONTEXT=$CLUSTER_LIB_DIR/database-wal-e
  DATABASE_BASE_IMAGE=${DEIS_DATABASE_BASE_IMAGE:-deis-backup/debian-postgres:bullseye-wal-e}
  # lib.sh's default names the plain image.
  [[ -n ${DEIS_DATABASE_IMAGE:-} ]] || DATABASE_IMAGE=deis-database:wal-e
  # The test knobs handed to the container (docs/DATABASE.md); Deis' defaults are 60 s, 3h and 5.
  DATABASE_ARCHIVE_TIMEOUT=${DEIS_DATABASE_ARCHIVE_TIMEOUT:-60}
  DATABASE_BACKUP_FREQUENCY=${DEIS_DATABASE_BACKUP_FREQUENCY:-3h}
  DATABASE_BACKUPS_TO_RETAIN=${DEIS_DATABASE_BACKUPS_TO_RETAIN:-5}
  # Where the boot reads initId, bucketName, adminPass (a scratch prefix in wal-e-check).
  DATABASE_ETCD_PATH=${DEIS_DATABASE_ETCD_PATH:-/deis/database}
  # A first boot may fetch a base backup and replay WAL before it accepts writes.
  DATABASE_READY_TIMEOUT=${DEIS_DATABASE_READY_TIMEOUT:-600}
  ;;
*)
  echo "DEIS_DATABASE_FLAVOUR must be plain or wal-e, not '$DATABASE_FLAVOUR'" >&2
  exit 2
  ;;
esac
# Databases the seed creates (and drops when seeding again).
DATABASE_SEEDED_DBS="deis registry_meta wal_test"

# database_psql [DB] [psql args...] — psql inside the container as OS user postgres over the local
# socket, ON_ERROR_STOP, SQL on stdin.
database_psql() {
  local db=${1:-postgres}
  if (($# > 0)); then shift; fi
  docker exec -i -u postgres ${PGOPTIONS:+-e PGOPTIONS="$PGOPTIONS"} "$DATABASE_CONTAINER" \
    psql -X -q -v ON_ERROR_STOP=1 -d "$db" "$@"
}

# database_password_md5 — the role password as PostgreSQL stores an md5 password.
database_password_md5() {
  printf 'md5%s\n' "$(printf '%s%s' "$(database_password)" postgres | md5sum | cut -c1-32)"
}

# database_build_rootfs TARBALL — mmdebstrap the base rootfs (installs mmdebstrap if missing).
database_build_rootfs() {
  local out=$1 tmp
  if [[ -n $(missing_cmds mmdebstrap) ]]; then
    log "installing mmdebstrap"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q mmdebstrap >&2 ||
      { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q mmdebstrap >&2; }
  fi
  mkdir -p "$(dirname "$out")"
  tmp=$out.tmp.$$
  log "building the database rootfs with mmdebstrap ($DATABASE_SUITE: $DATABASE_ROOTFS_PACKAGES)"
  # The wal-e flavour installs WAL-E into the rootfs (a venv in /opt/wal-e) from pip downloads
  # cached in $DEIS_CACHE/pip-wal-e-<suite>: a rebuild of the rootfs fetches nothing from PyPI.
  local hooks=()
  if [[ $DATABASE_FLAVOUR == wal-e ]]; then
    hooks=(--customize-hook="$DATABASE_CONTEXT/rootfs-hook \"\$1\" $DEIS_CACHE/pip-wal-e-$DATABASE_SUITE")
  fi
  # No default cluster at install time: the entrypoint creates it with our encoding and locale.
  # Docs, man pages and translations are left out (about 70 MB).
  # shellcheck disable=SC2016 # "$1" in the hook is mmdebstrap's, the chroot's path
  if ! mmdebstrap --variant=apt --format=tar --include="$DATABASE_ROOTFS_PACKAGES" \
    --essential-hook='mkdir -p "$1/etc/postgresql-common/createcluster.d" && echo "create_main_cluster = false" >"$1/etc/postgresql-common/createcluster.d/00-deis-backup.conf"' \
    "${hooks[@]}" \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-include=/usr/share/locale/locale.alias' \
    "$DATABASE_SUITE" "$tmp" >"$tmp.log" 2>&1; then
    tail -n 30 "$tmp.log" >&2
    rm -f "$tmp" "$tmp.log"
    die "mmdebstrap failed"
  fi
  rm -f "$tmp.log"
  mv "$tmp" "$out"
}

# database_image — makes sure $DATABASE_IMAGE exists and matches tests/cluster/database/.
database_image() {
  local ctx=$DATABASE_CONTEXT want have key tarball
  if [[ $DATABASE_FLAVOUR == plain ]]; then
    want=$(cat "$ctx/Dockerfile" "$ctx/entrypoint.sh" <(echo "$DATABASE_BASE_IMAGE") | sha256sum | cut -c1-16)
    key=$(echo "bookworm apt $DATABASE_ROOTFS_PACKAGES nodoc createcluster=false" | sha256sum | cut -c1-12)
  else
    # The rootfs' key covers its hook and the pinned WAL-E, and names the base image too: a change
    # of either makes a new rootfs. The image's hash covers every file of the context.
    key=$(cat <(echo "$DATABASE_SUITE apt $DATABASE_ROOTFS_PACKAGES nodoc createcluster=false") \
      "$ctx/rootfs-hook" "$ctx/requirements.txt" | sha256sum | cut -c1-12)
    [[ -n ${DEIS_DATABASE_BASE_IMAGE:-} ]] || DATABASE_BASE_IMAGE=$DATABASE_BASE_IMAGE-$key
    want=$(cd "$ctx" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum |
      cat - <(echo "$DATABASE_BASE_IMAGE") | sha256sum | cut -c1-16)
  fi
  have=$(docker image inspect -f "{{index .Config.Labels \"com.deis-backup.context\"}}" "$DATABASE_IMAGE" 2>/dev/null || true)
  [[ $have == "$want" ]] && return 0
  if ! docker image inspect "$DATABASE_BASE_IMAGE" >/dev/null 2>&1; then
    tarball=$DEIS_CACHE/rootfs-database-$DATABASE_SUITE-$key.tar
    [[ -s $tarball ]] || database_build_rootfs "$tarball"
    log "importing $tarball as $DATABASE_BASE_IMAGE"
    docker import "$tarball" "$DATABASE_BASE_IMAGE" >/dev/null
    if [[ $DATABASE_FLAVOUR == wal-e && -z ${DEIS_DATABASE_BASE_IMAGE:-} ]]; then
      # The wal-e rootfs is named by its key: the ones it supersedes go (each ~400 MB).
      local old_base old_tar
      for old_tar in "$DEIS_CACHE/rootfs-database-$DATABASE_SUITE"-*.tar; do
        [[ ! -e $old_tar || $old_tar == "$tarball" ]] || rm -f "$old_tar"
      done
      while read -r old_base; do
        [[ $old_base == "$DATABASE_BASE_IMAGE" ]] || docker rmi "$old_base" >/dev/null 2>&1 || true
      done < <(docker images --format '{{.Repository}}:{{.Tag}}' "${DATABASE_BASE_IMAGE%:*}" |
        grep -F ":$DATABASE_SUITE-wal-e-" || true)
    fi
  fi
  local old
  old=$(docker image inspect -f '{{.Id}}' "$DATABASE_IMAGE" 2>/dev/null || true)
  log "building $DATABASE_IMAGE"
  # The legacy builder: BuildKit (buildx) may be missing, and nothing is pulled either way.
  local out
  if ! out=$(DOCKER_BUILDKIT=0 docker build -q --build-arg BASE_IMAGE="$DATABASE_BASE_IMAGE" \
    --label "com.deis-backup.context=$want" -t "$DATABASE_IMAGE" "$ctx" 2>&1); then
    printf '%s\n' "$out" >&2
    die "docker build of $DATABASE_IMAGE failed"
  fi
  # The image it replaces, unless a container still uses it.
  [[ -z $old ]] || docker rmi "$old" >/dev/null 2>&1 || true
}

# database_image_other — the image of the other flavour as well: target clusters run plain by
# default and wal-e on request (tests/cluster/target), and building both once here keeps tests that
# start targets side by side from building one twice at once.
database_image_other() {
  (
    if [[ $DATABASE_FLAVOUR == wal-e ]]; then export DEIS_DATABASE_FLAVOUR=plain; else export DEIS_DATABASE_FLAVOUR=wal-e; fi
    unset DEIS_DATABASE_IMAGE DEIS_DATABASE_BASE_IMAGE
    DATABASE_IMAGE=deis-database:local
    # shellcheck source=database.sh
    source "$CLUSTER_LIB_DIR/database.sh"
    database_image
  )
}

# database_ours — the container exists and carries our label for this $D.
database_ours() {
  [[ $(docker inspect -f "{{index .Config.Labels \"$DATABASE_LABEL\"}}" "$DATABASE_CONTAINER" 2>/dev/null) == "$D" ]]
}

# database_ready — accepts connections, and (wal-e) has left recovery: a restoring database
# answers pg_isready read-only while it still replays WAL.
database_ready() {
  docker exec -u postgres "$DATABASE_CONTAINER" pg_isready -q || return 1
  [[ $DATABASE_FLAVOUR == plain ]] ||
    [[ $(docker exec -u postgres "$DATABASE_CONTAINER" psql -X -At -c 'SELECT pg_is_in_recovery()' 2>/dev/null) == f ]]
}

# database_run DOCKER-RUN-ARGS... — starts $DATABASE_CONTAINER from $DATABASE_IMAGE (host network,
# 127.0.0.1:$DATABASE_PORT) with the flavour's settings; the caller adds labels and secrets.
# wal-e: etcd at 127.0.0.1:4001, the keys under $DATABASE_ETCD_PATH (Deis': /deis/database), the
# test knobs above.
database_run() {
  local flavour=()
  if [[ $DATABASE_FLAVOUR == wal-e ]]; then
    flavour=(-e ETCD=http://127.0.0.1:4001 -e ETCD_PATH="$DATABASE_ETCD_PATH"
      -e ARCHIVE_TIMEOUT="$DATABASE_ARCHIVE_TIMEOUT" -e BACKUP_FREQUENCY="$DATABASE_BACKUP_FREQUENCY"
      -e BACKUPS_TO_RETAIN="$DATABASE_BACKUPS_TO_RETAIN")
  fi
  docker run -d --name "$DATABASE_CONTAINER" --network host --shm-size=256m \
    -e DATABASE_PORT="$DATABASE_PORT" -e DATABASE_LISTEN=127.0.0.1 "${flavour[@]}" "$@" \
    "$DATABASE_IMAGE" >/dev/null
}

# database_wait_ready SECONDS — until pg_isready answers; fails at once if the container stopped.
database_wait_ready() {
  local deadline=$((SECONDS + $1))
  until database_ready >/dev/null 2>&1; do
    if [[ $(docker inspect -f '{{.State.Running}}' "$DATABASE_CONTAINER" 2>/dev/null) != true ]]; then
      log "$DATABASE_CONTAINER stopped"
      return 1
    fi
    if ((SECONDS >= deadline)); then
      log "timed out after ${1}s waiting for $DATABASE_CONTAINER to accept connections"
      return 1
    fi
    sleep 0.2
  done
}

database_up() {
  local state id
  database_image
  database_password >/dev/null # create the secret before anyone reads it
  state=$(docker inspect -f '{{.State.Running}}' "$DATABASE_CONTAINER" 2>/dev/null) || state=missing
  if [[ $state != missing ]] && ! database_ours; then
    die "container $DATABASE_CONTAINER exists but was not started for $D; remove it yourself"
  fi
  if [[ $state == true ]] && database_ready; then
    # Reused: the image may have been rebuilt since, or the secret re-created.
    if [[ $(docker inspect -f '{{.Image}}' "$DATABASE_CONTAINER") != "$(docker image inspect -f '{{.Id}}' "$DATABASE_IMAGE")" ]]; then
      log "$DATABASE_CONTAINER runs an older $DATABASE_IMAGE; recreating"
      state=stale
    fi
  elif [[ $state != missing ]]; then
    state=stale
  fi
  if [[ $state != true ]]; then
    if [[ $state == stale ]]; then
      local used
      used=$(docker inspect -f '{{.Image}}' "$DATABASE_CONTAINER")
      docker rm -f "$DATABASE_CONTAINER" >/dev/null
      # An image left behind by a rebuild (untagged) goes with its last container.
      if [[ $used != "$(docker image inspect -f '{{.Id}}' "$DATABASE_IMAGE")" ]]; then
        docker rmi "$used" >/dev/null 2>&1 || true
      fi
    fi
    log "starting $DATABASE_CONTAINER on 127.0.0.1:$DATABASE_PORT"
    # The password hash goes through a mode-600 env file: never on a command line.
    (umask 077 && echo "DATABASE_PASSWORD_MD5=$(database_password_md5)" >"$D/secrets/database.env")
    database_run --label "$DATABASE_LABEL=$D" --env-file "$D/secrets/database.env"
    if ! database_wait_ready "$DATABASE_READY_TIMEOUT"; then
      docker logs --tail 30 "$DATABASE_CONTAINER" >&2 || true
      die "$DATABASE_CONTAINER did not come up"
    fi
  fi
  # The secret is the source of truth: if it changed under a reused container, apply it.
  local hash
  hash=$(database_password_md5)
  if [[ $(database_psql postgres -At <<<"SELECT rolpassword FROM pg_authid WHERE rolname = 'postgres'") != "$hash" ]]; then
    log "re-applying the postgres password"
    database_psql postgres <<<"ALTER ROLE postgres PASSWORD '$hash'"
  fi
  database_seed
}

# database_seed — the deterministic seed, once per container (see the invariants at the top).
database_seed() {
  local marker=$D/seeded-database-$CLUSTER_SIZE id t0=$SECONDS
  id="$(docker inspect -f '{{.Id}}' "$DATABASE_CONTAINER") $(database_seed_sql | sha256sum | cut -c1-16)"
  [[ -f $marker && $(cat "$marker") == "$id" ]] && return 0
  rm -f "$D"/seeded-database-*
  log "seeding $DATABASE_CONTAINER ($CLUSTER_SIZE)"
  database_seed_sql | PGOPTIONS='-c client_min_messages=warning' database_psql postgres >/dev/null
  # wal-e: the seed's WAL is in db_wal before anyone looks, so the bucket settles at once instead
  # of an archive_timeout later.
  if [[ $DATABASE_FLAVOUR == wal-e ]]; then database_archive_now; fi
  echo "$id" >"$marker"
  log "seeded $DATABASE_CONTAINER in $((SECONDS - t0))s"
}

# database_archive_now — ends the current WAL segment and waits (up to 120 s) until WAL-E has
# pushed it to the bucket (pg_stat_archiver).
database_archive_now() {
  local seg deadline=$((SECONDS + 120)) done
  seg=$(database_psql postgres -At <<<"SELECT pg_walfile_name(pg_switch_wal())")
  until done=$(database_psql postgres -At <<<"SELECT coalesce(last_archived_wal, '') >= '$seg' FROM pg_stat_archiver") &&
    [[ $done == t ]]; do
    ((SECONDS < deadline)) || die "WAL segment $seg was not archived within 120 s (docker logs $DATABASE_CONTAINER)"
    sleep 0.5
  done
}

# database_seed_sql — the seed script (psql, run as postgres against db postgres).
database_seed_sql() {
  local rows
  case "$CLUSTER_SIZE" in
  small) rows=20000 ;;    # ~4 MiB table
  large) rows=2500000 ;;  # ~450 MiB table, ~330 MiB of pg_dumpall text
  esac
  local db
  for db in $DATABASE_SEEDED_DBS; do echo "DROP DATABASE IF EXISTS $db WITH (FORCE);"; done
  cat <<'SQL'
DROP ROLE IF EXISTS deis;
DROP ROLE IF EXISTS registry;
-- Deis v1's database boot script creates the controller's role and database like this
-- (md5-stored passwords, so dumps are stable: deis/'deis-seed', registry/'registry-seed').
DO $$ BEGIN
  EXECUTE format('CREATE ROLE deis LOGIN PASSWORD %L', 'md5' || md5('deis-seed' || 'deis'));
  EXECUTE format('CREATE ROLE registry LOGIN CONNECTION LIMIT 10 PASSWORD %L', 'md5' || md5('registry-seed' || 'registry'));
END $$;
ALTER ROLE registry SET search_path = meta, public;
COMMENT ON ROLE deis IS 'Deis controller — Grüße';
CREATE DATABASE deis OWNER deis ENCODING 'UTF8' TEMPLATE template0;
CREATE DATABASE registry_meta OWNER registry ENCODING 'UTF8' TEMPLATE template0;
CREATE DATABASE wal_test ENCODING 'UTF8' TEMPLATE template0;
COMMENT ON DATABASE wal_test IS 'bulk rows and large objects, 日本語';

\connect deis
SET ROLE deis;
-- Shaped like the Deis v1 controller's Django tables (api/models.py, django.contrib.auth).
CREATE TABLE auth_user (
  id serial PRIMARY KEY,
  password varchar(128) NOT NULL,
  last_login timestamptz,
  is_superuser boolean NOT NULL,
  username varchar(30) NOT NULL UNIQUE,
  first_name varchar(30) NOT NULL,
  last_name varchar(30) NOT NULL,
  email varchar(75) NOT NULL,
  is_staff boolean NOT NULL,
  is_active boolean NOT NULL,
  date_joined timestamptz NOT NULL
);
CREATE TABLE api_app (
  uuid uuid PRIMARY KEY,
  created timestamptz NOT NULL,
  updated timestamptz NOT NULL,
  id varchar(64) NOT NULL UNIQUE,
  owner_id integer NOT NULL REFERENCES auth_user (id) DEFERRABLE INITIALLY DEFERRED,
  structure text NOT NULL
);
CREATE TABLE api_key (
  uuid uuid PRIMARY KEY,
  created timestamptz NOT NULL,
  updated timestamptz NOT NULL,
  owner_id integer NOT NULL REFERENCES auth_user (id) DEFERRABLE INITIALLY DEFERRED,
  id varchar(128) NOT NULL,
  public text NOT NULL UNIQUE,
  UNIQUE (owner_id, id)
);
CREATE TABLE api_domain (
  id serial PRIMARY KEY,
  created timestamptz NOT NULL,
  updated timestamptz NOT NULL,
  owner_id integer NOT NULL REFERENCES auth_user (id) DEFERRABLE INITIALLY DEFERRED,
  app_id uuid NOT NULL REFERENCES api_app (uuid) DEFERRABLE INITIALLY DEFERRED,
  domain text NOT NULL UNIQUE
);
CREATE TABLE api_config (
  uuid uuid PRIMARY KEY,
  created timestamptz NOT NULL,
  updated timestamptz NOT NULL,
  owner_id integer NOT NULL REFERENCES auth_user (id) DEFERRABLE INITIALLY DEFERRED,
  app_id uuid NOT NULL REFERENCES api_app (uuid) DEFERRABLE INITIALLY DEFERRED,
  "values" text NOT NULL,
  memory text NOT NULL,
  cpu text NOT NULL,
  tags text NOT NULL
);
CREATE TABLE api_build (
  uuid uuid PRIMARY KEY,
  created timestamptz NOT NULL,
  updated timestamptz NOT NULL,
  owner_id integer NOT NULL REFERENCES auth_user (id) DEFERRABLE INITIALLY DEFERRED,
  app_id uuid NOT NULL REFERENCES api_app (uuid) DEFERRABLE INITIALLY DEFERRED,
  image varchar(256) NOT NULL,
  sha varchar(40) NOT NULL,
  procfile text NOT NULL,
  dockerfile text NOT NULL
);
CREATE TABLE api_release (
  uuid uuid PRIMARY KEY,
  created timestamptz NOT NULL,
  updated timestamptz NOT NULL,
  owner_id integer NOT NULL REFERENCES auth_user (id) DEFERRABLE INITIALLY DEFERRED,
  app_id uuid NOT NULL REFERENCES api_app (uuid) DEFERRABLE INITIALLY DEFERRED,
  version integer NOT NULL,
  config_id uuid NOT NULL REFERENCES api_config (uuid) DEFERRABLE INITIALLY DEFERRED,
  build_id uuid REFERENCES api_build (uuid) DEFERRABLE INITIALLY DEFERRED,
  summary text,
  UNIQUE (app_id, version)
);
CREATE TABLE api_container (
  uuid uuid PRIMARY KEY,
  created timestamptz NOT NULL,
  updated timestamptz NOT NULL,
  owner_id integer NOT NULL REFERENCES auth_user (id) DEFERRABLE INITIALLY DEFERRED,
  app_id uuid NOT NULL REFERENCES api_app (uuid) DEFERRABLE INITIALLY DEFERRED,
  release_id uuid NOT NULL REFERENCES api_release (uuid) DEFERRABLE INITIALLY DEFERRED,
  type varchar(128) NOT NULL,
  num integer NOT NULL,
  UNIQUE (app_id, type, num)
);
CREATE TABLE api_certificate (
  id serial PRIMARY KEY,
  created timestamptz NOT NULL,
  updated timestamptz NOT NULL,
  owner_id integer NOT NULL REFERENCES auth_user (id) DEFERRABLE INITIALLY DEFERRED,
  common_name text NOT NULL UNIQUE,
  certificate text NOT NULL,
  key text NOT NULL,
  expires timestamptz NOT NULL
);
CREATE INDEX api_release_app_id ON api_release (app_id);
CREATE INDEX api_container_app_id ON api_container (app_id);
CREATE VIEW api_app_latest_release AS
  SELECT a.id AS app, max(r.version) AS version FROM api_app a JOIN api_release r ON r.app_id = a.uuid GROUP BY a.id;

INSERT INTO auth_user (password, last_login, is_superuser, username, first_name, last_name, email, is_staff, is_active, date_joined) VALUES
  ('pbkdf2_sha256$12000$seedsalt$' || md5('admin'), '2016-03-01 10:00:00+00', true, 'admin', 'Ada', 'Admin', 'admin@example.com', true, true, '2016-01-01 00:00:00+00'),
  ('pbkdf2_sha256$12000$seedsalt$' || md5('zoe'), '2016-03-02 11:00:00+00', false, 'zoë', 'Zoë', 'Grüße', 'zoe@example.com', false, true, '2016-01-02 00:00:00+00'),
  ('pbkdf2_sha256$12000$seedsalt$' || md5('taro'), NULL, false, 'taro', '太郎', '山田 🚀', 'taro@example.jp', false, true, '2016-01-03 00:00:00+00');

INSERT INTO api_app (uuid, created, updated, id, owner_id, structure)
SELECT md5('app' || i)::uuid, '2016-01-10 00:00:00+00'::timestamptz + i * interval '1 hour',
       '2016-02-10 00:00:00+00'::timestamptz + i * interval '1 hour',
       CASE i WHEN 1 THEN 'myapp' WHEN 2 THEN 'grüße-app' ELSE 'app-' || i END,
       1 + i % 3, format('{"web": %s, "worker": %s}', 1 + i % 4, i % 2)
FROM generate_series(1, 12) AS i;

INSERT INTO api_key (uuid, created, updated, owner_id, id, public)
SELECT md5('key' || i)::uuid, '2016-01-05 00:00:00+00', '2016-01-05 00:00:00+00', 1 + i % 3,
       'user' || i || '@laptop', 'ssh-rsa AAAAB3NzaC1yc2E' || encode(sha256(('key' || i)::bytea), 'base64') || ' user' || i || '@laptop'
FROM generate_series(1, 5) AS i;

INSERT INTO api_domain (created, updated, owner_id, app_id, domain)
SELECT '2016-01-11 00:00:00+00', '2016-01-11 00:00:00+00', 1, md5('app' || (1 + i % 12))::uuid, d
FROM (VALUES (1, 'myapp.example.com'), (2, 'www.example.com'), (3, 'xn--gre-6ka8i.example'), (4, 'shop.example.jp')) AS v(i, d);

INSERT INTO api_config (uuid, created, updated, owner_id, app_id, "values", memory, cpu, tags)
SELECT md5('config' || a || '-' || v)::uuid, '2016-01-12 00:00:00+00'::timestamptz + v * interval '1 day',
       '2016-01-12 00:00:00+00'::timestamptz + v * interval '1 day', 1 + a % 3, md5('app' || a)::uuid,
       CASE WHEN a = 1 AND v = 3
         THEN '{"GREETING": "Grüße aus Köln", "JA": "日本語のテキスト", "EMOJI": "🚀🐘✨", "QUOTE": "it''s \"quoted\"\ttab", "DATABASE_URL": "postgres://deis:secret@127.0.0.1:5432/deis"}'
         ELSE format('{"RELEASE": "v%s", "POWERED_BY": "Deis", "SECRET_KEY": "%s"}', v, md5(a || '-' || v)) END,
       CASE WHEN v > 1 THEN '{"web": "512M"}' ELSE '{}' END,
       CASE WHEN v > 2 THEN '{"web": 512}' ELSE '{}' END,
       CASE WHEN a % 4 = 0 THEN '{"environ": "prod"}' ELSE '{}' END
FROM generate_series(1, 12) AS a, generate_series(1, 3) AS v;

INSERT INTO api_build (uuid, created, updated, owner_id, app_id, image, sha, procfile, dockerfile)
SELECT md5('build' || a || '-' || v)::uuid, '2016-01-13 00:00:00+00'::timestamptz + v * interval '1 day',
       '2016-01-13 00:00:00+00'::timestamptz + v * interval '1 day', 1 + a % 3, md5('app' || a)::uuid,
       '127.0.0.1:5000/app-' || a || ':git-' || left(md5('sha' || a || v), 8), md5('sha' || a || v) || left(md5('x' || a || v), 8),
       '{"web": "gunicorn app:app", "worker": "celery worker"}', CASE WHEN a % 3 = 0 THEN E'FROM deis/slugrunner\nEXPOSE 5000\n' ELSE '' END
FROM generate_series(1, 12) AS a, generate_series(1, 3) AS v;

INSERT INTO api_release (uuid, created, updated, owner_id, app_id, version, config_id, build_id, summary)
SELECT md5('release' || a || '-' || v)::uuid, '2016-01-14 00:00:00+00'::timestamptz + v * interval '1 day',
       '2016-01-14 00:00:00+00'::timestamptz + v * interval '1 day', 1 + a % 3, md5('app' || a)::uuid, v,
       md5('config' || a || '-' || v)::uuid, md5('build' || a || '-' || v)::uuid,
       CASE WHEN a = 1 THEN 'zoë deployed ' || left(md5('sha' || a || v), 7) || ' — ✓' ELSE 'admin deployed ' || left(md5('sha' || a || v), 7) END
FROM generate_series(1, 12) AS a, generate_series(1, 3) AS v;

INSERT INTO api_container (uuid, created, updated, owner_id, app_id, release_id, type, num)
SELECT md5('container' || a || '-' || t || '-' || n)::uuid, '2016-01-17 00:00:00+00', '2016-01-17 00:00:00+00',
       1 + a % 3, md5('app' || a)::uuid, md5('release' || a || '-3')::uuid, t, n
FROM generate_series(1, 12) AS a, unnest(ARRAY['web', 'worker']) AS t, generate_series(1, 2) AS n;

INSERT INTO api_certificate (created, updated, owner_id, common_name, certificate, key, expires) VALUES
  ('2016-01-20 00:00:00+00', '2016-01-20 00:00:00+00', 1, 'www.example.com',
   E'-----BEGIN CERTIFICATE-----\nMIIBseedcertificate\n-----END CERTIFICATE-----\n',
   E'-----BEGIN RSA PRIVATE KEY-----\nMIIEseedkey\n-----END RSA PRIVATE KEY-----\n', '2026-01-20 00:00:00+00');
RESET ROLE;

\connect registry_meta
SET ROLE registry;
CREATE SCHEMA meta;
CREATE TYPE meta.visibility AS ENUM ('private', 'public');
CREATE TABLE meta.repositories (
  id serial PRIMARY KEY,
  name text NOT NULL UNIQUE,
  description text NOT NULL,
  visibility meta.visibility NOT NULL DEFAULT 'private'
);
CREATE TABLE meta.tags (
  repository_id integer NOT NULL REFERENCES meta.repositories (id),
  tag text NOT NULL,
  digest text NOT NULL,
  pushed timestamptz NOT NULL,
  PRIMARY KEY (repository_id, tag)
);
COMMENT ON TABLE meta.repositories IS 'Docker registry repositories — Grüße, 日本語, 🐳';
INSERT INTO meta.repositories (name, description, visibility) VALUES
  ('myapp', 'Grüße aus Köln', 'public'),
  ('日本語-app', '日本語の説明です', 'private'),
  ('emoji', 'ships 🚢 and whales 🐳', 'public');
INSERT INTO meta.tags
SELECT r.id, 'v' || v, 'sha256:' || encode(sha256((r.name || v)::bytea), 'hex'),
       '2016-02-01 00:00:00+00'::timestamptz + v * interval '1 minute'
FROM meta.repositories r, generate_series(1, 4) AS v;
RESET ROLE;

\connect wal_test
CREATE TABLE bulk (
  id bigint PRIMARY KEY,
  app text NOT NULL,
  created timestamptz NOT NULL,
  line text NOT NULL
);
CREATE TABLE large_objects (name text PRIMARY KEY, lo oid NOT NULL, bytes integer NOT NULL, md5 text NOT NULL);
-- Fixed OIDs, content from md5 chains: the same objects in every seeded cluster.
SELECT lo_from_bytea(424201, convert_to(repeat('Grüße, 日本語, 🚀 — large object text. ', 100), 'UTF8'));
SELECT lo_from_bytea(424202, (SELECT string_agg(decode(md5('lo2-' || i), 'hex'), ''::bytea ORDER BY i) FROM generate_series(1, 4096) AS i));
SELECT lo_from_bytea(424203, (SELECT string_agg(decode(md5('lo3-' || i), 'hex'), ''::bytea ORDER BY i) FROM generate_series(1, 131072) AS i));
COMMENT ON LARGE OBJECT 424203 IS 'two MiB of md5 output';
INSERT INTO large_objects
SELECT name, lo, length(lo_get(lo)), md5(lo_get(lo))
FROM (VALUES ('text-4800', 424201::oid), ('random-64k', 424202::oid), ('random-2m', 424203::oid)) AS v(name, lo);
SQL
  cat <<SQL
INSERT INTO bulk
SELECT i, 'app-' || (i % 97), '2016-01-01 00:00:00+00'::timestamptz + i * interval '1 second',
       format('%s web.%s: 10.2.%s.%s "GET /api/v1/items/%s HTTP/1.1" %s %s "%s"',
              'app-' || (i % 97), i % 5, i % 251, i % 239, md5(i::text), (ARRAY[200, 200, 200, 201, 304, 404, 500])[1 + i % 7],
              (i * 7919) % 100000, md5((i * 31)::text))
FROM generate_series(1::bigint, $rows) AS i;
INSERT INTO bulk VALUES (0, 'grüße', '2016-01-01 00:00:00+00', 'Grüße aus Köln — 日本語のテキスト — 🚀🐘✨');
ANALYZE;
SQL
}

database_down() {
  if docker inspect "$DATABASE_CONTAINER" >/dev/null 2>&1; then
    if database_ours; then
      log "removing $DATABASE_CONTAINER"
      docker rm -f "$DATABASE_CONTAINER" >/dev/null
    else
      log "leaving $DATABASE_CONTAINER alone: not started for $D"
    fi
  fi
  rm -f "$D"/seeded-database-*
}
