//! `restore <id>`: puts a snapshot back onto a (fresh) cluster, in the order the Deis docs give:
//! buckets first (so the database restores itself from `db_wal` when it starts), then the store
//! files with their owners; optionally the SQL dump into a running database and the platform's
//! etcd keys. The operator then runs `deisctl start platform`.
//!
//! Invariants:
//! - Nothing is written before the preflight passes: the snapshot's parts re-hash to their recorded
//!   sha256 and every object's blob exists; the gateway takes the cluster's *current* keys; no
//!   platform container runs on any host; the target buckets and store directories are empty; each
//!   store's filesystem has room for the archive's files beside what it holds (an overwrite keeps
//!   the old content until the new one is in place); a database image that does not hold the
//!   PostgreSQL major version of the `db_wal` base backup it would recover from (when the buckets
//!   are restored for that, not with `--database-sql`). `--force` overrides all but the first two.
//! - `--dry-run` runs the preflight and prints the plan, and writes nothing.
//! - A failure after writing began says exactly which steps completed.
//! - A restore that writes holds the target cluster's lock and a lease on the repository (taken by
//!   the caller); each step starts only while both are still held, so no snapshot, prune or second
//!   restore of that cluster runs meanwhile, and no prune of the repository deletes the snapshot.

use std::time::Instant;

use deis_backup_proto::v1::restore_database_request::Kind as DbKind;
use deis_backup_proto::v1::restore_store_request::Kind as StoreKind;
use deis_backup_proto::v1::{
    Digest, ProbeDatabaseImageRequest, RestoreDatabaseHeader, RestoreDatabaseRequest,
    RestoreStoreHeader, RestoreStoreRequest, StorePath,
};
use futures::StreamExt as _;
use serde::{Deserialize, Serialize};
use tokio_util::io::ReaderStream;

use crate::agents::{self, Agent, Described};
use crate::bucket_restore::{self, Existing};
use crate::error::{Error, ErrorKind, Result};
use crate::gateway::DeisBuckets;
use crate::hold::Hold;
use crate::platform_keys;
use crate::repository::{BlobRef, Manifest, PartInfo, Repository};
use crate::s3;
use crate::snapshot::{self, Cluster, DATABASE_PART, ETCD_PART, STORE_PREFIX};
use crate::verify::{self, Depth};

/// Options of `restore`. Serve the CLI, the config file (`[restore]`) and the library.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, clap::Args, merge::Merge)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
#[merge(strategy = merge::bool::overwrite_false)]
pub struct RestoreOptions {
    /// Run the preflight, print what would be restored, write nothing.
    #[arg(long)]
    #[serde(skip)]
    pub dry_run: bool,
    /// Restore although platform containers run or target buckets hold objects.
    #[arg(long)]
    #[serde(skip)]
    pub force: bool,
    /// What to do with a target bucket that holds objects (with --force) [default: refuse].
    #[arg(long, value_enum)]
    #[merge(strategy = merge::option::overwrite_none)]
    pub existing: Option<Existing>,
    /// Replace what a non-empty store directory holds.
    #[arg(long)]
    pub overwrite_store: bool,
    /// Load the SQL dump into the running deis-database (instead of letting it restore from db_wal).
    #[arg(long)]
    pub database_sql: bool,
    /// Write the snapshot's platform keys back into etcd (never ephemeral ones).
    #[arg(long)]
    pub etcd_keys: bool,
    /// Restore no bucket.
    #[arg(long)]
    pub no_buckets: bool,
    /// Restore no store file.
    #[arg(long)]
    pub no_store: bool,
}

impl RestoreOptions {
    /// What to do with a target bucket that holds objects.
    pub fn existing(&self) -> Existing {
        self.existing.unwrap_or_default()
    }
}

/// One step of a restore, as planned and then as done.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub what: String,
    pub target: String,
    pub done: bool,
    pub detail: String,
}

/// What a restore did (or, on a dry run, would do).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub snapshot: String,
    pub dry_run: bool,
    pub steps: Vec<Step>,
    /// Preflight findings overridden by --force.
    pub forced: Vec<String>,
    pub next: String,
}

/// Why the store's filesystem cannot take the archive's files, if it cannot: they need about the
/// archive's uncompressed size, on top of what the directory holds now (an overwrite keeps the old
/// content until the new one is in place).
fn too_little_room(there: Option<&StorePath>, info: &PartInfo) -> Option<String> {
    let need = info.raw_bytes?;
    let free = there?.free_bytes?;
    (need > free).then(|| {
        format!(
            "not enough space: the snapshot's files need about {} and the filesystem has {} free \
             (an overwrite keeps the old content until the new one is in place)",
            indicatif::HumanBytes(need),
            indicatif::HumanBytes(free)
        )
    })
}

/// What one planned step writes, with the agent or gateway that writes it resolved once, at
/// planning time.
#[derive(Debug)]
enum Action<'a> {
    /// Bucket `source` of the snapshot into `bucket` on the target's gateway.
    Bucket {
        source: String,
        bucket: String,
        gateway: &'a s3::Client,
    },
    /// Store part `part` through `agent`.
    Store {
        part: String,
        info: Box<PartInfo>,
        agent: &'a Agent,
        /// For a shared filesystem: the other agents with the path, which must see the restored
        /// tree on the same filesystem (`identity`) once `agent` has written it.
        seen_by: Vec<Agent>,
        identity: String,
    },
    /// The SQL dump into the database that `agent` runs.
    DatabaseSql { agent: &'a Agent },
    /// The platform's etcd keys.
    EtcdKeys,
}

/// The steps a restore takes, in the documented order, and what the preflight found against
/// them.
#[derive(Debug)]
struct Plan<'a> {
    steps: Vec<(Action<'a>, Step)>,
    refusals: Vec<String>,
}

