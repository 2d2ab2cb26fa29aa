//! `snapshot`: one whole-cluster snapshot — the gateway's buckets, the database dump, the store
//! archive of every distinct filesystem and the platform's etcd keys — written into a repository.
//!
//! Invariants:
//! - Planning reads only (etcd, agents' Describe, the previous manifest); `--dry-run` stops there.
//! - The cluster lock is held from before the first write until after the manifest.
//! - Parts are taken concurrently; every one must succeed and match its trailer (size, sha256)
//!   before the manifest is written. Any failure leaves no manifest, so no complete snapshot, and
//!   the error names the part.
//! - The shared store (CephFS, the same filesystem on every host) is archived once; each host-local
//!   store directory once per host.
//! - A host that does not take part (its agent silent, or no longer registered) is planned around
//!   only as `absent` allows: when another host provides all it held; otherwise the plan fails
//!   naming it, before anything is written.
//! - Reuse (unless `--full`): only blobs of the previous complete snapshot that are present in the
//!   repository with their recorded size are offered — the dump when the database is still in the
//!   state it was taken in, store segments whose fingerprints the agent finds again. The agent
//!   decides what is unchanged; the coordinator never assumes it. Bucket objects are carried over
//!   by [`mirror`]'s rule (key, size and ETag unchanged, the recorded SHA-256's blob present with
//!   its size); a previous listing that cannot be read or fails its SHA-256 is not used.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use deis_backup_proto::v1::chunk::Kind;
use deis_backup_proto::v1::{
    ArchiveStoreRequest, DumpDatabaseRequest, RunHookRequest, SegmentEnd, Trailer,
};
use futures::{FutureExt as _, StreamExt as _, TryStreamExt as _};
use serde::{Deserialize, Serialize};

use crate::agents::{self, Agent, AgentOptions, Described};
use crate::dump_rows;
use crate::error::{Error, ErrorKind, Result};
use crate::gateway::DeisBuckets;
use crate::hold::Hold;
use crate::mirror::{self, MirrorStats, Mirrored};
use crate::platform_keys;
use crate::repository::{
    BlobRef, Manifest, PartInfo, PartRef, Repository, SegmentRef, Sha256, SnapshotId,
    SnapshotWriter, WalChain,
};
use crate::s3::{self, GatewayOptions};
use crate::wal_e;

mod absent;
use absent::HOSTS_LABEL;

/// Part name of the database dump.
pub const DATABASE_PART: &str = "database/pg_dumpall.sql.zst";
/// Part name of the etcd export.
pub const ETCD_PART: &str = "etcd/deis.json";
/// Manifest labels naming the bucket that plays each Deis role, so a restore can put it into the
/// bucket the target cluster names for that role.
pub const BUCKET_DATABASE_LABEL: &str = "bucket.database";
pub const BUCKET_REGISTRY_LABEL: &str = "bucket.registry";
/// Prefix of store archive parts.
pub const STORE_PREFIX: &str = "store/";

/// Options of `snapshot`. Serve the CLI, the config file (`[snapshot]`) and the library.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, clap::Args, merge::Merge)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
#[merge(strategy = merge::bool::overwrite_false)]
pub struct SnapshotOptions {
    /// Print the plan (which agent does what, which buckets, what is reused) and touch nothing.
    #[arg(long)]
    #[serde(skip)]
    pub dry_run: bool,
    /// Run this agent hook on the database host first, e.g. wal-e-backup-push for a fresh WAL-E
    /// base backup before db_wal is mirrored.
    #[arg(long = "pre-hook", value_name = "NAME")]
    #[merge(strategy = merge::option::overwrite_none)]
    pub pre_hook: Option<String>,
    /// zstd level for the dump and archives [default: the agents' own].
    #[arg(long)]
    #[merge(strategy = merge::option::overwrite_none)]
    pub zstd_level: Option<i32>,
    /// Take no database dump (a cluster without deis-database).
    #[arg(long)]
    pub no_database: bool,
    /// Take no store archive.
    #[arg(long)]
    pub no_store: bool,
    /// Mirror no bucket.
    #[arg(long)]
    pub no_buckets: bool,
    /// Take the database dump and every store segment afresh, reusing none from the previous
    /// snapshot (bucket objects are still compared by key, size and ETag).
    #[arg(long)]
    pub full: bool,
    /// A host that left the cluster for good: snapshot without it even if it held something no
    /// other host provides (recorded as a warning); repeat for several.
    #[arg(long = "forget-host", value_name = "HOST")]
    #[serde(skip)]
    #[merge(strategy = merge::vec::overwrite_empty)]
    pub forget_hosts: Vec<String>,
}

/// Reports progress of the long steps; every method has a silent default.
pub trait Progress: mirror::Progress {
    fn part_started(&self, _part: &str, _source: &str) {}
    fn part_bytes(&self, _part: &str, _bytes: u64) {}
    fn part_finished(&self, _part: &str, _ok: bool) {}
}

/// What a snapshot will do.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    /// Agent (host id, address) that dumps the database.
    pub database: Option<AgentRef>,
    pub pre_hook: Option<String>,
    pub stores: Vec<StoreTask>,
    pub buckets: Vec<String>,
    pub gateways: Vec<String>,
    /// The snapshot whose listings make this one incremental.
    pub previous: Option<String>,
    /// The previous snapshot's manifest, read once here and reused by `run`.
    #[serde(skip)]
    pub previous_manifest: Option<Manifest>,
    /// Objects in the previous snapshot's listings (candidates for reuse).
    pub reusable_objects: u64,
    /// Whether the previous dump is offered for reuse (taken if the database is still in its state).
    pub reusable_dump: bool,
    /// What the previous snapshot offers, every blob checked present.
    #[serde(skip)]
    pub reuse: Reuse,
    pub etcd_export: bool,
    /// Hosts not taking part and who covers for them (README, "A host down"); they
    /// go into the manifest.
    pub warnings: Vec<String>,
    /// Hosts not taking part that the next snapshot still expects.
    pub absent_hosts: Vec<String>,
}

/// Parts of the previous snapshot offered for reuse; every blob named here is in the repository.
#[derive(Debug, Clone, Default)]
pub struct Reuse {
    /// The previous dump, its info, and the snapshot that first took it.
    pub database: Option<(PartRef, PartInfo, String)>,
    /// Per store part: fingerprint (raw bytes) -> the segment holding it.
    pub segments: BTreeMap<String, HashMap<Vec<u8>, SegmentRef>>,
}

