//! The agent's Prometheus metrics: what it counts, and the plain-HTTP endpoint that serves them
//! (`--metrics-listen`, off by default).
//!
//! Invariants:
//! - One [`Metrics`] per agent, shared by the authenticator and the service. Counting never fails,
//!   never blocks a call and costs the same whether or not the endpoint is served.
//! - No label or value names a secret, a token, a path or a peer: the labels are the gRPC method,
//!   its status code and the agent's version.
//! - A call that reaches its method is counted once, when its outcome is known: an answer when it
//!   is returned; a download when its trailer or its error is handed to the transport, or as
//!   `CANCELLED` when the caller goes away first. A call refused by authentication never reaches
//!   its method: it is counted as an authentication failure only.
//! - The endpoint answers `GET /metrics` (and `HEAD`) only, reads no request body, asks no
//!   authentication (it carries no secret), and holds at most [`MAX_CONNECTIONS`] connections, each
//!   for at most [`CONNECTION_TIMEOUT`].

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use deis_backup_proto::v1::{Chunk, chunk};
use futures::{Stream, StreamExt};
use http_body_util::Full;
use hyper::body::Body;
use hyper::{Method, StatusCode, header};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tonic::{Code, Status};

use crate::error::{Error, Result};

/// The media type of the OpenMetrics text the endpoint serves (Prometheus asks for it first).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Connections the endpoint serves at once; a scraper needs one.
pub const MAX_CONNECTIONS: usize = 4;
/// Longest a connection is held, request and answer together.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);

/// A method of the agent's gRPC service, as the `call` label names it.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum Call {
    Describe,
    DumpDatabase,
    ArchiveStore,
    RestoreStore,
    RestoreDatabase,
    RunHook,
    DrillDatabase,
    ProbeDatabaseImage,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    call: Call,
    code: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StreamLabels {
    call: Call,
}

/// A gRPC status code as the gRPC specification names it (`OK`, `UNAUTHENTICATED`, …).
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Everything the agent counts, and the registry that encodes it.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    calls: Family<CallLabels, Counter>,
    sent: Family<StreamLabels, Counter>,
    received: Family<StreamLabels, Counter>,
    authentication_failures: Counter,
    last_dump: Gauge<f64, AtomicU64>,
    last_archive: Gauge<f64, AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut m = Self {
            registry: Registry::default(),
            calls: Family::default(),
            sent: Family::default(),
            received: Family::default(),
            authentication_failures: Counter::default(),
            last_dump: Gauge::default(),
            last_archive: Gauge::default(),
        };
        // The streams' byte counters start at 0, so a rate over them exists before the first one.
        for call in [Call::DumpDatabase, Call::ArchiveStore] {
            m.sent.get_or_create_owned(&StreamLabels { call });
        }
        for call in [
            Call::RestoreStore,
            Call::RestoreDatabase,
            Call::DrillDatabase,
        ] {
            m.received.get_or_create_owned(&StreamLabels { call });
        }
        let r = &mut m.registry;
        r.register(
            "deis_backup_agent",
            "The agent's version",
            Info::new([("version", crate::VERSION)]),
        );
        r.register(
            "deis_backup_agent_calls",
            "Calls served, by gRPC method and status code (for a download: how its stream ended)",
            m.calls.clone(),
        );
        r.register_with_unit(
            "deis_backup_agent_sent",
            "Data bytes sent in download streams (compressed, as on the wire, before gRPC framing)",
            Unit::Bytes,
            m.sent.clone(),
        );
        r.register_with_unit(
            "deis_backup_agent_received",
            "Data bytes received in restore streams (compressed, before gRPC framing)",
            Unit::Bytes,
            m.received.clone(),
        );
        r.register(
            "deis_backup_agent_authentication_failures",
            "Calls refused for their client certificate or bearer token",
            m.authentication_failures.clone(),
        );
        r.register_with_unit(
            "deis_backup_agent_last_dump_duration",
            "Duration of the last complete database dump that sent data, from the call to its \
             trailer (0 before the first)",
            Unit::Seconds,
            m.last_dump.clone(),
        );
        r.register_with_unit(
            "deis_backup_agent_last_archive_duration",
            "Duration of the last complete store archive, from the call to its trailer (0 before \
             the first)",
            Unit::Seconds,
            m.last_archive.clone(),
        );
        m
    }

    /// Counts a call refused by authentication.
    pub fn authentication_failed(&self) {
        self.authentication_failures.inc();
    }

    /// Starts counting a call that reached its method.
    pub fn call(self: &Arc<Self>, call: Call) -> CallGuard {
        CallGuard {
            metrics: self.clone(),
            call,
            start: Instant::now(),
            done: false,
        }
    }

    /// The counter of data bytes an upload `call` receives.
    pub fn received(&self, call: Call) -> Counter {
        self.received.get_or_create(&StreamLabels { call }).clone()
    }

    /// The metrics as OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

