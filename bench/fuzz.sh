#!/usr/bin/env bash
# Coverage-guided fuzzing of the parsers that take untrusted input (fuzz/, cargo-fuzz + libFuzzer).
#
#   bench/fuzz.sh                 # every target, 10 minutes each
#   FUZZ_SECONDS=120 bench/fuzz.sh manifest sigv2
#   FUZZ_SANITIZER=address FUZZ_SECONDS=300 bench/fuzz.sh restore manifest
#
# Env: FUZZ_SECONDS (per target, default 600), FUZZ_RSS_MB (libFuzzer's memory cap per target,
# default 2048: "bounded memory" is part of every property), FUZZ_SANITIZER (`none`, the default,
# or `address`: passed as `-s` to `cargo fuzz build` and `cargo fuzz run`; AddressSanitizer with
# its leak checker, run logs named corpus/<target>.address.runN.log; the corpora are shared).
# Targets: manifest (repository manifest + listing), restore (agent store restore of a tar stream
# into a scratch root), etcd_keys (key_path + dry-run import), sigv2 (V2 string to sign).
# The stable toolchain builds them with RUSTC_BOOTSTRAP=1 and no sanitizer (`-s none`): panics and
# failed assertions are the findings. Corpora grow in fuzz/corpus/<target>/ (not committed);
# crashing inputs are kept in fuzz/artifacts/<target>/. After a crash the target is restarted
# (at most 5 times) until its time is used up. Prints executions and crashes per target.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

SECONDS_PER_TARGET="${FUZZ_SECONDS:-600}"
RSS_MB="${FUZZ_RSS_MB:-2048}"
SANITIZER="${FUZZ_SANITIZER:-none}"
case "$SANITIZER" in
  none) LOGTAG= ;;
  address) LOGTAG=.address ;;
  *) echo "FUZZ_SANITIZER must be none or address, not '$SANITIZER'" >&2; exit 2 ;;
esac
ALL=(manifest restore etcd_keys sigv2)
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=("${ALL[@]}")
export RUSTC_BOOTSTRAP=1

command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked

# Seeds: a few well-formed inputs per target, so the fuzzer starts past the first checks.
seed() { # target name content...
  mkdir -p "seeds/$1"
  [ -e "seeds/$1/$2" ] || printf '%b' "$3" >"seeds/$1/$2"
}
SHA=$(printf 'a%.0s' {1..64})
seed manifest manifest.json "{\"format\":\"deis-backup/1\",\"id\":\"20261124T233000.123Z-abcd\",\"started\":\"2026-11-24T23:30:00Z\",\"completed\":\"2026-11-24T23:31:00Z\",\"labels\":{\"cluster\":\"x\"},\"parts\":{\"database\":{\"sha256\":\"$SHA\",\"size\":3},\"store/var/lib/deis/store\":{\"size\":5,\"segments\":[{\"sha256\":\"$SHA\",\"size\":2},{\"sha256\":\"$SHA\",\"size\":3,\"fingerprint\":\"ab\"}]}},\"buckets\":{\"db_wal\":{\"listing\":\"snapshots/20261124T233000.123Z-abcd/buckets/db_wal.jsonl\",\"listing-sha256\":\"$SHA\",\"objects\":1,\"bytes\":3}},\"part-info\":{\"database\":{\"source\":\"db\",\"duration-ms\":5}}}"
seed manifest listing.jsonl "{\"key\":\"a/b\",\"size\":1,\"etag\":\"e\",\"sha256\":\"$SHA\",\"content-type\":\"text/plain\",\"metadata\":{\"owner\":\"deis\"}}\n{\"key\":\"z\",\"size\":0,\"etag\":\"f\",\"sha256\":\"$SHA\",\"last-modified\":\"2026-01-01T00:00:00Z\"}\n"
seed etcd_keys export.json '{"format":1,"root":"/deis","keys":[{"key":"/deis/router/bodySize","value":"1m"},{"key":"/deis/store/gateway/accessKey","value":"k"},{"key":"/deis/x/../store/y","value":"v"}],"excluded":[]}'
seed etcd_keys lines.txt '/deis/database/adminUser\tx\n/deis/a b+c\ty\n/deis//x\n/deis/%2e%2e/store\n/coreos.com/x\n/'
seed sigv2 put.txt 'PUT\n/db_wal/a%20b?x-id=UploadPart&uploadId=2~abc&partNumber=3\nDate: Tue, 27 Mar 2007 21:06:08 +0000\nx-amz-acl: public-read\nX-Amz-Meta-A: 1\nx-amz-meta-a: 2\nContent-Type: text/plain\nContent-MD5: abc=='
seed sigv2 list.txt 'GET\n/johnsmith/?prefix=photos&max-keys=50&acl&versions\nx-amz-date: now\nDate: x'
if [ ! -e seeds/restore/tree.bin ]; then
  mkdir -p seeds/restore
  d=$(mktemp -d)
  mkdir -p "$d/t/dir/sub" && echo hello >"$d/t/dir/file" && ln -s file "$d/t/dir/link" \
    && ln "$d/t/dir/file" "$d/t/dir/hard" && chmod 4755 "$d/t/dir/sub"
  { printf '\0'; tar -C "$d/t" --format=gnu -cf - .; } >seeds/restore/tree.bin
  { printf '\1'; tar -C "$d/t" --format=pax -cf - dir; } >seeds/restore/pax-overwrite.bin
  rm -rf "$d"
