//! What a `pg_dumpall` dump holds, table by table: the rows of each `COPY` block, by the database
//! its `\connect` put it in. A snapshot records the Deis controller's figures from it; a drill
//! compares a loaded database with it.
//!
//! Owns: [`Tables`], [`dump_tables`] (the parse), [`count`] (of a stored zstd dump), [`Counter`]
//! (of a zstd dump as it streams by), [`deis_figures`] and the Deis tables a drill names.
//! Invariant: a row is a line: COPY's text format escapes newlines, so a block's lines between
//! its `COPY … FROM stdin;` and `\.` are its rows, whatever they hold.

use std::collections::BTreeMap;

use crate::error::{Error, Result};
use crate::repository::{BlobRef, Repository};

/// The Deis controller's tables a drill names, in its database `deis`.
pub const DEIS_TABLES: [(&str, &str); 5] = [
    ("apps", "public.api_app"),
    ("releases", "public.api_release"),
    ("keys", "public.api_key"),
    ("domains", "public.api_domain"),
    ("users", "public.auth_user"),
];
pub const DEIS_DATABASE: &str = "deis";

/// Rows per (database, `schema.table`) in a dump.
pub type Tables = BTreeMap<(String, String), u64>;

/// The rows of every table the zstd dump in `blob` holds ([`dump_tables`]).
pub async fn count(repo: &Repository, blob: &BlobRef) -> Result<Tables> {
    let file = repo.blob_file(&blob.sha256).await?;
    let path = file.path().to_owned();
    let counted = tokio::task::spawn_blocking(move || dump_tables_in(&path))
        .await
        .map_err(|e| Error::io("count the dump's rows", std::io::Error::other(e)))?;
    drop(file);
    counted
}

/// Counts a zstd dump's rows ([`dump_tables`]) as its bytes arrive, on a blocking thread of its
/// own: a snapshot reads the stored dump no second time (which the snapshot host of an encrypted
/// repository could not: it holds no key to its blobs).
#[derive(Debug)]
pub struct Counter {
    tx: Option<tokio::sync::mpsc::Sender<Vec<u8>>>,
    task: tokio::task::JoinHandle<std::io::Result<Tables>>,
}

impl Counter {
    pub fn start() -> Self {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let task = tokio::task::spawn_blocking(move || {
            let chunks = ChannelReader {
                rx,
                chunk: Vec::new(),
                at: 0,
            };
            dump_tables(std::io::BufReader::new(zstd::stream::read::Decoder::new(
                chunks,
            )?))
        });
        Self { tx: Some(tx), task }
    }

    /// The next bytes of the dump. A counter that stopped (bytes that are no zstd dump) takes no
    /// more; [`Counter::finish`] says why.
    pub async fn feed(&mut self, data: &[u8]) {
        if let Some(tx) = &self.tx
            && tx.send(data.to_vec()).await.is_err()
        {
            self.tx = None;
        }
    }

    /// The rows of every table, once the dump's last bytes were fed.
    pub async fn finish(mut self) -> Result<Tables> {
        self.tx = None;
        self.task
            .await
            .map_err(|e| Error::io("count the dump's rows", std::io::Error::other(e)))?
            .map_err(|e| Error::io("count the dump's rows", e))
    }
}

/// The chunks a [`Counter`] is fed, as one byte stream.
struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<Vec<u8>>,
    chunk: Vec<u8>,
    at: usize,
}