/// The agent a part is given to: the connected agent itself, so running the plan looks nothing up
/// again; shown (and serialized) as its host id and address.
#[derive(Debug, Clone, Serialize)]
pub struct AgentRef {
    pub host: String,
    pub address: String,
    #[serde(skip)]
    pub agent: Agent,
}

impl From<&Agent> for AgentRef {
    fn from(agent: &Agent) -> Self {
        Self {
            host: agent.host_id.clone(),
            address: agent.address.clone(),
            agent: agent.clone(),
        }
    }
}

/// One store archive: a filesystem, the agent that reads it, and the other hosts that see it.
#[derive(Debug, Clone, Serialize)]
pub struct StoreTask {
    pub part: String,
    pub agent: AgentRef,
    pub path: String,
    pub fs_type: String,
    pub shared: bool,
    /// Hosts that see the same filesystem and are therefore not archived again.
    pub also_on: Vec<String>,
    /// Segments of the previous snapshot's archive offered for reuse.
    pub reusable_segments: usize,
}

/// The result of a snapshot (its `--json` report).
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub manifest: Manifest,
    pub buckets: BTreeMap<String, MirrorStats>,
    /// What each store-gateway served (requests spread over all that answer).
    pub gateways: Vec<s3::EndpointStats>,
}

/// Everything a snapshot talks to, set up once.
#[derive(Debug)]
pub struct Cluster {
    pub etcd: deis_backup_etcd::Client,
    pub agents: Vec<Described>,
    /// Agents that did not answer (their hosts down or cut off): the plan decides whether the
    /// snapshot can do without them.
    pub unanswered: Vec<agents::Unanswered>,
    pub gateway: Option<s3::Client>,
    /// The database and registry buckets, as this cluster names them in etcd.
    pub deis_buckets: Option<DeisBuckets>,
    pub buckets: Vec<String>,
}

impl Cluster {
    /// Discovers agents and the gateway. The gateway is connected (keys checked) unless `no_buckets`.
    pub async fn discover(
        etcd: deis_backup_etcd::Client,
        agent_options: &AgentOptions,
        gateway_options: &GatewayOptions,
        no_buckets: bool,
    ) -> Result<Self> {
        let locations = agents::locate(agent_options, Some(&etcd)).await?;
        let clients = agents::connect(agent_options, &locations)?;
        let (agents, unanswered) = agents::describe_answering(&clients).await?;
        let (gateway, deis_buckets) = if no_buckets {
            (None, None)
        } else {
            let gw = s3::Client::connect(gateway_options, Some(&etcd)).await?;
            (Some(gw), Some(DeisBuckets::discover(&etcd).await?))
        };
        let buckets = deis_buckets
            .as_ref()
            .map(DeisBuckets::all)
            .unwrap_or_default();
        Ok(Self {
            etcd,
            agents,
            unanswered,
            gateway,
            deis_buckets,
            buckets,
        })
    }
}

/// Decides who does what. Reads only.
pub async fn plan(
    cluster: &Cluster,
    repo: Option<&Repository>,
    options: &SnapshotOptions,
) -> Result<Plan> {
    let previous_manifest = match repo {
        Some(r) => r.latest().await?,
        None => None,
    };
    let found_database = database_agent(&cluster.agents);
    let mut stores = if options.no_store {
        Vec::new()
    } else {
        store_tasks(&cluster.agents)
    };
    // Hosts not taking part first: a missing database host is named as such.
    let shared_stores: Vec<(&str, &str)> = stores
        .iter()
        .filter(|t| t.shared)
        .map(|t| (t.path.as_str(), t.agent.host.as_str()))
        .collect();
    let answering = absent::Answering {
        database: found_database.as_ref().ok().map(|(a, _)| a.host.as_str()),
        database_wanted: !options.no_database,
        shared_stores: &shared_stores,
    };
    let absent = absent::check(
        &absent::absent_hosts(cluster, previous_manifest.as_ref()),
        previous_manifest.as_ref(),
        answering,
        &options.forget_hosts,
    )?;
    let database = if options.no_database {
        None
    } else {
        Some(found_database?)
    };
    if let (Some(hook), Some((_, d))) = (&options.pre_hook, &database)
        && !d.info.hooks.iter().any(|h| h == hook)
    {
        return Err(Error::config(format!(
            "the agent on {} defines no hook '{hook}' (it has: {})",
            d.agent.host_id,
            list_or_none(&d.info.hooks)
        )));
    }
    let reuse = match (repo, &previous_manifest) {
        (Some(r), Some(m)) if !options.full => reusable_parts(r, m).await?,
        _ => Reuse::default(),
    };
    for t in &mut stores {
        t.reusable_segments = reuse.segments.get(&t.part).map_or(0, HashMap::len);
    }
    let previous = previous_manifest.as_ref().map(|m| m.id.to_string());
    let reusable_objects = previous_manifest
        .as_ref()
        .map_or(0, |m| m.buckets.values().map(|b| b.objects).sum());
    Ok(Plan {
        database: database.map(|(agent, _)| agent),
        pre_hook: options.pre_hook.clone(),
        stores,
        buckets: cluster.buckets.clone(),
        gateways: cluster
            .gateway
            .as_ref()
            .map(|g| g.endpoints().into_iter().map(str::to_owned).collect())
            .unwrap_or_default(),
        previous,
        previous_manifest,
        reusable_objects,
        reusable_dump: reuse.database.is_some(),
        reuse,
        etcd_export: true,
        warnings: absent.warnings,
        absent_hosts: absent.still_expected,
    })
}

/// What `previous` offers for reuse: its dump (when it recorded the database state) and its store
/// segments with fingerprints, each only if its blob is in `repo` with the recorded size.
async fn reusable_parts(repo: &Repository, previous: &Manifest) -> Result<Reuse> {
    let present = async |blobs: Vec<BlobRef>| {
        let sizes = futures::stream::iter(blobs)
            .map(|b| async move { repo.has_blob(&b).await })
            .buffer_unordered(16)
            .try_collect::<Vec<bool>>()
            .await?;
        Ok::<_, Error>(sizes.into_iter().all(|ok| ok))
    };
    let mut reuse = Reuse::default();
    if let (Some(part), Some(info)) = (
        previous.parts.get(DATABASE_PART),
        previous.part_info.get(DATABASE_PART),
    ) && info.state.is_some()
        && present(part.blobs()).await?
    {
        let taken_in = info
            .taken_in
            .clone()
            .unwrap_or_else(|| previous.id.to_string());
        reuse.database = Some((part.clone(), info.clone(), taken_in));
    }
    for (name, part) in previous
        .parts
        .iter()
        .filter(|(n, _)| n.starts_with(STORE_PREFIX))
    {
        let mut offered = HashMap::new();
        for seg in part.segments() {
            let Some(fp) = seg.fingerprint.as_deref().and_then(|f| hex::decode(f).ok()) else {
                continue;
            };
            offered.insert(fp, seg.clone());
        }
        let blobs = offered.values().map(SegmentRef::blob).collect();
        if !offered.is_empty() && present(blobs).await? {
            reuse.segments.insert(name.clone(), offered);
        }
    }
    Ok(reuse)
}

