//! The on-disk (and in-bucket) format of a repository, described for people in `docs/FORMAT.md`.
//!
//! Owns: the names of every file in a repository, and the serde types of the repository config, the
//! snapshot manifest and the bucket listings.
//! Invariants:
//! - Blobs are content-addressed: `blobs/sha256/<first two hex digits>/<sha256 hex>`; the name is
//!   the SHA-256 of the bytes ([`Sha256`]), so equal bytes are stored once.
//! - A part is one blob or a list of segments, never both or neither ([`PartRef`]); a segmented
//!   part's size is the sum of its segments'. A manifest that says otherwise does not parse.
//! - A snapshot is the directory `snapshots/<id>/`; it is complete only when its `manifest.json`
//!   exists, and the manifest is written after everything it names.
//! - Listings are JSON Lines, one object per line, sorted by key.
//! - Nothing here holds a secret: an encrypted repository's config names public keys only.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::error::{Error, Result};
use crate::s3::ObjectMeta;

mod sha256;
mod wal_chain;
pub use sha256::{NotSha256, Sha256};
pub use wal_chain::{BaseBackupChain, WalChain};

/// The format this code writes and reads.
pub const FORMAT: &str = "deis-backup/1";
/// The repository's marker and config, at its root.
pub const CONFIG_FILE: &str = "deis-backup.json";
/// Where snapshots live.
pub const SNAPSHOTS_DIR: &str = "snapshots/";
/// Where blobs live.
pub const BLOBS_DIR: &str = "blobs/sha256/";
/// The manifest's file name inside a snapshot directory.
pub const MANIFEST_FILE: &str = "manifest.json";
/// Where an encrypted repository's blobs live: `blobs/keyed/<ab>/<hmac>.<sealed size>`.
pub const BLOBS_KEYED_DIR: &str = "blobs/keyed/";
/// An encrypted repository's name key, sealed to its operators and its snapshot host.
pub const KEYS_FILE: &str = "keys.age";
/// How an encrypted repository seals its files: zstd, then age to X25519 recipients.
pub const SCHEME: &str = "age-x25519+zstd/1";

/// The repository's marker file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RepositoryConfig {
    pub format: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created: OffsetDateTime,
    /// Absent: a plain repository (every file in the clear).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<Encryption>,
}

/// An encrypted repository's public half: who its files are sealed to. No secret.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Encryption {
    /// [`SCHEME`].
    pub scheme: String,
    /// The operators' age recipients (`age1…`): every file is sealed to them.
    pub recipients: Vec<String>,
    /// The snapshot host's recipient: metadata is sealed to it as well, blobs are not.
    pub host_recipient: String,
}

/// A snapshot's name: `YYYYMMDDTHHMMSS.mmmZ-xxxx` (UTC start time to the millisecond, a random
/// suffix), sortable by time; only `[A-Za-z0-9._-]`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SnapshotId(String);

impl SnapshotId {
    /// A new id from the current UTC time and a random suffix.
    pub fn generate() -> Self {
        let now = time::OffsetDateTime::now_utc();
        let fmt = time::macros::format_description!(
            "[year][month][day]T[hour][minute][second].[subsecond digits:3]Z"
        );
        let stamp = now.format(&fmt).expect("a UTC time formats");
        Self(format!("{stamp}-{:04x}", fastrand::u16(..)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SnapshotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for SnapshotId {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        if safe_name(&s) {
            Ok(Self(s))
        } else {
            Err(Error::config(format!(
                "'{s}' is not a snapshot id (letters, digits, '.', '_', '-' only)"
            )))
        }
    }
}

impl std::str::FromStr for SnapshotId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::try_from(s.to_owned())
    }
}

impl From<SnapshotId> for String {
    fn from(id: SnapshotId) -> Self {
        id.0
    }
}

/// True for names usable as one path segment everywhere: `[A-Za-z0-9._-]+`, not `.`/`..`-led.
pub fn safe_name(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with('.')
        && s.len() <= 200
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// A stored blob: its SHA-256 and size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BlobRef {
    pub sha256: Sha256,
    pub size: u64,
}

/// A part's bytes: one blob, or (store archives) the concatenation of segment blobs in order.
/// On disk, `{"sha256", "size"}` or `{"size", "segments"}` ([`PartFields`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "PartFields", into = "PartFields")]
pub enum PartRef {
    /// The part is one blob.
    Blob(BlobRef),
    /// The part is these segments, in order; never empty.
    Segmented(Vec<SegmentRef>),
}

/// A [`PartRef`] as the manifest spells it.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct PartFields {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sha256: Option<Sha256>,
    size: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    segments: Vec<SegmentRef>,
}

