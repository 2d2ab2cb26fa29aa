# shellcheck shell=bash
# The local stand-in for /var/lib/deis/store, the CephFS mount every Deis v1 host shares
# (sourced after lib.sh, never run).
#
# Owns:
# - $STORE_DIR and everything under it;
# - the seed marker $D/seeded-store-<size>;
# - the daemon `store-writer` ($D/run/store-writer.pid), which appends a line every ~50 ms to each
#   of $STORE_LIVE_FILES, as Deis' logger does while the cluster runs ("file changed as we read it").
# Invariants:
# - The seeded tree is deterministic for a given $CLUSTER_SIZE and $STORE_DIR: names, contents,
#   owners, modes, link targets and mtimes — except $STORE_LIVE_FILES, which start from seeded
#   content and then grow (and get new mtimes) while the writer runs. Only ctimes differ.
#   One symlink (logs-abs) is absolute and points inside $STORE_DIR, so its target names $STORE_DIR.
# - Seeding happens once: the marker holds a hash of the seeding code; a missing or different
#   marker (other size, changed code, interrupted seed) means: stop the writer, delete
#   $STORE_DIR, seed again.
# - store_writer_pause / store_writer_resume stop and continue the writer (SIGSTOP/SIGCONT on its
#   recorded PID) for tests that need a quiescent tree; pause returns only once the writer is
#   stopped, so no append is in flight afterwards. store_up resumes a paused writer.
#
# The tree (owners numeric; 4242 has no passwd entry on purpose):
#   logs/                       0755 root     component and app logs, 0-byte lock (0600),
#                                             current -> deis-controller.log (relative),
#                                             old-router.log -> archive/gone.log (dangling)
#   logs/archive/               0750 root     rotated router logs (the bulk of the text)
#   controller/                 0750 1000     settings (0600), keys/ (0700), a script (0755),
#                                             unicode/space names, a 150-char name, a deep path
#                                             longer than 255 bytes, files of 65534 and 4242
#   builder/repos/              2775 root:1000  setgid; a bare git repo (valid, 0444 objects)
#   builder/cache/              0755 root     a blob hardlinked with the repo's, slugs (random)
#   builder/tmp/                1777 root     empty (sticky)
#   empty/                      0755 root     empty
#   nobody/ 0700 65534, orphan/ 0750 4242:4242
#   database-log -> /var/lib/deis/store/logs/deis-database.log (absolute Deis path: dangling here)
#   logs-abs -> $STORE_DIR/logs (absolute, inside)
# Sizes: small ~5 MiB; large ~1 GiB (700 MiB of log text, 300 MiB of incompressible slugs).

STORE_LIVE_FILES="logs/deis-controller.log logs/myapp.log"
# The mtime of every seeded entry unless set otherwise.
STORE_MTIME='2016-02-29 12:00:00 UTC'

store_up() {
  local marker=$D/seeded-store-$CLUSTER_SIZE want
  want=$(store_seed_hash)
  if [[ -f $marker && $(cat "$marker") == "$want" && -d $STORE_DIR ]]; then
    if pid_alive store-writer; then
      kill -CONT "$(cat "$D/run/store-writer.pid")" 2>/dev/null || true
      return 0
    fi
  else
    stop_daemon store-writer
    rm -f "$D"/seeded-store-*
    store_seed
    echo "$want" >"$marker"
  fi
  store_writer_start
}

store_down() {
  stop_daemon store-writer
}

# store_seed_hash — identifies the seeding code and size (the marker's content).
store_seed_hash() {
  { declare -f store_seed store_seed_bulk; echo "$CLUSTER_SIZE $STORE_DIR $STORE_MTIME"; } | sha256sum | cut -c1-16
}

