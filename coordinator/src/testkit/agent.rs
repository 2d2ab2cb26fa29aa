//! A fake agent: the `Agent` gRPC service of `proto/deis/backup/v1/agent.proto`, served in process
//! on 127.0.0.1 over plain HTTP/2, answering from fixtures instead of Docker and a store directory.
//!
//! Owns: [`Host`] (what Describe reports), [`StoreFixture`] and the dump (what the download streams
//! carry), the [`Fault`] a test injects, and [`Calls`] (what the coordinator sent).
//! Invariants (the real agent's, `agent/src/service.rs`, unless a [`Fault`] says otherwise):
//! - Every call needs `authorization: Bearer` [`super::TOKEN`]; anything else is UNAUTHENTICATED.
//! - DumpDatabase sends the dump in chunks, then one trailer with its size and sha256 and the
//!   database state; asked with that same state (`unchanged_since`), it sends only a trailer with
//!   `unchanged` set. The dump needs a running database container (FAILED_PRECONDITION).
//! - ArchiveStore sends each segment as data chunks and a SegmentEnd (size, sha256, raw bytes,
//!   fingerprint); a segment whose fingerprint the caller offered is only a SegmentEnd with
//!   `reused` set. The trailer counts every segment, sent or reused. A path without a fixture is
//!   PERMISSION_DENIED, as one outside the allow-list.
//! - RestoreStore and RestoreDatabase take a header, then data; data that does not match the
//!   header's digests is INVALID_ARGUMENT, a non-empty store without `overwrite` and a database
//!   restore the host does not allow are FAILED_PRECONDITION. Only accepted restores are recorded
//!   (a restored store path stops being empty, on every fake started beside this one when the
//!   path is shared: they mount the same filesystem); refused ones are counted in
//!   [`Calls::refused`].
//! - The server stops when the [`FakeAgent`] is dropped.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use deis_backup_proto::v1::agent_server::{Agent, AgentServer};
use deis_backup_proto::v1::{
    ArchiveStoreRequest, Chunk, ContainerState, DescribeReply, DescribeRequest, DrillDatabaseReply,
    DumpDatabaseRequest, ProbeDatabaseImageReply, ProbeDatabaseImageRequest, RestoreDatabaseReply,
    RestoreDatabaseRequest, RestoreStoreHeader, RestoreStoreReply, RestoreStoreRequest,
    RunHookReply, RunHookRequest, SegmentEnd, StoreCounts, StorePath, TableRows, Trailer, chunk,
    restore_database_request, restore_store_request,
};
use futures::Stream;
use sha2::Digest as _;
use tonic::{Code, Request, Response, Status, Streaming};

/// The name of the database container in every fixture.
pub const DATABASE_CONTAINER: &str = "deis-database";
/// Largest data chunk the fake sends.
const CHUNK: usize = 1000;

/// What one host is and holds, as Describe reports it.
#[derive(Debug, Clone)]
pub struct Host {
    pub machine_id: String,
    pub database: Option<ContainerState>,
    pub store_paths: Vec<StorePath>,
    pub running_platform_containers: Vec<String>,
    pub hooks: Vec<String>,
    /// Whether the agent's config allows RestoreDatabase (`restore-database = true`).
    pub restore_database: bool,
    /// The PostgreSQL versions the database container's image holds (Deis v1.13's: 9.3).
    pub postgres_versions: Vec<String>,
}

impl Host {
    /// A host with nothing on it.
    pub fn new(machine_id: &str) -> Self {
        Self {
            machine_id: machine_id.to_owned(),
            database: None,
            store_paths: Vec::new(),
            running_platform_containers: Vec::new(),
            hooks: Vec::new(),
            restore_database: false,
            postgres_versions: vec!["9.3".to_owned()],
        }
    }

    /// With the database container, running or not (a running one is a running platform
    /// container too, as the agent reports it).
    #[must_use]
    pub fn with_database(mut self, running: bool) -> Self {
        self.database = Some(ContainerState {
            name: DATABASE_CONTAINER.to_owned(),
            running: false,
            image: "deis/database:v1.13.4".to_owned(),
        });
        if running {
            self.start_database();
        }
        self
    }

    /// Its database container starts (and so runs as a platform container).
    pub fn start_database(&mut self) {
        let db = self
            .database
            .as_mut()
            .expect("a host with a database container");
        if !db.running {
            db.running = true;
            self.running_platform_containers
                .push(DATABASE_CONTAINER.to_owned());
        }
    }

