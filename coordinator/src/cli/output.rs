//! What the CLI prints: aligned tables and sizes for people, or one JSON document per command with
//! `--json`. Results go to stdout; logs and progress go to stderr.
//!
//! Invariant: nothing printed here comes from a secret (manifests, listings and agent
//! descriptions hold none).

use std::fmt;
use std::io::{self, Write};
use std::sync::OnceLock;

use deis_backup_coordinator::Result;
use deis_backup_coordinator::agents::Agent;
use deis_backup_coordinator::drill;
use deis_backup_coordinator::history;
use deis_backup_coordinator::prune;
use deis_backup_coordinator::repository::{
    Initialized, Manifest, PartInfo, PartRef, Repository, SnapshotId,
};
use deis_backup_coordinator::restore;
use deis_backup_coordinator::rfc3339::rfc3339;
use deis_backup_coordinator::snapshot::{Outcome, Plan};
use deis_backup_coordinator::status;
use deis_backup_coordinator::verify;
use deis_backup_proto::v1::DescribeReply;
use serde::Serialize;
use serde_json::json;

/// `print!` that survives its reader: see [`write_stdout`].
macro_rules! out {
    ($($arg:tt)*) => { write_stdout(format_args!($($arg)*)) };
}

/// `println!` that survives its reader: see [`write_stdout`].
macro_rules! outln {
    ($($arg:tt)*) => { write_stdout(format_args!("{}\n", format_args!($($arg)*))) };
}

/// The first error writing to stdout other than a closed pipe, for `main` to report.
static STDOUT_FAILED: OnceLock<io::Error> = OnceLock::new();

/// Writes results to stdout. A reader that went away (`deis-backup list | head`) ends the
/// printing, never the command: a snapshot or restore runs to its end whatever happens to its
/// stdout, and nothing panics. Any other error (a full disk behind `>`) is kept for
/// [`stdout_failed`], so the command still exits non-zero.
pub fn write_stdout(args: fmt::Arguments<'_>) {
    let mut stdout = io::stdout().lock();
    if let Err(e) = stdout.write_fmt(args).and_then(|()| stdout.flush())
        && e.kind() != io::ErrorKind::BrokenPipe
    {
        let _ = STDOUT_FAILED.set(e);
    }
}

/// The error that lost part of the command's output, if one did.
pub fn stdout_failed() -> Option<&'static io::Error> {
    STDOUT_FAILED.get()
}

#[derive(Debug)]
pub struct Output {
    json: bool,
}

impl Output {
    pub fn new(json: bool) -> Self {
        Self { json }
    }

    pub fn is_json(&self) -> bool {
        self.json
    }

    /// Prints one typed report as the command's JSON document.
    fn emit_json(report: &impl Serialize) {
        outln!(
            "{}",
            serde_json::to_string_pretty(report).expect("reports serialise")
        );
    }

    pub async fn list(&self, repo: &Repository) -> Result<()> {
        let mut rows = Vec::new();
        for id in repo.snapshots().await? {
            let m = repo.manifest(&id).await?;
            rows.push(m);
        }
        let incomplete = repo.incomplete_snapshots().await?;
        if self.json {
            Self::emit_json(&Listing {
                snapshots: rows.iter().map(SnapshotRow::from).collect(),
                incomplete,
            });
            return Ok(());
        }
        let mut t = Table::new(&["ID", "STARTED", "PARTS", "OBJECTS", "SIZE"]);
        for m in &rows {
            t.row(vec![
                m.id.to_string(),
                rfc3339(m.started),
                m.parts.len().to_string(),
                m.buckets
                    .values()
                    .map(|b| b.objects)
                    .sum::<u64>()
                    .to_string(),
                size(total_bytes(m)),
            ]);
        }
        out!("{}", t.render());
        outln!("{} snapshots in {}", rows.len(), repo.location());
        if !incomplete.is_empty() {
            outln!(
                "{} incomplete (interrupted, never complete; `prune` removes them)",
                incomplete.len()
            );
        }
        Ok(())
    }

