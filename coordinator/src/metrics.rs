//! `snapshot --metrics-file`: the run's figures for Prometheus, as a file node_exporter's textfile
//! collector reads.
//!
//! Owns: the names of the coordinator's metrics (`docs/FORMAT.md` lists them) and writing the
//! file.
//! Invariants:
//! - The file is replaced atomically (written beside it, then renamed): a collector never reads
//!   half of it. Mode 644: it holds no secret, only counts, sizes, times and part and bucket names.
//! - Every metric is a gauge of the last run (or of the repository after it); names follow
//!   Prometheus' conventions (`deis_backup_…`, `_seconds`, `_bytes`, `_ratio`).

use std::path::Path;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use time::OffsetDateTime;

use crate::error::{Error, Result};
use crate::history::{Outcome, Run};
use crate::repository::Manifest;
use crate::s3;
use crate::snapshot;

/// What the file is made from.
#[derive(Debug, Default)]
pub struct Figures<'a> {
    /// The run just ended.
    pub run: Option<&'a Run>,
    /// When the last complete snapshot completed (this run's, or an earlier one's).
    pub last_success: Option<OffsetDateTime>,
    /// This run's snapshot, when it completed.
    pub outcome: Option<&'a snapshot::Outcome>,
    /// What the gateway client did.
    pub gateway: Option<s3::Stats>,
    /// The repository after the run: complete snapshots and the bytes of its blobs.
    pub repository: Option<(u64, u64)>,
}

type Labelled = Family<Vec<(String, String)>, Gauge<f64, std::sync::atomic::AtomicU64>>;

fn seconds(t: OffsetDateTime) -> f64 {
    #[expect(
        clippy::cast_precision_loss,
        reason = "seconds since 1970 fit an f64's 52 bits"
    )]
    let s = t.unix_timestamp() as f64;
    s + f64::from(t.nanosecond()) / 1e9
}

#[expect(
    clippy::cast_precision_loss,
    reason = "byte and object counts far below 2^52"
)]
fn float(n: u64) -> f64 {
    n as f64
}

fn gauge(registry: &mut Registry, name: &str, help: &str) -> Labelled {
    let family = Labelled::default();
    registry.register(name, help, family.clone());
    family
}

fn set(family: &Labelled, labels: &[(&str, &str)], value: f64) {
    let labels = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    family.get_or_create(&labels).set(value);
}

/// The text of the file.
pub fn render(f: &Figures<'_>) -> String {
    let mut r = Registry::default();
    if let Some(run) = f.run {
        run_figures(&mut r, run);
    }
    if let Some(t) = f.last_success {
        let g = gauge(
            &mut r,
            "deis_backup_last_success_timestamp_seconds",
            "When the last complete snapshot completed.",
        );
        set(&g, &[], seconds(t));
    }
    if let Some(o) = f.outcome {
        snapshot_figures(&mut r, &o.manifest, o);
        spread_figures(&mut r, &o.manifest, o);
    }
    if let Some(s) = f.gateway {
        let g = gauge(
            &mut r,
            "deis_backup_last_run_gateway_requests",
            "Requests the last run sent the gateway, by what became of them: sent, retried, \
             throttled (the gateway said it was overloaded).",
        );
        set(&g, &[("kind", "sent")], float(s.requests));
        set(&g, &[("kind", "retried")], float(s.retries));
        set(&g, &[("kind", "throttled")], float(s.overloads));
    }
    if let Some((snapshots, bytes)) = f.repository {
        let g = gauge(
            &mut r,
            "deis_backup_repository_snapshots",
            "Complete snapshots in the repository.",
        );
        set(&g, &[], float(snapshots));
        let g = gauge(
            &mut r,
            "deis_backup_repository_blob_bytes",
            "Bytes of every blob stored in the repository.",
        );
        set(&g, &[], float(bytes));
    }
    let mut text = String::new();
    encode(&mut text, &r).expect("writing to a String");
    text
}

