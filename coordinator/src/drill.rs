//! `drill <id>`: a restore drill that needs no second cluster. The snapshot's dump is loaded, by
//! the agent on the database's host, into a throwaway container of the same `deis-database` image
//! (no network, no etcd, removed afterwards: the agent's `DrillDatabase`); the row counts of every
//! table it then holds must be the ones the dump carries (the Deis controller's apps, releases,
//! keys, domains and users named one by one). Then the registry listing must hold every layer of
//! every image's ancestry, and the database bucket's WAL-E chain must be whole.
//!
//! Owns: [`Report`] (one [`Check`] per line), the comparison of the loaded database's rows with
//! the dump's ([`crate::dump_rows`]), the registry's ancestry check.
//! Invariants:
//! - Reads the repository only; touches no container but the agent's throwaway one.
//! - Every check is run and reported, whatever the others found; a check that cannot be made
//!   (no dump, no registry listing) says so and is not a failure.
//! - The expected counts come from the dump itself, so they are exactly what it holds: a table
//!   the load left short, or one it did not create, fails the drill by name.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::agents::{self, Described};
use crate::dump_rows::{self, DEIS_DATABASE, DEIS_TABLES, Tables};
use crate::error::Result;
use crate::repository::{Manifest, ObjectEntry, Repository};
use crate::restore;
use crate::snapshot::{self, BUCKET_REGISTRY_LABEL, DATABASE_PART};
use crate::wal_e;

/// One line of the drill.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub check: String,
    /// `ok`, `failed`, or `skipped` (nothing to check).
    pub outcome: Outcome,
    pub detail: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    Ok,
    Failed,
    Skipped,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Failed => "FAILED",
            Outcome::Skipped => "skipped",
        }
    }
}

/// What a drill found.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub snapshot: String,
    pub checks: Vec<Check>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.checks.iter().all(|c| c.outcome != Outcome::Failed)
    }

    fn push(&mut self, check: &str, outcome: Outcome, detail: impl Into<String>) {
        self.checks.push(Check {
            check: check.to_owned(),
            outcome,
            detail: detail.into(),
        });
    }
}

/// Runs the drill of `manifest`'s snapshot with the cluster's `agents`.
pub async fn drill(repo: &Repository, manifest: &Manifest, agents: &[Described]) -> Result<Report> {
    let mut report = Report {
        snapshot: manifest.id.to_string(),
        checks: Vec::new(),
    };
    database_checks(repo, manifest, agents, &mut report).await?;
    registry_check(repo, manifest, &mut report).await;
    chain_check(repo, manifest, &mut report).await;
    Ok(report)
}

/// Loads the dump in the throwaway container and compares the counts with the dump's.
async fn database_checks(
    repo: &Repository,
    manifest: &Manifest,
    agents: &[Described],
    report: &mut Report,
) -> Result<()> {
    if !manifest.parts.contains_key(DATABASE_PART) {
        report.push("database", Outcome::Skipped, "the snapshot holds no dump");
        return Ok(());
    }
    let blob = restore::single_blob(manifest, DATABASE_PART)?;
    let expected = dump_rows::count(repo, &blob).await?;
    let recorded = manifest
        .part_info
        .get(DATABASE_PART)
        .map(|i| i.figures.clone())
        .unwrap_or_default();
    let (agent, described) = snapshot::database_agent(agents)
        .map_err(|e| e.context("a drill needs the agent on the database's host"))?;
    let agent = agent.agent;
    let (requests, read_failure) = restore::dump_requests(repo, manifest)?;
    let mut c = agent.client.clone();
    let reply = c.drill_database(requests).await;
    read_failure.check(DATABASE_PART)?;
    let reply = match reply {
        Ok(r) => r.into_inner(),
        Err(s) => {
            let e = agents::status_error(&agent, "DrillDatabase", &s);
            report.push("database", Outcome::Failed, e.message().to_owned());
            return Ok(());
        }
    };
    let image = described
        .info
        .database
        .as_ref()
        .map_or("the database", |d| d.image.as_str());
    report.push(
        "database",
        Outcome::Ok,
        format!(
            "the dump ({} of SQL) loads into a throwaway container of {image} (PostgreSQL {}) on \
             {}: {:.1} s",
            bytesize::ByteSize::b(reply.raw_bytes),
            version_name(reply.server_version_num),
            agent.host_id,
            reply.duration_ms as f64 / 1000.0
        ),
    );
    let loaded: Tables = reply
        .tables
        .into_iter()
        .map(|t| ((t.database, t.table), t.rows))
        .collect();
    compare(&expected, &recorded, &loaded, report);
    Ok(())
}

