//! WAL-E's layout in the database bucket (`db_wal`), read from a bucket listing: the base backups
//! it holds, its WAL segments, and whether the base backup a restored database fetches has every
//! segment its recovery replays.
//!
//! Owns: [`Segment`] (a WAL segment's name and its successor), WAL-E's key names, and [`chain`]
//! (the analysis recorded in the manifest as a [`WalChain`]).
//! Invariants:
//! - Reads the listing and the stop sentinels (small JSON objects) only, never a base backup.
//! - "Newest" is what `wal-e backup-fetch LATEST` (Deis' boot) picks: the sentinel modified last;
//!   equal times go to the greater name, the later WAL position.
//! - A base backup needs the segments from the one its name starts with (`base_<segment>_…`) to
//!   its sentinel's `wal_segment_backup_stop`, both included, on the start's timeline. Segments are 16 MiB
//!   (PostgreSQL's default, which WAL-E assumes): 256 to a log file since PostgreSQL 9.3.
//! - A listing holds a restorable chain by construction when it is one ascending pass over the
//!   bucket ([`crate::s3`]'s listing is): `basebackups_005/` sorts before `wal_005/`, WAL-E writes
//!   a sentinel only after `pg_stop_backup` archived the stop segment, and a segment written after
//!   its page was listed sorts after it, so every segment a listed sentinel needs is listed too
//!   unless it was deleted meanwhile (`wal-e delete retain` deletes only what is older than the
//!   oldest base backup it keeps).
//! - A bucket with no WAL-E key has no chain (`None`).

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use serde::Deserialize;
use time::OffsetDateTime;

use crate::error::{Error, Result};
use crate::repository::{BaseBackupChain, ObjectEntry, Repository, Sha256, WalChain};

/// Segments in one log file (`0xFFFFFFFF / 16 MiB`, rounded up: 9.3+ uses all 256).
const SEGMENTS_PER_LOG: u64 = 0x100;
/// A base backup claiming more segments than this is taken as a broken sentinel (1 PiB of WAL).
const MAX_SEGMENTS: u64 = 1 << 26;

/// A WAL segment: timeline, log file and segment, as PostgreSQL names it (24 hex digits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Segment {
    timeline: u32,
    log: u32,
    seg: u32,
}

impl Segment {
    /// Its place in the WAL, across log files.
    fn position(self) -> u64 {
        u64::from(self.log) * SEGMENTS_PER_LOG + u64::from(self.seg)
    }

    fn at(timeline: u32, position: u64) -> Self {
        Self {
            timeline,
            log: u32::try_from(position / SEGMENTS_PER_LOG).unwrap_or(u32::MAX),
            seg: u32::try_from(position % SEGMENTS_PER_LOG).expect("below 256"),
        }
    }
}

impl fmt::Display for Segment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:08X}{:08X}{:08X}", self.timeline, self.log, self.seg)
    }
}

/// Not a WAL segment name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotSegment;

impl FromStr for Segment {
    type Err = NotSegment;
    fn from_str(s: &str) -> std::result::Result<Self, NotSegment> {
        if s.len() != 24 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(NotSegment);
        }
        let part = |i: usize| u32::from_str_radix(&s[i..i + 8], 16).map_err(|_| NotSegment);
        let seg = Self {
            timeline: part(0)?,
            log: part(8)?,
            seg: part(16)?,
        };
        if u64::from(seg.seg) >= SEGMENTS_PER_LOG || seg.timeline == 0 {
            return Err(NotSegment);
        }
        Ok(seg)
    }
}

/// `basebackups_005/base_<segment>_<offset>_backup_stop_sentinel.json` → (`005`, `base_…`).
fn sentinel_key(key: &str) -> Option<(&str, &str)> {
    let rest = key.strip_prefix("basebackups_")?;
    let (version, file) = rest.split_once('/')?;
    let name = file.strip_suffix("_backup_stop_sentinel.json")?;
    let (seg, offset) = name.strip_prefix("base_")?.split_once('_')?;
    (layout_version(version)
        && seg.parse::<Segment>().is_ok()
        && offset.len() == 8
        && offset.bytes().all(|b| b.is_ascii_hexdigit()))
    .then_some((version, name))
}

/// Whether `key` is a WAL-E stop sentinel (the file whose presence makes a base backup).
pub fn is_stop_sentinel(key: &str) -> bool {
    sentinel_key(key).is_some()
}