/// One call being served; counted once, with the code it ends with (`CANCELLED` when dropped
/// before an outcome).
#[derive(Debug)]
pub struct CallGuard {
    metrics: Arc<Metrics>,
    call: Call,
    start: Instant,
    done: bool,
}

impl CallGuard {
    /// Counts a call that answers once (unary, or an upload) by its answer, and passes it on.
    pub fn answer<T>(
        mut self,
        answer: std::result::Result<T, Status>,
    ) -> std::result::Result<T, Status> {
        self.finish(
            answer.as_ref().map_or_else(Status::code, |_| Code::Ok),
            false,
        );
        answer
    }

    /// A download: an error now is counted now; a stream is counted as it ends.
    pub fn download<S>(
        mut self,
        answer: std::result::Result<tonic::Response<S>, Status>,
    ) -> std::result::Result<tonic::Response<Counted<S>>, Status>
    where
        S: Stream<Item = std::result::Result<Chunk, Status>> + Unpin,
    {
        match answer {
            Ok(response) => {
                let sent = self
                    .metrics
                    .sent
                    .get_or_create_owned(&StreamLabels { call: self.call });
                Ok(response.map(|inner| Counted {
                    inner,
                    sent,
                    guard: self,
                }))
            }
            Err(status) => {
                self.finish(status.code(), false);
                Err(status)
            }
        }
    }

    /// Counts the outcome, once; a complete dump (one that sent data) or archive sets its
    /// duration.
    fn finish(&mut self, code: Code, unchanged: bool) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let m = &self.metrics;
        m.calls
            .get_or_create(&CallLabels {
                call: self.call,
                code: code_name(code),
            })
            .inc();
        let duration = match self.call {
            Call::DumpDatabase if !unchanged => Some(&m.last_dump),
            Call::ArchiveStore => Some(&m.last_archive),
            _ => None,
        };
        if let Some(gauge) = duration.filter(|_| code == Code::Ok) {
            gauge.set(self.start.elapsed().as_secs_f64());
        }
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        self.finish(Code::Cancelled, false);
    }
}

/// A download stream that counts its data bytes and its end.
#[derive(Debug)]
pub struct Counted<S> {
    inner: S,
    sent: Counter,
    guard: CallGuard,
}

impl<S> Stream for Counted<S>
where
    S: Stream<Item = std::result::Result<Chunk, Status>> + Unpin,
{
    type Item = std::result::Result<Chunk, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let item = self.inner.poll_next_unpin(cx);
        if let Poll::Ready(Some(result)) = &item {
            match result {
                Ok(Chunk {
                    kind: Some(chunk::Kind::Data(d)),
                }) => {
                    self.sent.inc_by(d.len() as u64);
                }
                Ok(Chunk {
                    kind: Some(chunk::Kind::Trailer(t)),
                }) => {
                    let unchanged = t.unchanged;
                    self.guard.finish(Code::Ok, unchanged);
                }
                Ok(_) => {}
                Err(status) => {
                    let code = status.code();
                    self.guard.finish(code, false);
                }
            }
        }
        item
    }
}

/// Binds the endpoint's address (at start, so a taken port stops the agent with a clear error).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| Error::Config {
        what: format!("cannot serve metrics on {addr}: {e}"),
    })
}

/// Serves `GET /metrics` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "metrics: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Over the limit: closed at once (a scraper retries at its next interval).
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let answer = respond(&req, &metrics);
                async move { Ok::<_, Infallible>(answer) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .keep_alive(false)
                .max_buf_size(16 << 10)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, conn).await;
            drop(slot);
        });
    }
}