fi

echo "building fuzz targets (cargo fuzz build -s $SANITIZER)..."
cargo fuzz build -s "$SANITIZER" >/dev/null 2>build.log || { cat build.log; exit 1; }

declare -A MAXLEN=([manifest]=16384 [restore]=65536 [etcd_keys]=4096 [sigv2]=4096)
summary=()
for t in "${TARGETS[@]}"; do
  mkdir -p "corpus/$t" "artifacts/$t"
  crashes_before=$(find "artifacts/$t" -type f | wc -l)
  execs=0
  runs=0
  end=$((SECONDS + SECONDS_PER_TARGET))
  while [ $((end - SECONDS)) -gt 0 ] && [ $runs -lt 6 ]; do
    runs=$((runs + 1))
    log="corpus/$t$LOGTAG.run$runs.log"
    set +e
    cargo fuzz run -s "$SANITIZER" "$t" "corpus/$t" "seeds/$t" -- \
      -max_total_time=$((end - SECONDS)) -rss_limit_mb="$RSS_MB" -timeout=10 \
      -max_len="${MAXLEN[$t]:-4096}" -print_final_stats=1 >"$log" 2>&1
    rc=$?
    set -e
    n=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | tail -1 | grep -o '[0-9]*$' || true)
    if [ -z "$n" ]; then # no final stats: take the last progress line (#N)
      n=$(grep -o '^#[0-9]*' "$log" | tail -1 | tr -d '#' || true)
    fi
    execs=$((execs + ${n:-0}))
    if [ $rc -ne 0 ]; then
      echo "--- $t: run $runs stopped (exit $rc):"
      grep -E "panicked at|ERROR: libFuzzer|ERROR: AddressSanitizer|ERROR: LeakSanitizer|SUMMARY|Test unit written" "$log" | head -5 || tail -5 "$log"
    else
      break
    fi
  done
  crashes=$(($(find "artifacts/$t" -type f | wc -l) - crashes_before))
  line=$(printf '%-10s %4ss  executions %10s  crashes %s' "$t" "$SECONDS_PER_TARGET" "$execs" "$crashes")
  echo "$line"
  summary+=("$line")
done
echo
echo "=== fuzz summary (FUZZ_SECONDS=$SECONDS_PER_TARGET, FUZZ_SANITIZER=$SANITIZER) ==="
printf '%s\n' "${summary[@]}"
