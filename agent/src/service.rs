//! The gRPC `Agent` service: each call checks its request against the agent's configuration, then
//! hands the work to `database`, `store` or `hooks`.
//!
//! Invariants:
//! - Download streams (dump, archive) end with exactly one trailer, or with an error status; the
//!   producer runs in its own task and blocks on a bounded channel, so a slow caller slows it down.
//! - Upload streams (restores) start with a header; a second header, a missing one or a broken
//!   stream is an error, never a partial restore reported as done.
//! - The caller never chooses a container, a command or a path outside the allow-list.
//! - Every call is counted in the agent's metrics by its outcome, and the data bytes of every
//!   stream by its method (`metrics`); the work itself does not know about it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use deis_backup_proto::v1::{
    ArchiveStoreRequest, Chunk, ContainerState, DescribeReply, DescribeRequest, DrillDatabaseReply,
    DumpDatabaseRequest, ProbeDatabaseImageReply, ProbeDatabaseImageRequest, RestoreDatabaseReply,
    RestoreDatabaseRequest, RestoreStoreReply, RestoreStoreRequest, RunHookReply, RunHookRequest,
    agent_server, chunk, restore_database_request, restore_store_request,
};
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::chunks::{ChannelReader, QUEUE_CHUNKS};
use crate::config::{DatabaseRestorePolicy, Hook, RestorePolicy};
use crate::container::Engine;
use crate::error::{Error, Result};
use crate::metrics::{Call, Counted, Metrics};
use crate::{database, drill, hooks, store};

/// What the service needs, resolved from the configuration once at start.
#[derive(Debug, Clone)]
pub struct Settings {
    pub host_id: String,
    pub hostname: String,
    pub address: String,
    pub database_container: String,
    /// Containers Describe reports when they run (see `Config::platform_containers`).
    pub platform_containers: Vec<String>,
    pub store_paths: Vec<PathBuf>,
    pub zstd_level: i32,
    /// The highest level a caller may ask for.
    pub max_zstd_level: i32,
    pub zstd_workers: u32,
    pub hooks: BTreeMap<String, Hook>,
    pub restore: RestorePolicy,
    pub database_restore: DatabaseRestorePolicy,
}

/// The service implementation.
#[derive(Debug, Clone)]
pub struct AgentService {
    settings: Arc<Settings>,
    engine: Engine,
    metrics: Arc<Metrics>,
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<Chunk, Status>> + Send>>;

impl AgentService {
    pub fn new(settings: Settings, engine: Engine, metrics: Arc<Metrics>) -> Self {
        Self {
            settings: Arc::new(settings),
            engine,
            metrics,
        }
    }

    fn level(&self, requested: i32) -> Result<i32> {
        match requested {
            0 => Ok(self.settings.zstd_level),
            l if (1..=self.settings.max_zstd_level).contains(&l) => Ok(l),
            l => Err(Error::BadRequest {
                what: format!(
                    "zstd level {l} is out of range (1..={}, 0 for the agent's default)",
                    self.settings.max_zstd_level
                ),
            }),
        }
    }

    /// A SQL upload (RestoreDatabase, DrillDatabase): its header's digest, checked, and its data
    /// forwarded to a channel (counted in the metrics of `call`), with the flag a broken stream
    /// sets.
    async fn sql_upload(
        &self,
        request: Request<Streaming<RestoreDatabaseRequest>>,
        call: Call,
    ) -> std::result::Result<([u8; 32], mpsc::Receiver<Bytes>, Arc<AtomicBool>), Status> {
        let mut stream = request.into_inner();
        let Some(RestoreDatabaseRequest {
            kind: Some(restore_database_request::Kind::Header(header)),
        }) = stream.message().await?
        else {
            return Err(Error::BadRequest {
                what: format!("a {call:?} stream must start with its header"),
            }
            .into());
        };
        let sha256 = database::check_digest(&header.sha256)?;
        let (rx, broken) = forward(
            stream,
            self.metrics.received(call),
            move |m: RestoreDatabaseRequest| match m.kind {
                Some(restore_database_request::Kind::Data(d)) => Ok(d),
                _ => Err(Status::invalid_argument(format!(
                    "a {call:?} stream carries one header, then data only"
                ))),
            },
        );
        Ok((sha256, rx, broken))
    }