    /// With `path` on the cluster's CephFS (the same filesystem on every host), empty, with
    /// `free` bytes free.
    #[must_use]
    pub fn with_shared_store(mut self, path: &str, free: Option<u64>) -> Self {
        self.store_paths.push(StorePath {
            path: path.to_owned(),
            fs_type: "ceph".to_owned(),
            fs_identity: format!("shared:ceph:00000000000000ab:{path}"),
            shared: true,
            empty: true,
            free_bytes: free,
        });
        self
    }

    /// With host-local `path`, empty, with `free` bytes free.
    #[must_use]
    pub fn with_local_store(mut self, path: &str, free: Option<u64>) -> Self {
        self.store_paths.push(StorePath {
            path: path.to_owned(),
            fs_type: "ext4".to_owned(),
            fs_identity: format!("local:{}:2049:{}", self.machine_id, path.len()),
            shared: false,
            empty: true,
            free_bytes: free,
        });
        self
    }
}

/// One segment of a store archive: its (compressed) bytes and its fingerprint, if it has one.
#[derive(Debug, Clone)]
pub struct Segment {
    pub data: Vec<u8>,
    pub fingerprint: Option<Vec<u8>>,
    pub raw_bytes: u64,
}

/// A store archive: its segments, in order.
#[derive(Debug, Clone)]
pub struct StoreFixture {
    pub segments: Vec<Segment>,
}

impl StoreFixture {
    /// Segments with these bytes, each fingerprinted `[f; 32]` (none for `None`: it may still
    /// change), then the end-of-archive segment, which has no fingerprint.
    pub fn new(segments: &[(&[u8], Option<u8>)]) -> Self {
        let mut out: Vec<Segment> = segments
            .iter()
            .map(|(data, fp)| Segment {
                data: data.to_vec(),
                fingerprint: fp.map(|f| vec![f; 32]),
                raw_bytes: 10 * data.len() as u64,
            })
            .collect();
        out.push(Segment {
            data: b"end-of-archive".to_vec(),
            fingerprint: None,
            raw_bytes: 1024,
        });
        Self { segments: out }
    }

    /// The fingerprints a snapshot of this archive records, hex, in order.
    pub fn fingerprints(&self) -> Vec<Option<String>> {
        self.segments
            .iter()
            .map(|s| s.fingerprint.as_ref().map(hex::encode))
            .collect()
    }
}

/// A rule the next calls break, for the coordinator's error paths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Download streams end without their trailer.
    NoTrailer,
    /// The first segment end (a dump: the trailer) announces another sha256 than its data's.
    WrongDigest,
    /// The first segment is announced reused, though its fingerprint was not offered.
    ReuseUnoffered,
    /// The trailer counts one segment more than the stream held.
    WrongSegmentCount,
    /// A data chunk follows the trailer.
    DataAfterTrailer,
    /// A dump carries a SegmentEnd.
    SegmentEndInDump,
    /// Half the data, then this status instead of the rest (the agent died mid-stream).
    FailMidway(Code),
    /// Every call but Describe answers this status at once.
    Refuse(Code),
}

/// A database dump the fake sends.
#[derive(Debug, Clone)]
pub struct Dump {
    pub data: Vec<u8>,
    pub raw_bytes: u64,
    /// The database state the dump was taken in.
    pub state: String,
}

/// What the coordinator sent, call by call.
#[derive(Debug, Clone, Default)]
pub struct Calls {
    pub dumps: Vec<DumpDatabaseRequest>,
    pub archives: Vec<ArchiveStoreRequest>,
    /// Accepted store restores: the header and the data.
    pub store_restores: Vec<(RestoreStoreHeader, Vec<u8>)>,
    /// Accepted database restores: the header's sha256 and the data.
    pub database_restores: Vec<(Vec<u8>, Vec<u8>)>,
    pub hooks: Vec<String>,
    /// Calls answered with an error status (Describe included).
    pub refused: Vec<String>,
}

#[derive(Debug)]
struct Inner {
    host: Host,
    address: String,
    dump: Option<Dump>,
    stores: BTreeMap<String, StoreFixture>,
    fault: Option<Fault>,
    calls: Calls,
    /// Identities of the shared filesystems written to, as every fake beside this one sees them.
    filesystems: Arc<Mutex<std::collections::BTreeSet<String>>>,
}