impl TryFrom<PartFields> for PartRef {
    type Error = String;
    fn try_from(p: PartFields) -> std::result::Result<Self, String> {
        match (p.sha256, p.segments.is_empty()) {
            (Some(sha256), true) => Ok(Self::Blob(BlobRef {
                sha256,
                size: p.size,
            })),
            (None, false) => {
                let total = p
                    .segments
                    .iter()
                    .try_fold(0u64, |t, s| t.checked_add(s.size))
                    .ok_or("segment sizes overflow")?;
                if total == p.size {
                    Ok(Self::Segmented(p.segments))
                } else {
                    Err(format!(
                        "segments add up to {total} bytes, the part says {}",
                        p.size
                    ))
                }
            }
            _ => Err("neither one SHA-256 nor a list of segments".into()),
        }
    }
}

impl From<PartRef> for PartFields {
    fn from(p: PartRef) -> Self {
        let size = p.size();
        match p {
            PartRef::Blob(b) => Self {
                sha256: Some(b.sha256),
                size,
                segments: Vec::new(),
            },
            PartRef::Segmented(segments) => Self {
                sha256: None,
                size,
                segments,
            },
        }
    }
}

impl PartRef {
    /// Bytes of the part (of all its segments).
    pub fn size(&self) -> u64 {
        match self {
            Self::Blob(b) => b.size,
            Self::Segmented(segments) => segments.iter().map(|s| s.size).sum(),
        }
    }

    /// The blobs whose concatenation, in this order, is the part.
    pub fn blobs(&self) -> Vec<BlobRef> {
        match self {
            Self::Blob(b) => vec![*b],
            Self::Segmented(segments) => segments.iter().map(SegmentRef::blob).collect(),
        }
    }

    /// The one blob of a part that is not segmented.
    pub fn single(&self) -> Option<BlobRef> {
        match self {
            Self::Blob(b) => Some(*b),
            Self::Segmented(_) => None,
        }
    }

    /// The segments of a segmented part; none for a one-blob part.
    pub fn segments(&self) -> &[SegmentRef] {
        match self {
            Self::Blob(_) => &[],
            Self::Segmented(segments) => segments,
        }
    }
}

impl From<BlobRef> for PartRef {
    fn from(blob: BlobRef) -> Self {
        Self::Blob(blob)
    }
}

/// One segment of a segmented part.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct SegmentRef {
    pub sha256: Sha256,
    pub size: u64,
    /// What the producer fingerprinted the segment's source as (hex); a later snapshot reuses the
    /// segment when the source still has this fingerprint. Absent: never reused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
}

impl SegmentRef {
    /// The blob holding the segment.
    pub fn blob(&self) -> BlobRef {
        BlobRef {
            sha256: self.sha256,
            size: self.size,
        }
    }
}

/// One object of a bucket listing: where it was, what it was, and which blob holds its bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ObjectEntry {
    pub key: String,
    pub size: u64,
    /// The gateway's ETag, without quotes.
    pub etag: String,
    pub sha256: Sha256,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_modified: Option<String>,
    #[serde(flatten)]
    pub meta: ObjectMeta,
}

impl ObjectEntry {
    /// The blob holding the object.
    pub fn blob(&self) -> BlobRef {
        BlobRef {
            sha256: self.sha256,
            size: self.size,
        }
    }
}

/// A bucket in a snapshot: its listing file and totals.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BucketRef {
    /// The listing's path from the repository root.
    pub listing: String,
    pub listing_sha256: Sha256,
    pub objects: u64,
    pub bytes: u64,
    /// Keys listed at the source but gone before their download (deleted meanwhile, as
    /// `wal-e delete retain` does); not in the listing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vanished: Vec<String>,
}