    /// Streams the result of `work` (which sends data chunks on the sender it gets) and its trailer.
    fn download<F, Fut>(work: F) -> ChunkStream
    where
        F: FnOnce(mpsc::Sender<Result<Chunk, Status>>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<deis_backup_proto::v1::Trailer>> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(QUEUE_CHUNKS);
        tokio::spawn(async move {
            let end = match work(tx.clone()).await {
                Ok(trailer) => Ok(Chunk {
                    kind: Some(chunk::Kind::Trailer(trailer)),
                }),
                Err(Error::Cancelled) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "stream failed");
                    Err(e.status())
                }
            };
            let _ = tx.send(end).await;
        });
        Box::pin(ReceiverStream::new(rx))
    }
}

/// Forwards the data messages of an upload stream to a channel, counting their bytes in
/// `received`; marks `broken` on a stream error.
fn forward<M, F>(
    mut stream: Streaming<M>,
    received: prometheus_client::metrics::counter::Counter,
    data: F,
) -> (mpsc::Receiver<Bytes>, Arc<AtomicBool>)
where
    M: Send + 'static,
    F: Fn(M) -> std::result::Result<Vec<u8>, Status> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(8);
    let broken = Arc::new(AtomicBool::new(false));
    let flag = broken.clone();
    tokio::spawn(async move {
        while let Some(msg) = stream.next().await {
            let piece = msg.and_then(&data);
            match piece {
                Ok(p) => {
                    received.inc_by(p.len() as u64);
                    if tx.send(Bytes::from(p)).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "upload stream broke off");
                    flag.store(true, Ordering::SeqCst);
                    return;
                }
            }
        }
    });
    (rx, broken)
}

fn join_status(e: &tokio::task::JoinError) -> Status {
    Status::internal(format!("an agent worker failed: {e}"))
}

#[tonic::async_trait]
impl agent_server::Agent for AgentService {
    async fn describe(
        &self,
        _request: Request<DescribeRequest>,
    ) -> Result<Response<DescribeReply>, Status> {
        let call = self.metrics.call(Call::Describe);
        let answer = async {
            let s = &self.settings;
            let database = self
                .engine
                .container(&s.database_container)
                .await?
                .map(|c| ContainerState {
                    name: c.name,
                    running: c.running,
                    image: c.image,
                });
            let mut store_paths = Vec::new();
            for p in &s.store_paths {
                store_paths.push(store::describe(p, &s.host_id).unwrap_or_else(|e| {
                    tracing::warn!(path = %p.display(), error = %e, "store path not usable here");
                    deis_backup_proto::v1::StorePath {
                        path: p.display().to_string(),
                        ..Default::default()
                    }
                }));
            }
            Ok(Response::new(DescribeReply {
                machine_id: s.host_id.clone(),
                hostname: s.hostname.clone(),
                address: s.address.clone(),
                agent_version: env!("CARGO_PKG_VERSION").to_owned(),
                docker_api_version: self.engine.api_version(),
                database,
                store_paths,
                running_platform_containers: self
                    .engine
                    .platform_containers(&s.platform_containers)
                    .await?,
                hooks: s.hooks.keys().cloned().collect(),
            }))
        }
        .await;
        call.answer(answer)
    }

    type DumpDatabaseStream = Counted<ChunkStream>;

    async fn dump_database(
        &self,
        request: Request<DumpDatabaseRequest>,
    ) -> Result<Response<Self::DumpDatabaseStream>, Status> {
        let call = self.metrics.call(Call::DumpDatabase);
        let answer = async {
            let level = self.level(request.get_ref().zstd_level)?;
            let unchanged_since = request.into_inner().unchanged_since;
            let container = self.settings.database_container.clone();
            self.engine.require_running(&container).await?;
            let engine = self.engine.clone();
            tracing::info!(%container, level, "database dump starts");
            Ok(Response::new(Self::download(move |tx| async move {
                database::dump(&engine, &container, level, &unchanged_since, tx).await
            })))
        }
        .await;
        call.download(answer)
    }

    type ArchiveStoreStream = Counted<ChunkStream>;

    async fn archive_store(
        &self,
        request: Request<ArchiveStoreRequest>,
    ) -> Result<Response<Self::ArchiveStoreStream>, Status> {
        let call = self.metrics.call(Call::ArchiveStore);
        let answer = async {
            let req = request.into_inner();
            let root = store::resolve(&self.settings.store_paths, &req.path)?;
            let level = self.level(req.zstd_level)?;
            let workers = self.settings.zstd_workers;
            let opts = store::archive::Options::new(level, workers, req.reusable.into_iter().collect());
            tracing::info!(path = %root.display(), level, workers, reusable = opts.reusable.len(), "store archive starts");
            Ok(Response::new(Self::download(move |tx| async move {
                tokio::task::spawn_blocking(move || store::archive::archive(&root, opts, tx))
                    .await
                    .map_err(|e| Error::Internal {
                        what: format!("the archive worker failed: {e}"),
                    })?
            })))
        }
        .await;
        call.download(answer)
    }