type Shared = Arc<Mutex<Inner>>;

/// A running fake agent; stops when dropped.
#[derive(Debug)]
pub struct FakeAgent {
    inner: Shared,
    address: String,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl FakeAgent {
    /// Serves `host` on 127.0.0.1 (a free port), with no dump and no store archive yet.
    pub async fn start(host: Host) -> Self {
        Self::start_on(host, Arc::default()).await
    }

    /// Serves `host` like [`FakeAgent::start`], mounting the same shared filesystems as `other`.
    pub async fn start_beside(host: Host, other: &FakeAgent) -> Self {
        let filesystems = other.inner.lock().unwrap().filesystems.clone();
        Self::start_on(host, filesystems).await
    }

    async fn start_on(
        host: Host,
        filesystems: Arc<Mutex<std::collections::BTreeSet<String>>>,
    ) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let inner = Arc::new(Mutex::new(Inner {
            host,
            address: address.clone(),
            dump: None,
            stores: BTreeMap::new(),
            fault: None,
            calls: Calls::default(),
            filesystems,
        }));
        let service = AgentServer::new(Service(inner.clone()))
            .max_decoding_message_size(deis_backup_proto::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(deis_backup_proto::MAX_MESSAGE_BYTES);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    async {
                        let _ = stopped.await;
                    },
                ),
        );
        Self {
            inner,
            address,
            _stop: stop,
        }
    }

    pub fn host_id(&self) -> String {
        self.lock().host.machine_id.clone()
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap()
    }

    /// What DumpDatabase sends from now on.
    pub fn set_dump(&self, data: &[u8], state: &str) {
        self.lock().dump = Some(Dump {
            data: data.to_vec(),
            raw_bytes: 3 * data.len() as u64,
            state: state.to_owned(),
        });
    }

    /// What ArchiveStore of `path` sends from now on.
    pub fn set_store(&self, path: &str, fixture: StoreFixture) {
        self.lock().stores.insert(path.to_owned(), fixture);
    }

    /// The rule the next calls break (`None`: none).
    pub fn set_fault(&self, fault: Option<Fault>) {
        self.lock().fault = fault;
    }

    /// Changes what Describe reports from now on.
    pub fn update_host(&self, f: impl FnOnce(&mut Host)) {
        f(&mut self.lock().host);
    }

    /// What the coordinator sent so far.
    pub fn calls(&self) -> Calls {
        self.lock().calls.clone()
    }
}

/// The service, over the shared fixtures.
#[derive(Debug, Clone)]
struct Service(Shared);

type ChunkStream = Pin<Box<dyn Stream<Item = Result<Chunk, Status>> + Send>>;

impl Service {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.0.lock().unwrap()
    }

    /// The token check, then the `Refuse` fault; a refusal is counted.
    fn admit<T>(&self, call: &str, request: &Request<T>) -> Result<(), Status> {
        let want = format!("Bearer {}", super::TOKEN);
        let status = match request.metadata().get(deis_backup_proto::AUTHORIZATION) {
            Some(v) if v.to_str().is_ok_and(|v| v == want) => match self.lock().fault {
                Some(Fault::Refuse(code)) if call != "Describe" => Some(Status::new(
                    code,
                    format!("{call} refused by the test; try again"),
                )),
                _ => None,
            },
            _ => Some(Status::unauthenticated(
                "missing or wrong bearer token; give the agents' token",
            )),
        };
        self.refuse(call, status)
    }

    fn refuse(&self, call: &str, status: Option<Status>) -> Result<(), Status> {
        match status {
            None => Ok(()),
            Some(s) => {
                self.lock()
                    .calls
                    .refused
                    .push(format!("{call}: {}", s.message()));
                Err(s)
            }
        }
    }
}

fn data_chunks(data: &[u8]) -> impl Iterator<Item = Result<Chunk, Status>> + '_ {
    data.chunks(CHUNK).map(|c| {
        Ok(Chunk {
            kind: Some(chunk::Kind::Data(c.to_vec())),
        })
    })
}

#[expect(
    clippy::unnecessary_wraps,
    reason = "an item of a response stream, beside the data chunks"
)]
fn message(kind: chunk::Kind) -> Result<Chunk, Status> {
    Ok(Chunk { kind: Some(kind) })
}

fn sha256(data: &[u8]) -> Vec<u8> {
    sha2::Sha256::digest(data).to_vec()
}

