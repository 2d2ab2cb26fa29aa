//! What a manifest records about the database bucket's WAL-E layout (`db_wal`): the base backup a
//! database restored from the snapshot recovers from, and whether the snapshot holds every WAL
//! segment that recovery needs. [`crate::wal_e`] works it out; `show` prints it, `verify` checks it
//! again.

use serde::{Deserialize, Serialize};

/// The database bucket's WAL-E chain, as the snapshot holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct WalChain {
    /// The bucket (`/deis/database/bucketName`).
    pub bucket: String,
    /// WAL-E's layout version: the `005` of `basebackups_005/` and `wal_005/`.
    pub layout: String,
    /// Base backups with a stop sentinel in the listing.
    pub base_backups: u64,
    /// WAL segments in the listing.
    pub wal_segments: u64,
    /// The base backup `backup-fetch LATEST` picks (the newest sentinel); `None` when there is none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest: Option<BaseBackupChain>,
    /// The newest base backup whose WAL range is whole; the same as `latest` on a healthy bucket.
    /// `None`: no base backup in the snapshot can be recovered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restorable: Option<BaseBackupChain>,
    /// The PostgreSQL that made the restorable base backup (else the latest), as its
    /// `extended_version.txt` says (`PostgreSQL 13.16 (Debian …) on x86_64-pc-linux-gnu, …`): a
    /// database image of another major version does not start on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postgres_version: Option<String>,
}

impl WalChain {
    /// The major version in [`Self::postgres_version`]: `13`, or `9.3` before PostgreSQL 10.
    pub fn postgres_major(&self) -> Option<String> {
        let v = self
            .postgres_version
            .as_deref()?
            .strip_prefix("PostgreSQL ")?;
        let number = v
            .split(|c: char| !(c.is_ascii_digit() || c == '.'))
            .next()?;
        let mut parts = number.split('.');
        let first = parts.next().filter(|p| !p.is_empty())?;
        Some(match first.parse::<u32>() {
            Ok(n) if n < 10 => format!("{first}.{}", parts.next()?),
            Ok(_) => first.to_owned(),
            Err(_) => return None,
        })
    }

    /// Whether the database, booting on this snapshot's bucket, can recover by itself: the base
    /// backup it fetches (LATEST) has every WAL segment from its start to its stop.
    pub fn recovers_by_itself(&self) -> bool {
        self.latest.as_ref().is_some_and(|l| l.missing == 0)
    }

    /// One line for people when the database cannot recover by itself; `None` when it can.
    pub fn problem(&self) -> Option<String> {
        let b = &self.bucket;
        match &self.latest {
            None => Some(format!(
                "s3://{b}: no WAL-E base backup: a database restored from this snapshot cannot \
                 recover from {b}; restore with --database-sql"
            )),
            Some(l) if l.missing > 0 => {
                let first = l.first_missing.as_deref().unwrap_or("?");
                let fallback = match &self.restorable {
                    Some(r) => format!(
                        "; the older base backup {} is whole (wal-e backup-fetch <datadir> {})",
                        r.name, r.name
                    ),
                    None => String::new(),
                };
                Some(format!(
                    "s3://{b}: the newest base backup {} lacks WAL segment {first} ({} of its {} \
                     segments missing): a database restored from this snapshot will not recover \
                     by itself{fallback}; restore with --database-sql",
                    l.name, l.missing, l.segments
                ))
            }
            Some(_) => None,
        }
    }
}

/// One base backup and the WAL range it needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BaseBackupChain {
    /// `base_<start segment>_<offset>`.
    pub name: String,
    /// The first and last WAL segment recovery replays (the sentinel's
    /// `wal_segment_backup_start` and `wal_segment_backup_stop`).
    pub wal_start: String,
    pub wal_stop: String,
    /// Segments from start to stop, both included.
    pub segments: u64,
    /// Of them, not in the snapshot.
    #[serde(default)]
    pub missing: u64,
    /// The first one missing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_missing: Option<String>,
}