    async fn restore_store(
        &self,
        request: Request<Streaming<RestoreStoreRequest>>,
    ) -> Result<Response<RestoreStoreReply>, Status> {
        let call = self.metrics.call(Call::RestoreStore);
        let answer = async {
            let mut stream = request.into_inner();
            let Some(RestoreStoreRequest {
                kind: Some(restore_store_request::Kind::Header(header)),
            }) = stream.message().await?
            else {
                return Err(Error::BadRequest {
                    what: "a RestoreStore stream must start with its header".into(),
                }
                .into());
            };
            let target = store::resolve(&self.settings.store_paths, &header.path)?;
            let received = self.metrics.received(Call::RestoreStore);
            let (rx, broken) = forward(stream, received, |m: RestoreStoreRequest| match m.kind {
                Some(restore_store_request::Kind::Data(d)) => Ok(d),
                _ => Err(Status::invalid_argument(
                    "a RestoreStore stream carries one header, then data only",
                )),
            });
            let opts = store::restore::Options {
                overwrite: header.overwrite,
                policy: self.settings.restore,
                segments: header
                    .segments
                    .into_iter()
                    .map(|d| (d.size, d.sha256))
                    .collect(),
            };
            tracing::info!(path = %target.display(), overwrite = opts.overwrite, "store restore starts");
            let reply = tokio::task::spawn_blocking(move || {
                store::restore::restore(&target, ChannelReader::with_broken_flag(rx, broken), &opts)
            })
            .await
            .map_err(|e| join_status(&e))??;
            Ok(Response::new(reply))
        }
        .await;
        call.answer(answer)
    }

    async fn restore_database(
        &self,
        request: Request<Streaming<RestoreDatabaseRequest>>,
    ) -> Result<Response<RestoreDatabaseReply>, Status> {
        let call = self.metrics.call(Call::RestoreDatabase);
        let answer = async {
            let policy = &self.settings.database_restore;
            database::check_enabled(policy)?;
            let (sha256, rx, broken) = self.sql_upload(request, Call::RestoreDatabase).await?;
            let container = &self.settings.database_container;
            self.engine.require_running(container).await?;
            tracing::info!(%container, spool_dir = %policy.spool_dir.display(), "database restore starts");
            let reply = database::restore(
                &self.engine,
                container,
                policy,
                self.settings.restore.max_window_log,
                sha256,
                rx,
                broken,
            )
            .await?;
            Ok(Response::new(reply))
        }
        .await;
        call.answer(answer)
    }

    async fn drill_database(
        &self,
        request: Request<Streaming<RestoreDatabaseRequest>>,
    ) -> Result<Response<DrillDatabaseReply>, Status> {
        let call = self.metrics.call(Call::DrillDatabase);
        let answer = async {
            let policy = &self.settings.database_restore;
            if !policy.drill {
                return Err(Error::Disabled {
                    what: "this agent serves no restore drill (its config says drill = false); \
                           enable it with --drill true"
                        .into(),
                }
                .into());
            }
            let (sha256, rx, broken) = self.sql_upload(request, Call::DrillDatabase).await?;
            let reply = drill::drill(
                &self.engine,
                &self.settings.host_id,
                &self.settings.database_container,
                policy,
                self.settings.restore.max_window_log,
                sha256,
                rx,
                broken,
            )
            .await?;
            Ok(Response::new(reply))
        }
        .await;
        call.answer(answer)
    }

    async fn probe_database_image(
        &self,
        _request: Request<ProbeDatabaseImageRequest>,
    ) -> Result<Response<ProbeDatabaseImageReply>, Status> {
        let call = self.metrics.call(Call::ProbeDatabaseImage);
        let answer = async {
            let reply = drill::probe(
                &self.engine,
                &self.settings.host_id,
                &self.settings.database_container,
            )
            .await?;
            Ok(Response::new(reply))
        }
        .await;
        call.answer(answer)
    }

    async fn run_hook(
        &self,
        request: Request<RunHookRequest>,
    ) -> Result<Response<RunHookReply>, Status> {
        let call = self.metrics.call(Call::RunHook);
        let answer = async {
            let name = request.into_inner().name;
            let reply = hooks::run(
                &self.engine,
                &self.settings.hooks,
                &self.settings.database_container,
                &name,
            )
            .await?;
            Ok(Response::new(reply))
        }
        .await;
        call.answer(answer)
    }
}
