//! The command line: one options struct per command, shared by flags, environment and the TOML
//! config file (`--config`, sections named after the commands), merged so that a flag or variable
//! given explicitly wins over the file, and the file over the built-in default (see `config`).

mod config;
mod output;
mod progress;

pub use output::stdout_failed;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory as _, FromArgMatches as _, Parser, Subcommand};
use deis_backup_coordinator::agents::{self, AgentOptions};
use deis_backup_coordinator::drill;
use deis_backup_coordinator::history::{self, Moved, Run};
use deis_backup_coordinator::hold::Hold;
use deis_backup_coordinator::lease::{self, Lease, Operation};
use deis_backup_coordinator::lock::Lock;
use deis_backup_coordinator::prune::{self, PruneOptions};
use deis_backup_coordinator::repository::{Init, Repository, RepositoryOptions, SnapshotId, seal};
use deis_backup_coordinator::restore::{self, RestoreOptions};
use deis_backup_coordinator::s3::GatewayOptions;
use deis_backup_coordinator::snapshot::{self, Cluster, SnapshotOptions};
use deis_backup_coordinator::status;
use deis_backup_coordinator::verify::{self, Depth};
use deis_backup_coordinator::{Error, ErrorKind, Result};

use self::config::ConfigFile;

/// deis-backup: whole-cluster backup and restore for Deis v1 platforms.
///
/// Snapshots hold the store-gateway's buckets (db_wal, registry), a pg_dumpall of deis-database,
/// the store files (/var/lib/deis/store) and the platform's etcd keys.
#[derive(Debug, Parser)]
#[command(name = "deis-backup", version, about, long_about)]
pub(crate) struct Cli {
    /// TOML config file; its sections ([repository], [gateway], [agents], [snapshot], [restore],
    /// [prune]) take the long option names without dashes' prefix.
    #[arg(long, short = 'c', global = true, env = "DEIS_BACKUP_CONFIG")]
    config: Option<PathBuf>,
    /// etcd v2 endpoints, comma-separated [default: http://127.0.0.1:4001].
    #[arg(long, global = true, env = "ETCDCTL_PEERS")]
    etcd: Option<String>,
    /// Machine-readable output (JSON) instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// More log output (-v info, -vv debug); RUST_LOG overrides.
    #[arg(long, short = 'v', global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a repository: encrypted to the operators' age recipients (the default), or --plain.
    /// An encrypted one gets a new key for the snapshot host (--host-key-file, mode 600): with it
    /// a host takes and prunes snapshots, but reads no snapshot's data.
    Init {
        #[command(flatten)]
        repository: RepositoryOptions,
        /// Every file in the clear: only for a local disk the operator trusts. Without it,
        /// --recipients-file (`age-keygen -y IDENTITY` prints a recipient) and --host-key-file
        /// (where the snapshot host's new key goes) are needed.
        #[arg(long)]
        plain: bool,
    },
    /// Take one snapshot of the whole cluster.
    Snapshot {
        #[command(flatten)]
        repository: RepositoryOptions,
        #[command(flatten)]
        gateway: GatewayOptions,
        #[command(flatten)]
        agents: AgentOptions,
        #[command(flatten)]
        options: SnapshotOptions,
        /// Write the run's figures here for node_exporter's textfile collector (Prometheus text,
        /// replaced atomically), e.g. /var/lib/node_exporter/textfile/deis_backup.prom.
        #[arg(long, env = "DEIS_BACKUP_METRICS_FILE", value_name = "FILE")]
        metrics_file: Option<PathBuf>,
    },
    /// List the complete snapshots.
    List {
        #[command(flatten)]
        repository: RepositoryOptions,
    },
    /// Show one snapshot's manifest.
    Show {
        /// Snapshot id, or `latest`.
        id: String,
        #[command(flatten)]
        repository: RepositoryOptions,
    },
    /// The run history: every snapshot, prune and restore with its outcome, oldest first.
    Runs {
        #[command(flatten)]
        repository: RepositoryOptions,
    },
    /// For monitoring (Nagios, Icinga): exit 0 when the last complete snapshot is younger than
    /// --max-age and the last run did not fail, 2 (CRITICAL) otherwise, 3 (UNKNOWN) when the facts
    /// cannot be read; one line says what is wrong and since when.
    Status {
        /// The oldest the last complete snapshot may be (a little more than the timer's period).
        #[arg(long, default_value = "26h", value_parser = humantime::parse_duration)]
        max_age: std::time::Duration,
        /// Where the facts come from: etcd (any host of the cluster) or the repository alone.
        #[arg(long, value_enum, default_value_t = StatusSource::Etcd)]
        from: StatusSource,
        #[command(flatten)]
        repository: RepositoryOptions,
    },
    /// Check a snapshot: every part and object present with its size; --read-data re-hashes all.
    Verify {
        /// Snapshot id, or `latest`.
        id: String,
        /// Read every byte again and compare sha256.
        #[arg(long)]
        read_data: bool,
        /// Read again only this slice of the blobs: K/M (slice K of M; the M slices hold every
        /// blob once) or N% (a window that moves on each UTC day: daily runs read everything in
        /// 100/N days). Every blob's size is still checked.
        #[arg(long, value_name = "K/M|N%", conflicts_with = "read_data")]
        read_data_subset: Option<verify::Subset>,
        #[command(flatten)]
        repository: RepositoryOptions,
    },
    /// A restore drill that needs no second cluster: the dump loaded into a throwaway container of
    /// the database's image by its host's agent, every table's rows counted against the dump, the
    /// registry's image ancestry and the db_wal chain checked. One line per check.
    Drill {
        /// Snapshot id, or `latest`.
        id: String,
        #[command(flatten)]
        repository: RepositoryOptions,
        #[command(flatten)]
        agents: AgentOptions,
    },
    /// Restore a snapshot onto a (fresh) cluster, in the order the Deis docs give.
    Restore {
        /// Snapshot id, or `latest`.
        id: String,
        #[command(flatten)]
        repository: RepositoryOptions,
        #[command(flatten)]
        gateway: GatewayOptions,
        #[command(flatten)]
        agents: AgentOptions,
        #[command(flatten)]
        options: RestoreOptions,
    },
    /// Forget snapshots a retention policy does not keep and delete unreferenced data.
    Prune {
        #[command(flatten)]
        repository: RepositoryOptions,
        #[command(flatten)]
        options: PruneOptions,
    },
    /// Show the agents registered in etcd and what each reported.
    Agents {
        #[command(flatten)]
        agents: AgentOptions,
    },
    /// The cluster's certificates: `pki init` makes the CA, `pki issue` a certificate per agent
    /// and one for the coordinator.
    Pki {
        #[command(subcommand)]
        action: PkiCommand,
    },
}

