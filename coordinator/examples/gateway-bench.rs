//! `gateway-bench`: drives the library's mirror and bucket restore from the command line for
//! `bench/gateway.sh` (build with `--release`). Not the product CLI: no snapshot management beyond
//! "take one" and "restore the latest".
//!
//! Prints one `key=value` line per run (objects, bytes, downloaded/uploaded bytes, seconds) so the
//! script can compute ratios.

use std::time::Instant;

use clap::{Parser, Subcommand};
use deis_backup_coordinator::bucket_restore::{Existing, restore_bucket};
use deis_backup_coordinator::gateway::{DeisBuckets, Gateway, GatewayOptions};
use deis_backup_coordinator::mirror::{NoProgress, mirror_buckets};
use deis_backup_coordinator::repository::{Repository, RepositoryOptions, SnapshotId};

#[derive(Debug, Parser)]
struct Cli {
    /// etcd v2 endpoints, comma-separated.
    #[arg(long, default_value = "http://127.0.0.1:4001")]
    etcd: String,
    #[command(flatten)]
    gateway: GatewayOptions,
    #[command(flatten)]
    repository: RepositoryOptions,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Take a snapshot of the buckets (default: Deis' buckets from etcd), incremental on the latest.
    Mirror {
        #[arg(long, value_delimiter = ',')]
        buckets: Vec<String>,
    },
    /// Restore the latest snapshot's buckets into `<bucket><suffix>`.
    Restore {
        #[arg(long)]
        suffix: String,
        #[arg(long, value_enum, default_value_t = Existing::Refuse)]
        existing: Existing,
    },
    /// Delete the buckets `<bucket><suffix>` of the latest snapshot with all their objects.
    DropRestored {
        #[arg(long)]
        suffix: String,
    },
    /// Fill `bucket` with `count` small objects (for the no-change benchmark).
    Seed {
        #[arg(long)]
        bucket: String,
        #[arg(long)]
        count: usize,
        #[arg(long, default_value_t = 1024)]
        size: usize,
    },
}

#[tokio::main]
#[expect(
    clippy::too_many_lines,
    reason = "the benchmark driver: one short arm per measured operation"
)]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let etcd = deis_backup_etcd::Client::from_list(&cli.etcd)?;
    let gw = Gateway::connect(&cli.gateway, Some(&etcd)).await?;
    let started = Instant::now();
    match cli.command {
        Command::Mirror { buckets } => {
            let buckets = if buckets.is_empty() {
                DeisBuckets::discover(&etcd).await?.all()
            } else {
                buckets
            };
            let repo = Repository::open_or_init(&cli.repository).await?;
            let previous = repo.latest().await?;
            let mut snap = repo.start_snapshot(SnapshotId::generate());
            let stats =
                mirror_buckets(&gw, &mut snap, &buckets, previous.as_ref(), &NoProgress).await?;
            snap.commit().await?;
            let objects: u64 = stats.values().map(|s| s.stats.objects).sum();
            let bytes: u64 = stats.values().map(|s| s.stats.bytes).sum();
            let downloaded: u64 = stats.values().map(|s| s.stats.downloaded_bytes).sum();
            println!(
                "op=mirror objects={objects} bytes={bytes} downloaded_bytes={downloaded} \
                 signature={:?} retries={} seconds={:.3}",
                gw.signature_in_use(),
                gw.stats().retries,
                started.elapsed().as_secs_f64()
            );
        }
        Command::Restore { suffix, existing } => {
            let repo = Repository::open(&cli.repository).await?;
            let m = repo
                .latest()
                .await?
                .ok_or_else(|| anyhow::anyhow!("the repository holds no snapshot"))?;
            let (mut objects, mut uploaded) = (0, 0);
            for bucket in m.buckets.keys() {
                let entries = repo.listing(&m, bucket).await?;
                let s = restore_bucket(
                    &gw,
                    &repo,
                    &entries,
                    &format!("{bucket}{suffix}"),
                    existing,
                    &NoProgress,
                )
                .await?;
                objects += s.objects;
                uploaded += s.uploaded_bytes;
            }
            println!(
                "op=restore objects={objects} uploaded_bytes={uploaded} seconds={:.3}",
                started.elapsed().as_secs_f64()
            );
        }
        Command::DropRestored { suffix } => {
            let repo = Repository::open(&cli.repository).await?;
            if let Some(m) = repo.latest().await? {
                for bucket in m.buckets.keys() {
                    let b = format!("{bucket}{suffix}");
                    if gw.bucket_exists(&b).await? {
                        let keys: Vec<String> = gw
                            .list_objects(&b, None)
                            .await?
                            .into_iter()
                            .map(|o| o.key)
                            .collect();
                        gw.delete_objects(&b, &keys).await?;
                        gw.delete_bucket(&b).await?;
                    }
                }
            }
        }
        Command::Seed {
            bucket,
            count,
            size,
        } => {
            use futures::StreamExt as _;
            gw.create_bucket(&bucket).await?;
            let dir = tempfile::tempdir()?;
            let meta = deis_backup_coordinator::gateway::ObjectMeta::default();
            let results: Vec<_> = futures::stream::iter(0..count)
                .map(|i| {
                    let path = dir.path().join(format!("{i}"));
                    let (bucket, gw, meta) = (&bucket, &gw, &meta);
                    async move {
                        let mut data = vec![0u8; size];
                        fastrand::Rng::with_seed(i as u64).fill(&mut data);
                        tokio::fs::write(&path, &data).await?;
                        let key = format!("objects/{:03}/{i:06}.bin", i % 100);
                        gw.put_file(bucket, &key, &path, size as u64, meta).await?;
                        tokio::fs::remove_file(&path).await?;
                        Ok::<_, anyhow::Error>(())
                    }
                })
                .buffer_unordered(gw.max_concurrency())
                .collect()
                .await;
            results.into_iter().collect::<anyhow::Result<Vec<()>>>()?;
            println!(
                "op=seed objects={count} seconds={:.3}",
                started.elapsed().as_secs_f64()
            );
        }
    }
    Ok(())
}
