//! A minimal agent client for benchmarks and manual checks: pulls a database dump or a store
//! archive from a running agent and writes the compressed stream to stdout; the trailer goes to
//! stderr as one line.
//!
//! Usage: `DEIS_BACKUP_TOKEN=… pull <host:port> dump` or `… pull <host:port> archive <path>`.
//! Invariants: exits non-zero unless the stream ended with a trailer whose sha256 and size match.

use std::io::Write;

use deis_backup_proto::v1::{
    ArchiveStoreRequest, DumpDatabaseRequest, agent_client::AgentClient, chunk,
};
use sha2::{Digest, Sha256};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let token = std::env::var("DEIS_BACKUP_TOKEN")?;
    let (addr, what) = match args.as_slice() {
        [addr, what, ..] => (addr.clone(), what.as_str()),
        _ => return Err("usage: pull <host:port> dump | archive <path>".into()),
    };
    let bearer: tonic::metadata::MetadataValue<_> = format!("Bearer {token}").parse()?;
    // Large HTTP/2 windows and frames: with the defaults (64 KiB window, 16 KiB frames) a fast
    // download spends its time on window updates and frame headers (the coordinator should do
    // the same).
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))?
        .initial_stream_window_size(8 << 20)
        .initial_connection_window_size(16 << 20)
        .max_frame_size(1 << 20)
        .connect()
        .await?;
    let mut client = AgentClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
        req.metadata_mut().insert("authorization", bearer.clone());
        Ok(req)
    })
    .max_decoding_message_size(16 << 20);
    let mut stream = match what {
        "dump" => client
            .dump_database(DumpDatabaseRequest {
                zstd_level: 0,
                ..Default::default()
            })
            .await?
            .into_inner(),
        "archive" => {
            let path = args.get(2).ok_or("archive needs a path")?.clone();
            client
                .archive_store(ArchiveStoreRequest {
                    path,
                    ..Default::default()
                })
                .await?
                .into_inner()
        }
        other => return Err(format!("unknown request {other}").into()),
    };
    let mut out = std::io::BufWriter::with_capacity(1 << 20, std::io::stdout().lock());
    // The dump's trailer covers all its data; an archive's segment ends cover their own data.
    let mut sha = Sha256::new();
    let mut segment = Sha256::new();
    let mut segments = 0u64;
    let mut n = 0u64;
    while let Some(c) = stream.message().await? {
        match c.kind {
            Some(chunk::Kind::Data(d)) => {
                sha.update(&d);
                segment.update(&d);
                n += d.len() as u64;
                out.write_all(&d)?;
            }
            Some(chunk::Kind::SegmentEnd(e)) => {
                segments += 1;
                if e.sha256 != segment.finalize_reset().to_vec() {
                    return Err("a segment does not match its data".into());
                }
            }
            Some(chunk::Kind::Trailer(t)) => {
                out.flush()?;
                let whole_ok = segments > 0 || t.sha256 == sha.finalize().to_vec();
                if !whole_ok || t.compressed_bytes != n || t.segments != segments {
                    return Err("the trailer does not match the data".into());
                }
                eprintln!(
                    "raw_bytes={} compressed_bytes={} duration_ms={} warnings={}",
                    t.raw_bytes,
                    t.compressed_bytes,
                    t.duration_ms,
                    t.warnings.len()
                );
                return Ok(());
            }
            None => return Err("an empty chunk".into()),
        }
    }
    Err("the stream ended without a trailer".into())
}