#[derive(Debug, Subcommand)]
enum PkiCommand {
    /// Create the cluster CA (ca.pem, and ca.key with mode 600) in --dir.
    Init {
        /// Directory of the CA [default: /etc/deis-backup/pki].
        #[arg(long, default_value = deis_backup_proto::identity::DEFAULT_PKI_DIR)]
        dir: PathBuf,
    },
    /// Issue a certificate and key signed by the CA: for one agent (--host) or the coordinator.
    Issue {
        /// Directory of the CA [default: /etc/deis-backup/pki].
        #[arg(long, default_value = deis_backup_proto::identity::DEFAULT_PKI_DIR)]
        dir: PathBuf,
        /// The agent's host id (its /etc/machine-id): writes agent-<id>.pem and agent-<id>.key.
        #[arg(
            long,
            conflicts_with = "coordinator",
            required_unless_present = "coordinator"
        )]
        host: Option<String>,
        /// The coordinator's client certificate: writes coordinator.pem and coordinator.key.
        #[arg(long)]
        coordinator: bool,
        /// Directory to write the certificate and key into [default: --dir].
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// The exit code for an error (see `main.rs`).
pub fn exit_code(e: &Error) -> u8 {
    match e.kind() {
        ErrorKind::Config => 2,
        ErrorKind::Locked => 4,
        ErrorKind::Preflight => 5,
        _ => 1,
    }
}