/// Restores `manifest` onto the cluster. See the module invariants.
pub async fn restore(
    repo: &Repository,
    manifest: &Manifest,
    target: &Cluster,
    options: &RestoreOptions,
    progress: &dyn snapshot::Progress,
    hold: Option<&Hold>,
) -> Result<Report> {
    // 1. The snapshot itself must be whole.
    let check = verify::verify(repo, manifest, Depth::Parts).await?;
    if !check.ok() {
        return Err(Error::integrity(format!(
            "snapshot {} is damaged, nothing was restored: {}",
            manifest.id,
            check.problems.join("; ")
        )));
    }
    // 2. Plan and preflight on the target cluster; nothing is written before it passes.
    let plan = plan(manifest, target, options).await?;
    if !plan.refusals.is_empty() && !options.force {
        return Err(Error::new(
            ErrorKind::Preflight,
            format!(
                "restore refused, nothing was written: {}",
                plan.refusals.join("; ")
            ),
            "restore onto a cluster where only the store components run (deisctl stop platform; \
             start store-*), or pass --force",
        ));
    }
    let (actions, steps): (Vec<_>, Vec<_>) = plan.steps.into_iter().unzip();
    let mut report = Report {
        snapshot: manifest.id.to_string(),
        dry_run: options.dry_run,
        steps,
        forced: plan.refusals,
        next: "deisctl start platform".into(),
    };
    if options.dry_run {
        return Ok(report);
    }
    // 3. Write, in the planned order; each step only while the lock and lease are still held.
    for (i, action) in actions.iter().enumerate() {
        let step = &report.steps[i];
        let r = match hold {
            Some(h) => h.check(&format!("{} {}", step.what, step.target)),
            None => Ok(()),
        };
        let r = match r {
            Ok(()) => execute(repo, manifest, &target.etcd, options, progress, action).await,
            Err(e) => Err(e),
        };
        match r {
            Ok(detail) => {
                report.steps[i].done = true;
                report.steps[i].detail = detail;
            }
            Err(e) => return Err(stopped_part_way(&report, e)),
        }
        if matches!(action, Action::DatabaseSql { .. }) {
            report.next = "deisctl start platform (the database already holds the dump)".into();
        }
    }
    if let Some(next) = recovery_next(manifest, &report) {
        report.next = next;
    }
    Ok(report)
}

/// What the operator does next when the database bucket was restored and the database is to
/// restore itself from it (no `--database-sql`): what `deisctl start platform` will do, from which
/// base backup, on which PostgreSQL, and the base backup to take afterwards (deis/postgres#104:
/// until the restored database pushes a base backup of its new timeline, a second restore
/// replays only the old one). `None` when no such recovery follows.
fn recovery_next(manifest: &Manifest, report: &Report) -> Option<String> {
    let chain = manifest.wal_e.as_ref()?;
    if report.steps.iter().any(|s| s.what == "database-sql") {
        return None;
    }
    // The bucket step's target: `db_wal`, or `<name> (was db_wal)` when the target names it so.
    let was = format!("(was {})", chain.bucket);
    let bucket = report
        .steps
        .iter()
        .find(|s| s.what == "bucket" && (s.target == chain.bucket || s.target.ends_with(&was)))?
        .target
        .split(' ')
        .next()?;
    if let Some(problem) = chain.problem() {
        return Some(format!(
            "warning: {problem}. The buckets and the store are back; deisctl start platform \
             starts a database that will not recover: restore the dump with --database-sql"
        ));
    }
    let b = chain.latest.as_ref()?;
    let postgres = chain.postgres_major().map_or_else(String::new, |v| {
        format!(
            " The base backup is PostgreSQL {v}: the target's deis-database image must run \
             PostgreSQL {v} (another major version does not start on it, deis/deis#4709)."
        )
    });
    Some(format!(
        "deisctl start platform: deis-database finds base backup {} in {}, fetches it, replays \
         WAL {} to {} and on to the end of the restored WAL, then accepts connections (its log \
         says `database: restoring from backup...`).{postgres} Once it runs, take a base backup \
         of its new timeline: deis-backup snapshot --pre-hook wal-e-backup-push",
        b.name, bucket, b.wal_start, b.wal_stop
    ))
}

/// The plan: every step the options ask for, with the preflight's findings.
async fn plan<'a>(
    manifest: &Manifest,
    target: &'a Cluster,
    options: &RestoreOptions,
) -> Result<Plan<'a>> {
    let agents = target.agents.as_slice();
    let mut plan = Plan {
        steps: Vec::new(),
        refusals: Vec::new(),
    };
    for d in agents {
        // The agent reports the platform containers it watches (its config; the Deis ones and its
        // database container by default).
        for c in &d.info.running_platform_containers {
            let is_database = d.info.database.as_ref().is_some_and(|db| &db.name == c);
            if !(options.database_sql && is_database) {
                plan.refusals
                    .push(format!("{c} runs on {}", d.agent.host_id));
            }
        }
    }
    if !options.no_buckets && !options.database_sql {
        postgres_check(&mut plan, manifest, agents).await;
    }
    if !options.no_buckets && !manifest.buckets.is_empty() {
        plan_buckets(&mut plan, manifest, target, options).await?;
    }
    if !options.no_store {
        plan_stores(&mut plan, manifest, agents, options)?;
    }
    if options.database_sql {
        if !manifest.parts.contains_key(DATABASE_PART) {
            return Err(Error::config(format!(
                "snapshot {} holds no database dump; restore without --database-sql",
                manifest.id
            )));
        }
        let (_, d) = snapshot::database_agent(agents).map_err(|e| {
            e.context("--database-sql needs the database running (deisctl start database)")
        })?;
        let step = Step {
            what: "database-sql".into(),
            target: format!("deis-database on {}", d.agent.host_id),
            done: false,
            detail: DATABASE_PART.into(),
        };
        plan.steps
            .push((Action::DatabaseSql { agent: &d.agent }, step));
    }
    if options.etcd_keys && manifest.parts.contains_key(ETCD_PART) {
        let step = Step {
            what: "etcd".into(),
            target: platform_keys::ROOT.into(),
            done: false,
            detail: "platform keys, ephemeral ones left out".into(),
        };
        plan.steps.push((Action::EtcdKeys, step));
    }
    Ok(plan)
}