/// `messages`, changed by the stream faults, as a response stream.
fn download(mut messages: Vec<Result<Chunk, Status>>, fault: Option<Fault>) -> ChunkStream {
    match fault {
        Some(Fault::NoTrailer) => {
            messages.pop();
        }
        Some(Fault::DataAfterTrailer) => messages.push(message(chunk::Kind::Data(b"x".to_vec()))),
        Some(Fault::FailMidway(code)) => {
            messages.truncate(messages.len() / 2);
            messages.push(Err(Status::new(
                code,
                "the worker died; see the agent's log",
            )));
        }
        _ => {}
    }
    Box::pin(futures::stream::iter(messages))
}

/// The dump's messages for `request`.
fn dump_messages(
    dump: &Dump,
    request: &DumpDatabaseRequest,
    fault: Option<Fault>,
) -> Vec<Result<Chunk, Status>> {
    if !request.unchanged_since.is_empty() && request.unchanged_since == dump.state {
        return vec![message(chunk::Kind::Trailer(Trailer {
            state: dump.state.clone(),
            unchanged: true,
            ..Trailer::default()
        }))];
    }
    let mut out: Vec<_> = data_chunks(&dump.data).collect();
    if fault == Some(Fault::SegmentEndInDump) {
        out.push(message(chunk::Kind::SegmentEnd(SegmentEnd {
            compressed_bytes: dump.data.len() as u64,
            sha256: sha256(&dump.data),
            ..SegmentEnd::default()
        })));
    }
    let digest = if fault == Some(Fault::WrongDigest) {
        sha256(b"other bytes")
    } else {
        sha256(&dump.data)
    };
    out.push(message(chunk::Kind::Trailer(Trailer {
        raw_bytes: dump.raw_bytes,
        compressed_bytes: dump.data.len() as u64,
        sha256: digest,
        state: dump.state.clone(),
        ..Trailer::default()
    })));
    out
}

/// The archive's messages for `request`.
fn archive_messages(
    store: &StoreFixture,
    request: &ArchiveStoreRequest,
    fault: Option<Fault>,
) -> Vec<Result<Chunk, Status>> {
    let mut out = Vec::new();
    let (mut raw, mut sent, mut reused) = (0, 0, 0);
    for (i, seg) in store.segments.iter().enumerate() {
        let fingerprint = seg.fingerprint.clone().unwrap_or_default();
        let offered = !fingerprint.is_empty() && request.reusable.contains(&fingerprint);
        if offered || (i == 0 && fault == Some(Fault::ReuseUnoffered)) {
            reused += 1;
            out.push(message(chunk::Kind::SegmentEnd(SegmentEnd {
                fingerprint,
                reused: true,
                ..SegmentEnd::default()
            })));
            continue;
        }
        out.extend(data_chunks(&seg.data));
        let digest = if i == 0 && fault == Some(Fault::WrongDigest) {
            sha256(b"other bytes")
        } else {
            sha256(&seg.data)
        };
        raw += seg.raw_bytes;
        sent += seg.data.len() as u64;
        out.push(message(chunk::Kind::SegmentEnd(SegmentEnd {
            fingerprint,
            reused: false,
            compressed_bytes: seg.data.len() as u64,
            sha256: digest,
            raw_bytes: seg.raw_bytes,
        })));
    }
    let segments = store.segments.len() as u64 + u64::from(fault == Some(Fault::WrongSegmentCount));
    out.push(message(chunk::Kind::Trailer(Trailer {
        raw_bytes: raw,
        compressed_bytes: sent,
        store: Some(StoreCounts {
            files: segments,
            ..StoreCounts::default()
        }),
        segments,
        reused_segments: reused,
        ..Trailer::default()
    })));
    out
}

/// Reads an upload stream: its header (the first message), then its data.
async fn upload<M, H>(
    mut stream: Streaming<M>,
    split: impl Fn(M) -> Option<Result<H, Vec<u8>>>,
) -> Result<(H, Vec<u8>), Status> {
    let first = stream.message().await?.and_then(&split);
    let Some(Ok(header)) = first else {
        return Err(Status::invalid_argument(
            "the stream must start with its header",
        ));
    };
    let mut data = Vec::new();
    while let Some(m) = stream.message().await? {
        match split(m) {
            Some(Err(d)) => data.extend_from_slice(&d),
            _ => return Err(Status::invalid_argument("one header, then data only")),
        }
    }
    Ok((header, data))
}