/// A snapshot's manifest: the last file written, the proof the snapshot is complete.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    pub id: SnapshotId,
    /// RFC 3339 UTC.
    #[serde(with = "time::serde::rfc3339")]
    pub started: OffsetDateTime,
    /// RFC 3339 UTC.
    #[serde(with = "time::serde::rfc3339")]
    pub completed: OffsetDateTime,
    /// Free-form facts the coordinator records (cluster, version, ...). Never secrets.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Named parts (database dump, store archives, etcd export, ...).
    #[serde(default)]
    pub parts: BTreeMap<String, PartRef>,
    /// Mirrored buckets by name.
    #[serde(default)]
    pub buckets: BTreeMap<String, BucketRef>,
    /// Where each part came from and how taking it went, by part name.
    #[serde(default)]
    pub part_info: BTreeMap<String, PartInfo>,
    /// The database bucket's WAL-E chain, when it holds WAL-E's layout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wal_e: Option<WalChain>,
    /// What the coordinator warns about the snapshot as a whole (a host that did not take part
    /// and who covered for it, ...). The snapshot is complete nonetheless.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// What the coordinator recorded about a part beyond its bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct PartInfo {
    /// Where the part came from, for people (`agent 3f2a… /var/lib/deis/store`).
    pub source: String,
    /// Bytes before compression, when the part is compressed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw_bytes: Option<u64>,
    pub duration_ms: u64,
    /// The agent's host id, for parts an agent produced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// The store path, for store archives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// For store archives: whether the filesystem was shared by several hosts (CephFS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared: Option<bool>,
    /// For a shared store archive: the other hosts that saw the same filesystem (not archived
    /// again).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub also_on: Vec<String>,
    /// What the producer reported (files that changed while read, ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// For the database dump: the database state it was taken in (server start, WAL position,
    /// next transaction id); a later snapshot reuses the dump while the state is the same.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// For a part carried over unchanged: the snapshot that first took it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub taken_in: Option<String>,
    /// For a segmented part: how many segments were carried over from the previous snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub segments_reused: Option<u64>,
    /// For the database dump: the rows it holds of the Deis controller's tables (`apps`,
    /// `releases`, `keys`, `domains`, `users`), counted from the dump when it was taken; a
    /// restore drill compares the loaded database with them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub figures: BTreeMap<String, u64>,
}

/// `blobs/sha256/ab/ab12...`.
pub fn blob_path(sha256: &Sha256) -> String {
    let hex = sha256.to_hex();
    format!("{BLOBS_DIR}{}/{hex}", &hex[..2])
}

impl Manifest {
    /// Checks what parsing cannot: every part and bucket name safe, each bucket's listing where
    /// the format puts it. (Digests and part shapes are checked by parsing.) One line names the
    /// first fault.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(Error::repository(format!("snapshot {}: {what}", self.id)));
        for name in self.parts.keys() {
            if !name.split('/').all(safe_name) {
                return bad(format!("part name {name:?} is not a safe name"));
            }
        }
        for (bucket, b) in &self.buckets {
            if !safe_name(bucket) {
                return bad(format!("bucket name {bucket:?} is not a safe name"));
            }
            if b.listing != listing_path(&self.id, bucket) {
                return bad(format!("bucket {bucket}: listing at an unexpected path"));
            }
        }
        Ok(())
    }
}

/// Checks one listing entry: its key one an S3 gateway can hold (its digest is checked by parsing).
fn validate_entry(e: &ObjectEntry) -> std::result::Result<(), String> {
    // S3 keys may hold any UTF-8, control characters included; only emptiness and length are
    // beyond what a gateway can store.
    if e.key.is_empty() || e.key.len() > 1024 {
        return Err("its key is empty or longer than 1024 bytes".into());
    }
    Ok(())
}

/// `snapshots/<id>/`.
pub fn snapshot_dir(id: &SnapshotId) -> String {
    format!("{SNAPSHOTS_DIR}{id}/")
}

/// `snapshots/<id>/manifest.json`.
pub fn manifest_path(id: &SnapshotId) -> String {
    format!("{SNAPSHOTS_DIR}{id}/{MANIFEST_FILE}")
}

/// `snapshots/<id>/buckets/<bucket>.jsonl`.
pub fn listing_path(id: &SnapshotId, bucket: &str) -> String {
    format!("{SNAPSHOTS_DIR}{id}/buckets/{bucket}.jsonl")
}