/// `wal_005/<segment>.lzo` → (`005`, the segment). History and backup label files are not
/// segments.
fn wal_key(key: &str) -> Option<(&str, Segment)> {
    let rest = key.strip_prefix("wal_")?;
    let (version, file) = rest.split_once('/')?;
    let seg = file.strip_suffix(".lzo")?.parse().ok()?;
    layout_version(version).then_some((version, seg))
}

fn layout_version(v: &str) -> bool {
    v.len() == 3 && v.bytes().all(|b| b.is_ascii_digit())
}

/// The part of a stop sentinel that says where a base backup's WAL ends. Where it starts is in
/// the base backup's name (WAL-E 1.x writes no `wal_segment_backup_start`; 0.x did, with the
/// same value).
#[derive(Deserialize)]
struct Sentinel {
    wal_segment_backup_stop: String,
}

/// Works out `bucket`'s chain from its listing; `read` gives an object's bytes (a sentinel's, from
/// the repository or the gateway). `None`: the listing holds no WAL-E key.
pub async fn chain<F, Fut>(
    bucket: &str,
    entries: &[ObjectEntry],
    read: F,
) -> Result<Option<WalChain>>
where
    F: Fn(&ObjectEntry) -> Fut,
    Fut: Future<Output = Result<Vec<u8>>>,
{
    let mut layout: Option<&str> = None;
    let mut backups: Vec<(Option<OffsetDateTime>, &str, &ObjectEntry)> = Vec::new();
    let mut segments: BTreeSet<Segment> = BTreeSet::new();
    for e in entries {
        if let Some((version, name)) = sentinel_key(&e.key) {
            layout.get_or_insert(version);
            backups.push((modified(e), name, e));
        } else if let Some((version, seg)) = wal_key(&e.key) {
            layout.get_or_insert(version);
            segments.insert(seg);
        }
    }
    let Some(layout) = layout else {
        return Ok(None);
    };
    backups.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
    let mut latest = None;
    let mut restorable = None;
    for (_, name, entry) in backups.iter().rev() {
        let c = needs(name, &read(entry).await?, &segments);
        let whole = c.missing == 0;
        if latest.is_none() {
            latest = Some(c.clone());
        }
        if whole {
            restorable = Some(c);
            break;
        }
    }
    let postgres_version = match restorable.as_ref().or(latest.as_ref()) {
        Some(b) => {
            let key = format!("basebackups_{layout}/{}/extended_version.txt", b.name);
            match entries.iter().find(|e| e.key == key) {
                Some(e) => version_line(&read(e).await?),
                None => None,
            }
        }
        None => None,
    };
    Ok(Some(WalChain {
        bucket: bucket.to_owned(),
        layout: layout.to_owned(),
        base_backups: backups.len() as u64,
        wal_segments: segments.len() as u64,
        latest,
        restorable,
        postgres_version,
    }))
}

/// [`chain`] of `bucket`'s `entries`, with the sentinels read from `repo` (where the snapshot
/// stored them).
pub async fn chain_in(
    repo: &Repository,
    bucket: &str,
    entries: &[ObjectEntry],
) -> Result<Option<WalChain>> {
    chain(bucket, entries, |e: &ObjectEntry| {
        let (sha256, what) = (e.sha256, format!("s3://{bucket}/{}", e.key));
        async move { repo.read_blob(&sha256, MAX_SENTINEL, &what).await }
    })
    .await
}

/// [`chain_in`] as a snapshot reads it: the sentinels from `repo`, or, when the repository is
/// encrypted and this host may not read its blobs (it holds the host key only), from the gateway,
/// checked against the SHA-256 the snapshot recorded for them.
pub async fn chain_at_snapshot(
    repo: &Repository,
    gateway: Option<&crate::s3::Client>,
    bucket: &str,
    entries: &[ObjectEntry],
) -> Result<Option<WalChain>> {
    let gateway = match gateway {
        Some(g) if !repo.reads_blobs() => g,
        _ => return chain_in(repo, bucket, entries).await,
    };
    chain(bucket, entries, |e: &ObjectEntry| {
        let (sha256, key) = (e.sha256, e.key.clone());
        async move {
            let body = gateway.get_small(bucket, &key, MAX_SENTINEL).await?;
            if Sha256::of(&body) != sha256 {
                return Err(Error::integrity(format!(
                    "s3://{bucket}/{key} changed at the gateway since the snapshot listed it"
                )));
            }
            Ok(body)
        }
    })
    .await
}