/// Whether `data` is the concatenation of segments with these sizes and digests.
fn matches_segments(header: &RestoreStoreHeader, data: &[u8]) -> bool {
    let mut rest = data;
    for d in &header.segments {
        let Ok(n) = usize::try_from(d.size) else {
            return false;
        };
        if rest.len() < n || sha256(&rest[..n]) != d.sha256 {
            return false;
        }
        rest = &rest[n..];
    }
    rest.is_empty()
}

impl Service {
    /// A SQL upload's digest and data; refused (as the agent refuses it) when they do not match.
    async fn sql_upload(
        &self,
        call: &str,
        request: Request<Streaming<RestoreDatabaseRequest>>,
    ) -> Result<(Vec<u8>, Vec<u8>), Status> {
        let (digest, data) = upload(request.into_inner(), |m: RestoreDatabaseRequest| {
            match m.kind? {
                restore_database_request::Kind::Header(h) => Some(Ok(h.sha256)),
                restore_database_request::Kind::Data(d) => Some(Err(d)),
            }
        })
        .await?;
        if sha256(&data) != digest {
            let s = Status::invalid_argument("the SQL does not match its sha256; nothing was run");
            return Err(self.refuse(call, Some(s)).unwrap_err());
        }
        Ok((digest, data))
    }
}

#[tonic::async_trait]
impl Agent for Service {
    async fn describe(
        &self,
        request: Request<DescribeRequest>,
    ) -> Result<Response<DescribeReply>, Status> {
        self.admit("Describe", &request)?;
        let inner = self.lock();
        let h = &inner.host;
        Ok(Response::new(DescribeReply {
            machine_id: h.machine_id.clone(),
            hostname: format!("{}.local", h.machine_id),
            address: inner.address.clone(),
            agent_version: "fake".to_owned(),
            docker_api_version: "1.23".to_owned(),
            database: h.database.clone(),
            store_paths: h
                .store_paths
                .iter()
                .map(|p| {
                    let written =
                        p.shared && inner.filesystems.lock().unwrap().contains(&p.fs_identity);
                    StorePath {
                        empty: p.empty && !written,
                        ..p.clone()
                    }
                })
                .collect(),
            running_platform_containers: h.running_platform_containers.clone(),
            hooks: h.hooks.clone(),
        }))
    }

    type DumpDatabaseStream = ChunkStream;

    async fn dump_database(
        &self,
        request: Request<DumpDatabaseRequest>,
    ) -> Result<Response<Self::DumpDatabaseStream>, Status> {
        self.admit("DumpDatabase", &request)?;
        let request = request.into_inner();
        let mut inner = self.lock();
        inner.calls.dumps.push(request.clone());
        let running = inner.host.database.as_ref().is_some_and(|d| d.running);
        let (Some(dump), true) = (&inner.dump, running) else {
            drop(inner);
            let s = Status::failed_precondition("the database container is not running here");
            return Err(self.refuse("DumpDatabase", Some(s)).unwrap_err());
        };
        let messages = dump_messages(dump, &request, inner.fault);
        Ok(Response::new(download(messages, inner.fault)))
    }

    type ArchiveStoreStream = ChunkStream;

    async fn archive_store(
        &self,
        request: Request<ArchiveStoreRequest>,
    ) -> Result<Response<Self::ArchiveStoreStream>, Status> {
        self.admit("ArchiveStore", &request)?;
        let request = request.into_inner();
        let mut inner = self.lock();
        inner.calls.archives.push(request.clone());
        let Some(store) = inner.stores.get(&request.path) else {
            drop(inner);
            let s =
                Status::permission_denied(format!("{} is not an allowed store path", request.path));
            return Err(self.refuse("ArchiveStore", Some(s)).unwrap_err());
        };
        let messages = archive_messages(store, &request, inner.fault);
        Ok(Response::new(download(messages, inner.fault)))
    }