/// Takes the snapshot the plan describes. The caller holds `hold` (the cluster lock and a
/// repository lease).
pub async fn run(
    cluster: &Cluster,
    repo: &Repository,
    plan: &Plan,
    options: &SnapshotOptions,
    hold: &Hold,
    progress: &dyn Progress,
) -> Result<Outcome> {
    let mut snapshot = start(cluster, repo, plan).await?;

    if let (Some(hook), Some(db)) = (&plan.pre_hook, &plan.database) {
        run_hook(&db.agent, hook).await?;
    }

    let level = options.zstd_level.unwrap_or(0);
    let buckets = async {
        match &cluster.gateway {
            Some(gw) => {
                mirror::mirror_buckets(
                    gw,
                    &mut snapshot,
                    &plan.buckets,
                    plan.previous_manifest.as_ref(),
                    progress,
                )
                .await
            }
            None => Ok(BTreeMap::new()),
        }
    };
    let agents = agent_parts(repo, plan, level, progress);
    let etcd = async {
        let started = Instant::now();
        let export = platform_keys::export(&cluster.etcd).await?;
        let data = serde_json::to_vec_pretty(&export).expect("export serialises");
        let stored = repo.write_blob_from(&data[..]).await?;
        Ok::<_, Error>((
            ETCD_PART.to_owned(),
            (
                PartRef::Blob(stored.blob),
                PartInfo {
                    source: format!(
                        "etcd {}: {} keys, {} ephemeral or cluster-specific left out",
                        platform_keys::ROOT,
                        export.keys.len(),
                        export.excluded.len()
                    ),
                    duration_ms: deis_backup_proto::duration_ms(started.elapsed()),
                    ..PartInfo::default()
                },
            ),
        ))
    };

    let (buckets, agents, etcd) = tokio::try_join!(buckets, agents, etcd)?;
    if let Some(db) = &cluster.deis_buckets
        && let Some(mirrored) = buckets.get(&db.database)
        && let Some(chain) =
            wal_chain(repo, cluster.gateway.as_ref(), &db.database, mirrored).await?
    {
        snapshot.wal_chain(chain);
    }

    for (name, (blob, info)) in agents.into_iter().chain([etcd]) {
        snapshot.add_part(&name, blob)?;
        snapshot.describe_part(&name, info);
    }
    hold.check("writing the manifest; the snapshot is not complete")?;
    let manifest = snapshot.commit().await?;
    let buckets = buckets.into_iter().map(|(b, m)| (b, m.stats)).collect();
    let gateways = cluster
        .gateway
        .as_ref()
        .map(s3::Client::endpoint_stats)
        .unwrap_or_default();
    Ok(Outcome {
        manifest,
        buckets,
        gateways,
    })
}

/// The snapshot writer with the manifest's labels and the plan's warnings.
async fn start(cluster: &Cluster, repo: &Repository, plan: &Plan) -> Result<SnapshotWriter> {
    let mut snapshot = repo.start_snapshot(SnapshotId::generate());
    snapshot.label("tool", format!("deis-backup {}", env!("CARGO_PKG_VERSION")));
    for (k, v) in cluster_identity(cluster).await? {
        snapshot.label(k, v);
    }
    for w in &plan.warnings {
        tracing::warn!("{w}");
        snapshot.warn(w);
    }
    if !plan.absent_hosts.is_empty() {
        snapshot.label(absent::ABSENT_LABEL, plan.absent_hosts.join(","));
    }
    if let Some(b) = &cluster.deis_buckets {
        snapshot.label(BUCKET_DATABASE_LABEL, &b.database);
        snapshot.label(BUCKET_REGISTRY_LABEL, &b.registry);
    }
    Ok(snapshot)
}

/// The database bucket's WAL-E chain in the snapshot. A segment the newest base backup needs that
/// was deleted at the source during the mirror fails the snapshot (a run moments later holds a
/// whole chain again); a chain incomplete at the source is recorded, and warned about.
async fn wal_chain(
    repo: &Repository,
    gateway: Option<&s3::Client>,
    bucket: &str,
    mirrored: &Mirrored,
) -> Result<Option<WalChain>> {
    let Some(chain) = wal_e::chain_at_snapshot(repo, gateway, bucket, &mirrored.entries).await?
    else {
        return Ok(None);
    };
    if let Some(key) = wal_e::needed_and_vanished(&chain, &mirrored.vanished) {
        return Err(Error::new(
            ErrorKind::Gateway,
            format!(
                "s3://{bucket}/{key} was deleted at the source during the snapshot, and the \
                 newest base backup ({}) needs it",
                chain.latest.as_ref().map_or("?", |l| l.name.as_str())
            ),
            "run the snapshot again: the next listing holds a whole chain",
        ));
    }
    if let Some(problem) = chain.problem() {
        tracing::warn!("{problem}");
    }
    Ok(Some(chain))
}

type Part = (PartRef, PartInfo);

/// The parts the plan asks of agents, taken concurrently: the dump (first) and the store archives,
/// each stored and checked against what its agent announced. An error names the part.
async fn agent_parts(
    repo: &Repository,
    plan: &Plan,
    level: i32,
    progress: &dyn Progress,
) -> Result<Vec<(String, Part)>> {
    let database = async {
        match &plan.database {
            Some(db) => {
                let agent = &db.agent;
                let part = DATABASE_PART;
                progress.part_started(part, &format!("agent {}", db.host));
                let r =
                    dump_database(agent, repo, level, plan.reuse.database.as_ref(), progress).await;
                progress.part_finished(part, r.is_ok());
                r.map(|p| Some((part.to_owned(), p)))
                    .map_err(|e| e.context(format!("part {part}")))
            }
            None => Ok(None),
        }
    };
    let stores = futures::future::try_join_all(plan.stores.iter().map(|t| {
        async move {
            progress.part_started(&t.part, &format!("agent {} {}", t.agent.host, t.path));
            let reusable = plan.reuse.segments.get(&t.part);
            let r = archive_store(&t.agent.agent, t, repo, level, reusable, progress).await;
            progress.part_finished(&t.part, r.is_ok());
            r.map(|p| (t.part.clone(), p))
                .map_err(|e| e.context(format!("part {}", t.part)))
        }
        .boxed()
    }));
    let (database, stores) = futures::future::try_join(database, stores).await?;
    Ok(database.into_iter().chain(stores).collect())
}