/// A sentinel is a few hundred bytes; more is not one.
const MAX_SENTINEL: u64 = 1 << 20;

/// The first of `vanished` (keys listed, then deleted at the source before their download) that
/// the newest base backup's recovery needs: a WAL segment within its range.
pub fn needed_and_vanished<'a>(chain: &WalChain, vanished: &'a [String]) -> Option<&'a str> {
    let latest = chain.latest.as_ref()?;
    let (start, stop) = (
        latest.wal_start.parse::<Segment>().ok()?,
        latest.wal_stop.parse::<Segment>().ok()?,
    );
    vanished.iter().map(String::as_str).find(|key| {
        wal_key(key).is_some_and(|(_, seg)| {
            (start.position()..=stop.position()).contains(&seg.position())
                && (seg.timeline == start.timeline || seg == stop)
        })
    })
}

/// The first line of an `extended_version.txt` (`SELECT version()`), when it names PostgreSQL.
fn version_line(body: &[u8]) -> Option<String> {
    let line = std::str::from_utf8(body).ok()?.lines().next()?.trim();
    (line.starts_with("PostgreSQL ") && line.len() <= 512).then(|| line.to_owned())
}

/// When the source modified `e`, as its listing said.
pub fn modified(e: &ObjectEntry) -> Option<OffsetDateTime> {
    let t = e.last_modified.as_deref()?;
    OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok()
}