    async fn restore_store(
        &self,
        request: Request<Streaming<RestoreStoreRequest>>,
    ) -> Result<Response<RestoreStoreReply>, Status> {
        self.admit("RestoreStore", &request)?;
        let (header, data) = upload(request.into_inner(), |m: RestoreStoreRequest| {
            match m.kind? {
                restore_store_request::Kind::Header(h) => Some(Ok(h)),
                restore_store_request::Kind::Data(d) => Some(Err(d)),
            }
        })
        .await?;
        let mut inner = self.lock();
        let refusal = match inner
            .host
            .store_paths
            .iter()
            .find(|p| p.path == header.path)
        {
            None => Some(Status::permission_denied(format!(
                "{} is not allowed",
                header.path
            ))),
            Some(_) if !matches_segments(&header, &data) => Some(Status::invalid_argument(
                "the archive does not match its segment digests; nothing was written",
            )),
            Some(p) if !p.empty && !header.overwrite => Some(Status::failed_precondition(format!(
                "{} is not empty; restore with overwrite",
                header.path
            ))),
            Some(_) => None,
        };
        if let Some(s) = refusal {
            drop(inner);
            return Err(self.refuse("RestoreStore", Some(s)).unwrap_err());
        }
        let filesystems = inner.filesystems.clone();
        for p in inner
            .host
            .store_paths
            .iter_mut()
            .filter(|p| p.path == header.path)
        {
            p.empty = false;
            if p.shared {
                filesystems.lock().unwrap().insert(p.fs_identity.clone());
            }
        }
        let reply = RestoreStoreReply {
            files: header.segments.len() as u64,
            dirs: 1,
            links: 0,
            bytes: data.len() as u64,
            warnings: Vec::new(),
        };
        inner.calls.store_restores.push((header, data));
        Ok(Response::new(reply))
    }

    async fn restore_database(
        &self,
        request: Request<Streaming<RestoreDatabaseRequest>>,
    ) -> Result<Response<RestoreDatabaseReply>, Status> {
        self.admit("RestoreDatabase", &request)?;
        let allowed = self.lock().host.restore_database;
        if !allowed {
            let s = Status::failed_precondition("database restores are off on this agent");
            return Err(self.refuse("RestoreDatabase", Some(s)).unwrap_err());
        }
        let (digest, data) = self.sql_upload("RestoreDatabase", request).await?;
        let reply = RestoreDatabaseReply {
            raw_bytes: 3 * data.len() as u64,
            duration_ms: 1,
            output_tail: String::new(),
        };
        self.lock().calls.database_restores.push((digest, data));
        Ok(Response::new(reply))
    }

    /// Loads nothing: checks the digest, then counts the dump's `COPY` rows as a database that
    /// loaded it whole would (`dump_rows::dump_tables`).
    async fn drill_database(
        &self,
        request: Request<Streaming<RestoreDatabaseRequest>>,
    ) -> Result<Response<DrillDatabaseReply>, Status> {
        self.admit("DrillDatabase", &request)?;
        let (_, data) = self.sql_upload("DrillDatabase", request).await?;
        let sql = zstd::decode_all(data.as_slice())
            .map_err(|e| Status::invalid_argument(format!("the SQL is not zstd: {e}")))?;
        let tables = crate::dump_rows::dump_tables(sql.as_slice())
            .map_err(|e| Status::internal(e.to_string()))?
            .into_iter()
            .map(|((database, table), rows)| TableRows {
                database,
                table,
                rows,
            })
            .collect();
        Ok(Response::new(DrillDatabaseReply {
            server_version_num: 130_023,
            raw_bytes: sql.len() as u64,
            duration_ms: 1,
            tables,
        }))
    }

    async fn probe_database_image(
        &self,
        request: Request<ProbeDatabaseImageRequest>,
    ) -> Result<Response<ProbeDatabaseImageReply>, Status> {
        self.admit("ProbeDatabaseImage", &request)?;
        let inner = self.lock();
        let Some(db) = &inner.host.database else {
            drop(inner);
            let s = Status::not_found("no database container on this host");
            return Err(self.refuse("ProbeDatabaseImage", Some(s)).unwrap_err());
        };
        Ok(Response::new(ProbeDatabaseImageReply {
            image: db.image.clone(),
            postgres_versions: inner.host.postgres_versions.clone(),
        }))
    }

    async fn run_hook(
        &self,
        request: Request<RunHookRequest>,
    ) -> Result<Response<RunHookReply>, Status> {
        self.admit("RunHook", &request)?;
        let name = request.into_inner().name;
        let mut inner = self.lock();
        if !inner.host.hooks.contains(&name) {
            drop(inner);
            let s = Status::new(Code::NotFound, format!("no hook {name}"));
            return Err(self.refuse("RunHook", Some(s)).unwrap_err());
        }
        inner.calls.hooks.push(name);
        Ok(Response::new(RunHookReply {
            duration_ms: 1,
            output_tail: String::new(),
        }))
    }
}