store_seed() {
  local t0=$SECONDS s=$STORE_DIR
  [[ -n $s && $s == "$D"/* ]] || die "STORE_DIR ($s) must be inside $D"
  [[ -z $(missing_cmds python3) ]] || die "python3 is needed to seed the store"
  log "seeding $s ($CLUSTER_SIZE)"
  # emptied, not removed: on a multi-host cluster $s is a CephFS mount point
  mkdir -p "$s"
  find "$s" -mindepth 1 -delete
  (
    umask 022
    set -e
    cd "$s"

    # logs/: what deis-logger writes, one file per component and per app.
    mkdir -p logs/archive
    local c i
    for c in controller registry builder router database store-gateway store-monitor; do
      for i in $(seq 1 40); do
        printf '2016-02-29T11:%02d:%02d+00:00 deis-%s[1]: INFO seeded line %d of deis-%s\n' \
          $((i / 60)) $((i % 60)) "$c" "$i" "$c"
      done >"logs/deis-$c.log"
    done
    for i in $(seq 1 200); do
      printf '2016-02-29T10:%02d:%02d+00:00 myapp[web.%d]: 10.0.0.%d "GET /items/%d HTTP/1.1" 200 %d\n' \
        $((i / 60)) $((i % 60)) $((1 + i % 3)) $((i % 250)) "$i" $((i * 37 % 5000))
    done >logs/myapp.log
    printf '2016-02-29T10:00:00+00:00 grüße-app[web.1]: Grüße aus Köln — 日本語 — 🚀\n' >'logs/grüße-app.log'
    : >logs/deis-logger.lock
    chmod 0600 logs/deis-logger.lock
    ln -s deis-controller.log logs/current
    ln -s archive/gone.log logs/old-router.log
    chmod 0750 logs/archive

    # controller/: Django settings, keys, uploads, exports (uid 1000 like an app user).
    mkdir -p controller/settings controller/keys controller/uploads controller/exports
    printf "SECRET_KEY = 'seeded-secret'\nDATABASES = {'default': {'NAME': 'deis'}}\n" >controller/settings/local_settings.py
    chmod 0600 controller/settings/local_settings.py
    printf -- '-----BEGIN RSA PRIVATE KEY-----\nMIIEseeded\n-----END RSA PRIVATE KEY-----\n' >controller/keys/id_rsa
    printf 'ssh-rsa AAAAB3NzaC1yc2Eseeded deis@controller\n' >controller/keys/id_rsa.pub
    chmod 0600 controller/keys/id_rsa
    chmod 0700 controller/keys
    printf '#!/bin/sh\necho hook\n' >controller/run-hook.sh
    chmod 0755 controller/run-hook.sh
    printf 'Grüße aus 日本 🚀\n' >'controller/uploads/Grüße aus 日本 🚀 (copy).txt'
    printf 'odd\n' >"controller/uploads/odd name 'quotes' & \$HOME #1.txt"
    : >controller/uploads/empty.txt
    local long deep
    long=app-config-export-2016-02-29T12-00-00Z-$(printf 'x%.0s' $(seq 1 100))-final.json
    printf '{"app": "myapp", "long": true}\n' >"controller/exports/$long"
    deep=controller/exports/deep
    for i in $(seq 1 12); do deep=$deep/level-$i-of-a-rather-long-path; done
    mkdir -p "$deep"
    printf 'deep\n' >"$deep/leaf.txt"
    printf 'owned by nobody\n' >controller/nobody-owned.txt
    printf 'owned by a uid with no passwd entry\n' >controller/orphan-4242.dat
    chmod 0640 controller/orphan-4242.dat
    chown -R 1000:1000 controller
    chown 65534:65534 controller/nobody-owned.txt
    chown 4242:4242 controller/orphan-4242.dat
    chmod 0750 controller

    # builder/: bare git repos (setgid, group 1000) and the build cache.
    local git=builder/repos/myapp.git
    mkdir -p "$git/hooks" "$git/refs/heads" "$git/refs/tags" "$git/objects/info" \
      "$git/objects/pack" builder/cache/slugs builder/tmp
    printf 'ref: refs/heads/master\n' >"$git/HEAD"
    printf '[core]\n\trepositoryformatversion = 0\n\tbare = true\n' >"$git/config"
    printf 'myapp\n' >"$git/description"
    printf '#!/bin/bash\nexec /usr/local/bin/receiver "$@"\n' >"$git/hooks/pre-receive"
    chmod 0755 "$git/hooks/pre-receive"
    # Real loose objects (zlib): a blob, its tree and a commit with fixed dates.
    local blob
    blob=$(python3 - "$git" <<'PY'
import hashlib, os, sys, zlib
git = sys.argv[1]
def put(kind, body):
    raw = b"%s %d\0" % (kind, len(body)) + body
    sha = hashlib.sha1(raw).hexdigest()
    os.makedirs(f"{git}/objects/{sha[:2]}", exist_ok=True)
    with open(f"{git}/objects/{sha[:2]}/{sha[2:]}", "wb") as f:
        f.write(zlib.compress(raw, 1))
    return sha
blob = put(b"blob", "web: gunicorn app:app  # Grüße\n".encode())
tree = put(b"tree", b"100644 Procfile\0" + bytes.fromhex(blob))
who = b"Zo\xc3\xab <zoe@example.com> 1456747200 +0000"
commit = put(b"commit", b"tree %s\nauthor %s\ncommitter %s\n\nSeeded commit\n" % (tree.encode(), who, who))
with open(f"{git}/refs/heads/master", "w") as f:
    f.write(commit + "\n")
print(f"objects/{blob[:2]}/{blob[2:]}")
PY
    )
    chmod 0444 "$git"/objects/??/*
    # A hardlink pair, as `git clone --local` makes: the cache shares the blob's inode.
    ln "$git/$blob" builder/cache/procfile.blob
    mkdir -p builder/repos/empty.git
    chown -R root:1000 builder/repos
    find builder/repos -type d -exec chmod 2775 {} +
    chmod 1777 builder/tmp

    # Odds and ends: empty dir, dirs of other owners, absolute symlinks.
    mkdir -p empty nobody orphan
    printf 'nobody\n' >nobody/file
    chown -R 65534:65534 nobody
    chmod 0700 nobody
    printf 'orphan\n' >orphan/file
    chown -R 4242:4242 orphan
    chmod 0750 orphan
    ln -s /var/lib/deis/store/logs/deis-database.log database-log
    ln -s "$s/logs" logs-abs
  )
  store_seed_bulk
  # Fixed mtimes: everything, then a few on purpose older, then directories last (creating an
  # entry changes its directory's mtime).
  find "$s" ! -type d -exec touch -h -d "$STORE_MTIME" {} +
  find "$s/logs/archive" -type f -exec touch -d '2016-01-31 23:59:59 UTC' {} +
  touch -d '2015-12-24 18:00:00 UTC' "$s/controller/keys/id_rsa" "$s/controller/keys/id_rsa.pub"
  touch -h -d '2015-06-01 00:00:00 UTC' "$s/logs/old-router.log"
  find "$s" -depth -type d -exec touch -d "$STORE_MTIME" {} +
  log "seeded $s in $((SECONDS - t0))s ($(du -sh "$s" | cut -f1))"
}

# store_seed_bulk — the big files, deterministic (seeded PRNG): rotated router logs (text) and
# slugs (incompressible bytes).
store_seed_bulk() {
  local text_files text_mib slugs slug_mib
  case "$CLUSTER_SIZE" in
  small) text_files=3 text_mib=1 slugs=2 slug_mib=1 ;;
  large) text_files=7 text_mib=100 slugs=3 slug_mib=100 ;;
  esac
  python3 - "$STORE_DIR" "$text_files" "$text_mib" "$slugs" "$slug_mib" <<'PY'
import random, sys
root, text_files, text_mib, slugs, slug_mib = sys.argv[1], *map(int, sys.argv[2:])
MiB = 1 << 20
rng = random.Random(20160229)
paths = ["/", "/api/items", "/api/items/42", "/login", "/static/app.js", "/static/style.css",
         "/healthz", "/api/v1/apps/myapp/config", "/search?q=gr%C3%BC%C3%9Fe"]
codes = [200, 200, 200, 200, 201, 204, 301, 304, 404, 500]
agents = ["curl/7.43.0", "Mozilla/5.0 (X11; Linux x86_64)", "Deis Client v1.13.4", "python-requests/2.9.1"]
for f in range(1, text_files + 1):
    target = text_mib * MiB
    written = 0
    sec = 1451606400 + f * 86400
    with open(f"{root}/logs/archive/deis-router.log.{f}", "w", encoding="utf-8") as out:
        while written < target:
            ids = rng.randbytes(4096).hex()
            lines = []
            for k in range(256):
                sec += rng.randrange(3)
                h, m, s = (sec // 3600) % 24, (sec // 60) % 60, sec % 60
                lines.append(
                    f"2016-01-{1 + (sec // 86400) % 28:02d}T{h:02d}:{m:02d}:{s:02d}+00:00 deis-router[{1 + k % 3}]: "
                    f"[{rng.choice(['myapp', 'grüße-app', 'api', 'www'])}] 10.{k % 8}.{rng.randrange(256)}.{rng.randrange(256)} "
                    f"- - \"GET {rng.choice(paths)} HTTP/1.1\" {rng.choice(codes)} {rng.randrange(100000)} "
                    f"\"-\" \"{rng.choice(agents)}\" req={ids[k * 32:k * 32 + 16]} t=0.{rng.randrange(1000):03d}\n")
            chunk = "".join(lines)
            if written + len(chunk.encode()) > target:
                chunk = chunk.encode()[: target - written].decode("utf-8", "ignore")
                chunk = chunk[: chunk.rfind("\n") + 1] if "\n" in chunk else ""
                if not chunk:
                    break
            out.write(chunk)
            written += len(chunk.encode())
for n in range(1, slugs + 1):
    with open(f"{root}/builder/cache/slugs/app-{n}.tar.gz", "wb") as out:
        for _ in range(slug_mib):
            out.write(rng.randbytes(MiB))
PY
}

store_writer_start() {
  log "starting the store log writer"
  # the writer stops when logs/ goes (a test removing the store); it must be there to begin with
  [[ -d $STORE_DIR/logs ]] || die "the store at $STORE_DIR is not seeded (no logs/): nothing for the writer to append to"
  # shellcheck disable=SC2016,SC2086 # the script is for the child bash; the file list splits
  start_daemon "${STORE_WRITER:-store-writer}" bash -c '
    set -u
    dir=$1
    shift
    n=0
    while [[ -d $dir/logs ]]; do
      n=$((n + 1))
      printf -v ts "%(%Y-%m-%dT%H:%M:%S+00:00)T" -1
      for f in "$@"; do
        name=${f##*/}
        printf "%s %s[web.1]: INFO live line %d\n" "$ts" "${name%.log}" "$n" >>"$dir/$f" || exit 0
      done
      sleep 0.05
    done' store-writer "$STORE_DIR" $STORE_LIVE_FILES
  if ! wait_for 5 "the store writer's first line" grep -q 'live line' "$STORE_DIR/logs/myapp.log"; then
    show_log "${STORE_WRITER:-store-writer}"
    die "the store writer does not write"
  fi
}

# store_writer_pause — SIGSTOP the writer and wait until it is stopped (no append in flight).
store_writer_pause() {
  pid_alive store-writer || return 0
  local pid
  pid=$(cat "$D/run/store-writer.pid")
  kill -STOP "$pid"
  wait_for 5 "the store writer to stop" store_writer_stopped "$pid"
}

store_writer_stopped() { [[ $(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) == T ]]; }

# store_writer_resume — SIGCONT the writer.
store_writer_resume() {
  pid_alive store-writer || return 0
  kill -CONT "$(cat "$D/run/store-writer.pid")"
}