    pub fn manifest(&self, m: &Manifest) {
        if self.json {
            Self::emit_json(m);
            return;
        }
        outln!("snapshot {}", m.id);
        outln!("  started   {}", rfc3339(m.started));
        outln!("  completed {}", rfc3339(m.completed));
        for (k, v) in &m.labels {
            outln!("  {k} = {v}");
        }
        for w in &m.warnings {
            outln!("  warning: {w}");
        }
        let mut t = Table::new(&["PART", "SIZE", "RAW", "SECONDS", "SHA256", "WARNINGS"]);
        for (name, b) in &m.parts {
            let info = m.part_info.get(name);
            t.row(vec![
                name.clone(),
                size(b.size()),
                info.and_then(|i| i.raw_bytes).map(size).unwrap_or_default(),
                info.map(|i| format!("{:.1}", i.duration_ms as f64 / 1000.0))
                    .unwrap_or_default(),
                match b {
                    PartRef::Blob(blob) => blob.sha256.to_hex()[..16].to_owned(),
                    PartRef::Segmented(segments) => format!(
                        "{} segments{}",
                        segments.len(),
                        info.and_then(|i| i.segments_reused)
                            .map(|r| format!(", {r} reused"))
                            .unwrap_or_default()
                    ),
                },
                info.map(|i| i.warnings.len().to_string())
                    .unwrap_or_default(),
            ]);
        }
        out!("{}", t.render());
        let mut t = Table::new(&["BUCKET", "OBJECTS", "SIZE"]);
        for (name, b) in &m.buckets {
            t.row(vec![name.clone(), b.objects.to_string(), size(b.bytes)]);
        }
        out!("{}", t.render());
        for (name, info) in &m.part_info {
            if !info.figures.is_empty() {
                let figures: Vec<String> = info
                    .figures
                    .iter()
                    .map(|(k, v)| format!("{k} {v}"))
                    .collect();
                outln!("  {name} holds: {}", figures.join(", "));
            }
        }
        for line in chain_lines(m) {
            outln!("  {line}");
        }
        for (name, b) in &m.buckets {
            for key in b.vanished.iter().take(20) {
                outln!("  vanished s3://{name}/{key} (deleted at the source during the snapshot)");
            }
        }
        for (name, info) in &m.part_info {
            for w in info.warnings.iter().take(20) {
                outln!("  warning {name}: {w}");
            }
        }
    }

    pub fn verify(&self, r: &verify::Report) {
        if self.json {
            Self::emit_json(r);
            return;
        }
        for p in &r.problems {
            outln!("damaged: {p}");
        }
        outln!(
            "snapshot {}: {} parts, {} objects, {} blobs checked, {} read again{} ({}): {}",
            r.snapshot,
            r.parts,
            r.objects,
            r.blobs_checked,
            r.blobs_read,
            r.subset
                .as_ref()
                .map(|s| format!(" (slice {s})"))
                .unwrap_or_default(),
            size(r.bytes_read),
            if r.ok() {
                "ok".to_owned()
            } else {
                format!("{} problems", r.problems.len())
            }
        );
        if let Some(c) = &r.wal_e {
            match c.restorable.as_ref().filter(|_| c.recovers_by_itself()) {
                Some(b) => outln!(
                    "{}: WAL-E chain whole: base backup {} with WAL {} to {} ({} segments)",
                    c.bucket,
                    b.name,
                    b.wal_start,
                    b.wal_stop,
                    b.segments
                ),
                None => outln!("{}: WAL-E chain incomplete", c.bucket),
            }
        }
        for w in &r.warnings {
            outln!("warning: {w}");
        }
    }

    pub fn drill(&self, r: &drill::Report) {
        if self.json {
            Self::emit_json(r);
            return;
        }
        outln!("drill of snapshot {}", r.snapshot);
        for c in &r.checks {
            outln!("{:<7} {:<9} {}", c.outcome.as_str(), c.check, c.detail);
        }
        outln!("drill {}", if r.ok() { "passed" } else { "FAILED" });
    }