/// `130023` → `13.23`; `90325` → `9.3.25`.
fn version_name(num: u32) -> String {
    if num >= 100_000 {
        format!("{}.{}", num / 10_000, num % 10_000)
    } else {
        format!("{}.{}.{}", num / 10_000, num / 100 % 100, num % 100)
    }
}

/// The Deis tables one line each (against the dump and the figures `recorded` at snapshot
/// time), then every table of the dump.
fn compare(
    expected: &Tables,
    recorded: &BTreeMap<String, u64>,
    loaded: &Tables,
    report: &mut Report,
) {
    for (what, table) in DEIS_TABLES {
        let key = (DEIS_DATABASE.to_owned(), table.to_owned());
        match (expected.get(&key), loaded.get(&key)) {
            (None, None) => {}
            (Some(want), Some(got)) if want == got => match recorded.get(what) {
                Some(r) if r == got => report.push(
                    what,
                    Outcome::Ok,
                    format!("{got}, as in the dump and as recorded at snapshot time"),
                ),
                Some(r) => report.push(
                    what,
                    Outcome::Failed,
                    format!("{got} loaded, as in the dump, but {r} recorded at snapshot time"),
                ),
                None => report.push(what, Outcome::Ok, format!("{got}, as in the dump")),
            },
            (want, got) => report.push(
                what,
                Outcome::Failed,
                format!(
                    "{DEIS_DATABASE}.{table}: the dump holds {}, the loaded database {}",
                    want.map_or("no such table".to_owned(), u64::to_string),
                    got.map_or("no such table".to_owned(), u64::to_string)
                ),
            ),
        }
    }
    let wrong: Vec<String> = expected
        .iter()
        .filter(|(k, want)| loaded.get(*k) != Some(*want))
        .map(|((db, t), want)| {
            format!(
                "{db}.{t} ({want} in the dump, {})",
                loaded
                    .get(&(db.clone(), t.clone()))
                    .map_or("absent".to_owned(), |n| format!("{n} loaded"))
            )
        })
        .collect();
    let databases: BTreeSet<&str> = expected.keys().map(|(d, _)| d.as_str()).collect();
    let rows: u64 = expected.values().sum();
    if wrong.is_empty() {
        report.push(
            "tables",
            Outcome::Ok,
            format!(
                "{} tables in {} databases, {rows} rows: every count as in the dump",
                expected.len(),
                databases.len()
            ),
        );
    } else {
        report.push(
            "tables",
            Outcome::Failed,
            format!(
                "{} of {} tables differ: {}",
                wrong.len(),
                expected.len(),
                wrong.iter().take(5).cloned().collect::<Vec<_>>().join(", ")
            ),
        );
    }
}

/// Every image's ancestry names layers the registry listing holds (Docker registry v1:
/// `…images/<id>/ancestry` lists the image and its parents, each stored at `…images/<id>/layer`).
async fn registry_check(repo: &Repository, manifest: &Manifest, report: &mut Report) {
    let Some(bucket) = manifest.labels.get(BUCKET_REGISTRY_LABEL) else {
        report.push(
            "registry",
            Outcome::Skipped,
            "the snapshot holds no registry bucket",
        );
        return;
    };
    if !manifest.buckets.contains_key(bucket) {
        report.push(
            "registry",
            Outcome::Skipped,
            format!("the snapshot holds no bucket {bucket}"),
        );
        return;
    }
    let listing = match repo.listing(manifest, bucket).await {
        Ok(l) => l,
        Err(e) => {
            report.push("registry", Outcome::Failed, e.message().to_owned());
            return;
        }
    };
    match ancestry_gaps(repo, &listing).await {
        Ok((images, gaps)) if gaps.is_empty() => report.push(
            "registry",
            Outcome::Ok,
            format!("{images} images in {bucket}, every layer of their ancestry present"),
        ),
        Ok((images, gaps)) => report.push(
            "registry",
            Outcome::Failed,
            format!(
                "{} of {images} images in {bucket} lack a layer of their ancestry: {}",
                gaps.len(),
                gaps.iter().take(5).cloned().collect::<Vec<_>>().join("; ")
            ),
        ),
        Err(e) => report.push("registry", Outcome::Failed, e.message().to_owned()),
    }
}