/// Refuses to put back a `db_wal` whose base backup only another PostgreSQL major version than the
/// target's database image holds can start (deis/deis#4709): asked of every agent with a
/// database container, running or not. With none, or an agent that cannot say, the closing
/// message names the version the image must run.
async fn postgres_check(plan: &mut Plan<'_>, manifest: &Manifest, agents: &[Described]) {
    let Some((chain, major)) = manifest
        .wal_e
        .as_ref()
        .and_then(|c| c.postgres_major().map(|m| (c, m)))
    else {
        return;
    };
    for d in agents.iter().filter(|d| d.info.database.is_some()) {
        let mut c = d.agent.client.clone();
        match c.probe_database_image(ProbeDatabaseImageRequest {}).await {
            Ok(r) => {
                let r = r.into_inner();
                if !r.postgres_versions.contains(&major) {
                    plan.refusals.push(format!(
                        "the base backup in {} is PostgreSQL {major}, but the database image {} \
                         on {} holds PostgreSQL {}: the database would not start on it \
                         (deis/deis#4709); run an image of PostgreSQL {major}, or restore with \
                         --database-sql",
                        chain.bucket,
                        r.image,
                        d.agent.host_id,
                        if r.postgres_versions.is_empty() {
                            "none".to_owned()
                        } else {
                            r.postgres_versions.join(", ")
                        }
                    ));
                }
            }
            Err(s) => tracing::warn!(
                host = %d.agent.host_id,
                "cannot learn the PostgreSQL version of the database image: {}",
                s.message()
            ),
        }
    }
}

async fn plan_buckets<'a>(
    plan: &mut Plan<'a>,
    manifest: &Manifest,
    target: &'a Cluster,
    options: &RestoreOptions,
) -> Result<()> {
    let gateway = target
        .gateway
        .as_ref()
        .ok_or_else(|| Error::config("the snapshot holds buckets but no gateway is configured"))?;
    for (source, b) in &manifest.buckets {
        let bucket = target_bucket(manifest, target.deis_buckets.as_ref(), source);
        if options.existing() == Existing::Refuse
            && gateway.bucket_exists(&bucket).await?
            && !gateway.bucket_is_empty(&bucket).await?
        {
            plan.refusals
                .push(format!("bucket {bucket} already holds objects"));
        }
        let step = Step {
            what: "bucket".into(),
            target: if &bucket == source {
                bucket.clone()
            } else {
                format!("{bucket} (was {source})")
            },
            done: false,
            detail: format!("{} objects, {} bytes", b.objects, b.bytes),
        };
        let action = Action::Bucket {
            source: source.clone(),
            bucket,
            gateway,
        };
        plan.steps.push((action, step));
    }
    Ok(())
}

fn plan_stores<'a>(
    plan: &mut Plan<'a>,
    manifest: &Manifest,
    agents: &'a [Described],
    options: &RestoreOptions,
) -> Result<()> {
    for (name, blob) in manifest
        .parts
        .iter()
        .filter(|(n, _)| n.starts_with(STORE_PREFIX))
    {
        let info = manifest.part_info.get(name).cloned().unwrap_or_default();
        let agent = store_target(agents, name, &info)?;
        let path = info.path.as_deref().unwrap_or_default();
        let there = agents
            .iter()
            .filter(|d| d.agent.host_id == agent.host_id)
            .flat_map(|d| &d.info.store_paths)
            .find(|p| p.path == path);
        if !there.is_some_and(|p| p.empty) && !options.overwrite_store {
            plan.refusals.push(format!(
                "store directory {path} on {} is not empty (--overwrite-store replaces it)",
                agent.host_id
            ));
        }
        if let Some(short) = too_little_room(there, &info) {
            plan.refusals.push(format!(
                "store directory {path} on {}: {short}",
                agent.host_id
            ));
        }
        let identity = there.map(|p| p.fs_identity.clone()).unwrap_or_default();
        let mut seen_by = Vec::new();
        if info.shared == Some(true) {
            // Written once, through `agent`; every other host with the path must be on the same
            // filesystem, or the restored tree would reach only some of them.
            for d in agents.iter().filter(|d| d.agent.host_id != agent.host_id) {
                if let Some(p) = d.info.store_paths.iter().find(|p| p.path == path) {
                    if p.fs_identity != identity {
                        plan.refusals.push(format!(
                            "store {path} is one shared filesystem in the snapshot, but {} has \
                             another filesystem there than {} ({} against {}): the restored \
                             tree would reach only some hosts",
                            d.agent.host_id, agent.host_id, p.fs_identity, identity
                        ));
                    }
                    seen_by.push(d.agent.clone());
                }
            }
        }
        let step = Step {
            what: "store".into(),
            target: format!("{path} on {}", agent.host_id),
            done: false,
            detail: format!("{name}, {} bytes compressed", blob.size()),
        };
        let action = Action::Store {
            part: name.clone(),
            info: Box::new(info),
            agent,
            seen_by,
            identity,
        };
        plan.steps.push((action, step));
    }
    Ok(())
}