    pub fn runs(&self, runs: &[(history::Run, history::State)]) {
        if self.json {
            #[derive(Serialize)]
            struct Row<'a> {
                #[serde(flatten)]
                run: &'a history::Run,
                state: history::State,
            }
            let rows: Vec<Row<'_>> = runs
                .iter()
                .map(|(run, state)| Row { run, state: *state })
                .collect();
            Self::emit_json(&json!({ "runs": rows }));
            return;
        }
        let mut t = Table::new(&[
            "STARTED", "COMMAND", "HOST", "STATE", "SNAPSHOT", "MOVED", "ERROR",
        ]);
        for (r, state) in runs {
            t.row(vec![
                rfc3339(r.started),
                r.command.as_str().to_owned(),
                r.host.clone(),
                state.as_str().to_owned(),
                r.snapshot
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_default(),
                if r.objects > 0 || r.bytes > 0 {
                    format!("{} objects, {}", r.objects, size(r.bytes))
                } else {
                    String::new()
                },
                r.error.clone().unwrap_or_default(),
            ]);
        }
        out!("{}", t.render());
    }

    pub fn status(&self, s: &status::Status) {
        if self.json {
            Self::emit_json(s);
        } else {
            outln!("{}", s.line);
        }
    }

    pub fn initialized(&self, r: &Initialized) {
        if self.json {
            Self::emit_json(r);
            return;
        }
        if !r.encrypted {
            outln!(
                "created the plain repository {} (nothing encrypted)",
                r.location
            );
            return;
        }
        outln!("created the encrypted repository {}", r.location);
        for recipient in &r.recipients {
            outln!("  sealed to        {recipient}");
        }
        if let (Some(file), Some(public)) = (&r.host_key_file, &r.host_recipient) {
            outln!(
                "  snapshot host key {} (public key {public})",
                file.display()
            );
        }
        outln!(
            "snapshot and prune need the host key (--host-key-file); restore, verify --read-data \
             and drill need an operator's identity (--identity-file), which stays off the cluster"
        );
    }

    pub fn prune(&self, r: &prune::Report) {
        if self.json {
            Self::emit_json(r);
            return;
        }
        let mut t = Table::new(&["ID", "TIME", "DECISION", "WHY"]);
        for d in &r.snapshots {
            t.row(vec![
                d.id.clone(),
                rfc3339(d.time),
                if d.keep { "keep" } else { "forget" }.to_owned(),
                d.reasons.join(","),
            ]);
        }
        out!("{}", t.render());
        let verb = if r.dry_run { "would delete" } else { "deleted" };
        outln!(
            "{verb} {} snapshots, {} incomplete runs, {} blobs ({}); {} blobs kept",
            r.snapshots.iter().filter(|d| !d.keep).count(),
            r.incomplete.len(),
            r.blobs_deleted,
            size(r.bytes_deleted),
            r.blobs_kept
        );
    }

    pub fn agents(&self, described: &[(Agent, Result<DescribeReply>)]) {
        if self.json {
            let agents: Vec<AgentRow> = described.iter().map(AgentRow::from).collect();
            Self::emit_json(&json!({ "agents": agents }));
            return;
        }
        let mut t = Table::new(&["HOST", "ADDRESS", "VERSION", "DATABASE", "STORE", "STATUS"]);
        for (a, r) in described {
            match r {
                Ok(d) => t.row(vec![
                    a.host_id.clone(),
                    a.address.clone(),
                    d.agent_version.clone(),
                    match &d.database {
                        Some(c) if c.running => "running here".to_owned(),
                        Some(_) => "stopped here".to_owned(),
                        None => "not on this host".to_owned(),
                    },
                    d.store_paths
                        .iter()
                        .map(|p| {
                            format!(
                                "{} ({}, {} {})",
                                p.path,
                                p.fs_type,
                                if p.shared { "shared" } else { "host-local" },
                                p.fs_identity
                            )
                        })
                        .collect::<Vec<_>>()
                        .join("; "),
                    "ok".to_owned(),
                ]),
                Err(e) => t.row(vec![
                    a.host_id.clone(),
                    a.address.clone(),
                    String::new(),
                    String::new(),
                    String::new(),
                    e.message().to_owned(),
                ]),
            }
        }
        out!("{}", t.render());
    }

    pub fn plan(&self, p: &Plan, repository: &str) {
        if self.json {
            Self::emit_json(&json!({ "repository": repository, "plan": p }));
            return;
        }
        outln!("plan (dry run, nothing written) into {repository}:");
        for w in &p.warnings {
            outln!("  warning   {w}");
        }
        if let Some(h) = &p.pre_hook
            && let Some(db) = &p.database
        {
            outln!("  hook      {h} on {}", db.host);
        }
        match &p.database {
            Some(db) => outln!(
                "  database  pg_dumpall by agent {} ({})",
                db.host,
                db.address
            ),
            None => outln!("  database  skipped"),
        }
        for s in &p.stores {
            outln!(
                "  store     {} ({}, {}) by agent {}{}",
                s.path,
                s.fs_type,
                if s.shared { "shared" } else { "host-local" },
                s.agent.host,
                if s.also_on.is_empty() {
                    String::new()
                } else {
                    format!(
                        "; same filesystem on {}, not archived again",
                        s.also_on.join(", ")
                    )
                }
            );
        }
        for b in &p.buckets {
            outln!("  bucket    {b} from {}", p.gateways.join(", "));
        }
        outln!("  etcd      /deis minus ephemeral keys");
        match &p.previous {
            Some(prev) => {
                outln!(
                    "  reuse     unchanged objects of snapshot {prev} ({} objects listed there)",
                    p.reusable_objects
                );
                if p.reusable_dump {
                    outln!(
                        "  reuse     its database dump, if the database is still in the same state"
                    );
                }
                for s in p.stores.iter().filter(|s| s.reusable_segments > 0) {
                    outln!(
                        "  reuse     its store segments of {} whose files did not change ({} offered)",
                        s.path,
                        s.reusable_segments
                    );
                }
            }
            None => outln!("  reuse     nothing (first snapshot)"),
        }
    }

    pub fn snapshot(&self, o: &Outcome) {
        let m = &o.manifest;
        if self.json {
            Self::emit_json(o);
            return;
        }
        outln!("snapshot {} complete", m.id);
        for w in &m.warnings {
            outln!("  warning: {w}");
        }
        for (b, s) in &o.buckets {
            outln!(
                "  bucket {b}: {} objects ({}), {} downloaded ({}), {} unchanged{}",
                s.objects,
                size(s.bytes),
                s.downloaded_objects,
                size(s.downloaded_bytes),
                s.unchanged_objects,
                if s.vanished_objects > 0 {
                    format!(
                        ", {} vanished (deleted at the source meanwhile: deis-backup show {})",
                        s.vanished_objects, m.id
                    )
                } else {
                    String::new()
                }
            );
        }
        for g in &o.gateways {
            outln!(
                "  gateway {}: {} requests{}",
                g.endpoint,
                g.requests,
                if g.failures > 0 {
                    format!(", {} failed (retried)", g.failures)
                } else {
                    String::new()
                }
            );
        }
        for line in chain_lines(m) {
            outln!("  {line}");
        }
        for (name, b) in &m.parts {
            let info = m.part_info.get(name);
            let reused = match info {
                Some(PartInfo {
                    taken_in: Some(id), ..
                }) => format!(" (unchanged since snapshot {id})"),
                Some(PartInfo {
                    segments_reused: Some(r),
                    ..
                }) => format!(" ({r} of {} segments unchanged)", b.segments().len()),
                _ => String::new(),
            };
            outln!(
                "  part {name}: {}{reused}{}{}",
                size(b.size()),
                info.map(|i| format!(" in {:.1} s", i.duration_ms as f64 / 1000.0))
                    .unwrap_or_default(),
                info.filter(|i| !i.warnings.is_empty())
                    .map(|i| format!(
                        ", {} warnings (deis-backup show {})",
                        i.warnings.len(),
                        m.id
                    ))
                    .unwrap_or_default()
            );
        }
    }

    pub fn restore(&self, r: &restore::Report) {
        if self.json {
            Self::emit_json(r);
            return;
        }
        let head = if r.dry_run {
            "restore plan (dry run, nothing written)"
        } else {
            "restored"
        };
        outln!("{head}: snapshot {}", r.snapshot);
        for s in &r.steps {
            outln!(
                "  {:<13} {:<40} {}",
                s.what,
                s.target,
                if r.dry_run || s.done {
                    s.detail.as_str()
                } else {
                    "not done"
                }
            );
        }
        for f in &r.forced {
            outln!("  forced past: {f}");
        }
        if !r.dry_run {
            outln!("next: {}", r.next);
        }
    }
}