impl std::io::Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.at == self.chunk.len() {
            match self.rx.blocking_recv() {
                Some(c) => (self.chunk, self.at) = (c, 0),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len() - self.at);
        buf[..n].copy_from_slice(&self.chunk[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// The Deis controller's figures among `tables`: `apps`, `releases`, … with their rows.
pub fn deis_figures(tables: &Tables) -> BTreeMap<String, u64> {
    DEIS_TABLES
        .iter()
        .filter_map(|(what, table)| {
            tables
                .get(&(DEIS_DATABASE.to_owned(), (*table).to_owned()))
                .map(|n| ((*what).to_owned(), *n))
        })
        .collect()
}

/// [`dump_tables`] of a zstd-compressed dump in the file at `path`.
fn dump_tables_in(path: &std::path::Path) -> Result<Tables> {
    let f = std::fs::File::open(path).map_err(|e| Error::io("open the dump", e))?;
    let z = zstd::stream::read::Decoder::new(f).map_err(|e| Error::io("read the dump", e))?;
    dump_tables(std::io::BufReader::new(z)).map_err(|e| Error::io("read the dump", e))
}

/// The rows each table's `COPY … FROM stdin;` block holds in a `pg_dumpall` dump, by the
/// database its `\connect` put it in. Rows are lines: COPY's text format escapes newlines.
pub fn dump_tables(reader: impl std::io::BufRead) -> std::io::Result<Tables> {
    let mut out = Tables::new();
    let mut database = String::new();
    let mut copying: Option<(String, u64)> = None;
    for line in reader.split(b'\n') {
        let line = line?;
        let line = line.strip_suffix(b"\r").unwrap_or(&line);
        if let Some((table, rows)) = &mut copying {
            if line == b"\\." {
                *out.entry((database.clone(), std::mem::take(table)))
                    .or_default() += *rows;
                copying = None;
            } else {
                *rows += 1;
            }
            continue;
        }
        let Ok(text) = std::str::from_utf8(line) else {
            continue;
        };
        if let Some(target) = text.strip_prefix("\\connect ") {
            database = connect_target(target);
        } else if let Some(rest) = text.strip_prefix("COPY ")
            && text.ends_with(" FROM stdin;")
        {
            copying = Some((qualified_name(rest).to_owned(), 0));
        }
    }
    Ok(out)
}

/// The table name a `COPY` line starts with: up to the first space outside double quotes.
fn qualified_name(rest: &str) -> &str {
    let mut quoted = false;
    for (i, c) in rest.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ' ' if !quoted => return &rest[..i],
            _ => {}
        }
    }
    rest
}

/// The database a `\connect` line names: `deis`, `"my db"`, or
/// `-reuse-previous=on "dbname='my db'"` (what pg_dumpall writes for a name that needs quoting).
fn connect_target(target: &str) -> String {
    let t = target.trim();
    let t = t.strip_prefix("-reuse-previous=on ").unwrap_or(t);
    if let Some(inner) = t
        .strip_prefix("\"dbname='")
        .and_then(|r| r.strip_suffix("'\""))
    {
        return inner.replace("\\'", "'").replace("\\\\", "\\");
    }
    if let Some(inner) = t.strip_prefix('"').and_then(|r| r.strip_suffix('"')) {
        return inner.replace("\"\"", "\"");
    }
    t.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dump_is_counted_per_database_and_table() {
        let dump = "\
--\n-- PostgreSQL database cluster dump\n--\nCREATE ROLE deis;\n\
\\connect template1\n\
\\connect deis\n\
COPY public.api_app (id, uuid, \"structure\") FROM stdin;\n1\ta\t{}\n2\tb\t{\"x\": \"a\\\\nb\"}\n\\.\n\
COPY public.auth_user (id) FROM stdin;\n\\.\n\
COPY public.\"Weird (name)\" (id) FROM stdin;\n7\n\\.\n\
\\connect -reuse-previous=on \"dbname='a b'\"\n\
COPY s.t FROM stdin;\n1\n2\n3\n\\.\n\
SELECT pg_catalog.lo_create('424201');\n";
        let t = dump_tables(dump.as_bytes()).unwrap();
        let get = |d: &str, n: &str| t.get(&(d.to_owned(), n.to_owned())).copied();
        assert_eq!(get("deis", "public.api_app"), Some(2));
        assert_eq!(get("deis", "public.auth_user"), Some(0));
        assert_eq!(get("deis", "public.\"Weird (name)\""), Some(1));
        assert_eq!(get("a b", "s.t"), Some(3));
        assert_eq!(t.len(), 4, "{t:?}");
        assert_eq!(connect_target("-reuse-previous=on \"dbname='a b'\""), "a b");
        assert_eq!(connect_target("\"Quoted\"\"db\""), "Quoted\"db");
        assert_eq!(connect_target("deis"), "deis");
    }
}
