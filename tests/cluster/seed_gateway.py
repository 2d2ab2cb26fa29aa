#!/usr/bin/env python3
"""Seeds the Deis store-gateway's buckets with data shaped like a real Deis v1 cluster's.

Owns: the objects of the database bucket (WAL-E: base backups and WAL segments) and of the registry
bucket (Docker registry v1 layout), and the manifest that lists them.

Invariants:
- Deterministic: the same --size gives the same keys, bytes, content types and metadata on every run and
  every cluster (fixed PRNG seeds, one per object); nothing depends on time, keys or thread order.
- The gateway endpoint, its S3 keys and the bucket names are read from etcd (v2 API), as a Deis
  component reads them; nothing about the cluster is hard-coded. `--database-bucket` puts the
  WAL-E-shaped objects in another bucket: the source cluster's database (the wal-e flavour) writes
  its own `db_wal`, and these synthetic ones (multipart objects, metadata) stay for the gateway
  and mirror tests.
- After a successful run each bucket holds exactly the manifest's objects (a listing checks every size
  and ETag; objects not in the manifest are deleted), then the manifest is written, then the marker.
- Objects of CHUNK bytes or more are uploaded in CHUNK-sized multipart parts, so the manifest's ETags
  (md5 for single PUTs, md5-of-part-md5s-N for multipart) are what the gateway reports.

Run with the tools venv's python (boto3):  seed_gateway.py --size small|large --manifest M --marker F
`--plan` prints what a size holds without touching the gateway.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import gzip
import hashlib
import io
import json
import math
import os
import random
import sys
import time
import urllib.request

KiB = 1 << 10
MiB = 1 << 20
# multipart threshold and part size: the ETags in the manifest depend on it
CHUNK = 8 * MiB
WALE_VERSION = "0.8.1"
PG_VERSION = (
    "PostgreSQL 9.3.10 on x86_64-unknown-linux-gnu, compiled by gcc (Ubuntu 4.8.2-19ubuntu1) 4.8.2, 64-bit"
)
EPOCH = 1447000000  # November 2015, Deis v1 days


@dataclasses.dataclass
class Obj:
    bucket_role: str  # "database" or "registry"; the bucket name comes from etcd
    key: str
    content_type: str
    # either the bytes themselves (small documents) or (seed, size, random share) for generated data
    data: bytes | None = None
    gen: tuple[str, int, float] | None = None
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)
    cache_control: str | None = None
    content_encoding: str | None = None

    @property
    def size(self) -> int:
        return len(self.data) if self.data is not None else self.gen[1]

    def body(self) -> bytes:
        return self.data if self.data is not None else generated_bytes(*self.gen)


def generated_bytes(seed: str, size: int, random_share: float) -> bytes:
    """Bytes that compress like real data: random runs (already-compressed content) between repetitive
    runs (zero pages, repeated records), in the given share."""
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < size:
        n = min(size - len(out), rng.randrange(4 * KiB, 64 * KiB))
        if rng.random() < random_share:
            out += rng.randbytes(n)
        else:
            unit = rng.randbytes(rng.choice((1, 8, 64, 512)))
            out += (unit * (n // len(unit) + 1))[:n]
    return bytes(out)


def jdump(value) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def hex_id(rng: random.Random, bits: int = 256) -> str:
    return f"{rng.getrandbits(bits):0{bits // 4}x}"


# ---------------------------------------------------------------------------------------------- plan


@dataclasses.dataclass
class Shape:
    base_backups: int
    parts: tuple[int, int]  # tar partitions per base backup
    part_size: tuple[int, int]
    wal_segments: int
    wal_median: int  # compressed segment size, log-normal around this, within wal_bounds
    wal_bounds: tuple[int, int]
    repos: int
    base_chains: int  # shared base images (stacks) the apps build on
    base_chain_len: int
    own_images: tuple[int, int]  # images per repo on top of its base chain
    layer_classes: tuple[tuple[float, int, int], ...]  # (share, min, max) of layer sizes
    workers: int


SHAPES = {
    # ~60 objects, ~40 MiB: a 0-byte layer and a 12.5 MiB (multipart) tar partition are fixed below
    "small": Shape(
        base_backups=2, parts=(2, 3), part_size=(300 * KiB, 2500 * KiB), wal_segments=10,
        wal_median=1 * MiB, wal_bounds=(150 * KiB, 2500 * KiB), repos=3, base_chains=1,
        base_chain_len=2, own_images=(1, 3),
        layer_classes=((0.25, 1 * KiB, 64 * KiB), (0.35, 256 * KiB, 3 * MiB), (0.4, 3 * MiB, 7 * MiB)),
        workers=8,
    ),
    # ~10,000 objects, ~2 GiB: mostly small registry files, WAL segments up to 16 MiB, some tens of MiB
    "large": Shape(
        base_backups=3, parts=(5, 8), part_size=(4 * MiB, 32 * MiB), wal_segments=200,
        wal_median=2 * MiB, wal_bounds=(200 * KiB, 16 * MiB), repos=150, base_chains=6,
        base_chain_len=8, own_images=(8, 20),
        layer_classes=((0.05, 0, 0), (0.5, 32, 16 * KiB), (0.35, 16 * KiB, 512 * KiB),
                       (0.092, 512 * KiB, 6 * MiB), (0.008, 10 * MiB, 40 * MiB)),
        workers=16,
    ),
}


def segment_name(n: int, timeline: int = 1) -> str:
    """WAL segment file name: timeline, log, segment (16 MiB segments, 256 per log)."""
    return f"{timeline:08X}{n // 256:08X}{n % 256:08X}"


def plan_database(rng: random.Random, shape: Shape, small: bool) -> list[Obj]:
    objs: list[Obj] = []
    wale_meta = {"wal-e-version": WALE_VERSION}
    first, last = 4, 4 + shape.wal_segments - 1
    starts = [first + (last - first) * i // shape.base_backups for i in range(shape.base_backups)]
    for b, start in enumerate(starts):
        seg = segment_name(start)
        offset = f"{rng.randrange(0x28, 0x800000, 8):08X}"
        name = f"base_{seg}_{offset}"
        prefix = f"basebackups_005/{name}"
        nparts = rng.randint(*shape.parts)
        sizes = [rng.randint(*shape.part_size) for _ in range(nparts)]
        if small and b == 0:
            sizes[0] = 12 * MiB + 512 * KiB  # needs multipart (two CHUNK parts)
        expanded = 0
        for p, size in enumerate(sizes):
            expanded += size * 3
            objs.append(Obj("database", f"{prefix}/tar_partitions/part_{p:08d}.tar.lzo", "application/x-lzop",
                            gen=(f"db/{name}/{p}", size, 0.8), metadata=dict(wale_meta)))
        objs.append(Obj("database", f"{prefix}/extended_version.txt", "text/plain", data=PG_VERSION.encode()))
        stop_seg = segment_name(start + rng.randint(0, 1))
        sentinel = {
            "wal_segment_backup_start": seg,
            "wal_segment_offset_backup_start": offset,
            "wal_segment_backup_stop": stop_seg,
            "wal_segment_offset_backup_stop": f"{rng.randrange(0x28, 0x1000000, 8):08X}",
            "expanded_size_bytes": expanded,
        }
        objs.append(Obj("database", f"{prefix}_backup_stop_sentinel.json", "application/json",
                        data=jdump(sentinel)))
        # the backup history file PostgreSQL archives at pg_stop_backup, pushed by wal-push
        objs.append(Obj("database", f"wal_005/{seg}.{offset}.backup.lzo", "application/x-lzop",
                        gen=(f"db/{seg}.{offset}.backup", rng.randint(250, 400), 0.9), metadata=dict(wale_meta)))
    lo, hi = shape.wal_bounds
    for n in range(first, last + 1):
        size = int(min(hi, max(lo, rng.lognormvariate(math.log(shape.wal_median), 0.9))))
        seg = segment_name(n)
        meta = dict(wale_meta) if n % 2 == 0 else {}
        objs.append(Obj("database", f"wal_005/{seg}.lzo", "application/x-lzop",
                        gen=(f"db/wal/{seg}", size, 0.8), metadata=meta))
    return objs


def layer_size(rng: random.Random, shape: Shape) -> int:
    pick = rng.random()
    for share, lo, hi in shape.layer_classes:
        if pick < share:
            return rng.randint(lo, hi)
        pick -= share
    return rng.randint(*shape.layer_classes[-1][1:])


def plan_registry(rng: random.Random, shape: Shape, small: bool) -> list[Obj]:
    objs: list[Obj] = []
    images: dict[str, str | None] = {}  # id -> parent, in creation order

    def new_image(parent: str | None, created: int, size: int, comment: str) -> str:
        image_id = hex_id(rng)
        images[image_id] = parent
        chain = [image_id]
        while images[chain[-1]] is not None:
            chain.append(images[chain[-1]])
        tarsum = "tarsum+sha256:" + hashlib.sha256(f"{image_id}/{size}".encode()).hexdigest()
        meta = {
            "id": image_id,
            "parent": parent,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S.000000000Z", time.gmtime(created)),
            "container_config": {"Cmd": ["/bin/sh", "-c", comment], "Env": ["PATH=/usr/local/bin:/usr/bin:/bin"]},
            "docker_version": "1.8.3",
            "architecture": "amd64",
            "os": "linux",
            "Size": size,
        }
        if parent is None:
            del meta["parent"]
        n = len(images)
        doc = jdump(meta)
        encoding = None
        if n % 17 == 3:  # a few stored gzip-encoded, as a proxy in front of the registry could
            doc, encoding = gzip.compress(doc, mtime=0), "gzip"
        objs.append(Obj("registry", f"images/{image_id}/json", "application/json", data=doc,
                        content_encoding=encoding))
        objs.append(Obj("registry", f"images/{image_id}/layer", "application/octet-stream",
                        gen=(f"registry/{image_id}", size, 0.97),
                        metadata={"checksum": tarsum} if n % 3 == 0 else {},
                        cache_control="max-age=31536000" if n % 5 == 1 else None))
        objs.append(Obj("registry", f"images/{image_id}/ancestry", "application/json", data=jdump(chain)))
        objs.append(Obj("registry", f"images/{image_id}/_checksum", "text/plain", data=tarsum.encode()))
        return image_id

    created = EPOCH
    stacks = []
    for s in range(shape.base_chains):
        chain = []
        for i in range(shape.base_chain_len):
            created += rng.randint(60, 86400)
            size = 0 if (s == 0 and i == 1) else layer_size(rng, shape)  # an empty layer, always
            chain.append(new_image(chain[-1] if chain else None, created, size, f"#(nop) stack {s} step {i}"))
        stacks.append(chain)

    words = ["go", "ruby", "python", "node", "java", "php", "scala", "clojure", "static", "dockerfile"]
    for r in range(shape.repos):
        name = f"{rng.choice(words)}-{rng.choice(['example', 'web', 'worker', 'api', 'app'])}-{r:03d}"
        chain = list(rng.choice(stacks))
        for i in range(rng.randint(*shape.own_images)):
            created += rng.randint(60, 3600)
            chain.append(new_image(chain[-1], created, layer_size(rng, shape), f"deis release {name} step {i}"))
        prefix = f"repositories/library/{name}"
        index = [{"id": i} for i in reversed(chain)]
        repo_json = jdump({"last_update": created, "docker_version": "1.8.3", "docker_go_version": "go1.4.2",
                           "arch": "amd64", "os": "linux", "kernel": "4.3.0-coreos"})
        objs.append(Obj("registry", f"{prefix}/_index_images", "application/json", data=jdump(index)))
        objs.append(Obj("registry", f"{prefix}/json", "application/json", data=repo_json))
        tags = {"latest": chain[-1], "v1": chain[shape.base_chain_len]}
        for v in range(2, 2 + rng.randint(0, min(3, len(chain) - shape.base_chain_len - 1))):
            tags[f"v{v}"] = chain[shape.base_chain_len + v - 1]
        for tag, image_id in tags.items():
            objs.append(Obj("registry", f"{prefix}/tag_{tag}", "application/octet-stream", data=image_id.encode()))
        objs.append(Obj("registry", f"{prefix}/taglatest_json", "application/json", data=repo_json))
    return objs


def plan(size: str) -> tuple[Shape, list[Obj]]:
    shape = SHAPES[size]
    rng = random.Random(f"deis-backup gateway seed {size} v1")
    objs = plan_database(rng, shape, size == "small") + plan_registry(rng, shape, size == "small")
    keys = [(o.bucket_role, o.key) for o in objs]
    assert len(set(keys)) == len(keys), "duplicate keys in the plan"
    return shape, objs


# ------------------------------------------------------------------------------------------ gateway


def etcd_get(endpoint: str, key: str) -> str:
    with urllib.request.urlopen(f"{endpoint}/v2/keys{key}", timeout=10) as resp:
        return json.load(resp)["node"]["value"]


def etag_of(body: bytes) -> str:
    if len(body) < CHUNK:
        return hashlib.md5(body).hexdigest()
    parts = [hashlib.md5(body[i:i + CHUNK]).digest() for i in range(0, len(body), CHUNK)]
    return f"{hashlib.md5(b''.join(parts)).hexdigest()}-{len(parts)}"


def record(obj: Obj, bucket: str, body: bytes) -> dict:
    return {
        "bucket": bucket,
        "key": obj.key,
        "size": len(body),
        "sha256": hashlib.sha256(body).hexdigest(),
        "md5": hashlib.md5(body).hexdigest(),
        "etag": etag_of(body),
        "content_type": obj.content_type,
        "metadata": obj.metadata,
        "cache_control": obj.cache_control,
        "content_encoding": obj.content_encoding,
    }


def log(msg: str) -> None:
    print(f"[seed_gateway {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def seed(size: str, manifest_path: str, marker_path: str, etcd: str, database_bucket: str | None) -> None:
    import boto3
    from boto3.s3.transfer import TransferConfig
    from botocore.config import Config
    from botocore.exceptions import ClientError

    shape, objs = plan(size)
    host = etcd_get(etcd, "/deis/store/gateway/host")
    port = etcd_get(etcd, "/deis/store/gateway/port")
    buckets = {
        "database": database_bucket or etcd_get(etcd, "/deis/database/bucketName"),
        "registry": etcd_get(etcd, "/deis/registry/bucketName"),
    }
    s3 = boto3.client(
        "s3",
        endpoint_url=f"http://{host}:{port}",
        aws_access_key_id=etcd_get(etcd, "/deis/store/gateway/accessKey"),
        aws_secret_access_key=etcd_get(etcd, "/deis/store/gateway/secretKey"),
        region_name="us-east-1",
        config=Config(
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            retries={"max_attempts": 6, "mode": "standard"},
            max_pool_connections=shape.workers * 4,
            # radosgw (and Deis' Hammer gateway) predate the flexible-checksum headers
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        ),
    )
    transfer = TransferConfig(multipart_threshold=CHUNK, multipart_chunksize=CHUNK, max_concurrency=4)

    for name in buckets.values():
        try:
            s3.head_bucket(Bucket=name)
        except ClientError:
            s3.create_bucket(Bucket=name)

    total = sum(o.size for o in objs)
    log(f"seeding '{size}': {len(objs)} objects, {total / MiB:.1f} MiB into {sorted(buckets.values())} "
        f"at {host}:{port} ({shape.workers} threads)")

    def upload(obj: Obj) -> dict:
        body = obj.body()
        extra = {"ContentType": obj.content_type}
        if obj.metadata:
            extra["Metadata"] = obj.metadata
        if obj.cache_control:
            extra["CacheControl"] = obj.cache_control
        if obj.content_encoding:
            extra["ContentEncoding"] = obj.content_encoding
        bucket = buckets[obj.bucket_role]
        if len(body) < CHUNK:  # one PUT; s3transfer's machinery costs more than the request itself
            s3.put_object(Bucket=bucket, Key=obj.key, Body=body, **extra)
        else:
            s3.upload_fileobj(io.BytesIO(body), bucket, obj.key, ExtraArgs=extra, Config=transfer)
        return record(obj, bucket, body)

    t0 = time.monotonic()
    records: list[dict] = []
    done_bytes = 0
    last_report = t0
    # biggest first, so the long uploads overlap the many small ones
    order = sorted(objs, key=lambda o: -o.size)
    with concurrent.futures.ThreadPoolExecutor(shape.workers) as pool:
        for rec in pool.map(upload, order):
            records.append(rec)
            done_bytes += rec["size"]
            now = time.monotonic()
            if now - last_report >= 5:
                last_report = now
                log(f"{len(records)}/{len(objs)} objects, {done_bytes / MiB:.0f}/{total / MiB:.0f} MiB")
    elapsed = time.monotonic() - t0
    log(f"uploaded {total / MiB:.1f} MiB in {elapsed:.1f} s ({total / MiB / max(elapsed, 1e-3):.0f} MiB/s)")

    # The listing must show exactly the plan: sizes and ETags as computed; anything else goes.
    want = {(r["bucket"], r["key"]): r for r in records}
    extra_keys = []
    for name in buckets.values():
        for page in s3.get_paginator("list_objects").paginate(Bucket=name):
            for item in page.get("Contents", []):
                rec = want.get((name, item["Key"]))
                if rec is None:
                    extra_keys.append((name, item["Key"]))
                    continue
                etag = item["ETag"].strip('"')
                if item["Size"] != rec["size"] or etag != rec["etag"]:
                    raise SystemExit(f"{name}/{item['Key']}: gateway lists size {item['Size']} etag {etag}, "
                                     f"seeded {rec['size']} {rec['etag']}")
                rec["listed"] = True
    missing = [k for k, r in want.items() if not r.pop("listed", False)]
    if missing:
        raise SystemExit(f"{len(missing)} seeded objects missing from the listing, e.g. {missing[:3]}")
    if extra_keys:
        log(f"deleting {len(extra_keys)} objects that are not part of seed '{size}'")
        # one DeleteObject each: DeleteObjects needs a Content-MD5 that new botocore no longer sends
        with concurrent.futures.ThreadPoolExecutor(shape.workers) as pool:
            list(pool.map(lambda bk: s3.delete_object(Bucket=bk[0], Key=bk[1]), extra_keys))

    records.sort(key=lambda r: (r["bucket"], r["key"]))
    manifest = {
        "size": size,
        "chunk_bytes": CHUNK,
        "buckets": buckets,
        "count": len(records),
        "total_bytes": total,
        "objects": records,
    }
    tmp = f"{manifest_path}.tmp"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, manifest_path)
    with open(marker_path, "w") as f:
        f.write(f"{size} {len(records)} objects {total} bytes\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(SHAPES), required=True)
    ap.add_argument("--manifest", help="where to write the manifest (JSON)")
    ap.add_argument("--marker", help="file written last, once the buckets match the manifest")
    ap.add_argument("--etcd", default=os.environ.get("DEIS_ETCD_ENDPOINT", "http://127.0.0.1:4001"))
    ap.add_argument("--database-bucket", help="bucket of the WAL-E-shaped objects (default: etcd's bucketName)")
    ap.add_argument("--plan", action="store_true", help="print what the size holds, touch nothing")
    args = ap.parse_args()
    if args.plan:
        _, objs = plan(args.size)
        for role in ("database", "registry"):
            sel = [o for o in objs if o.bucket_role == role]
            sizes = sorted(o.size for o in sel)
            print(f"{role}: {len(sel)} objects, {sum(sizes) / MiB:.1f} MiB, "
                  f"min {sizes[0]} max {sizes[-1] / MiB:.1f} MiB, "
                  f"multipart {sum(s >= CHUNK for s in sizes)}, empty {sum(s == 0 for s in sizes)}")
        print(f"total: {len(objs)} objects, {sum(o.size for o in objs) / MiB:.1f} MiB")
        return
    if not (args.manifest and args.marker):
        ap.error("--manifest and --marker are required unless --plan")
    seed(args.size, args.manifest, args.marker, args.etcd, args.database_bucket)


if __name__ == "__main__":
    main()