/// The number of images with an ancestry, and one line per image missing a layer.
async fn ancestry_gaps(repo: &Repository, listing: &[ObjectEntry]) -> Result<(u64, Vec<String>)> {
    let keys: BTreeSet<&str> = listing.iter().map(|e| e.key.as_str()).collect();
    let mut images = 0;
    let mut gaps = Vec::new();
    for e in listing {
        let Some(prefix) = e.key.strip_suffix("/ancestry") else {
            continue;
        };
        let Some((root, image)) = prefix.rsplit_once("images/") else {
            continue;
        };
        if image.contains('/') {
            continue;
        }
        images += 1;
        let body = repo.read_blob(&e.sha256, 16 << 20, &e.key).await?;
        let Ok(ancestry) = serde_json::from_slice::<Vec<String>>(&body) else {
            gaps.push(format!("{image}: its ancestry is not a JSON list of ids"));
            continue;
        };
        let missing: Vec<&String> = ancestry
            .iter()
            .filter(|a| !keys.contains(format!("{root}images/{a}/layer").as_str()))
            .collect();
        if let Some(first) = missing.first() {
            gaps.push(format!(
                "{image} (no layer of {first}{})",
                if missing.len() > 1 {
                    format!(" and {} more", missing.len() - 1)
                } else {
                    String::new()
                }
            ));
        }
    }
    Ok((images, gaps))
}

/// The database bucket's WAL-E chain is whole (what `verify` checks).
async fn chain_check(repo: &Repository, manifest: &Manifest, report: &mut Report) {
    let Some(bucket) = manifest
        .wal_e
        .as_ref()
        .map(|c| c.bucket.clone())
        .or_else(|| {
            manifest
                .labels
                .get(snapshot::BUCKET_DATABASE_LABEL)
                .cloned()
        })
        .filter(|b| manifest.buckets.contains_key(b))
    else {
        report.push(
            "db_wal",
            Outcome::Skipped,
            "the snapshot holds no database bucket",
        );
        return;
    };
    let chain = match repo.listing(manifest, &bucket).await {
        Ok(l) => wal_e::chain_in(repo, &bucket, &l).await,
        Err(e) => Err(e),
    };
    match chain {
        Ok(None) => report.push(
            "db_wal",
            Outcome::Skipped,
            format!("{bucket} holds no WAL-E key"),
        ),
        Ok(Some(c)) => match (c.problem(), &c.latest) {
            (Some(p), _) => report.push("db_wal", Outcome::Failed, p),
            (None, Some(l)) => report.push(
                "db_wal",
                Outcome::Ok,
                format!(
                    "{bucket}: base backup {} with WAL {} to {} ({} segments), whole",
                    l.name, l.wal_start, l.wal_stop, l.segments
                ),
            ),
            (None, None) => {}
        },
        Err(e) => report.push("db_wal", Outcome::Failed, e.message().to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_compared_table_by_table_and_named() {
        let key = |d: &str, n: &str| (d.to_owned(), n.to_owned());
        let expected: Tables = [
            (key("deis", "public.api_app"), 3),
            (key("deis", "public.api_release"), 9),
            (key("other", "public.t"), 1),
        ]
        .into_iter()
        .collect();
        let mut report = Report {
            snapshot: "s".into(),
            checks: Vec::new(),
        };
        let recorded = dump_rows::deis_figures(&expected);
        assert_eq!(
            recorded,
            [("apps".to_owned(), 3), ("releases".to_owned(), 9)]
                .into_iter()
                .collect()
        );
        compare(&expected, &recorded, &expected, &mut report);
        assert!(report.ok());
        assert_eq!(
            report.checks[0].detail,
            "3, as in the dump and as recorded at snapshot time"
        );
        assert_eq!(
            report
                .checks
                .iter()
                .map(|c| c.check.as_str())
                .collect::<Vec<_>>(),
            ["apps", "releases", "tables"]
        );

        let mut short = expected.clone();
        short.insert(key("deis", "public.api_release"), 8);
        short.remove(&key("other", "public.t"));
        let mut report = Report {
            snapshot: "s".into(),
            checks: Vec::new(),
        };
        compare(&expected, &BTreeMap::new(), &short, &mut report);
        assert!(!report.ok());
        let failed: Vec<&str> = report
            .checks
            .iter()
            .filter(|c| c.outcome == Outcome::Failed)
            .map(|c| c.detail.as_str())
            .collect();
        assert_eq!(failed.len(), 2, "{failed:?}");
        assert!(
            failed[0].contains("the dump holds 9, the loaded database 8"),
            "{failed:?}"
        );
        assert!(
            failed[1].contains("other.public.t (1 in the dump, absent)"),
            "{failed:?}"
        );
    }

    #[test]
    fn versions_read_as_postgresql_writes_them() {
        assert_eq!(version_name(130_023), "13.23");
        assert_eq!(version_name(90_325), "9.3.25");
    }
}