#[expect(
    clippy::too_many_lines,
    reason = "the dispatch: one short arm per subcommand, each merging its config sections and \
              calling its command"
)]
pub async fn run() -> Result<ExitCode> {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).map_err(|e| Error::config(e.to_string()))?;
    init_logging(cli.verbose);
    if let Command::Pki { action } = &cli.command {
        return cmd_pki(action);
    }
    let file = match &cli.config {
        Some(p) => ConfigFile::read(p)?,
        None => ConfigFile::default(),
    };
    let etcd = deis_backup_etcd::Client::from_list(file.etcd(cli.etcd.as_deref()))?;
    let out = output::Output::new(cli.json);
    tracing::debug!(command = matches.subcommand_name(), "starting");

    match cli.command {
        Command::Init { repository, plain } => {
            let repository = file.merged("repository", repository)?;
            let how = match (plain, &repository.recipients_file) {
                (true, _) => Init::Plain,
                (false, Some(recipients)) => Init::Encrypted {
                    recipients: seal::read_recipients(recipients)?,
                    host_key_file: repository.host_key_file.clone().ok_or_else(|| {
                        Error::config(
                            "an encrypted repository gets a key for the snapshot host: give \
                             --host-key-file (where to write it)",
                        )
                    })?,
                },
                (false, None) => {
                    return Err(Error::config("give --recipients-file, or --plain"));
                }
            };
            out.initialized(&Repository::init(&repository, how).await?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Snapshot {
            repository,
            gateway,
            agents,
            options,
            metrics_file,
        } => {
            let repository = file.merged("repository", repository)?;
            let gateway = file.merged("gateway", gateway)?;
            let agents = file.merged("agents", agents)?;
            let options = file.merged("snapshot", options)?;
            let inputs = SnapshotInputs {
                repository: &repository,
                gateway: &gateway,
                agents: &agents,
                options: &options,
                metrics_file: metrics_file.as_deref(),
            };
            cmd_snapshot(&out, etcd, &inputs).await
        }
        Command::List { repository } => {
            let repo = Repository::open(&file.merged("repository", repository)?).await?;
            out.list(&repo).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Show { id, repository } => {
            let repo = Repository::open(&file.merged("repository", repository)?).await?;
            let m = repo.manifest(&resolve_id(&repo, &id).await?).await?;
            out.manifest(&m);
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify {
            id,
            read_data,
            read_data_subset,
            repository,
        } => {
            let repo = Repository::open(&file.merged("repository", repository)?).await?;
            let id = resolve_id(&repo, &id).await?;
            // No cluster lock: a verify changes nothing. Its lease keeps a prune (of any
            // cluster) from deleting what it reads.
            let (lease, _) =
                Lease::take_to_read(&repo, Operation::Verify, vec![id.clone()], None).await?;
            let hold = Hold::new(None, lease);
            let depth = match (read_data, read_data_subset) {
                (_, Some(subset)) => Depth::Subset(subset),
                (true, None) => Depth::All,
                (false, None) => Depth::Sizes,
            };
            let r = async { verify::verify(&repo, &repo.manifest(&id).await?, depth).await }.await;
            release(hold).await;
            let report = r?;
            out.verify(&report);
            Ok(if !report.ok() {
                ExitCode::from(3)
            } else if report.recovers == Some(false) {
                ExitCode::from(6)
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Drill {
            id,
            repository,
            agents,
        } => {
            let repo = Repository::open(&file.merged("repository", repository)?).await?;
            let agents = file.merged("agents", agents)?;
            let id = resolve_id(&repo, &id).await?;
            let cluster =
                Cluster::discover(etcd.clone(), &agents, &GatewayOptions::default(), true).await?;
            // No cluster lock: a drill changes nothing of the cluster. Its lease (a verify's)
            // keeps a prune from deleting what it reads.
            let (lease, _) =
                Lease::take_to_read(&repo, Operation::Verify, vec![id.clone()], None).await?;
            let hold = Hold::new(None, lease);
            let r =
                async { drill::drill(&repo, &repo.manifest(&id).await?, &cluster.agents).await }
                    .await;
            release(hold).await;
            let report = r?;
            out.drill(&report);
            Ok(if report.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(7)
            })
        }
        Command::Restore {
            id,
            repository,
            gateway,
            agents,
            options,
        } => {
            let repository = file.merged("repository", repository)?;
            let gateway = file.merged("gateway", gateway)?;
            let agents = file.merged("agents", agents)?;
            let options = file.merged("restore", options)?;
            cmd_restore(&out, &etcd, &id, &repository, &gateway, &agents, &options).await
        }
        Command::Prune {
            repository,
            options,
        } => {
            let repo = Repository::open(&file.merged("repository", repository)?).await?;
            let options = file.merged("prune", options)?;
            let mut run = Run::start(history::Command::Prune);
            let r = run_prune(&repo, &etcd, &options, &mut run).await;
            if !options.dry_run {
                run.end(r.as_ref().map(|r| Moved {
                    bytes: r.bytes_deleted,
                    objects: r.blobs_deleted,
                    reused_objects: 0,
                }));
                record(&run, Some(&repo), &etcd).await;
            }
            out.prune(&r?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Pki { .. } => unreachable!("handled before etcd is set up"),
        Command::Runs { repository } => {
            let repo = Repository::open(&file.merged("repository", repository)?).await?;
            out.runs(&history::runs(&repo).await?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Status {
            max_age,
            from,
            repository,
        } => {
            let facts = match from {
                StatusSource::Etcd => status_from_etcd(&etcd).await,
                StatusSource::Repository => {
                    match Repository::open(&file.merged("repository", repository)?).await {
                        Ok(repo) => status_from_repository(&repo).await,
                        Err(e) => Err(e),
                    }
                }
            };
            let verdict = match facts {
                Ok(facts) => status::judge(facts, max_age, time::OffsetDateTime::now_utc()),
                Err(e) => status::Status::unknown(&e),
            };
            out.status(&verdict);
            Ok(ExitCode::from(verdict.code))
        }
        Command::Agents { agents } => {
            let agents = file.merged("agents", agents)?;
            let locations = agents::locate(&agents, Some(&etcd)).await?;
            let clients = agents::connect(&agents, &locations)?;
            let described = agents::describe_all(&clients).await;
            let healthy = described.iter().all(|(_, r)| r.is_ok());
            out.agents(&described);
            Ok(if healthy {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

/// What `snapshot` was asked to do.
struct SnapshotInputs<'a> {
    repository: &'a RepositoryOptions,
    gateway: &'a GatewayOptions,
    agents: &'a AgentOptions,
    options: &'a SnapshotOptions,
    metrics_file: Option<&'a std::path::Path>,
}

async fn cmd_snapshot(
    out: &output::Output,
    etcd: deis_backup_etcd::Client,
    inputs: &SnapshotInputs<'_>,
) -> Result<ExitCode> {
    let options = inputs.options;
    let mut run = Run::start(history::Command::Snapshot);
    let discovered = Cluster::discover(
        etcd.clone(),
        inputs.agents,
        inputs.gateway,
        options.no_buckets,
    )
    .await;
    let cluster = match discovered {
        Ok(c) => c,
        Err(e) => {
            // No agent, gateway or etcd to work with: only etcd may hear of it.
            if !options.dry_run {
                run.end(Err(&e));
                record(&run, None, &etcd).await;
                metrics(inputs, &run, None, &etcd, None).await;
            }
            return Err(e);
        }
    };
    if options.dry_run {
        let repo = Repository::open(inputs.repository).await.ok();
        let plan = snapshot::plan(&cluster, repo.as_ref(), options).await?;
        out.plan(&plan, inputs.repository.location());
        return Ok(ExitCode::SUCCESS);
    }
    // The lock before the repository: a refused snapshot creates nothing.
    let opened = match Lock::acquire(&cluster.etcd, "snapshot").await {
        Ok(lock) => match Repository::open(inputs.repository).await {
            Ok(repo) => Ok((lock, repo)),
            Err(e) => {
                release(Hold::new(Some(lock), None)).await;
                Err(e)
            }
        },
        Err(e) => Err(e),
    };
    let (lock, repo) = match opened {
        Ok(opened) => opened,
        Err(e) => {
            run.end(Err(&e));
            record(&run, None, &cluster.etcd).await;
            metrics(inputs, &run, None, &cluster.etcd, Some(&cluster)).await;
            return Err(e);
        }
    };
    if !repo.encrypted() && inputs.repository.location().starts_with("s3://") {
        tracing::warn!(
            "{} is not encrypted: whoever reads it reads the cluster's secrets (database \
             password, TLS keys, app config); make an encrypted one with `deis-backup init`",
            repo.location()
        );
    }
    let result = take_snapshot(out, &cluster, &repo, options, lock, &mut run).await;
    run.snapshot = result.as_ref().ok().map(|o| o.manifest.id.clone());
    run.end(result.as_ref().map(moved_by_snapshot));
    record(&run, Some(&repo), &cluster.etcd).await;
    let done = result.as_ref().ok().map(|o| (o, &repo));
    metrics(inputs, &run, done, &cluster.etcd, Some(&cluster)).await;
    let outcome = result?;
    out.snapshot(&outcome);
    Ok(ExitCode::SUCCESS)
}

/// Writes `--metrics-file`, when asked for: the run, the last success (this run's, or the one
/// etcd records), the snapshot's figures, the gateway's counts and the repository's size. A
/// failure is a warning.
async fn metrics(
    inputs: &SnapshotInputs<'_>,
    run: &Run,
    done: Option<(&snapshot::Outcome, &Repository)>,
    etcd: &deis_backup_etcd::Client,
    cluster: Option<&Cluster>,
) {
    let Some(path) = inputs.metrics_file else {
        return;
    };
    let last_success = match done {
        Some(_) => run.ended,
        None => history::from_etcd(etcd, history::LAST_SUCCESS_KEY)
            .await
            .ok()
            .flatten()
            .and_then(|r| r.ended),
    };
    let repository = match done {
        Some((_, repo)) => repository_size(repo).await.ok(),
        None => None,
    };
    let figures = deis_backup_coordinator::metrics::Figures {
        run: Some(run),
        last_success,
        outcome: done.map(|(o, _)| o),
        gateway: cluster
            .and_then(|c| c.gateway.as_ref())
            .map(deis_backup_coordinator::s3::Client::stats),
        repository,
    };
    let text = deis_backup_coordinator::metrics::render(&figures);
    if let Err(e) = deis_backup_coordinator::metrics::write(path, &text) {
        eprintln!("deis-backup: warning: {}", e.message());
    }
}

/// Complete snapshots in `repo`, and the bytes of its blobs.
async fn repository_size(repo: &Repository) -> Result<(u64, u64)> {
    let snapshots = repo.snapshots().await?.len() as u64;
    let bytes = repo.blobs().await?.iter().map(|(_, size)| size).sum();
    Ok((snapshots, bytes))
}

/// The snapshot itself, under the cluster lock (`lock`, held) and a repository lease; `run`'s
/// `started` entry is written once both are held.
async fn take_snapshot(
    out: &output::Output,
    cluster: &Cluster,
    repo: &Repository,
    options: &SnapshotOptions,
    lock: Lock,
    run: &mut Run,
) -> Result<snapshot::Outcome> {
    let (hold, others) = hold(repo, Operation::Snapshot, Vec::new(), lock).await?;
    run.lease = hold.lease_file().map(str::to_owned);
    write_entry(run, repo).await;
    clean_staging(repo, &others).await;
    let progress = progress::Bars::new(out.is_json());
    let result = async {
        let plan = snapshot::plan(cluster, Some(repo), options).await?;
        snapshot::run(cluster, repo, &plan, options, &hold, &progress).await
    }
    .await;
    progress.finish();
    release(hold).await;
    result
}

/// What a snapshot moved: bytes and objects downloaded from the gateway, objects carried over.
fn moved_by_snapshot(o: &snapshot::Outcome) -> Moved {
    let mut moved = Moved::default();
    for s in o.buckets.values() {
        moved.bytes += s.downloaded_bytes;
        moved.objects += s.downloaded_objects;
        moved.reused_objects += s.unchanged_objects;
    }
    moved
}

/// Writes `run`'s entry in `repo` as it stands (`started`, or its outcome); a failure is a warning
/// (history never decides a run).
async fn write_entry(run: &Run, repo: &Repository) {
    if let Err(e) = history::write(repo, run).await {
        eprintln!("deis-backup: warning: recording the run: {}", e.message());
    }
}

/// Writes `run`'s final entry in the repository (when it could be opened) and as the cluster's
/// last run in etcd; failures are warnings.
async fn record(run: &Run, repo: Option<&Repository>, etcd: &deis_backup_etcd::Client) {
    if let Some(repo) = repo {
        write_entry(run, repo).await;
    }
    if let Err(e) = history::publish(etcd, run).await {
        eprintln!(
            "deis-backup: warning: publishing the run in etcd: {}",
            e.message()
        );
    }
}

async fn cmd_restore(
    out: &output::Output,
    etcd: &deis_backup_etcd::Client,
    id: &str,
    repository: &RepositoryOptions,
    gateway: &GatewayOptions,
    agent_options: &AgentOptions,
    options: &RestoreOptions,
) -> Result<ExitCode> {
    let repo = Repository::open(repository).await?;
    let id = resolve_id(&repo, id).await?;
    let mut run = Run::start(history::Command::Restore);
    run.snapshot = Some(id.clone());
    let r = run_restore(
        out,
        etcd,
        &repo,
        &id,
        gateway,
        agent_options,
        options,
        &mut run,
    )
    .await;
    if !options.dry_run {
        run.end(r.as_ref().map(|_| Moved::default()));
        record(&run, Some(&repo), etcd).await;
    }
    out.restore(&r?);
    Ok(ExitCode::SUCCESS)
}

/// A restore of snapshot `id` onto the cluster of `etcd`: its preflight only with `--dry-run`,
/// otherwise under the target's cluster lock and a repository lease (`run`'s `started` entry is
/// written once both are held).
#[expect(
    clippy::too_many_arguments,
    reason = "the command's inputs, passed through once"
)]
async fn run_restore(
    out: &output::Output,
    etcd: &deis_backup_etcd::Client,
    repo: &Repository,
    id: &SnapshotId,
    gateway: &GatewayOptions,
    agent_options: &AgentOptions,
    options: &RestoreOptions,
    run: &mut Run,
) -> Result<restore::Report> {
    let manifest = repo.manifest(id).await?;
    let no_buckets = options.no_buckets || manifest.buckets.is_empty();
    let target = Cluster::discover(etcd.clone(), agent_options, gateway, no_buckets)
        .await
        .map_err(|e| match e.kind() {
            ErrorKind::GatewayAuth | ErrorKind::GatewayUnreachable => Error::new(
                ErrorKind::Preflight,
                format!("restore refused, nothing was written: the gateway does not take this cluster's keys: {}", e.message()),
                e.guidance().to_owned(),
            ),
            _ => e,
        })?;
    let progress = progress::Bars::new(out.is_json());
    if options.dry_run {
        let r = restore::restore(repo, &manifest, &target, options, &progress, None).await;
        progress.finish();
        return r;
    }
    // The target cluster's lock: no snapshot or prune of it, and no second restore, meanwhile.
    // The lease: no prune of the repository (from any cluster) deletes the snapshot meanwhile.
    let lock = Lock::acquire(etcd, "restore").await?;
    let (lease, _) =
        match Lease::take_to_read(repo, Operation::Restore, vec![id.clone()], Some(&lock)).await {
            Ok(taken) => taken,
            Err(e) => {
                release(Hold::new(Some(lock), None)).await;
                return Err(e);
            }
        };
    let hold = Hold::new(Some(lock), lease);
    run.lease = hold.lease_file().map(str::to_owned);
    write_entry(run, repo).await;
    // Read again under the lease: a prune that ran in between shows here, not half-way through.
    let r = match repo.manifest(id).await {
        Ok(manifest) => {
            restore::restore(repo, &manifest, &target, options, &progress, Some(&hold)).await
        }
        Err(e) => Err(e),
    };
    progress.finish();
    release(hold).await;
    r
}

fn cmd_pki(action: &PkiCommand) -> Result<ExitCode> {
    use deis_backup_coordinator::pki::{self, Subject};
    let issued = match action {
        PkiCommand::Init { dir } => pki::init(dir)?,
        PkiCommand::Issue {
            dir,
            host,
            coordinator: _,
            out,
        } => {
            let subject = host.clone().map_or(Subject::Coordinator, Subject::Agent);
            pki::issue(dir, &subject, out.as_deref())?
        }
    };
    output::write_stdout(format_args!(
        "{}\n{}\n",
        issued.cert.display(),
        issued.key.display()
    ));
    Ok(ExitCode::SUCCESS)
}

/// Where `status` reads its facts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum StatusSource {
    Etcd,
    Repository,
}

/// The last run and the last complete snapshot as etcd has them.
async fn status_from_etcd(etcd: &deis_backup_etcd::Client) -> Result<status::Facts> {
    let last_run = history::from_etcd(etcd, history::LAST_RUN_KEY).await?;
    let last_success = history::from_etcd(etcd, history::LAST_SUCCESS_KEY).await?;
    Ok(status::Facts {
        last_run: last_run.map(|r| {
            let state = r.state(false);
            (r, state)
        }),
        last_success: last_success.and_then(|r| {
            Some((
                r.ended?,
                r.snapshot.map(|s| s.to_string()).unwrap_or_default(),
            ))
        }),
    })
}

/// The last run that is not still running, and the newest complete snapshot, as the repository
/// has them.
async fn status_from_repository(repo: &Repository) -> Result<status::Facts> {
    let runs = history::runs(repo).await?;
    let last_run = runs
        .into_iter()
        .rev()
        .find(|(_, state)| *state != history::State::Running);
    let last_success = repo
        .latest()
        .await?
        .map(|m| (m.completed, m.id.to_string()));
    Ok(status::Facts {
        last_run,
        last_success,
    })
}

/// A prune under the cluster lock and a repository lease.
async fn run_prune(
    repo: &Repository,
    etcd: &deis_backup_etcd::Client,
    options: &PruneOptions,
    run: &mut Run,
) -> Result<prune::Report> {
    let lock = Lock::acquire(etcd, "prune").await?;
    let (hold, others) = hold(repo, Operation::Prune, Vec::new(), lock).await?;
    if !options.dry_run {
        run.lease = hold.lease_file().map(str::to_owned);
        write_entry(run, repo).await;
    }
    clean_staging(repo, &others).await;
    let r = prune::prune(repo, options, &hold, &others).await;
    release(hold).await;
    r
}

/// Takes the repository lease for `operation` beside the cluster lock `lock`: refused (and the
/// lock released) beside a run it must not overlap (see `lease`). The other live leases come
/// back with it.
async fn hold(
    repo: &Repository,
    operation: Operation,
    reads: Vec<SnapshotId>,
    lock: Lock,
) -> Result<(Hold, Vec<lease::Record>)> {
    match Lease::take(repo, operation, reads, Some(&lock)).await {
        Ok((lease, others)) => Ok((Hold::new(Some(lock), Some(lease)), others)),
        Err(e) => {
            release(Hold::new(Some(lock), None)).await;
            Err(e)
        }
    }
}

/// Removes staging files a killed run left; a failure to clean is a warning, never the run's
/// outcome. A local repository's staging directory (`<repository>/tmp`) is written only by runs
/// holding the cluster lock, which the caller now holds, and by snapshots of other clusters
/// sharing the repository, whose leases are among `others`: without those, anything there
/// untouched for 30 s belongs to a dead run. An S3 repository stages in a directory others may
/// share (the system's temporary directory), so only files older than the repository's long
/// threshold go.
async fn clean_staging(repo: &Repository, others: &[lease::Record]) {
    let shared = repo.location().starts_with("s3://")
        || others.iter().any(|o| o.operation == Operation::Snapshot);
    let age = if shared {
        deis_backup_coordinator::repository::STALE_STAGING_AGE
    } else {
        std::time::Duration::from_secs(30)
    };
    if let Err(e) = repo.clean_staging(age).await {
        eprintln!("deis-backup: warning: {}", e.message());
    }
}

/// Releases what the run holds. A failure is a warning, not the run's outcome: the work is done
/// (or its own error stands), and the lock and lease lapse by themselves.
async fn release(hold: Hold) {
    for w in hold.release().await {
        eprintln!("deis-backup: warning: {w}");
    }
}

async fn resolve_id(repo: &Repository, id: &str) -> Result<SnapshotId> {
    if id == "latest" {
        return repo.snapshots().await?.pop().ok_or_else(|| {
            Error::new(
                ErrorKind::NotFound,
                format!("{} holds no snapshot", repo.location()),
                "take one with `deis-backup snapshot`",
            )
        });
    }
    id.parse()
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn secrets_are_never_taken_from_the_command_line() {
        for (flag, value) in [
            ("--gateway-secret-key", "s3cret"),
            ("--repository-secret-key", "s3cret"),
            ("--agent-token", "s3cret"),
        ] {
            let parsed = Cli::try_parse_from(["deis-backup", "snapshot", flag, value]);
            assert!(parsed.is_err(), "{flag} is accepted");
        }
        let files = Cli::try_parse_from([
            "deis-backup",
            "snapshot",
            "--gateway-secret-key-file",
            "/etc/deis-backup/gateway-secret",
            "--repository-secret-key-file",
            "/etc/deis-backup/repository-secret",
        ]);
        assert!(files.is_ok(), "{files:?}");
    }

    /// The fleet unit's command line, after the image name, as a shell would split it.
    fn unit_args(unit: &str) -> Vec<String> {
        let text = unit.replace("\\\n", " ");
        let exec = text
            .lines()
            .find_map(|l| l.strip_prefix("ExecStart="))
            .expect("the unit has an ExecStart");
        exec.split_whitespace()
            .skip_while(|w| *w != "${IMAGE}")
            .skip(1)
            .map(|w| w.replace("${COREOS_PRIVATE_IPV4}", "10.21.1.7"))
            .collect()
    }

    #[test]
    fn the_fleet_unit_runs_a_real_snapshot_command() {
        let unit = include_str!("../../systemd/deis-backup.service");
        let args = unit_args(unit);
        assert!(!args.is_empty(), "no arguments after the image");
        let cli = Cli::try_parse_from(std::iter::once("deis-backup".to_owned()).chain(args))
            .unwrap_or_else(|e| panic!("systemd/deis-backup.service: {e}"));
        assert_eq!(cli.etcd.as_deref(), Some("http://10.21.1.7:4001"));
        let Command::Snapshot {
            agents, options, ..
        } = cli.command
        else {
            panic!("the unit does not run `snapshot`");
        };
        assert_eq!(options.pre_hook.as_deref(), Some("wal-e-backup-push"));
        assert!(!options.dry_run);
        assert_eq!(
            agents.token_file.as_deref(),
            Some(std::path::Path::new("/etc/deis-backup/token"))
        );
        assert_eq!(
            agents.tls_cert.as_deref(),
            Some(std::path::Path::new("/etc/deis-backup/pki/coordinator.pem"))
        );
        assert!(!agents.insecure_plaintext);
        assert!(unit.contains("--entrypoint /usr/bin/deis-backup"));
        assert!(unit.contains("Type=oneshot"));
    }

    #[test]
    fn the_timer_lives_beside_its_service() {
        let timer = include_str!("../../systemd/deis-backup.timer");
        assert!(timer.contains("OnCalendar=daily"));
        assert!(timer.contains("[X-Fleet]\nMachineOf=deis-backup.service"));
        let timer = include_str!("../../systemd/deis-backup-verify.timer");
        assert!(timer.contains("OnCalendar=weekly"));
        assert!(timer.contains("[X-Fleet]\nMachineOf=deis-backup-verify.service"));
        let timer = include_str!("../../systemd/deis-backup-drill.timer");
        assert!(timer.contains("OnCalendar=Sun *-*-* 04:00:00"));
        assert!(timer.contains("[X-Fleet]\nMachineOf=deis-backup-drill.service"));
    }

    #[test]
    fn the_weekly_drill_unit_drills_the_latest_snapshot_with_the_agents_credentials() {
        let unit = include_str!("../../systemd/deis-backup-drill.service");
        let args = unit_args(unit);
        let cli = Cli::try_parse_from(std::iter::once("deis-backup".to_owned()).chain(args))
            .unwrap_or_else(|e| panic!("systemd/deis-backup-drill.service: {e}"));
        let Command::Drill { id, agents, .. } = cli.command else {
            panic!("the unit does not run `drill`");
        };
        assert_eq!(id, "latest");
        assert_eq!(
            agents.token_file.as_deref(),
            Some(std::path::Path::new("/etc/deis-backup/token"))
        );
        assert!(!agents.insecure_plaintext);
        assert!(unit.contains("\nOnFailure=deis-backup-failed@%n.service\n"));
        assert!(unit.contains("Type=oneshot"));
    }

    #[test]
    fn a_failed_unit_notifies_through_the_on_failure_template() {
        for unit in [
            include_str!("../../systemd/deis-backup.service"),
            include_str!("../../systemd/deis-backup-verify.service"),
            include_str!("../../systemd/deis-backup-drill.service"),
        ] {
            assert!(
                unit.contains("\nOnFailure=deis-backup-failed@%n.service\n"),
                "{unit}"
            );
        }
        let notify = include_str!("../../systemd/deis-backup-failed@.service");
        assert!(notify.contains("journalctl -u \"%i\""), "{notify}");
        assert!(
            notify.contains("/etc/deis-backup/on-failure \"%i\""),
            "{notify}"
        );
        assert!(
            !notify.contains("[X-Fleet]"),
            "fleet does not place templates"
        );
    }

    #[test]
    fn the_weekly_verify_unit_reads_a_moving_quarter_of_the_latest_snapshot() {
        let unit = include_str!("../../systemd/deis-backup-verify.service");
        let args = unit_args(unit);
        let cli = Cli::try_parse_from(std::iter::once("deis-backup".to_owned()).chain(args))
            .unwrap_or_else(|e| panic!("systemd/deis-backup-verify.service: {e}"));
        let Command::Verify {
            id,
            read_data,
            read_data_subset,
            ..
        } = cli.command
        else {
            panic!("the unit does not run `verify`");
        };
        assert_eq!(id, "latest");
        assert!(!read_data);
        let Some(verify::Subset::Window { width, .. }) = read_data_subset else {
            panic!("the unit reads no moving window: {read_data_subset:?}");
        };
        assert_eq!(width, 250_000, "25%: every blob within four weekly runs");
        assert!(unit.contains("--entrypoint /usr/bin/deis-backup"));
        assert!(unit.contains("Type=oneshot"));
    }
}
