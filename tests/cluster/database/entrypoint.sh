#!/bin/bash
# Entrypoint of deis-database:local (see Dockerfile). Owns the cluster $PG_MAJOR/main:
#   data   /var/lib/postgresql/$PG_MAJOR/main   (Deis v1: /var/lib/postgresql/9.3/main)
#   config /etc/postgresql/$PG_MAJOR/main       (Debian layout, so pg_wrapper finds the port and
#                                                `sudo -u postgres pg_dumpall` needs no options)
# Invariants:
# - The cluster is created once (first start), UTF8, locale C.UTF-8, by OS user postgres.
# - Every start re-applies port/listen address and the superuser password from the environment:
#     DATABASE_PORT (5432), DATABASE_LISTEN (127.0.0.1),
#     DATABASE_PASSWORD_MD5 ('md5' + md5(password + 'postgres'), stored as is: same hash, same dump)
#     or DATABASE_PASSWORD (plain text; hashed here the same way).
# - Auth: local socket = peer; TCP = md5 (which also accepts SCRAM-stored passwords); no TLS.
# - postgres is exec'ed in the foreground as user postgres (PID 1, logs to stderr = docker logs).
set -euo pipefail

ver=${PG_MAJOR:-15}
port=${DATABASE_PORT:-5432}
listen=${DATABASE_LISTEN:-127.0.0.1}
data=/var/lib/postgresql/$ver/main
conf=/etc/postgresql/$ver/main
bin=/usr/lib/postgresql/$ver/bin

as_postgres() { setpriv --reuid=postgres --regid=postgres --init-groups -- "$@"; }

install -d -o postgres -g postgres -m 2775 /var/run/postgresql

if [[ ! -s $data/PG_VERSION ]]; then
  echo "deis-database: creating cluster $ver/main (UTF8, C.UTF-8)" >&2
  rm -rf "$conf"
  pg_createcluster --encoding=UTF8 --locale=C.UTF-8 --port="$port" "$ver" main >&2
  cat >"$conf/pg_hba.conf" <<'HBA'
# TYPE  DATABASE  USER  ADDRESS       METHOD
local   all       all                 peer
host    all       all   127.0.0.1/32  md5
host    all       all   ::1/128       md5
HBA
  chown postgres:postgres "$conf/pg_hba.conf"
  chmod 0640 "$conf/pg_hba.conf"
fi

pg_conftool -s "$ver" main set port "$port"
# (pg_conftool would write listen_addresses unquoted, which postgres rejects: use conf.d.)
# No TLS, as Deis v1's database: Debian turns it on with a snakeoil cert, which clients that
# try TLS first and verify certificates would trip over.
printf "listen_addresses = '%s'\nssl = off\n" "$listen" >"$conf/conf.d/00-deis-backup.conf"

hash=${DATABASE_PASSWORD_MD5:-}
if [[ -z $hash && -n ${DATABASE_PASSWORD:-} ]]; then
  hash=md5$(printf '%s%s' "$DATABASE_PASSWORD" postgres | md5sum | cut -c1-32)
fi
if [[ -n $hash ]]; then
  [[ $hash =~ ^md5[0-9a-f]{32}$ ]] || { echo "deis-database: bad DATABASE_PASSWORD_MD5" >&2; exit 1; }
  # Single-user mode: no server, no socket, nothing listening while the password is set.
  out=$(echo "ALTER ROLE postgres PASSWORD '$hash';" |
    as_postgres "$bin/postgres" --single -D "$data" -c config_file="$conf/postgresql.conf" postgres 2>&1) || {
    echo "$out" >&2
    exit 1
  }
  if grep -q 'ERROR' <<<"$out"; then
    echo "$out" >&2
    exit 1
  fi
fi

exec setpriv --reuid=postgres --regid=postgres --init-groups -- \
  "$bin/postgres" -D "$data" -c config_file="$conf/postgresql.conf"