fn run_figures(r: &mut Registry, run: &Run) {
    let labels = [("command", run.command.as_str())];
    let ended = run.ended.unwrap_or(run.started);
    let g = gauge(
        r,
        "deis_backup_last_run_timestamp_seconds",
        "When the last run ended.",
    );
    set(&g, &labels, seconds(ended));
    let g = gauge(
        r,
        "deis_backup_last_run_success",
        "1 when the last run completed, 0 when it failed or was refused.",
    );
    set(
        &g,
        &labels,
        if run.outcome == Outcome::Complete {
            1.0
        } else {
            0.0
        },
    );
    let g = gauge(
        r,
        "deis_backup_last_run_duration_seconds",
        "How long the last run took.",
    );
    set(&g, &labels, (ended - run.started).as_seconds_f64());
}

fn snapshot_figures(r: &mut Registry, m: &Manifest, o: &snapshot::Outcome) {
    let part_bytes = gauge(
        r,
        "deis_backup_snapshot_part_bytes",
        "Stored bytes of each part of the last snapshot.",
    );
    for (name, part) in &m.parts {
        set(&part_bytes, &[("part", name)], float(part.size()));
    }
    let objects = gauge(
        r,
        "deis_backup_snapshot_bucket_objects",
        "Objects of each bucket in the last snapshot, by how they were taken: downloaded, or reused from the previous snapshot.",
    );
    let bytes = gauge(
        r,
        "deis_backup_snapshot_bucket_bytes",
        "Bytes of each bucket in the last snapshot: all, and downloaded.",
    );
    let (mut listed, mut reused) = (0u64, 0u64);
    for (bucket, s) in &o.buckets {
        set(
            &objects,
            &[("bucket", bucket), ("how", "downloaded")],
            float(s.downloaded_objects),
        );
        set(
            &objects,
            &[("bucket", bucket), ("how", "reused")],
            float(s.unchanged_objects),
        );
        set(
            &bytes,
            &[("bucket", bucket), ("how", "all")],
            float(s.bytes),
        );
        set(
            &bytes,
            &[("bucket", bucket), ("how", "downloaded")],
            float(s.downloaded_bytes),
        );
        listed += s.objects;
        reused += s.unchanged_objects;
    }
    let ratio = if listed == 0 {
        0.0
    } else {
        float(reused) / float(listed)
    };
    set(
        &gauge(
            r,
            "deis_backup_snapshot_reused_objects_ratio",
            "Share of the last snapshot's bucket objects carried over from the previous one.",
        ),
        &[],
        ratio,
    );
}

/// Per store-gateway requests and the snapshot's warnings.
fn spread_figures(r: &mut Registry, m: &Manifest, o: &snapshot::Outcome) {
    let per_gateway = gauge(
        r,
        "deis_backup_snapshot_gateway_requests",
        "Requests the last snapshot sent each store-gateway, by outcome: sent, failed (retried).",
    );
    for g in &o.gateways {
        set(
            &per_gateway,
            &[("endpoint", &g.endpoint), ("outcome", "sent")],
            float(g.requests),
        );
        set(
            &per_gateway,
            &[("endpoint", &g.endpoint), ("outcome", "failed")],
            float(g.failures),
        );
    }
    set(
        &gauge(
            r,
            "deis_backup_snapshot_warnings",
            "Warnings of the last snapshot as a whole, such as a host that did not take part.",
        ),
        &[],
        float(m.warnings.len() as u64),
    );
}