/// Writes one planned step; returns what it did, for the report.
async fn execute(
    repo: &Repository,
    manifest: &Manifest,
    etcd: &deis_backup_etcd::Client,
    options: &RestoreOptions,
    progress: &dyn snapshot::Progress,
    action: &Action<'_>,
) -> Result<String> {
    match action {
        Action::Bucket {
            source,
            bucket,
            gateway,
        } => {
            let listing = repo.listing(manifest, source).await?;
            let existing = if options.existing() == Existing::Refuse && options.force {
                Existing::Merge
            } else {
                options.existing()
            };
            let stats =
                bucket_restore::restore_bucket(gateway, repo, &listing, bucket, existing, progress)
                    .await?;
            Ok(format!(
                "{} objects, {} uploaded, {} bytes",
                stats.objects, stats.uploaded_objects, stats.uploaded_bytes
            ))
        }
        Action::Store {
            part,
            info,
            agent,
            seen_by,
            identity,
        } => {
            progress.part_started(part, &format!("agent {}", agent.host_id));
            let overwrite = options.overwrite_store || options.force;
            let mut r = restore_store(repo, manifest, part, info, agent, overwrite).await;
            if let Ok(done) = &r
                && !seen_by.is_empty()
            {
                let path = info.path.as_deref().unwrap_or_default();
                r = confirm_seen(seen_by, path, identity)
                    .await
                    .map(|hosts| format!("{done}; the same tree seen from {hosts}"));
            }
            progress.part_finished(part, r.is_ok());
            r
        }
        Action::DatabaseSql { agent } => {
            progress.part_started(DATABASE_PART, &format!("agent {}", agent.host_id));
            let r = restore_database(repo, manifest, agent).await;
            progress.part_finished(DATABASE_PART, r.is_ok());
            r
        }
        Action::EtcdKeys => restore_etcd_keys(repo, manifest, etcd).await,
    }
}

/// Asks every agent of `seen_by` whether it sees the restored shared store: `path` on the
/// filesystem `identity`, no longer empty. Their host ids, or the error naming one that does not.
async fn confirm_seen(seen_by: &[Agent], path: &str, identity: &str) -> Result<String> {
    let mut hosts = Vec::new();
    for (agent, r) in agents::describe_all(seen_by).await {
        let info = r.map_err(|e| {
            e.context(format!(
                "the shared store {path} was restored, but {} could not confirm it sees it",
                agent.host_id
            ))
        })?;
        let seen = info
            .store_paths
            .iter()
            .find(|p| p.path == path)
            .is_some_and(|p| p.fs_identity == identity && !p.empty);
        if !seen {
            return Err(Error::new(
                ErrorKind::Agent,
                format!(
                    "the shared store {path} was restored, but {} does not see it (another \
                     filesystem, or still empty there)",
                    agent.host_id
                ),
                "check that every host mounts the same CephFS at the store path (store-volume)",
            ));
        }
        hosts.push(agent.host_id);
    }
    Ok(hosts.join(", "))
}

async fn restore_etcd_keys(
    repo: &Repository,
    manifest: &Manifest,
    etcd: &deis_backup_etcd::Client,
) -> Result<String> {
    let blob = single_blob(manifest, ETCD_PART)?;
    let data = repo
        .read_blob(&blob.sha256, u64::MAX, "the etcd export")
        .await?;
    let export: platform_keys::Export = serde_json::from_slice(&data)
        .map_err(|e| Error::repository(format!("{ETCD_PART} is not an etcd export: {e}")))?;
    let r = platform_keys::import(etcd, &export, false).await?;
    Ok(format!(
        "{} keys written, {} refused as ephemeral",
        r.written.len(),
        r.refused.len()
    ))
}

/// `e`, saying which steps completed before it.
fn stopped_part_way(report: &Report, e: Error) -> Error {
    let done: Vec<String> = report
        .steps
        .iter()
        .filter(|s| s.done)
        .map(|s| format!("{} {}", s.what, s.target))
        .collect();
    e.context(format!(
        "restore stopped part-way (completed: {})",
        if done.is_empty() {
            "nothing".to_owned()
        } else {
            done.join(", ")
        }
    ))
}

/// The bucket on the target cluster for `source`: the target's bucket of the same Deis role
/// (database, registry) when the snapshot recorded roles, else the same name.
pub fn target_bucket(manifest: &Manifest, target: Option<&DeisBuckets>, source: &str) -> String {
    let role = |label: &str| manifest.labels.get(label).is_some_and(|b| b == source);
    match target {
        Some(t) if role(snapshot::BUCKET_DATABASE_LABEL) => t.database.clone(),
        Some(t) if role(snapshot::BUCKET_REGISTRY_LABEL) => t.registry.clone(),
        _ => source.to_owned(),
    }
}

/// The agent that restores store part `name`: for a shared filesystem any agent that has the path
/// (first by host id); for a host-local directory the same host, or the only host with the path.
fn store_target<'a>(agents: &'a [Described], name: &str, info: &PartInfo) -> Result<&'a Agent> {
    let path = info
        .path
        .as_deref()
        .ok_or_else(|| Error::repository(format!("store part {name} does not record its path")))?;
    let mut with_path: Vec<&Described> = agents
        .iter()
        .filter(|d| d.info.store_paths.iter().any(|p| p.path == path))
        .collect();
    with_path.sort_by(|a, b| a.agent.host_id.cmp(&b.agent.host_id));
    if info.shared != Some(true) {
        if let Some(d) = with_path
            .iter()
            .find(|d| Some(d.agent.host_id.as_str()) == info.host.as_deref())
        {
            return Ok(&d.agent);
        }
        if with_path.len() > 1 {
            return Err(Error::new(
                ErrorKind::Preflight,
                format!(
                    "store part {name} came from host-local {path} on {}, which is not in this \
                     cluster, and several hosts have {path}",
                    info.host.as_deref().unwrap_or("?")
                ),
                "restore with --agent naming the one host to restore it to",
            ));
        }
    }
    with_path.first().map(|d| &d.agent).ok_or_else(|| {
        Error::new(
            ErrorKind::Preflight,
            format!("no agent allows the store path {path} (store part {name})"),
            "start the agents with --store-path for that directory",
        )
    })
}

