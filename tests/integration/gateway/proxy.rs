//! A loopback HTTP proxy in front of the gateway that misbehaves on purpose: it stands in for Ceph
//! Hammer (refusing `AWS4-HMAC-SHA256` requests) and for an overloaded or flaky gateway (answering
//! `503 SlowDown`, cutting connections in the middle of a response), or holding object downloads
//! until released (so something can change at the source between a listing and its downloads).
//!
//! Invariants: it listens on 127.0.0.1 only and forwards only to the given upstream; every request
//! gets its own upstream connection (`Connection: close` is forced), so every request is judged;
//! faults are bounded by `max_faults` so a run always finishes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the proxy does to requests.
#[derive(Debug, Clone, Copy, Default)]
pub struct Behaviour {
    /// Answer 403 AccessDenied to SigV4-signed requests (Hammer does not know V4).
    pub reject_v4: bool,
    /// Chance of answering `503 SlowDown` instead of forwarding.
    pub p_slow_down: f64,
    /// Chance of cutting the connection after part of the response.
    pub p_reset: f64,
    /// At most this many injected faults in all.
    pub max_faults: u64,
}

/// Counts of what the proxy did.
#[derive(Debug, Default)]
pub struct Counts {
    pub requests: AtomicU64,
    /// Requests signed with SigV4 (`AWS4-HMAC-SHA256`), SigV2 (`Authorization: AWS key:sig`), or
    /// neither.
    pub signed_v4: AtomicU64,
    pub signed_v2: AtomicU64,
    pub unsigned: AtomicU64,
    pub rejected_v4: AtomicU64,
    pub slow_downs: AtomicU64,
    pub resets: AtomicU64,
    /// Object GETs that waited at the gate.
    pub held: AtomicU64,
}

pub struct Proxy {
    pub addr: SocketAddr,
    pub counts: Arc<Counts>,
    /// Closed (true): object GETs wait until [`Proxy::open_gate`]. Open from the start unless
    /// started with [`Proxy::start_gated`].
    gate: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Proxy {
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn start(upstream: SocketAddr, behaviour: Behaviour) -> Proxy {
        Self::start_with(upstream, behaviour, false).await
    }

    /// A proxy that holds every object GET (a download, not a listing) until
    /// [`Proxy::open_gate`]; the others pass.
    pub async fn start_gated(upstream: SocketAddr) -> Proxy {
        Self::start_with(upstream, Behaviour::default(), true).await
    }

    async fn start_with(upstream: SocketAddr, behaviour: Behaviour, closed: bool) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let counts = Arc::new(Counts::default());
        let (gate, _) = tokio::sync::watch::channel(closed);
        let c = Arc::clone(&counts);
        let g = gate.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let c = Arc::clone(&c);
                let closed = g.subscribe();
                tokio::spawn(async move {
                    let _ = serve(client, upstream, behaviour, &c, closed).await;
                });
            }
        });
        Proxy {
            addr,
            counts,
            gate,
            task,
        }
    }

    /// Lets held and later object GETs through.
    pub fn open_gate(&self) {
        self.gate.send_replace(false);
    }
}

/// Whether the request line is a GET of an object (`GET /bucket/key`), not of a bucket (a listing).
fn is_object_get(head: &str) -> bool {
    let line = head.lines().next().unwrap_or_default();
    let Some(target) = line.strip_prefix("GET ") else {
        return false;
    };
    let path = target.split([' ', '?']).next().unwrap_or_default();
    path.trim_start_matches('/')
        .split_once('/')
        .is_some_and(|(_, key)| !key.is_empty())
}

/// How the request with this head is signed: "v4", "v2", or `None` (the `Authorization` header;
/// a presigned URL carries the same marks in its query).
fn signature_of(head: &str) -> Option<&'static str> {
    let request_line = head.lines().next().unwrap_or_default();
    let authorization = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("authorization"))
        .map(|(_, value)| value.trim());
    if authorization.is_some_and(|a| a.starts_with("AWS4-HMAC-SHA256 "))
        || request_line.contains("X-Amz-Algorithm=AWS4-HMAC-SHA256")
    {
        Some("v4")
    } else if authorization.is_some_and(|a| a.starts_with("AWS "))
        || request_line.contains("Signature=")
    {
        Some("v2")
    } else {
        None
    }
}

fn faults(c: &Counts) -> u64 {
    c.slow_downs.load(Ordering::Relaxed) + c.resets.load(Ordering::Relaxed)
}

async fn serve(
    mut client: TcpStream,
    upstream: SocketAddr,
    b: Behaviour,
    c: &Counts,
    mut closed: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()> {
    // Read the request head.
    let mut buf = Vec::with_capacity(8192);
    let head_end = loop {
        let mut chunk = [0u8; 8192];
        let n = client.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > 1 << 20 {
            return Ok(());
        }
    };
    c.requests.fetch_add(1, Ordering::Relaxed);
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    match signature_of(&head) {
        Some("v4") => &c.signed_v4,
        Some(_) => &c.signed_v2,
        None => &c.unsigned,
    }
    .fetch_add(1, Ordering::Relaxed);
    let body_start = buf[head_end..].to_vec();
    if *closed.borrow() && is_object_get(&head) {
        c.held.fetch_add(1, Ordering::Relaxed);
        let _ = closed.wait_for(|closed| !closed).await;
    }

    if b.reject_v4 && head.contains("AWS4-HMAC-SHA256") {
        c.rejected_v4.fetch_add(1, Ordering::Relaxed);
        let body =
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>AccessDenied</Code></Error>";
        let resp = format!(
            "HTTP/1.1 403 Forbidden\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        client.write_all(resp.as_bytes()).await?;
        return client.shutdown().await;
    }
    let roll = fastrand::f64();
    let can_fault = faults(c) < b.max_faults;
    if can_fault && roll < b.p_slow_down {
        c.slow_downs.fetch_add(1, Ordering::Relaxed);
        let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>";
        let resp = format!(
            "HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        client.write_all(resp.as_bytes()).await?;
        return client.shutdown().await;
    }
    let reset = can_fault && roll < b.p_slow_down + b.p_reset;

    // Forward with `Connection: close`, so the next request comes on a new connection.
    let mut forwarded = String::new();
    for line in head.split("\r\n").filter(|l| !l.is_empty()) {
        if line.to_ascii_lowercase().starts_with("connection:") {
            continue;
        }
        forwarded.push_str(line);
        forwarded.push_str("\r\n");
    }
    forwarded.push_str("Connection: close\r\n\r\n");
    let mut up = TcpStream::connect(upstream).await?;
    up.write_all(forwarded.as_bytes()).await?;
    up.write_all(&body_start).await?;
    if reset {
        c.resets.fetch_add(1, Ordering::Relaxed);
        // Send the request body on, pass back part of the answer, then drop both sides.
        let (mut cr, mut cw) = client.split();
        let (mut ur, mut uw) = up.split();
        let to_up = tokio::io::copy(&mut cr, &mut uw);
        let cut = async {
            let mut sent = 0usize;
            let limit = 200 + fastrand::usize(0..4000);
            let mut chunk = [0u8; 1024];
            while sent < limit {
                let n = ur.read(&mut chunk).await?;
                if n == 0 {
                    break;
                }
                let n = n.min(limit - sent);
                cw.write_all(&chunk[..n]).await?;
                sent += n;
            }
            Ok::<_, std::io::Error>(())
        };
        tokio::select! {
            _ = to_up => {}
            _ = cut => {}
        }
        return Ok(());
    }
    tokio::io::copy_bidirectional(&mut client, &mut up).await?;
    Ok(())
}