/// What base backup `name` needs, from its sentinel's bytes, and what of it `present` lacks. A
/// sentinel that does not say is a base backup missing everything (`first_missing` says why).
fn needs(name: &str, sentinel: &[u8], present: &BTreeSet<Segment>) -> BaseBackupChain {
    let broken = |why: &str, start: String, stop: String| BaseBackupChain {
        name: name.to_owned(),
        wal_start: start,
        wal_stop: stop,
        segments: 0,
        missing: 1,
        first_missing: Some(why.to_owned()),
    };
    let start = name
        .strip_prefix("base_")
        .and_then(|n| n.split_once('_'))
        .and_then(|(seg, _)| seg.parse::<Segment>().ok())
        .expect("sentinel_key checked the name");
    let Ok(s) = serde_json::from_slice::<Sentinel>(sentinel) else {
        return broken(
            "(its stop sentinel is not WAL-E's JSON)",
            start.to_string(),
            String::new(),
        );
    };
    let Ok(stop) = s.wal_segment_backup_stop.parse::<Segment>() else {
        return broken(
            "(its stop sentinel names no WAL segment)",
            start.to_string(),
            s.wal_segment_backup_stop,
        );
    };
    let (from, to) = (start.position(), stop.position());
    if to < from || to - from >= MAX_SEGMENTS {
        return broken(
            "(its stop sentinel's range is not a WAL range)",
            start.to_string(),
            stop.to_string(),
        );
    }
    let mut missing = 0u64;
    let mut first_missing = None;
    for p in from..=to {
        let seg = if p == to {
            stop
        } else {
            Segment::at(start.timeline, p)
        };
        if !present.contains(&seg) {
            missing += 1;
            first_missing.get_or_insert_with(|| seg.to_string());
        }
    }
    BaseBackupChain {
        name: name.to_owned(),
        wal_start: start.to_string(),
        wal_stop: stop.to_string(),
        segments: to - from + 1,
        missing,
        first_missing,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::repository::Sha256;

    fn entry(key: &str, modified: &str) -> ObjectEntry {
        ObjectEntry {
            key: key.to_owned(),
            size: 1,
            etag: String::new(),
            sha256: Sha256::of(key.as_bytes()),
            last_modified: Some(modified.to_owned()),
            meta: crate::s3::ObjectMeta::default(),
        }
    }

    /// A bucket: base backups (name's segment, stop segment, modified) and WAL segments.
    fn bucket(
        backups: &[(&str, &str, &str)],
        wal: &[&str],
    ) -> (Vec<ObjectEntry>, HashMap<String, Vec<u8>>) {
        let mut entries = Vec::new();
        let mut bodies = HashMap::new();
        for (start, stop, modified) in backups {
            let key = format!("basebackups_005/base_{start}_00000028_backup_stop_sentinel.json");
            bodies.insert(
                key.clone(),
                // What WAL-E 1.1.1 writes (the start is in the name).
                serde_json::to_vec(&serde_json::json!({
                    "wal_segment_backup_stop": stop,
                    "wal_segment_offset_backup_stop": "00000138",
                    "expanded_size_bytes": 1234,
                    "spec": {"base_prefix": "/var/lib/postgresql/13/main/", "tablespaces": []},
                }))
                .unwrap(),
            );
            entries.push(entry(&key, modified));
            entries.push(entry(
                &format!(
                    "basebackups_005/base_{start}_00000028/tar_partitions/part_00000000.tar.lzo"
                ),
                modified,
            ));
            let version = format!("basebackups_005/base_{start}_00000028/extended_version.txt");
            bodies.insert(
                version.clone(),
                format!(
                    "PostgreSQL 13.{} (Debian) on x86_64-pc-linux-gnu\n",
                    &start[22..]
                )
                .into_bytes(),
            );
            entries.push(entry(&version, modified));
        }
        for w in wal {
            entries.push(entry(&format!("wal_005/{w}.lzo"), "2026-01-01T00:00:00Z"));
        }
        entries.push(entry(
            "wal_005/00000002.history.lzo",
            "2026-01-01T00:00:00Z",
        ));
        entries.sort_by(|a, b| a.key.cmp(&b.key));
        (entries, bodies)
    }

    async fn run(entries: &[ObjectEntry], bodies: &HashMap<String, Vec<u8>>) -> Option<WalChain> {
        chain("db_wal", entries, |e: &ObjectEntry| {
            let body = bodies.get(&e.key).cloned().unwrap_or_default();
            async move { Ok(body) }
        })
        .await
        .unwrap()
    }

    #[test]
    fn segment_names_round_trip_and_count_across_log_files() {
        let s: Segment = "0000000100000001000000FF".parse().unwrap();
        assert_eq!(s.to_string(), "0000000100000001000000FF");
        assert_eq!(
            Segment::at(1, s.position() + 1).to_string(),
            "000000010000000200000000"
        );
        for bad in [
            "",
            "00000001000000010000000",
            "000000010000000100000100", // segment 256 does not exist
            "000000000000000100000001", // timeline 0 does not exist
            "00000001000000010000000G",
        ] {
            assert_eq!(bad.parse::<Segment>(), Err(NotSegment), "{bad}");
        }
    }

    #[tokio::test]
    async fn the_newest_base_backup_with_its_whole_range_is_restorable() {
        let (entries, bodies) = bucket(
            &[
                (
                    "000000010000000000000002",
                    "000000010000000000000003",
                    "2026-01-01T00:00:00Z",
                ),
                (
                    "0000000100000000000000FE",
                    "000000010000000100000001",
                    "2026-01-02T00:00:00.5Z",
                ),
            ],
            &[
                "000000010000000000000002",
                "000000010000000000000003",
                "0000000100000000000000FE",
                "0000000100000000000000FF",
                "000000010000000100000000",
                "000000010000000100000001",
            ],
        );
        let c = run(&entries, &bodies).await.unwrap();
        assert_eq!(c.layout, "005");
        assert_eq!((c.base_backups, c.wal_segments), (2, 6));
        let latest = c.latest.clone().unwrap();
        assert_eq!(latest.name, "base_0000000100000000000000FE_00000028");
        assert_eq!((latest.segments, latest.missing), (4, 0));
        assert_eq!(c.restorable, c.latest);
        assert_eq!(
            c.postgres_version.as_deref(),
            Some("PostgreSQL 13.FE (Debian) on x86_64-pc-linux-gnu")
        );
        assert_eq!(c.postgres_major().as_deref(), Some("13"));
        assert!(c.recovers_by_itself());
        assert_eq!(c.problem(), None);
    }

    #[tokio::test]
    async fn a_gap_in_the_newest_range_names_the_segment_and_the_older_whole_backup() {
        let (entries, bodies) = bucket(
            &[
                (
                    "000000010000000000000002",
                    "000000010000000000000002",
                    "2026-01-01T00:00:00Z",
                ),
                (
                    "000000010000000000000005",
                    "000000010000000000000007",
                    "2026-01-02T00:00:00Z",
                ),
            ],
            &[
                "000000010000000000000002",
                "000000010000000000000005",
                "000000010000000000000007",
            ],
        );
        let c = run(&entries, &bodies).await.unwrap();
        let latest = c.latest.clone().unwrap();
        assert_eq!((latest.segments, latest.missing), (3, 1));
        assert_eq!(
            latest.first_missing.as_deref(),
            Some("000000010000000000000006")
        );
        assert_eq!(
            c.restorable.as_ref().map(|r| r.name.as_str()),
            Some("base_000000010000000000000002_00000028")
        );
        assert!(!c.recovers_by_itself());
        let p = c.problem().unwrap();
        assert!(
            p.contains("lacks WAL segment 000000010000000000000006"),
            "{p}"
        );
        assert!(
            p.contains("backup-fetch <datadir> base_000000010000000000000002_00000028"),
            "{p}"
        );
    }

    #[tokio::test]
    async fn latest_is_by_sentinel_time_as_wal_e_picks_it_not_by_name() {
        // A restored cluster's timeline 2 starts lower in the WAL than timeline 1 ended.
        let (entries, bodies) = bucket(
            &[
                (
                    "000000010000000000000009",
                    "000000010000000000000009",
                    "2026-01-01T00:00:00Z",
                ),
                (
                    "000000020000000000000008",
                    "000000020000000000000008",
                    "2026-01-03T00:00:00Z",
                ),
            ],
            &["000000010000000000000009"],
        );
        let c = run(&entries, &bodies).await.unwrap();
        assert_eq!(
            c.latest.as_ref().unwrap().first_missing.as_deref(),
            Some("000000020000000000000008")
        );
        assert_eq!(
            c.restorable.unwrap().name,
            "base_000000010000000000000009_00000028"
        );
    }

    #[tokio::test]
    async fn no_base_backup_or_a_broken_sentinel_is_said_and_other_buckets_have_no_chain() {
        let (entries, bodies) = bucket(&[], &["000000010000000000000002"]);
        let c = run(&entries, &bodies).await.unwrap();
        assert_eq!((c.base_backups, c.latest.is_none()), (0, true));
        assert!(c.problem().unwrap().contains("no WAL-E base backup"));

        let (entries, mut bodies) = bucket(
            &[(
                "000000010000000000000002",
                "000000010000000000000002",
                "2026-01-01T00:00:00Z",
            )],
            &["000000010000000000000002"],
        );
        for b in bodies.values_mut() {
            *b = b"{not json".to_vec();
        }
        let c = run(&entries, &bodies).await.unwrap();
        assert!(c.restorable.is_none());
        assert!(c.problem().unwrap().contains("not WAL-E's JSON"));

        let registry = [entry("images/abc/json", "2026-01-01T00:00:00Z")];
        assert_eq!(run(&registry, &HashMap::new()).await, None);
    }

    #[test]
    fn major_versions_as_postgresql_counts_them() {
        let with = |v: &str| WalChain {
            bucket: "db_wal".into(),
            layout: "005".into(),
            base_backups: 0,
            wal_segments: 0,
            latest: None,
            restorable: None,
            postgres_version: Some(v.into()),
        };
        for (v, major) in [
            (
                "PostgreSQL 9.3.25 on x86_64-unknown-linux-gnu, compiled by gcc",
                Some("9.3"),
            ),
            (
                "PostgreSQL 13.16 (Debian 13.16-0+deb11u1) on x86_64-pc-linux-gnu",
                Some("13"),
            ),
            ("PostgreSQL 15beta1 on x86_64", Some("15")),
            ("MySQL 8.0", None),
        ] {
            assert_eq!(with(v).postgres_major().as_deref(), major, "{v}");
        }
    }

    #[tokio::test]
    async fn only_a_vanished_segment_in_the_newest_range_is_needed() {
        let (entries, bodies) = bucket(
            &[(
                "000000010000000000000005",
                "000000010000000000000006",
                "2026-01-02T00:00:00Z",
            )],
            &["000000010000000000000005"],
        );
        let c = run(&entries, &bodies).await.unwrap();
        let retained_away = vec![
            "basebackups_005/base_000000010000000000000002_00000028_backup_stop_sentinel.json"
                .to_owned(),
            "wal_005/000000010000000000000003.lzo".to_owned(),
            "wal_005/000000010000000000000004.00000028.backup.lzo".to_owned(),
        ];
        assert_eq!(needed_and_vanished(&c, &retained_away), None);
        let mut gone = retained_away;
        gone.push("wal_005/000000010000000000000006.lzo".to_owned());
        assert_eq!(
            needed_and_vanished(&c, &gone),
            Some("wal_005/000000010000000000000006.lzo")
        );
    }
}