async fn restore_store(
    repo: &Repository,
    manifest: &Manifest,
    name: &str,
    info: &PartInfo,
    agent: &Agent,
    overwrite: bool,
) -> Result<String> {
    let started = Instant::now();
    let blobs = manifest.parts[name].blobs();
    let segments = blobs
        .iter()
        .map(|b| {
            Ok(Digest {
                size: b.size,
                sha256: digest_bytes(b),
            })
        })
        .collect::<Result<_>>()?;
    let header = RestoreStoreRequest {
        kind: Some(StoreKind::Header(RestoreStoreHeader {
            path: info.path.clone().unwrap_or_default(),
            overwrite,
            segments,
        })),
    };
    let (data, read_failure) = blob_chunks(repo, blobs);
    let requests = futures::stream::iter([header]).chain(data.map(|d| RestoreStoreRequest {
        kind: Some(StoreKind::Data(d)),
    }));
    let mut c = agent.client.clone();
    let reply = c.restore_store(requests).await;
    read_failure.check(name)?;
    let reply = reply
        .map_err(|s| agents::status_error(agent, &format!("RestoreStore of {name}"), &s))?
        .into_inner();
    Ok(format!(
        "{} files, {} dirs, {} links, {} bytes in {:.1} s{}",
        reply.files,
        reply.dirs,
        reply.links,
        reply.bytes,
        started.elapsed().as_secs_f64(),
        if reply.warnings.is_empty() {
            String::new()
        } else {
            format!(", {} warnings", reply.warnings.len())
        }
    ))
}

/// The snapshot's dump as the stream RestoreDatabase and DrillDatabase take: its header (the
/// digest), then its bytes; the [`ReadFailure`] says whether reading the blob cut it short.
pub(crate) fn dump_requests(
    repo: &Repository,
    manifest: &Manifest,
) -> Result<(
    impl futures::Stream<Item = RestoreDatabaseRequest> + Send + 'static,
    ReadFailure,
)> {
    let blob = single_blob(manifest, DATABASE_PART)?;
    let header = RestoreDatabaseRequest {
        kind: Some(DbKind::Header(RestoreDatabaseHeader {
            sha256: digest_bytes(&blob),
        })),
    };
    let (data, read_failure) = blob_chunks(repo, vec![blob]);
    let requests = futures::stream::iter([header]).chain(data.map(|d| RestoreDatabaseRequest {
        kind: Some(DbKind::Data(d)),
    }));
    Ok((requests, read_failure))
}

async fn restore_database(repo: &Repository, manifest: &Manifest, agent: &Agent) -> Result<String> {
    let (requests, read_failure) = dump_requests(repo, manifest)?;
    let mut c = agent.client.clone();
    let reply = c.restore_database(requests).await;
    read_failure.check(DATABASE_PART)?;
    let reply = reply
        .map_err(|s| agents::status_error(agent, "RestoreDatabase", &s))?
        .into_inner();
    Ok(format!(
        "{} bytes of SQL in {:.1} s",
        reply.raw_bytes,
        reply.duration_ms as f64 / 1000.0
    ))
}

/// The one blob of part `name`.
pub(crate) fn single_blob(manifest: &Manifest, name: &str) -> Result<BlobRef> {
    manifest.parts[name].single().ok_or_else(|| {
        Error::repository(format!(
            "part {name} of snapshot {} is segmented, but this part is always one blob",
            manifest.id
        ))
    })
}

/// A blob's digest as the contract carries it.
fn digest_bytes(blob: &BlobRef) -> Vec<u8> {
    blob.sha256.as_bytes().to_vec()
}

/// Where [`blob_chunks`] leaves the error that ended its stream early.
#[derive(Debug, Clone, Default)]
pub(crate) struct ReadFailure(std::sync::Arc<std::sync::Mutex<Option<Error>>>);

impl ReadFailure {
    fn set(&self, e: Error) {
        let mut slot = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        slot.get_or_insert(e);
    }

    /// The read error, if the stream ended on one: it, not what the agent made of the short
    /// stream, is what failed.
    pub(crate) fn check(&self, part: &str) -> Result<()> {
        let taken = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        taken.map_or(Ok(()), |e| {
            Err(e.context(format!("reading part {part} from the repository")))
        })
    }
}