/// Replaces the file at `path` with `text`, atomically.
pub fn write(path: &Path, text: &str) -> Result<()> {
    use std::io::Write as _;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let what = format!("write the metrics file {}", path.display());
    let mut tmp = tempfile::Builder::new()
        .prefix(".deis-backup-metrics-")
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .tempfile_in(dir)
        .map_err(|e| Error::io(&what, e))?;
    tmp.write_all(text.as_bytes())
        .map_err(|e| Error::io(&what, e))?;
    tmp.as_file().sync_all().map_err(|e| Error::io(&what, e))?;
    tmp.persist(path).map_err(|e| Error::io(&what, e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{Command, Moved};
    use crate::mirror::MirrorStats;
    use std::collections::BTreeMap;

    #[test]
    #[expect(
        clippy::float_cmp,
        clippy::too_many_lines,
        reason = "whole numbers compare exactly; one scrape, checked metric by metric"
    )]
    fn the_file_parses_and_carries_the_runs_figures() {
        let mut run = Run::start(Command::Snapshot);
        run.end(Ok(Moved::default()));
        let manifest: Manifest = serde_json::from_value(serde_json::json!({
            "format": crate::repository::format::FORMAT,
            "id": "20261124T233000.123Z-abcd",
            "started": "2026-11-24T23:30:00Z",
            "completed": "2026-11-24T23:31:00Z",
            "parts": {"database/pg_dumpall.sql.zst": {"sha256": "a".repeat(64), "size": 1234}},
        }))
        .unwrap();
        let outcome = snapshot::Outcome {
            manifest,
            buckets: BTreeMap::from([(
                "db_wal".to_owned(),
                MirrorStats {
                    objects: 10,
                    bytes: 1000,
                    downloaded_objects: 4,
                    downloaded_bytes: 400,
                    unchanged_objects: 6,
                    ..MirrorStats::default()
                },
            )]),
            gateways: vec![s3::EndpointStats {
                endpoint: "http://10.0.0.2:8888".to_owned(),
                requests: 11,
                failures: 1,
            }],
        };
        let text = render(&Figures {
            run: Some(&run),
            last_success: run.ended,
            outcome: Some(&outcome),
            gateway: Some(s3::Stats {
                requests: 20,
                retries: 2,
                overloads: 1,
                ..s3::Stats::default()
            }),
            repository: Some((3, 99_999)),
        });
        let lines: Vec<_> = text.lines().map(|l| Ok(l.to_owned())).collect();
        let scrape = prometheus_parse::Scrape::parse(lines.into_iter()).unwrap();
        let value = |name: &str, labels: &[(&str, &str)]| -> f64 {
            let s = scrape
                .samples
                .iter()
                .find(|s| {
                    s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
                })
                .unwrap_or_else(|| panic!("no {name} {labels:?} in\n{text}"));
            match s.value {
                prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Untyped(v) => v,
                ref other => panic!("{name}: {other:?}"),
            }
        };
        assert_eq!(
            value("deis_backup_last_run_success", &[("command", "snapshot")]),
            1.0
        );
        assert_eq!(
            value(
                "deis_backup_snapshot_part_bytes",
                &[("part", "database/pg_dumpall.sql.zst")]
            ),
            1234.0
        );
        assert_eq!(
            value(
                "deis_backup_snapshot_bucket_objects",
                &[("bucket", "db_wal"), ("how", "reused")]
            ),
            6.0
        );
        assert_eq!(
            value(
                "deis_backup_snapshot_bucket_bytes",
                &[("bucket", "db_wal"), ("how", "downloaded")]
            ),
            400.0
        );
        assert!((value("deis_backup_snapshot_reused_objects_ratio", &[]) - 0.6).abs() < 1e-9);
        let gw = [("endpoint", "http://10.0.0.2:8888")];
        assert_eq!(
            value(
                "deis_backup_snapshot_gateway_requests",
                &[gw[0], ("outcome", "sent")]
            ),
            11.0
        );
        assert_eq!(
            value(
                "deis_backup_snapshot_gateway_requests",
                &[gw[0], ("outcome", "failed")]
            ),
            1.0
        );
        assert_eq!(value("deis_backup_snapshot_warnings", &[]), 0.0);
        assert_eq!(
            value(
                "deis_backup_last_run_gateway_requests",
                &[("kind", "throttled")]
            ),
            1.0
        );
        assert_eq!(value("deis_backup_repository_blob_bytes", &[]), 99_999.0);
        let ended = run.ended.unwrap();
        assert!(
            (value("deis_backup_last_success_timestamp_seconds", &[]) - seconds(ended)).abs()
                < 1e-3
        );

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("deis_backup.prom");
        write(&path, &text).unwrap();
        write(&path, &text).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&path).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o644);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temporary file left"
        );
    }
}