async fn dump_database(
    agent: &Agent,
    repo: &Repository,
    level: i32,
    previous: Option<&(PartRef, PartInfo, String)>,
    progress: &dyn Progress,
) -> Result<Part> {
    let started = Instant::now();
    let unchanged_since = previous
        .and_then(|(_, info, _)| info.state.clone())
        .unwrap_or_default();
    let mut c = agent.client.clone();
    let stream = c
        .dump_database(DumpDatabaseRequest {
            zstd_level: level,
            unchanged_since,
        })
        .await
        .map_err(|s| agents::status_error(agent, "DumpDatabase", &s))?
        .into_inner();
    // What the dump holds of the Deis controller, for `show` and a later drill: counted as it
    // streams by.
    let mut counter = dump_rows::Counter::start();
    let pulled = pull(
        agent,
        "DumpDatabase",
        DATABASE_PART,
        stream,
        repo,
        progress,
        Some(&mut counter),
    )
    .await?;
    if !pulled.segments.is_empty() {
        return Err(malformed(agent, "DumpDatabase"));
    }
    let (blob, trailer) = (pulled.rest, pulled.trailer);
    let state = (!trailer.state.is_empty()).then(|| trailer.state.clone());
    let mut info = PartInfo {
        source: format!("agent {} pg_dumpall", agent.host_id),
        raw_bytes: Some(trailer.raw_bytes),
        duration_ms: deis_backup_proto::duration_ms(started.elapsed()),
        host: Some(agent.host_id.clone()),
        warnings: warnings(&trailer),
        state,
        ..PartInfo::default()
    };
    match (blob, trailer.unchanged, previous) {
        (Some(blob), false, _) => {
            match counter.finish().await {
                Ok(tables) => info.figures = dump_rows::deis_figures(&tables),
                Err(e) => info
                    .warnings
                    .push(format!("its rows could not be counted: {}", e.message())),
            }
            Ok((PartRef::Blob(blob), info))
        }
        (None, true, Some((part, before, taken_in))) => {
            info.raw_bytes = before.raw_bytes;
            info.figures.clone_from(&before.figures);
            info.taken_in = Some(taken_in.clone());
            Ok((part.clone(), info))
        }
        _ => Err(malformed(agent, "DumpDatabase")),
    }
}

async fn archive_store(
    agent: &Agent,
    task: &StoreTask,
    repo: &Repository,
    level: i32,
    reusable: Option<&HashMap<Vec<u8>, SegmentRef>>,
    progress: &dyn Progress,
) -> Result<Part> {
    let started = Instant::now();
    let empty = HashMap::new();
    let reusable = reusable.unwrap_or(&empty);
    let mut c = agent.client.clone();
    let stream = c
        .archive_store(ArchiveStoreRequest {
            path: task.path.clone(),
            zstd_level: level,
            reusable: reusable.keys().cloned().collect(),
        })
        .await
        .map_err(|s| agents::status_error(agent, "ArchiveStore", &s))?
        .into_inner();
    let call = "ArchiveStore";
    let pulled = pull(agent, call, &task.part, stream, repo, progress, None).await?;
    let trailer = pulled.trailer;
    let mut segments = Vec::with_capacity(pulled.segments.len());
    let mut reused = 0u64;
    for (end, blob) in pulled.segments {
        if let Some(blob) = blob {
            segments.push(SegmentRef {
                sha256: blob.sha256,
                size: blob.size,
                fingerprint: (!end.fingerprint.is_empty()).then(|| hex::encode(&end.fingerprint)),
            });
        } else {
            let seg = reusable
                .get(&end.fingerprint)
                .ok_or_else(|| malformed(agent, call))?;
            segments.push(seg.clone());
            reused += 1;
        }
    }
    if pulled.rest.is_some() || segments.is_empty() || trailer.segments != segments.len() as u64 {
        return Err(malformed(agent, call));
    }
    Ok((
        PartRef::Segmented(segments),
        PartInfo {
            source: format!("agent {} {}", agent.host_id, task.path),
            raw_bytes: Some(trailer.raw_bytes),
            duration_ms: deis_backup_proto::duration_ms(started.elapsed()),
            host: Some(agent.host_id.clone()),
            path: Some(task.path.clone()),
            shared: Some(task.shared),
            also_on: task.also_on.clone(),
            warnings: warnings(&trailer),
            segments_reused: Some(reused),
            ..PartInfo::default()
        },
    ))
}

fn malformed(agent: &Agent, call: &str) -> Error {
    Error::new(
        ErrorKind::Agent,
        format!(
            "agent {} sent a malformed {call} stream (out of order, or naming a segment it was not offered)",
            agent.host_id
        ),
        "make sure the agent and coordinator versions match",
    )
}

fn incomplete(agent: &Agent, call: &str) -> Error {
    Error::new(
        ErrorKind::Agent,
        format!(
            "agent {} ({}) ended {call} without its trailer: the stream is incomplete",
            agent.host_id, agent.address
        ),
        "the agent or its connection died; see the agent's log and run the snapshot again",
    )
}

/// Checks a stored blob against the size and sha256 the agent announced for it.
fn check_digest(agent: &Agent, call: &str, got: &BlobRef, size: u64, sha256: &[u8]) -> Result<()> {
    if got.size == size && Sha256::try_from(sha256) == Ok(got.sha256) {
        return Ok(());
    }
    Err(Error::integrity(format!(
        "{call} from agent {}: received {} bytes with sha256 {}, the agent sent {size} bytes with sha256 {}",
        agent.host_id,
        got.size,
        got.sha256,
        hex::encode(sha256)
    )))
}

/// What a download stream delivered.
struct Pulled {
    /// One entry per SegmentEnd, in order: the end and the blob of the data sent before it (checked
    /// against the end's size and sha256), or no blob for a segment the agent reused.
    segments: Vec<(SegmentEnd, Option<BlobRef>)>,
    /// Data after the last SegmentEnd: a dump's whole stream, checked against the trailer.
    rest: Option<BlobRef>,
    trailer: Trailer,
}

