//! `verify`: is a snapshot whole? Every part and every listed object's blob must exist with its
//! recorded size; with `--read-data`, every byte is read again and its sha256 compared.
//!
//! Invariants:
//! - Reads only. Every problem is collected (not just the first) and named by part or bucket/key.
//! - Each distinct blob is checked once, however many objects or snapshots name it.
//! - `restore` runs the same checks (parts re-hashed) before it writes anything.

use std::collections::BTreeMap;

use futures::{StreamExt as _, TryStreamExt as _};
use serde::Serialize;
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncReadExt as _;

use crate::error::Result;
use crate::repository::{Manifest, Repository};

/// How deep to look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Depth {
    /// Sizes of every blob.
    Sizes,
    /// Sizes of every blob; parts (dump, archives, etcd export) re-hashed.
    Parts,
    /// Every blob re-hashed.
    All,
}

/// What `verify` found.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Report {
    pub snapshot: String,
    pub parts: u64,
    pub objects: u64,
    pub blobs_checked: u64,
    pub bytes_read: u64,
    /// One line per problem; empty when the snapshot is whole.
    pub problems: Vec<String>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Checks `manifest`'s snapshot in `repo`.
pub async fn verify(repo: &Repository, manifest: &Manifest, depth: Depth) -> Result<Report> {
    let mut report = Report {
        snapshot: manifest.id.to_string(),
        ..Report::default()
    };
    // blob -> (size, what names it, re-hash?)
    let mut blobs: BTreeMap<String, (u64, String, bool)> = BTreeMap::new();
    for (name, part) in &manifest.parts {
        report.parts += 1;
        let all = part.blobs();
        if all.iter().map(|b| b.size).sum::<u64>() != part.size || all.is_empty() {
            report.problems.push(format!(
                "part {name}: its blobs do not add up to its size of {} bytes",
                part.size
            ));
        }
        let n = all.len();
        for (i, blob) in all.into_iter().enumerate() {
            let what = if n > 1 {
                format!("part {name} segment {} of {n}", i + 1)
            } else {
                format!("part {name}")
            };
            blobs.insert(blob.sha256, (blob.size, what, depth != Depth::Sizes));
        }
    }
    for bucket in manifest.buckets.keys() {
        let listing = match repo.listing(manifest, bucket).await {
            Ok(l) => l,
            Err(e) => {
                report
                    .problems
                    .push(format!("bucket {bucket}: {}", e.message()));
                continue;
            }
        };
        for e in listing {
            report.objects += 1;
            blobs.entry(e.sha256.clone()).or_insert_with(|| {
                (
                    e.size,
                    format!("s3://{bucket}/{}", e.key),
                    depth == Depth::All,
                )
            });
        }
    }

    let checks = futures::stream::iter(blobs)
        .map(|(sha, (size, what, rehash))| async move {
            check_blob(repo, &sha, size, rehash)
                .await
                .map(|(read, problem)| (read, problem.map(|p| format!("{what}: {p}"))))
        })
        .buffer_unordered(16);
    let results: Vec<(u64, Option<String>)> = checks.try_collect().await?;
    for (read, problem) in results {
        report.blobs_checked += 1;
        report.bytes_read += read;
        report.problems.extend(problem);
    }
    report.problems.sort();
    Ok(report)
}

/// Checks one blob; returns the bytes read and a problem, if any.
async fn check_blob(
    repo: &Repository,
    sha: &str,
    size: u64,
    rehash: bool,
) -> Result<(u64, Option<String>)> {
    match repo.blob_size(sha).await? {
        None => return Ok((0, Some(format!("blob {sha} is missing")))),
        Some(s) if s != size => {
            return Ok((
                0,
                Some(format!("blob {sha} holds {s} bytes, {size} were recorded")),
            ));
        }
        Some(_) => {}
    }
    if !rehash {
        return Ok((0, None));
    }
    let mut reader = repo.open_blob(sha).await?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut read = 0u64;
    loop {
        let n = reader
            .read(&mut buf)
            .await
            .map_err(|e| crate::Error::io(format!("read blob {sha}"), &e))?;
        if n == 0 {
            break;
        }
        read += n as u64;
        hasher.update(&buf[..n]);
    }
    let got = hex::encode(hasher.finalize());
    if got == sha {
        Ok((read, None))
    } else {
        Ok((
            read,
            Some(format!(
                "blob {sha} now hashes to {got}: its bytes are damaged"
            )),
        ))
    }
}