/// Parses the manifest of snapshot `id`; one line names where it is wrong (`parts.database.sha256:
/// not a SHA-256 …`), then [`Manifest::validate`] checks the names.
pub fn decode_manifest(data: &[u8], id: &SnapshotId) -> Result<Manifest> {
    let de = &mut serde_json::Deserializer::from_slice(data);
    let m: Manifest = serde_path_to_error::deserialize(de).map_err(|e| {
        Error::repository(format!(
            "snapshot {id}: bad manifest: {}: {}",
            e.path(),
            e.inner()
        ))
    })?;
    if m.format != FORMAT {
        return Err(Error::repository(format!(
            "snapshot {id} has format {}, this deis-backup reads {FORMAT}",
            m.format
        )));
    }
    if m.id != *id {
        return Err(Error::repository(format!(
            "snapshot {id}: its manifest names snapshot {}",
            m.id
        )));
    }
    m.validate()?;
    Ok(m)
}

/// Encodes a listing as JSON Lines, sorted by key.
pub fn encode_listing(entries: &[ObjectEntry]) -> Result<Vec<u8>> {
    let mut sorted: Vec<&ObjectEntry> = entries.iter().collect();
    sorted.sort_by(|a, b| a.key.cmp(&b.key));
    let mut out = Vec::with_capacity(entries.len() * 200);
    for e in sorted {
        serde_json::to_writer(&mut out, e)
            .map_err(|err| Error::repository(format!("encoding listing entry: {err}")))?;
        out.push(b'\n');
    }
    Ok(out)
}

/// Decodes a JSON Lines listing.
pub fn decode_listing(data: &[u8], what: &str) -> Result<Vec<ObjectEntry>> {
    data.split(|b| *b == b'\n')
        .enumerate()
        .filter(|(_, l)| !l.is_empty())
        .map(|(i, l)| {
            let e: ObjectEntry = serde_json::from_slice(l).map_err(|e| {
                Error::repository(format!("{what} line {}: not a listing entry: {e}", i + 1))
            })?;
            validate_entry(&e)
                .map_err(|why| Error::repository(format!("{what} line {}: {why}", i + 1)))?;
            Ok(e)
        })
        .collect()
}