/// One agent in `agents --json`: what it described, or why it could not.
#[derive(Serialize)]
struct AgentRow<'a> {
    host: &'a str,
    address: &'a str,
    healthy: bool,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    described: Option<AgentFacts<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// What a healthy agent reported about its host.
#[derive(Serialize)]
struct AgentFacts<'a> {
    hostname: &'a str,
    version: &'a str,
    docker_api_version: &'a str,
    database_running: bool,
    platform_containers: &'a [String],
    hooks: &'a [String],
    store_paths: Vec<StorePathRow<'a>>,
}

#[derive(Serialize)]
struct StorePathRow<'a> {
    path: &'a str,
    fs_type: &'a str,
    shared: bool,
    fs_identity: &'a str,
}

impl<'a> From<&'a (Agent, Result<DescribeReply>)> for AgentRow<'a> {
    fn from((a, r): &'a (Agent, Result<DescribeReply>)) -> Self {
        let (described, error) = match r {
            Ok(d) => (
                Some(AgentFacts {
                    hostname: &d.hostname,
                    version: &d.agent_version,
                    docker_api_version: &d.docker_api_version,
                    database_running: d.database.as_ref().is_some_and(|c| c.running),
                    platform_containers: &d.running_platform_containers,
                    hooks: &d.hooks,
                    store_paths: d
                        .store_paths
                        .iter()
                        .map(|p| StorePathRow {
                            path: &p.path,
                            fs_type: &p.fs_type,
                            shared: p.shared,
                            fs_identity: &p.fs_identity,
                        })
                        .collect(),
                }),
                None,
            ),
            Err(e) => (None, Some(e.to_string())),
        };
        Self {
            host: &a.host_id,
            address: &a.address,
            healthy: r.is_ok(),
            described,
            error,
        }
    }
}