/// Blobs, one after another, as a stream of chunks of up to 1 MiB (each blob opened only once the
/// one before is read to its end). A failure to open or read one ends the stream early and is left
/// in the [`ReadFailure`]; the agent sees the data fall short of its digests and refuses it, and
/// the caller reports the read error.
fn blob_chunks(
    repo: &Repository,
    blobs: Vec<BlobRef>,
) -> (
    impl futures::Stream<Item = Vec<u8>> + Send + 'static,
    ReadFailure,
) {
    let repo = repo.clone();
    let failure = ReadFailure::default();
    let failed = failure.clone();
    let stream = futures::stream::iter(blobs)
        .then(move |blob| {
            let repo = repo.clone();
            async move { repo.open_blob(&blob.sha256).await }
        })
        .flat_map(|opened| match opened {
            Ok(reader) => ReaderStream::with_capacity(reader, 1 << 20)
                .map(|chunk| chunk.map_err(|e| Error::io("read a blob", e)))
                .left_stream(),
            Err(e) => futures::stream::once(std::future::ready(Err(e))).right_stream(),
        })
        .scan((), move |(), chunk| {
            std::future::ready(match chunk {
                Ok(bytes) => Some(Vec::from(bytes)),
                Err(e) => {
                    failed.set(e);
                    None
                }
            })
        });
    (stream, failure)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_without_room_for_the_archive_is_a_preflight_refusal() {
        let info = |raw| PartInfo {
            raw_bytes: raw,
            ..PartInfo::default()
        };
        let path = |free| StorePath {
            free_bytes: free,
            ..StorePath::default()
        };
        let mib = 1 << 20;
        let short = too_little_room(Some(&path(Some(20 * mib))), &info(Some(30 * mib)))
            .expect("30 MiB do not fit in 20");
        assert!(
            short.contains("not enough space") && short.contains("30.00 MiB"),
            "{short}"
        );
        assert!(too_little_room(Some(&path(Some(30 * mib))), &info(Some(30 * mib))).is_none());
        // Unknown on either side (an older agent or snapshot): no finding.
        assert!(too_little_room(Some(&path(None)), &info(Some(30 * mib))).is_none());
        assert!(too_little_room(Some(&path(Some(0))), &info(None)).is_none());
        assert!(too_little_room(None, &info(Some(1))).is_none());
    }

    #[tokio::test]
    async fn a_blob_that_cannot_be_read_is_the_error_not_a_short_stream() {
        let tmp = tempfile::tempdir().unwrap();
        let repo = Repository::open_or_init(&crate::repository::RepositoryOptions {
            location: Some(tmp.path().join("repo").display().to_string()),
            fsync: Some(false),
            ..Default::default()
        })
        .await
        .unwrap();
        let there = repo.write_blob_from(&b"abc"[..]).await.unwrap().blob;
        let gone = BlobRef {
            sha256: "ab".repeat(32).parse().unwrap(),
            size: 3,
        };
        let (stream, failure) = blob_chunks(&repo, vec![there, gone]);
        let chunks: Vec<Vec<u8>> = stream.collect().await;
        assert_eq!(chunks, [b"abc".to_vec()]);
        let e = failure.check("store/x").unwrap_err();
        assert!(
            e.message()
                .starts_with("reading part store/x from the repository"),
            "{e}"
        );
        let (stream, failure) = blob_chunks(&repo, vec![there]);
        assert_eq!(stream.collect::<Vec<_>>().await.len(), 1);
        failure.check("store/x").unwrap();

        // One that opens but fails to read (a directory where the blob should be): the stream
        // ends there, nothing of the blobs after it is sent, and the read error is kept.
        let unreadable = BlobRef {
            sha256: "cd".repeat(32).parse().unwrap(),
            size: 3,
        };
        let path = tmp
            .path()
            .join("repo")
            .join(crate::repository::format::blob_path(&unreadable.sha256));
        std::fs::create_dir_all(&path).unwrap();
        let (stream, failure) = blob_chunks(&repo, vec![there, unreadable, there]);
        let chunks: Vec<Vec<u8>> = stream.collect().await;
        assert_eq!(chunks, [b"abc".to_vec()]);
        let e = failure.check("store/x").unwrap_err();
        assert!(e.to_string().contains("read a blob"), "{e}");
    }

    #[tokio::test]
    async fn blobs_are_sent_whole_and_in_order_in_chunks_of_at_most_a_mib() {
        let tmp = tempfile::tempdir().unwrap();
        let repo = Repository::open_or_init(&crate::repository::RepositoryOptions {
            location: Some(tmp.path().join("repo").display().to_string()),
            fsync: Some(false),
            ..Default::default()
        })
        .await
        .unwrap();
        let big: Vec<u8> = (0..(5u32 << 19)).map(|i| (i % 251) as u8).collect();
        let a = repo.write_blob_from(&big[..]).await.unwrap().blob;
        let b = repo.write_blob_from(&b"tail"[..]).await.unwrap().blob;
        let (stream, failure) = blob_chunks(&repo, vec![a, b, a]);
        let chunks: Vec<Vec<u8>> = stream.collect().await;
        failure.check("store/x").unwrap();
        assert!(chunks.iter().all(|c| !c.is_empty() && c.len() <= 1 << 20));
        let expected = [&big[..], b"tail", &big[..]].concat();
        assert_eq!(chunks.concat(), expected);
    }

    mod with_agents {
        //! Plan, preflight and restore against fake agents, from a memory repository.
        use super::*;
        use crate::mirror::NoProgress;
        use crate::repository::format::blob_path;
        use crate::repository::{PartRef, SegmentRef, Sha256, SnapshotId};
        use crate::testkit::{self, FakeAgent, Host};

        const STORE: &str = "/var/lib/deis/store";
        const SHARED_PART: &str = "store/shared/var-lib-deis-store.tar.zst";
        const LOCAL_PART: &str = "store/a/srv-x.tar.zst";
        const DUMP: &[u8] = b"-- the dump";

        /// A snapshot of a dump, the shared store (two segments, 5000 bytes unpacked) and `a`'s
        /// local `/srv/x`.
        async fn snapshot(repo: &Repository) -> Manifest {
            let mut s = repo.start_snapshot(SnapshotId::generate());
            let dump = repo.write_blob_from(DUMP).await.unwrap().blob;
            s.add_part(DATABASE_PART, dump).unwrap();
            let mut segments = Vec::new();
            for data in [&b"segment one"[..], b"segment two"] {
                let b = repo.write_blob_from(data).await.unwrap().blob;
                segments.push(SegmentRef {
                    sha256: b.sha256,
                    size: b.size,
                    fingerprint: None,
                });
            }
            s.add_part(SHARED_PART, PartRef::Segmented(segments))
                .unwrap();
            let store_info = |host: &str, path: &str, shared: bool| PartInfo {
                host: Some(host.into()),
                path: Some(path.into()),
                shared: Some(shared),
                raw_bytes: Some(5000),
                ..PartInfo::default()
            };
            s.describe_part(SHARED_PART, store_info("old-host", STORE, true));
            let local = repo.write_blob_from(&b"a's files"[..]).await.unwrap().blob;
            s.add_part(LOCAL_PART, local).unwrap();
            s.describe_part(LOCAL_PART, store_info("a", "/srv/x", false));
            s.commit().await.unwrap()
        }

        /// A fresh cluster: only the store runs; `a` has the database (restores allowed).
        async fn fresh_cluster() -> (FakeAgent, FakeAgent) {
            let mut host_a = Host::new("a")
                .with_database(false)
                .with_shared_store(STORE, Some(1 << 30))
                .with_local_store("/srv/x", Some(1 << 30));
            host_a.restore_database = true;
            let b = Host::new("b")
                .with_shared_store(STORE, Some(1 << 30))
                .with_local_store("/srv/x", Some(1 << 30));
            let a = FakeAgent::start(host_a).await;
            let b = FakeAgent::start_beside(b, &a).await;
            (a, b)
        }

        fn options() -> RestoreOptions {
            RestoreOptions {
                no_buckets: true,
                ..RestoreOptions::default()
            }
        }

        fn nothing_written(agents: &[&FakeAgent]) {
            for a in agents {
                let c = a.calls();
                assert!(
                    c.store_restores.is_empty() && c.database_restores.is_empty(),
                    "{c:?}"
                );
            }
        }

        #[tokio::test]
        async fn the_preflight_refuses_running_containers_occupied_or_small_stores_and_writes_nothing()
         {
            let (repo, _) = testkit::memory_repo();
            let m = snapshot(&repo).await;
            let (a, b) = fresh_cluster().await;
            a.update_host(|h| {
                h.start_database();
                h.store_paths[0].free_bytes = Some(4000);
                h.store_paths[1].empty = false;
            });
            b.update_host(|h| {
                h.running_platform_containers.push("deis-registry".into());
                // b mounts another filesystem where a has the shared store
                h.store_paths[0].fs_identity = format!("shared:ceph:00000000000000cd:{STORE}");
            });
            let cluster = testkit::cluster(&[&a, &b]).await;
            let e = restore(&repo, &m, &cluster, &options(), &NoProgress, None)
                .await
                .unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Preflight);
            for says in [
                "deis-database runs on a",
                "deis-registry runs on b",
                "store directory /srv/x on a is not empty",
                &format!("store directory {STORE} on a: not enough space"),
                &format!(
                    "store {STORE} is one shared filesystem in the snapshot, but b has another \
                     filesystem there than a"
                ),
            ] {
                assert!(e.message().contains(says), "{says}: {e}");
            }
            nothing_written(&[&a, &b]);

            // Forced, a dry run lists what it overrides and still writes nothing.
            let forced = RestoreOptions {
                force: true,
                dry_run: true,
                ..options()
            };
            let report = restore(&repo, &m, &cluster, &forced, &NoProgress, None)
                .await
                .unwrap();
            assert_eq!(report.forced.len(), 5, "{:?}", report.forced);
            let steps: Vec<_> = report
                .steps
                .iter()
                .map(|s| (&s.what[..], &s.target[..], s.done))
                .collect();
            assert_eq!(
                steps,
                [
                    ("store", "/srv/x on a", false),
                    ("store", "/var/lib/deis/store on a", false)
                ]
            );
            nothing_written(&[&a, &b]);

            // Loading the SQL dump needs the database running: then it is no refusal.
            let sql = RestoreOptions {
                database_sql: true,
                dry_run: true,
                overwrite_store: true,
                ..options()
            };
            let e = restore(&repo, &m, &cluster, &sql, &NoProgress, None)
                .await
                .unwrap_err();
            assert!(!e.message().contains("deis-database runs"), "{e}");
            assert!(
                e.message().contains("deis-registry runs on b")
                    && !e.message().contains("not empty"),
                "{e}"
            );
        }

        #[tokio::test]
        async fn a_base_backup_of_another_postgresql_than_the_image_is_refused_unless_sql() {
            let (repo, _) = testkit::memory_repo();
            let mut writer = repo.start_snapshot(SnapshotId::generate());
            let dump = repo.write_blob_from(DUMP).await.unwrap().blob;
            writer.add_part(DATABASE_PART, dump).unwrap();
            writer.wal_chain(crate::repository::WalChain {
                bucket: "db_wal".into(),
                layout: "005".into(),
                base_backups: 1,
                wal_segments: 1,
                latest: None,
                restorable: None,
                postgres_version: Some(
                    "PostgreSQL 13.23 (Debian 13.23-0+deb11u4) on x86_64".into(),
                ),
            });
            let m = writer.commit().await.unwrap();
            let (a, b) = fresh_cluster().await;
            let cluster = testkit::cluster(&[&a, &b]).await;
            let deis_way = RestoreOptions {
                no_store: true,
                ..RestoreOptions::default()
            };
            // Deis v1.13's image: 9.3.
            let refused = restore(&repo, &m, &cluster, &deis_way, &NoProgress, None)
                .await
                .unwrap_err();
            assert_eq!(refused.kind(), ErrorKind::Preflight);
            assert!(
                refused.message().contains(
                    "the base backup in db_wal is PostgreSQL 13, but the database image \
                     deis/database:v1.13.4 on a holds PostgreSQL 9.3"
                ),
                "{refused}"
            );
            // The same image holding 13 as well: no refusal.
            a.update_host(|h| h.postgres_versions = vec!["13".into(), "9.3".into()]);
            let cluster = testkit::cluster(&[&a, &b]).await;
            restore(&repo, &m, &cluster, &deis_way, &NoProgress, None)
                .await
                .unwrap();
            // The dump does not care which base backup db_wal holds.
            a.update_host(|h| {
                h.postgres_versions = vec!["9.3".into()];
                h.start_database();
            });
            let cluster = testkit::cluster(&[&a, &b]).await;
            let sql = RestoreOptions {
                database_sql: true,
                no_store: true,
                no_buckets: true,
                ..RestoreOptions::default()
            };
            restore(&repo, &m, &cluster, &sql, &NoProgress, None)
                .await
                .unwrap();
        }

        #[tokio::test]
        async fn each_part_is_streamed_to_the_host_that_owns_it_with_its_digests() {
            let (repo, _) = testkit::memory_repo();
            let m = snapshot(&repo).await;
            let (a, b) = fresh_cluster().await;
            a.update_host(|h| {
                h.start_database();
            });
            let cluster = testkit::cluster(&[&a, &b]).await;
            let sql = RestoreOptions {
                database_sql: true,
                ..options()
            };
            let report = restore(&repo, &m, &cluster, &sql, &NoProgress, None)
                .await
                .unwrap();
            assert!(report.steps.iter().all(|s| s.done), "{:?}", report.steps);
            assert_eq!(
                report.next,
                "deisctl start platform (the database already holds the dump)"
            );
            let shared = report
                .steps
                .iter()
                .find(|s| s.target == format!("{STORE} on a"))
                .unwrap();
            assert!(
                shared.detail.ends_with("; the same tree seen from b"),
                "written once through a, confirmed by b: {shared:?}"
            );
            let calls = a.calls();
            let restored: Vec<_> = calls
                .store_restores
                .iter()
                .map(|(h, d)| (&h.path[..], h.segments.len(), &d[..]))
                .collect();
            assert_eq!(
                restored,
                [
                    ("/srv/x", 1, &b"a's files"[..]),
                    (STORE, 2, &b"segment onesegment two"[..])
                ],
                "the shared store goes to the first host by id, the local one to its own host"
            );
            let (header, _) = &calls.store_restores[1];
            let digests: Vec<_> = header
                .segments
                .iter()
                .map(|d| (d.size, d.sha256.clone()))
                .collect();
            let recorded: Vec<_> = m.parts[SHARED_PART]
                .blobs()
                .iter()
                .map(|b| (b.size, b.sha256.as_bytes().to_vec()))
                .collect();
            assert_eq!(digests, recorded);
            assert!(!header.overwrite);
            assert_eq!(
                calls.database_restores,
                [(Sha256::of(DUMP).as_bytes().to_vec(), DUMP.to_vec())]
            );
            nothing_written(&[&b]);
        }

        #[tokio::test]
        async fn a_failed_step_stops_the_restore_saying_what_completed() {
            let (repo, backend) = testkit::memory_repo();
            let m = snapshot(&repo).await;
            let (a, b) = fresh_cluster().await;
            a.update_host(|h| {
                h.restore_database = false;
                h.start_database();
            });
            let cluster = testkit::cluster(&[&a, &b]).await;
            let sql = RestoreOptions {
                database_sql: true,
                ..options()
            };
            let e = restore(&repo, &m, &cluster, &sql, &NoProgress, None)
                .await
                .unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Agent);
            assert!(
                e.message().starts_with(&format!(
                    "restore stopped part-way (completed: store /srv/x on a, store {STORE} on a): agent a"
                )) && e.message().contains("database restores are off"),
                "{e}"
            );

            // A damaged snapshot is refused before anything is written.
            let (a, b) = fresh_cluster().await;
            let cluster = testkit::cluster(&[&a, &b]).await;
            let seg = m.parts[SHARED_PART].blobs()[1];
            backend.set(&blob_path(&seg.sha256), &b"segment 2!!"[..]);
            let e = restore(&repo, &m, &cluster, &options(), &NoProgress, None)
                .await
                .unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Integrity);
            assert!(
                e.message().contains("is damaged, nothing was restored")
                    && e.message().contains("segment 2 of 2"),
                "{e}"
            );
            nothing_written(&[&a, &b]);
        }

        #[tokio::test]
        async fn a_local_store_from_a_host_that_is_gone_needs_one_host_with_its_path() {
            let (repo, _) = testkit::memory_repo();
            let mut m = snapshot(&repo).await;
            m.part_info.get_mut(LOCAL_PART).unwrap().host = Some("gone".into());
            let (a, b) = fresh_cluster().await;
            let cluster = testkit::cluster(&[&a, &b]).await;
            let dry = RestoreOptions {
                dry_run: true,
                ..options()
            };
            let e = restore(&repo, &m, &cluster, &dry, &NoProgress, None)
                .await
                .unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Preflight);
            assert!(
                e.message().contains(
                    "on gone, which is not in this cluster, and several hosts have /srv/x"
                ),
                "{e}"
            );
            b.update_host(|h| h.store_paths.retain(|p| p.path != "/srv/x"));
            let cluster = testkit::cluster(&[&a, &b]).await;
            let report = restore(&repo, &m, &cluster, &dry, &NoProgress, None)
                .await
                .unwrap();
            assert_eq!(report.steps[0].target, "/srv/x on a");
            a.update_host(|h| h.store_paths.retain(|p| p.path != "/srv/x"));
            let cluster = testkit::cluster(&[&a, &b]).await;
            let e = restore(&repo, &m, &cluster, &dry, &NoProgress, None)
                .await
                .unwrap_err();
            assert!(
                e.message()
                    .starts_with("no agent allows the store path /srv/x"),
                "{e}"
            );
        }
    }
}