#[cfg(test)]
mod proptests;

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "20261124T233000.123Z-abcd";

    /// A manifest whose `database` part is `part` (JSON), as it would sit on disk.
    fn manifest_json(part: &serde_json::Value) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "format": FORMAT,
            "id": ID,
            "started": "2026-11-24T23:30:00.123Z",
            "completed": "2026-11-24T23:31:00Z",
            "parts": {"database": part},
        }))
        .unwrap()
    }

    fn decode(part: &serde_json::Value) -> Result<Manifest> {
        decode_manifest(&manifest_json(part), &ID.parse().unwrap())
    }

    #[test]
    fn a_well_formed_manifest_round_trips_to_the_same_json() {
        let sha = "a".repeat(64);
        let seg = serde_json::json!({"sha256": sha, "size": 2, "fingerprint": "00ff"});
        for part in [
            serde_json::json!({"sha256": sha, "size": 1}),
            serde_json::json!({"size": 4, "segments": [seg, seg]}),
        ] {
            let m = decode(&part).unwrap();
            let again: serde_json::Value = serde_json::to_value(&m).unwrap();
            assert_eq!(again["parts"]["database"], part);
            assert_eq!(again["started"], "2026-11-24T23:30:00.123Z");
            assert_eq!(again["completed"], "2026-11-24T23:31:00Z");
        }
        let m = decode(&serde_json::json!({"size": 4, "segments": [seg, seg]})).unwrap();
        assert_eq!(m.parts["database"].size(), 4);
        assert_eq!(m.parts["database"].blobs().len(), 2);
    }

    #[test]
    fn tampered_manifests_are_one_clear_error_naming_the_place() {
        let sha = "a".repeat(64);
        let seg = |sha256: &str, size: u64| serde_json::json!({"sha256": sha256, "size": size});
        for (part, want) in [
            (
                serde_json::json!({"sha256": "é".repeat(32), "size": 1}),
                "not a SHA-256",
            ),
            (
                serde_json::json!({"sha256": "../../x", "size": 1}),
                "not a SHA-256",
            ),
            (serde_json::json!({"size": 1}), "neither"),
            (
                serde_json::json!({"sha256": sha, "size": 2, "segments": [seg(&sha, 2)]}),
                "neither",
            ),
            (
                serde_json::json!({"size": 0, "segments": [seg(&sha, u64::MAX), seg(&sha, 2)]}),
                "overflow",
            ),
            (
                serde_json::json!({"size": 5, "segments": [seg(&sha, 2)]}),
                "add up",
            ),
            (
                serde_json::json!({"size": 2, "segments": [seg("ÿ", 2)]}),
                "not a SHA-256",
            ),
        ] {
            let e = decode(&part).unwrap_err().to_string();
            assert!(e.contains(want), "{part}: {e}");
            assert!(e.contains("parts.database"), "{part}: {e}");
            assert_eq!(e.lines().count(), 1, "{e}");
        }
        let mut bad_time = serde_json::from_slice::<serde_json::Value>(&manifest_json(
            &serde_json::json!({"sha256": sha, "size": 1}),
        ))
        .unwrap();
        bad_time["started"] = "yesterday".into();
        let e = decode_manifest(
            &serde_json::to_vec(&bad_time).unwrap(),
            &ID.parse().unwrap(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("started"), "{e}");
    }

    #[test]
    fn listing_entries_are_checked() {
        let line = |sha: &str, key: &str| {
            format!(r#"{{"key":{key:?},"size":1,"etag":"x","sha256":{sha:?}}}"#)
        };
        let ok = line(&"b".repeat(64), "a/b");
        assert_eq!(decode_listing(ok.as_bytes(), "l").unwrap().len(), 1);
        for bad in [
            line("é", "a"),
            line(&"B".repeat(64), "a"),
            line(&"b".repeat(64), ""),
            line(&"b".repeat(64), &"k".repeat(1025)),
        ] {
            let e = decode_listing(bad.as_bytes(), "l").unwrap_err();
            assert!(e.to_string().contains("line 1"), "{e}");
        }
    }

    #[test]
    fn ids_are_safe_and_sortable() {
        let a = SnapshotId::generate();
        assert!(safe_name(a.as_str()), "{a}");
        assert_eq!(a.as_str().len(), "20261124T233000.123Z-abcd".len());
        assert!("../x".parse::<SnapshotId>().is_err());
        assert!("a/b".parse::<SnapshotId>().is_err());
        assert!("".parse::<SnapshotId>().is_err());
    }

    #[test]
    fn paths() {
        let id: SnapshotId = "s1".parse().unwrap();
        let sha = Sha256::of(b"");
        assert_eq!(blob_path(&sha), format!("blobs/sha256/e3/{sha}"));
        assert_eq!(manifest_path(&id), "snapshots/s1/manifest.json");
        assert_eq!(
            listing_path(&id, "db_wal"),
            "snapshots/s1/buckets/db_wal.jsonl"
        );
    }

    #[test]
    fn listing_round_trips_odd_keys_and_metadata() {
        let mut meta = ObjectMeta {
            content_type: Some("text/plain".into()),
            ..ObjectMeta::default()
        };
        meta.metadata.insert("owner".into(), "deis".into());
        let entries = vec![
            ObjectEntry {
                key: "z/ü a+b%20\n".into(),
                size: 3,
                etag: "e".into(),
                sha256: "c".repeat(64).parse().unwrap(),
                last_modified: None,
                meta,
            },
            ObjectEntry {
                key: "/a//b".into(),
                size: 0,
                etag: "e2".into(),
                sha256: "d".repeat(64).parse().unwrap(),
                last_modified: Some("2026-01-01T00:00:00Z".into()),
                meta: ObjectMeta::default(),
            },
        ];
        let enc = encode_listing(&entries).unwrap();
        let text = String::from_utf8(enc.clone()).unwrap();
        assert_eq!(text.lines().count(), 2);
        assert!(text.contains("\"content-type\":\"text/plain\""), "{text}");
        let dec = decode_listing(&enc, "t").unwrap();
        assert_eq!(dec[0], entries[1], "sorted by key");
        assert_eq!(dec[1], entries[0]);
    }
}