/// The answer to one request: the metrics for `GET /metrics`, a short error otherwise.
fn respond<B: Body>(req: &hyper::Request<B>, metrics: &Metrics) -> hyper::Response<Full<Bytes>> {
    let plain = |status: StatusCode, text: &'static str| {
        let mut r = hyper::Response::new(Full::new(Bytes::from_static(text.as_bytes())));
        *r.status_mut() = status;
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        r
    };
    if req.uri().path() != "/metrics" {
        return plain(StatusCode::NOT_FOUND, "only /metrics is served here\n");
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = plain(StatusCode::METHOD_NOT_ALLOWED, "only GET /metrics\n");
        r.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    if req.body().size_hint().exact() != Some(0) {
        return plain(
            StatusCode::PAYLOAD_TOO_LARGE,
            "GET /metrics takes no body\n",
        );
    }
    let mut r = hyper::Response::new(Full::new(Bytes::from(metrics.encode())));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(CONTENT_TYPE),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use deis_backup_proto::v1::Trailer;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn data(n: usize) -> Chunk {
        Chunk {
            kind: Some(chunk::Kind::Data(vec![0; n])),
        }
    }

    fn trailer(unchanged: bool) -> Chunk {
        Chunk {
            kind: Some(chunk::Kind::Trailer(Trailer {
                unchanged,
                ..Trailer::default()
            })),
        }
    }

    /// The sample lines of the encoding, without the comments.
    fn samples(m: &Metrics) -> Vec<String> {
        m.encode()
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(String::from)
            .collect()
    }

    async fn drain<S: Stream + Unpin>(mut s: S) {
        while s.next().await.is_some() {}
    }

    #[test]
    fn a_fresh_agent_shows_every_metric_at_zero_and_its_version() {
        let text = Metrics::new().encode();
        let version = format!("deis_backup_agent_info{{version=\"{}\"}} 1", crate::VERSION);
        for line in [
            "# TYPE deis_backup_agent info",
            &version,
            "# TYPE deis_backup_agent_sent_bytes counter",
            "# UNIT deis_backup_agent_sent_bytes bytes",
            "deis_backup_agent_sent_bytes_total{call=\"DumpDatabase\"} 0",
            "deis_backup_agent_sent_bytes_total{call=\"ArchiveStore\"} 0",
            "deis_backup_agent_received_bytes_total{call=\"RestoreStore\"} 0",
            "deis_backup_agent_received_bytes_total{call=\"RestoreDatabase\"} 0",
            "deis_backup_agent_authentication_failures_total 0",
            "# UNIT deis_backup_agent_last_dump_duration_seconds seconds",
            "deis_backup_agent_last_dump_duration_seconds 0.0",
            "deis_backup_agent_last_archive_duration_seconds 0.0",
        ] {
            assert!(text.lines().any(|l| l == line), "no `{line}` in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
        // A family with no series yet is left out: no call has an outcome.
        assert!(!text.contains("deis_backup_agent_calls"), "{text}");
    }

    #[tokio::test]
    async fn calls_are_counted_once_by_their_outcome() {
        let m = Arc::new(Metrics::new());
        m.authentication_failed();
        m.authentication_failed();
        let _ = m.call(Call::Describe).answer(Ok(()));
        let _ = m
            .call(Call::RunHook)
            .answer::<()>(Err(Status::not_found("no hook")));
        // A call whose future is dropped (the caller went away) is cancelled.
        drop(m.call(Call::RestoreStore));
        m.received(Call::RestoreStore).inc_by(5);

        // A dump streamed to its trailer: its bytes, OK, and its duration.
        let stream = futures::stream::iter([Ok(data(3)), Ok(data(4)), Ok(trailer(false))]);
        let response = m
            .call(Call::DumpDatabase)
            .download(Ok(tonic::Response::new(stream)))
            .unwrap();
        drain(response.into_inner()).await;
        // An archive that fails midway, one refused at once, one the caller drops.
        let failing = futures::stream::iter([Ok(data(10)), Err(Status::internal("disk"))]);
        let response = m
            .call(Call::ArchiveStore)
            .download(Ok(tonic::Response::new(failing)))
            .unwrap();
        drain(response.into_inner()).await;
        let refused = m
            .call(Call::ArchiveStore)
            .download::<futures::stream::Empty<_>>(Err(Status::permission_denied("allow-list")));
        assert!(refused.is_err());
        let abandoned = futures::stream::iter([Ok(data(1)), Ok(trailer(false))]);
        let mut s = m
            .call(Call::ArchiveStore)
            .download(Ok(tonic::Response::new(abandoned)))
            .unwrap()
            .into_inner();
        assert!(s.next().await.is_some());
        drop(s);

        let lines = samples(&m);
        for want in [
            "deis_backup_agent_authentication_failures_total 2",
            "deis_backup_agent_calls_total{call=\"Describe\",code=\"OK\"} 1",
            "deis_backup_agent_calls_total{call=\"RunHook\",code=\"NOT_FOUND\"} 1",
            "deis_backup_agent_calls_total{call=\"RestoreStore\",code=\"CANCELLED\"} 1",
            "deis_backup_agent_calls_total{call=\"DumpDatabase\",code=\"OK\"} 1",
            "deis_backup_agent_calls_total{call=\"ArchiveStore\",code=\"INTERNAL\"} 1",
            "deis_backup_agent_calls_total{call=\"ArchiveStore\",code=\"PERMISSION_DENIED\"} 1",
            "deis_backup_agent_calls_total{call=\"ArchiveStore\",code=\"CANCELLED\"} 1",
            "deis_backup_agent_sent_bytes_total{call=\"DumpDatabase\"} 7",
            "deis_backup_agent_sent_bytes_total{call=\"ArchiveStore\"} 11",
            "deis_backup_agent_received_bytes_total{call=\"RestoreStore\"} 5",
            // No archive completed.
            "deis_backup_agent_last_archive_duration_seconds 0.0",
        ] {
            assert!(
                lines.iter().any(|l| l == want),
                "no `{want}` in\n{lines:#?}"
            );
        }
        let dump = lines
            .iter()
            .find_map(|l| l.strip_prefix("deis_backup_agent_last_dump_duration_seconds "))
            .unwrap();
        assert!(dump.parse::<f64>().unwrap() > 0.0, "{dump}");
    }

    #[tokio::test]
    async fn an_unchanged_dump_keeps_the_last_duration() {
        let m = Arc::new(Metrics::new());
        let unchanged = futures::stream::iter([Ok(trailer(true))]);
        let r = m
            .call(Call::DumpDatabase)
            .download(Ok(tonic::Response::new(unchanged)))
            .unwrap();
        drain(r.into_inner()).await;
        let lines = samples(&m);
        assert!(
            lines.contains(&"deis_backup_agent_last_dump_duration_seconds 0.0".to_owned()),
            "{lines:#?}"
        );
        assert!(
            lines.contains(
                &"deis_backup_agent_calls_total{call=\"DumpDatabase\",code=\"OK\"} 1".to_owned()
            ),
            "{lines:#?}"
        );
    }

    /// One raw HTTP/1.1 exchange with the endpoint: the status line and the whole answer.
    async fn exchange(addr: SocketAddr, request: &str) -> (String, String) {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).await.unwrap();
        let status = answer.lines().next().unwrap_or_default().to_owned();
        (status, answer)
    }

    #[tokio::test]
    async fn the_endpoint_serves_only_get_metrics_without_a_body() {
        let m = Arc::new(Metrics::new());
        m.authentication_failed();
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve(listener, m));

        let (status, answer) = exchange(addr, "GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n").await;
        assert_eq!(status, "HTTP/1.1 200 OK", "{answer}");
        assert!(answer.contains(CONTENT_TYPE), "{answer}");
        assert!(
            answer.contains("\ndeis_backup_agent_authentication_failures_total 1\n"),
            "{answer}"
        );
        assert!(answer.ends_with("# EOF\n"), "{answer}");

        for (request, want) in [
            ("GET / HTTP/1.1\r\nHost: a\r\n\r\n", "404"),
            ("GET /metrics/x HTTP/1.1\r\nHost: a\r\n\r\n", "404"),
            (
                "POST /metrics HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",
                "405",
            ),
            (
                "GET /metrics HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc",
                "413",
            ),
            (
                "GET /metrics HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                "413",
            ),
        ] {
            let (status, answer) = exchange(addr, request).await;
            assert!(status.contains(want), "{request:?}: {answer}");
            assert!(
                !answer.contains("deis_backup_agent"),
                "{request:?}: {answer}"
            );
        }
        server.abort();
    }
}