/// Reads a download stream into blobs (one per sent segment, one for the data after the last
/// segment) and checks each against what the agent announced.
async fn pull(
    agent: &Agent,
    call: &str,
    part: &str,
    mut stream: tonic::Streaming<deis_backup_proto::v1::Chunk>,
    repo: &Repository,
    progress: &dyn Progress,
    mut counter: Option<&mut dump_rows::Counter>,
) -> Result<Pulled> {
    let mut segments = Vec::new();
    let mut writer = None;
    let mut trailer = None;
    while let Some(chunk) = stream
        .message()
        .await
        .map_err(|s| agents::status_error(agent, call, &s))?
    {
        match (chunk.kind, &trailer) {
            (Some(Kind::Data(data)), None) => {
                if writer.is_none() {
                    writer = Some(repo.blob_writer().await?);
                }
                writer.as_mut().expect("just made").write(&data).await?;
                if let Some(c) = counter.as_deref_mut() {
                    c.feed(&data).await;
                }
                progress.part_bytes(part, data.len() as u64);
            }
            (Some(Kind::SegmentEnd(end)), None) => {
                let blob = match (writer.take(), end.reused) {
                    (None, true) => None,
                    (Some(w), false) => {
                        let stored = w.finish().await?;
                        check_digest(agent, call, &stored.blob, end.compressed_bytes, &end.sha256)?;
                        Some(stored.blob)
                    }
                    _ => return Err(malformed(agent, call)),
                };
                segments.push((end, blob));
            }
            (Some(Kind::Trailer(t)), None) => trailer = Some(t),
            _ => return Err(malformed(agent, call)),
        }
    }
    let Some(trailer) = trailer else {
        return Err(incomplete(agent, call));
    };
    let rest = match writer {
        Some(w) => {
            let stored = w.finish().await?;
            check_digest(
                agent,
                call,
                &stored.blob,
                trailer.compressed_bytes,
                &trailer.sha256,
            )?;
            Some(stored.blob)
        }
        None => None,
    };
    Ok(Pulled {
        segments,
        rest,
        trailer,
    })
}

async fn run_hook(agent: &Agent, hook: &str) -> Result<()> {
    let mut c = agent.client.clone();
    let reply = c
        .run_hook(RunHookRequest {
            name: hook.to_owned(),
        })
        .await
        .map_err(|s| {
            agents::status_error(agent, &format!("hook {hook}"), &s).context(
                "the pre-hook failed (fix it by running it by hand in the container, or snapshot without --pre-hook)",
            )
        })?
        .into_inner();
    tracing::info!(hook, host = %agent.host_id, ms = reply.duration_ms, "pre-hook done");
    Ok(())
}

/// The single agent whose host runs the database container.
pub fn database_agent(agents: &[Described]) -> Result<(AgentRef, &Described)> {
    let running: Vec<&Described> = agents
        .iter()
        .filter(|d| d.info.database.as_ref().is_some_and(|c| c.running))
        .collect();
    match running.as_slice() {
        [d] => Ok((AgentRef::from(&d.agent), d)),
        [] => Err(Error::new(
            ErrorKind::Agent,
            format!(
                "no agent reports a running database container (asked {})",
                agents.len()
            ),
            "start deis-database (deisctl start database), or snapshot with --no-database",
        )),
        many => Err(Error::new(
            ErrorKind::Agent,
            format!(
                "several hosts report a running database container: {}",
                many.iter()
                    .map(|d| d.agent.host_id.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            "stop the extra database containers; Deis runs one",
        )),
    }
}

/// One task per distinct filesystem: the first agent (by host id) that sees it archives it.
pub fn store_tasks(agents: &[Described]) -> Vec<StoreTask> {
    let mut sorted: Vec<&Described> = agents.iter().collect();
    sorted.sort_by(|a, b| a.agent.host_id.cmp(&b.agent.host_id));
    let mut by_fs: BTreeMap<(String, String), StoreTask> = BTreeMap::new();
    for d in sorted {
        for p in &d.info.store_paths {
            let key = (p.fs_identity.clone(), p.path.clone());
            by_fs
                .entry(key)
                .and_modify(|t| t.also_on.push(d.agent.host_id.clone()))
                .or_insert_with(|| StoreTask {
                    part: store_part_name(&d.agent.host_id, &p.path, p.shared),
                    agent: AgentRef::from(&d.agent),
                    path: p.path.clone(),
                    fs_type: p.fs_type.clone(),
                    shared: p.shared,
                    also_on: Vec::new(),
                    reusable_segments: 0,
                });
        }
    }
    by_fs.into_values().collect()
}

/// `store/shared/var-lib-deis-store.tar.zst`, or `store/<host>/...` for a host-local directory.
pub fn store_part_name(host: &str, path: &str, shared: bool) -> String {
    let clean = |s: &str| {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' || c == '_' {
                    c
                } else {
                    '-'
                }
            })
            .collect::<String>()
            .trim_matches('-')
            .to_owned()
    };
    let owner = if shared {
        "shared".to_owned()
    } else {
        clean(host)
    };
    format!("{STORE_PREFIX}{owner}/{}.tar.zst", clean(path))
}

async fn cluster_identity(cluster: &Cluster) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for (label, key) in [
        ("cluster.domain", "/deis/platform/domain"),
        ("cluster.store-fsid", "/deis/store/fsid"),
    ] {
        if let Some(v) = cluster.etcd.get(key).await? {
            out.push((label.to_owned(), v));
        }
    }
    let mut hosts: Vec<&str> = cluster
        .agents
        .iter()
        .map(|d| d.agent.host_id.as_str())
        .collect();
    hosts.sort_unstable();
    out.push((HOSTS_LABEL.to_owned(), hosts.join(",")));
    Ok(out)
}

fn warnings(t: &Trailer) -> Vec<String> {
    t.warnings
        .iter()
        .map(|w| {
            if w.path.is_empty() {
                w.message.clone()
            } else {
                format!("{}: {}", w.path, w.message)
            }
        })
        .collect()
}