/// `list --json`.
#[derive(Serialize)]
struct Listing {
    snapshots: Vec<SnapshotRow>,
    /// Interrupted snapshots (no manifest), which `prune` removes.
    incomplete: Vec<SnapshotId>,
}

/// One complete snapshot in `list --json`.
#[derive(Serialize)]
struct SnapshotRow {
    id: SnapshotId,
    #[serde(with = "time::serde::rfc3339")]
    started: time::OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    completed: time::OffsetDateTime,
    parts: usize,
    objects: u64,
    bytes: u64,
}

impl From<&Manifest> for SnapshotRow {
    fn from(m: &Manifest) -> Self {
        Self {
            id: m.id.clone(),
            started: m.started,
            completed: m.completed,
            parts: m.parts.len(),
            objects: m.buckets.values().map(|b| b.objects).sum(),
            bytes: total_bytes(m),
        }
    }
}

/// What the manifest says of the database bucket's WAL-E chain: its contents, the base backup a
/// restored database recovers from, and a warning when it cannot.
fn chain_lines(m: &Manifest) -> Vec<String> {
    let Some(c) = &m.wal_e else {
        return Vec::new();
    };
    let mut out = vec![format!(
        "{} (WAL-E {}): {}, {}",
        c.bucket,
        c.layout,
        counted(c.base_backups, "base backup"),
        counted(c.wal_segments, "WAL segment")
    )];
    if let Some(r) = c.restorable.as_ref().filter(|_| c.recovers_by_itself()) {
        out.push(format!(
            "{}: the database recovers by itself from base backup {} (WAL {} to {}, {} segments)",
            c.bucket, r.name, r.wal_start, r.wal_stop, r.segments
        ));
    }
    if let Some(p) = c.problem() {
        out.push(format!("warning: {p}"));
    }
    out
}

/// `1 base backup`, `7 WAL segments`.
fn counted(n: u64, noun: &str) -> String {
    format!("{n} {noun}{}", if n == 1 { "" } else { "s" })
}

fn total_bytes(m: &Manifest) -> u64 {
    m.parts.values().map(PartRef::size).sum::<u64>()
        + m.buckets.values().map(|b| b.bytes).sum::<u64>()
}

/// `1.5 GiB`, `512 B`: binary units, one decimal.
fn size(bytes: u64) -> String {
    bytesize::ByteSize(bytes).display().iec().to_string()
}

/// A text table: left-aligned columns two spaces apart, a header line, no borders, no trailing
/// spaces, never wrapped (people read it, and so do `awk` and `cut`).
struct Table(comfy_table::Table);

impl Table {
    fn new(header: &[&str]) -> Self {
        let mut t = comfy_table::Table::new();
        t.load_preset(comfy_table::presets::NOTHING)
            .set_header(header.to_vec());
        for column in t.column_iter_mut() {
            column.set_padding((0, 2));
        }
        Self(t)
    }

    fn row(&mut self, r: Vec<String>) {
        self.0.add_row(r);
    }

    fn render(&self) -> String {
        self.0
            .lines()
            .map(|l| l.trim_end().to_owned() + "\n")
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_before() {
        assert_eq!(size(0), "0 B");
        assert_eq!(size(1023), "1023 B");
        assert_eq!(size(1024), "1.0 KiB");
        assert_eq!(size(1536 << 20), "1.5 GiB");
        assert_eq!(size(30 << 20), "30.0 MiB");
        assert_eq!(size(3 << 40), "3.0 TiB");
    }

    #[test]
    fn tables_are_aligned_columns_without_borders() {
        let mut t = Table::new(&["ID", "STARTED", "SIZE"]);
        t.row(vec![
            "20261124T233000Z".into(),
            "2026-11-24T23:30:00Z".into(),
            "1.5 GiB".into(),
        ]);
        t.row(vec!["b".into(), String::new(), String::new()]);
        assert_eq!(
            t.render(),
            "ID                STARTED               SIZE\n\
             20261124T233000Z  2026-11-24T23:30:00Z  1.5 GiB\n\
             b\n"
        );
        assert_eq!(Table::new(&["HOST", "STATUS"]).render(), "HOST  STATUS\n");
    }
}