fn list_or_none(v: &[String]) -> String {
    if v.is_empty() {
        "none".to_owned()
    } else {
        v.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use deis_backup_proto::v1::{DescribeReply, StorePath};

    fn described(host: &str, paths: &[(&str, &str, bool)]) -> Described {
        let options = crate::agents::AgentOptions::default();
        let loc = crate::agents::Location {
            host_id: host.to_owned(),
            address: format!("{host}:4195"),
        };
        // connect() reads the token; it connects lazily, so nothing is dialled here.
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "a-test-token-of-16+-chars").unwrap();
        std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let options = crate::agents::AgentOptions {
            token_file: Some(token),
            insecure_plaintext: true,
            ..options
        };
        let agent = crate::agents::connect(&options, &[loc]).unwrap().remove(0);
        Described {
            agent,
            info: DescribeReply {
                machine_id: host.to_owned(),
                store_paths: paths
                    .iter()
                    .map(|(p, id, shared)| StorePath {
                        path: (*p).to_owned(),
                        fs_type: if *shared { "ceph" } else { "ext4" }.to_owned(),
                        fs_identity: (*id).to_owned(),
                        shared: *shared,
                        empty: false,
                        free_bytes: None,
                    })
                    .collect(),
                ..DescribeReply::default()
            },
        }
    }

    #[tokio::test]
    async fn the_shared_store_is_archived_once_and_local_ones_per_host() {
        let store = "/var/lib/deis/store";
        let agents = [
            described("c", &[(store, "shared:ceph:ab:/", true)]),
            described(
                "a",
                &[
                    (store, "shared:ceph:ab:/", true),
                    ("/srv/x", "local:a:1:2", false),
                ],
            ),
            described(
                "b",
                &[
                    (store, "shared:ceph:ab:/", true),
                    ("/srv/x", "local:b:1:2", false),
                ],
            ),
        ];
        let tasks = store_tasks(&agents);
        let got: Vec<(&str, &str, bool, Vec<String>)> = tasks
            .iter()
            .map(|t| {
                (
                    t.part.as_str(),
                    t.agent.host.as_str(),
                    t.shared,
                    t.also_on.clone(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("store/a/srv-x.tar.zst", "a", false, vec![]),
                ("store/b/srv-x.tar.zst", "b", false, vec![]),
                (
                    "store/shared/var-lib-deis-store.tar.zst",
                    "a",
                    true,
                    vec!["b".to_owned(), "c".to_owned()]
                ),
            ]
        );
    }

    mod with_agents {
        //! Planning and taking the agents' parts against fake agents, into a memory repository.
        use super::*;
        use crate::mirror::NoProgress;
        use crate::repository::format::blob_path;
        use crate::testkit::{self, FakeAgent, Fault, Host, StoreFixture};
        use crate::verify::{self, Depth};

        const STORE: &str = "/var/lib/deis/store";
        const HOOK: &str = "wal-e-backup-push";

        /// The connected agent of `host` in `cluster`.
        fn host_agent<'a>(cluster: &'a Cluster, host: &str) -> &'a Agent {
            &cluster
                .agents
                .iter()
                .find(|d| d.agent.host_id == host)
                .expect("a host of the test cluster")
                .agent
        }
        const SHARED_PART: &str = "store/shared/var-lib-deis-store.tar.zst";

        /// Three hosts on one CephFS; `b` runs the database.
        async fn three_hosts() -> [FakeAgent; 3] {
            let a = FakeAgent::start(Host::new("a").with_shared_store(STORE, None)).await;
            let mut host_b = Host::new("b")
                .with_shared_store(STORE, None)
                .with_database(true);
            host_b.hooks.push(HOOK.to_owned());
            let b = FakeAgent::start(host_b).await;
            let c = FakeAgent::start(
                Host::new("c")
                    .with_shared_store(STORE, None)
                    .with_database(false),
            )
            .await;
            [a, b, c]
        }

        #[tokio::test]
        #[expect(
            clippy::too_many_lines,
            reason = "one cluster, planned again as its database hosts change"
        )]
        async fn the_plan_names_the_one_database_host_and_checks_the_pre_hook() {
            let [a, b, c] = three_hosts().await;
            let cluster = testkit::cluster(&[&a, &b, &c]).await;
            let planned = plan(&cluster, None, &SnapshotOptions::default())
                .await
                .unwrap();
            assert_eq!(planned.database.as_ref().unwrap().host, "b");
            assert_eq!(planned.database.as_ref().unwrap().address, b.address());
            let stores: Vec<_> = planned
                .stores
                .iter()
                .map(|t| (&t.part[..], &t.agent.host[..], t.also_on.clone()))
                .collect();
            assert_eq!(
                stores,
                [(SHARED_PART, "a", vec!["b".to_owned(), "c".to_owned()])]
            );
            assert!(planned.previous.is_none() && !planned.reusable_dump);

            let hooked = SnapshotOptions {
                pre_hook: Some(HOOK.into()),
                ..SnapshotOptions::default()
            };
            assert_eq!(
                plan(&cluster, None, &hooked)
                    .await
                    .unwrap()
                    .pre_hook
                    .as_deref(),
                Some(HOOK)
            );
            let unknown = SnapshotOptions {
                pre_hook: Some("nope".into()),
                ..SnapshotOptions::default()
            };
            let e = plan(&cluster, None, &unknown).await.unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Config);
            assert!(
                e.message()
                    .contains(&format!("on b defines no hook 'nope' (it has: {HOOK})")),
                "{e}"
            );
            // Planning only read: Describe was the only call.
            for agent in [&a, &b, &c] {
                let calls = agent.calls();
                assert!(
                    calls.dumps.is_empty() && calls.archives.is_empty() && calls.hooks.is_empty()
                );
            }
            // The hook runs on the database host; one it does not define is an error naming it.
            run_hook(host_agent(&cluster, "b"), HOOK).await.unwrap();
            assert_eq!(b.calls().hooks, [HOOK]);
            let e = run_hook(host_agent(&cluster, "b"), "nope")
                .await
                .unwrap_err();
            assert!(
                e.message().contains("agent b") && e.message().contains("hook nope"),
                "{e}"
            );

            // Two running databases, or none, are refused, unless no dump is asked for.
            c.update_host(|h| h.database.as_mut().unwrap().running = true);
            let cluster = testkit::cluster(&[&a, &b, &c]).await;
            let e = plan(&cluster, None, &SnapshotOptions::default())
                .await
                .unwrap_err();
            assert!(
                e.message()
                    .contains("several hosts report a running database container: b, c"),
                "{e}"
            );
            b.update_host(|h| h.database = None);
            c.update_host(|h| h.database = None);
            let cluster = testkit::cluster(&[&a, &b, &c]).await;
            let e = plan(&cluster, None, &SnapshotOptions::default())
                .await
                .unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Agent);
            assert!(
                e.message()
                    .starts_with("no agent reports a running database container"),
                "{e}"
            );
            let no_db = SnapshotOptions {
                no_database: true,
                ..SnapshotOptions::default()
            };
            assert!(
                plan(&cluster, None, &no_db)
                    .await
                    .unwrap()
                    .database
                    .is_none()
            );
        }

        /// Host `a` runs the database; both see the CephFS store and have a local `/srv/x`.
        async fn two_hosts() -> (FakeAgent, FakeAgent, StoreFixture) {
            let a = FakeAgent::start(
                Host::new("a")
                    .with_database(true)
                    .with_shared_store(STORE, None)
                    .with_local_store("/srv/x", None),
            )
            .await;
            let b = FakeAgent::start(
                Host::new("b")
                    .with_shared_store(STORE, None)
                    .with_local_store("/srv/x", None),
            )
            .await;
            // Over the repository's 1 MiB buffer: that segment goes through a staging file.
            let big: Vec<u8> = (0..1_500_000u32).map(|i| (i % 251) as u8).collect();
            let shared = StoreFixture::new(&[
                (&big, Some(1)),
                (b"second segment", Some(2)),
                (b"still changing", None),
            ]);
            a.set_dump(b"-- the dump", "s1");
            a.set_store(STORE, shared.clone());
            a.set_store("/srv/x", StoreFixture::new(&[(b"a's files", Some(7))]));
            b.set_store(STORE, StoreFixture::new(&[(b"never asked", Some(9))]));
            b.set_store("/srv/x", StoreFixture::new(&[(b"b's files", Some(7))]));
            (a, b, shared)
        }

        async fn take(
            cluster: &Cluster,
            repo: &Repository,
            options: &SnapshotOptions,
        ) -> Result<Manifest> {
            let planned = plan(cluster, Some(repo), options).await?;
            let parts = agent_parts(repo, &planned, 0, &NoProgress).await?;
            let mut snapshot = repo.start_snapshot(SnapshotId::generate());
            for (name, (part, info)) in parts {
                snapshot.add_part(&name, part)?;
                snapshot.describe_part(&name, info);
            }
            snapshot.commit().await
        }

        /// What `agent` was asked for `path`, call by call (stores are archived concurrently).
        fn archives_of(agent: &FakeAgent, path: &str) -> Vec<ArchiveStoreRequest> {
            agent
                .calls()
                .archives
                .into_iter()
                .filter(|r| r.path == path)
                .collect()
        }

        fn segments(m: &Manifest, part: &str) -> Vec<SegmentRef> {
            match &m.parts[part] {
                PartRef::Segmented(s) => s.clone(),
                PartRef::Blob(_) => panic!("{part} is one blob"),
            }
        }

        #[tokio::test]
        async fn the_dump_and_each_store_are_pulled_from_their_agent_and_checked() {
            let (a, b, shared) = two_hosts().await;
            let cluster = testkit::cluster(&[&a, &b]).await;
            let (repo, backend) = testkit::memory_repo();
            let m = take(&cluster, &repo, &SnapshotOptions::default())
                .await
                .unwrap();
            let names: Vec<&str> = m.parts.keys().map(String::as_str).collect();
            assert_eq!(
                names,
                [
                    DATABASE_PART,
                    "store/a/srv-x.tar.zst",
                    "store/b/srv-x.tar.zst",
                    SHARED_PART
                ]
            );

            let dump = m.parts[DATABASE_PART].single().unwrap();
            assert_eq!(dump.sha256, Sha256::of(b"-- the dump"));
            let info = &m.part_info[DATABASE_PART];
            assert_eq!(
                (info.state.as_deref(), info.host.as_deref(), info.raw_bytes),
                (Some("s1"), Some("a"), Some(33))
            );

            let got = segments(&m, SHARED_PART);
            let want: Vec<(Sha256, u64)> = shared
                .segments
                .iter()
                .map(|s| (Sha256::of(&s.data), s.data.len() as u64))
                .collect();
            assert_eq!(
                got.iter().map(|s| (s.sha256, s.size)).collect::<Vec<_>>(),
                want
            );
            assert_eq!(
                got.iter()
                    .map(|s| s.fingerprint.clone())
                    .collect::<Vec<_>>(),
                shared.fingerprints()
            );
            let info = &m.part_info[SHARED_PART];
            assert_eq!(
                (info.shared, info.segments_reused, info.path.as_deref()),
                (Some(true), Some(0), Some(STORE))
            );
            // The shared store came once, from the first host; each local one from its own.
            assert_eq!(
                segments(&m, "store/b/srv-x.tar.zst")[0].sha256,
                Sha256::of(b"b's files")
            );
            let paths = |agent: &FakeAgent| {
                let mut p: Vec<String> = agent
                    .calls()
                    .archives
                    .iter()
                    .map(|r| r.path.clone())
                    .collect();
                p.sort();
                p
            };
            assert_eq!(paths(&a), ["/srv/x", STORE]);
            assert_eq!(paths(&b), ["/srv/x"]);
            // Nothing offered without a previous snapshot.
            assert!(a.calls().archives.iter().all(|r| r.reusable.is_empty()));
            assert_eq!(a.calls().dumps[0].unchanged_since, "");

            let report = verify::verify(&repo, &m, Depth::All).await.unwrap();
            assert!(report.ok(), "{:?}", report.problems);
            assert!(
                backend
                    .get(&blob_path(&got[0].sha256))
                    .is_some_and(|d| d.len() == 1_500_000)
            );
        }

        #[tokio::test]
        #[expect(
            clippy::too_many_lines,
            reason = "one repository through four snapshots, each building on the last"
        )]
        async fn the_next_snapshot_reuses_only_what_the_agent_finds_unchanged_and_is_still_stored()
        {
            let (a, b, mut shared) = two_hosts().await;
            let cluster = testkit::cluster(&[&a, &b]).await;
            let (repo, backend) = testkit::memory_repo();
            let first = take(&cluster, &repo, &SnapshotOptions::default())
                .await
                .unwrap();
            let plan1 = plan(&cluster, Some(&repo), &SnapshotOptions::default())
                .await
                .unwrap();
            assert_eq!(plan1.previous.as_deref(), Some(first.id.as_str()));
            assert!(plan1.reusable_dump);
            let offered: Vec<_> = plan1
                .stores
                .iter()
                .map(|t| (&t.part[..], t.reusable_segments))
                .collect();
            assert_eq!(
                offered,
                [
                    ("store/a/srv-x.tar.zst", 1),
                    ("store/b/srv-x.tar.zst", 1),
                    (SHARED_PART, 2)
                ]
            );

            // The second segment changed; the first did not.
            shared.segments[1] = StoreFixture::new(&[(b"second, changed", Some(3))])
                .segments
                .remove(0);
            a.set_store(STORE, shared.clone());
            let second = take(&cluster, &repo, &SnapshotOptions::default())
                .await
                .unwrap();
            let calls = a.calls();
            let mut asked = archives_of(&a, STORE)[1].reusable.clone();
            asked.sort();
            assert_eq!(
                asked,
                [vec![1u8; 32], vec![2u8; 32]],
                "the fingerprinted segments are offered"
            );
            assert_eq!(calls.dumps[1].unchanged_since, "s1");
            assert_eq!(second.parts[DATABASE_PART], first.parts[DATABASE_PART]);
            assert_eq!(
                second.part_info[DATABASE_PART].taken_in.as_deref(),
                Some(first.id.as_str())
            );
            assert_eq!(second.part_info[DATABASE_PART].raw_bytes, Some(33));
            let (old, new) = (
                segments(&first, SHARED_PART),
                segments(&second, SHARED_PART),
            );
            assert_eq!(new[0], old[0], "the unchanged segment is carried over");
            assert_eq!(new[1].sha256, Sha256::of(b"second, changed"));
            assert_eq!(
                new[2], old[2],
                "a segment without a fingerprint is sent again (same bytes)"
            );
            assert_eq!(second.part_info[SHARED_PART].segments_reused, Some(1));
            assert!(
                verify::verify(&repo, &second, Depth::All)
                    .await
                    .unwrap()
                    .ok()
            );

            // A segment whose blob is gone makes its part offer nothing; a lost dump is not offered.
            backend.remove(&blob_path(&new[0].sha256));
            backend.remove(&blob_path(
                &second.parts[DATABASE_PART].single().unwrap().sha256,
            ));
            let plan3 = plan(&cluster, Some(&repo), &SnapshotOptions::default())
                .await
                .unwrap();
            assert!(!plan3.reusable_dump);
            assert_eq!(
                plan3
                    .stores
                    .iter()
                    .find(|t| t.part == SHARED_PART)
                    .unwrap()
                    .reusable_segments,
                0
            );
            let third = take(&cluster, &repo, &SnapshotOptions::default())
                .await
                .unwrap();
            assert_eq!(a.calls().dumps[2].unchanged_since, "");
            assert!(archives_of(&a, STORE)[2].reusable.is_empty());
            assert_eq!(third.part_info[SHARED_PART].segments_reused, Some(0));
            assert!(
                verify::verify(&repo, &third, Depth::All)
                    .await
                    .unwrap()
                    .ok(),
                "the lost blobs are back"
            );

            // --full offers nothing at all.
            let full = SnapshotOptions {
                full: true,
                ..SnapshotOptions::default()
            };
            take(&cluster, &repo, &full).await.unwrap();
            let calls = a.calls();
            assert_eq!(calls.dumps[3].unchanged_since, "");
            assert!(
                calls
                    .archives
                    .iter()
                    .rev()
                    .take(2)
                    .all(|r| r.reusable.is_empty())
            );
        }

        #[tokio::test]
        #[expect(clippy::too_many_lines, reason = "a table of faults, one line each")]
        async fn broken_or_malformed_streams_are_refused_naming_the_part() {
            let a = FakeAgent::start(
                Host::new("a")
                    .with_database(true)
                    .with_shared_store(STORE, None),
            )
            .await;
            a.set_dump(b"-- the dump", "s1");
            a.set_store(
                STORE,
                StoreFixture::new(&[(b"one", Some(1)), (b"two", Some(2))]),
            );
            let cluster = testkit::cluster(&[&a]).await;
            let (repo, _) = testkit::memory_repo();
            let dump = SnapshotOptions {
                no_store: true,
                ..SnapshotOptions::default()
            };
            let store = SnapshotOptions {
                no_database: true,
                ..SnapshotOptions::default()
            };
            let cases = [
                (
                    Fault::NoTrailer,
                    &dump,
                    ErrorKind::Agent,
                    "ended DumpDatabase without its trailer",
                ),
                (
                    Fault::NoTrailer,
                    &store,
                    ErrorKind::Agent,
                    "ended ArchiveStore without its trailer",
                ),
                (
                    Fault::WrongDigest,
                    &dump,
                    ErrorKind::Integrity,
                    "DumpDatabase from agent a: received 11 bytes with sha256",
                ),
                (
                    Fault::WrongDigest,
                    &store,
                    ErrorKind::Integrity,
                    "ArchiveStore from agent a: received 3 bytes with sha256",
                ),
                (
                    Fault::SegmentEndInDump,
                    &dump,
                    ErrorKind::Agent,
                    "sent a malformed DumpDatabase stream",
                ),
                (
                    Fault::DataAfterTrailer,
                    &dump,
                    ErrorKind::Agent,
                    "sent a malformed DumpDatabase stream",
                ),
                (
                    Fault::DataAfterTrailer,
                    &store,
                    ErrorKind::Agent,
                    "sent a malformed ArchiveStore stream",
                ),
                (
                    Fault::ReuseUnoffered,
                    &store,
                    ErrorKind::Agent,
                    "sent a malformed ArchiveStore stream",
                ),
                (
                    Fault::WrongSegmentCount,
                    &store,
                    ErrorKind::Agent,
                    "sent a malformed ArchiveStore stream",
                ),
                (
                    Fault::FailMidway(tonic::Code::Unavailable),
                    &dump,
                    ErrorKind::Agent,
                    "DumpDatabase: the worker died",
                ),
                (
                    Fault::FailMidway(tonic::Code::Internal),
                    &store,
                    ErrorKind::Agent,
                    "ArchiveStore: the worker died",
                ),
                (
                    Fault::Refuse(tonic::Code::PermissionDenied),
                    &store,
                    ErrorKind::Agent,
                    "ArchiveStore: ArchiveStore refused",
                ),
            ];
            for (fault, options, kind, says) in cases {
                a.set_fault(Some(fault));
                let planned = plan(&cluster, Some(&repo), options).await.unwrap();
                let part = if options.no_store {
                    DATABASE_PART
                } else {
                    SHARED_PART
                };
                let e = agent_parts(&repo, &planned, 0, &NoProgress)
                    .await
                    .unwrap_err();
                assert_eq!(e.kind(), kind, "{fault:?}: {e}");
                assert!(
                    e.message().starts_with(&format!("part {part}: ")),
                    "{fault:?}: {e}"
                );
                assert!(e.message().contains(says), "{fault:?}: {e}");
            }
            // The same calls pass once the agent keeps the rules.
            a.set_fault(None);
            let planned = plan(&cluster, Some(&repo), &SnapshotOptions::default())
                .await
                .unwrap();
            let parts = agent_parts(&repo, &planned, 0, &NoProgress).await.unwrap();
            assert_eq!(parts.len(), 2);
        }
    }
}
