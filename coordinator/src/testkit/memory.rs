//! A repository backend in memory, for tests.
//!
//! Owns: a map of names to bytes, a staging directory (a temporary directory, since
//! [`Backend::put_file`] takes staged files and [`Backend::local_file`] gives them), and a log of
//! every write, delete and sync, in order.
//! Invariants:
//! - The local backend's contract: `put_*` keep a name that exists whole (and say so with false)
//!   and replace one of another size (cut short by a crash); `replace_bytes` overwrites; `list`
//!   gives every name under a prefix with its size, sorted; `delete` ignores missing names;
//!   `get_bytes` and `local_file` of a missing name are `NotFound`; a staged file given to
//!   `put_file` is consumed.
//! - [`Mode::ReadOnly`] refuses writes with an error, as read-only credentials do;
//!   [`Mode::Frozen`] panics on one, for tests asserting that a read never writes (those may run
//!   without a Tokio runtime: nothing here needs one).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::{Error, Result};
use crate::repository::{Backend, LocalFile};

/// What a [`MemoryBackend`] does with a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    ReadWrite,
    /// Writes fail (a repository this run may only read).
    ReadOnly,
    /// Writes panic: the code under test must only read.
    Frozen,
}

/// See the module doc.
#[derive(Debug)]
pub struct MemoryBackend {
    files: Mutex<BTreeMap<String, Bytes>>,
    log: Mutex<Vec<String>>,
    mode: Mutex<Mode>,
    staging: tempfile::TempDir,
}

impl Default for MemoryBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryBackend {
    pub fn new() -> Self {
        Self {
            files: Mutex::default(),
            log: Mutex::default(),
            mode: Mutex::new(Mode::ReadWrite),
            staging: tempfile::tempdir().expect("a staging directory"),
        }
    }

    /// A backend holding `files` that must never be written.
    pub fn frozen<'a>(files: impl IntoIterator<Item = (&'a str, Bytes)>) -> Self {
        let b = Self::new();
        for (name, data) in files {
            b.set(name, data);
        }
        b.set_mode(Mode::Frozen);
        b
    }

    pub fn set_mode(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }

    /// Every write, delete and sync so far (`put NAME`, `replace NAME`, `delete NAME`, `sync`).
    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    pub fn clear_log(&self) {
        self.log.lock().unwrap().clear();
    }

    /// The bytes stored as `name`.
    pub fn get(&self, name: &str) -> Option<Bytes> {
        self.files.lock().unwrap().get(name).cloned()
    }

    /// Stores `data` as `name` behind the repository's back (a fixture, or damage at rest).
    pub fn set(&self, name: &str, data: impl Into<Bytes>) {
        self.files
            .lock()
            .unwrap()
            .insert(name.to_owned(), data.into());
    }

    /// Removes `name` behind the repository's back (a lost file).
    pub fn remove(&self, name: &str) {
        self.files.lock().unwrap().remove(name);
    }

    /// Records a write, or refuses it in a read-only mode.
    fn write(&self, what: String) -> Result<()> {
        match *self.mode.lock().unwrap() {
            Mode::ReadWrite => {
                self.log.lock().unwrap().push(what);
                Ok(())
            }
            Mode::ReadOnly => Err(Error::repository(format!(
                "{what}: the repository is read-only"
            ))),
            Mode::Frozen => panic!("a read wrote: {what}"),
        }
    }

    /// Stores `data` unless `name` exists whole; the local backend's rule.
    fn put(&self, name: &str, data: Bytes) -> bool {
        let mut files = self.files.lock().unwrap();
        if files.get(name).is_some_and(|d| d.len() == data.len()) {
            return false;
        }
        files.insert(name.to_owned(), data);
        true
    }
}

fn missing(name: &str) -> Error {
    Error::not_found(format!("memory:{name} does not exist"))
}

#[async_trait]
impl Backend for MemoryBackend {
    fn location(&self) -> String {
        "memory".into()
    }

    fn staging_dir(&self) -> &Path {
        self.staging.path()
    }

    async fn size(&self, name: &str) -> Result<Option<u64>> {
        Ok(self.get(name).map(|d| d.len() as u64))
    }

    async fn put_file(&self, name: &str, file: &Path, size: u64) -> Result<bool> {
        self.write(format!("put {name}"))?;
        let data =
            std::fs::read(file).map_err(|e| Error::io(format!("read {}", file.display()), e))?;
        assert_eq!(
            data.len() as u64,
            size,
            "put_file of {name}: the staged file has another size"
        );
        std::fs::remove_file(file)
            .map_err(|e| Error::io(format!("remove {}", file.display()), e))?;
        Ok(self.put(name, Bytes::from(data)))
    }

    async fn put_bytes(&self, name: &str, data: Bytes) -> Result<bool> {
        self.write(format!("put {name}"))?;
        Ok(self.put(name, data))
    }

    async fn replace_bytes(&self, name: &str, data: Bytes) -> Result<()> {
        self.write(format!("replace {name}"))?;
        self.set(name, data);
        Ok(())
    }

    async fn get_bytes(&self, name: &str) -> Result<Bytes> {
        self.get(name).ok_or_else(|| missing(name))
    }

    async fn local_file(&self, name: &str) -> Result<LocalFile> {
        let data = self.get(name).ok_or_else(|| missing(name))?;
        let mut f = tempfile::Builder::new()
            .prefix(".get-")
            .tempfile_in(self.staging.path())
            .map_err(|e| Error::io("stage a download", e))?;
        std::io::Write::write_all(&mut f, &data).map_err(|e| Error::io("stage a download", e))?;
        Ok(LocalFile::staged(f.into_temp_path()))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>> {
        Ok(self
            .files
            .lock()
            .unwrap()
            .range(prefix.to_owned()..)
            .take_while(|(n, _)| n.starts_with(prefix))
            .map(|(n, d)| (n.clone(), d.len() as u64))
            .collect())
    }

    async fn delete(&self, names: &[String]) -> Result<()> {
        for name in names {
            self.write(format!("delete {name}"))?;
            self.remove(name);
        }
        Ok(())
    }

    async fn sync(&self) -> Result<()> {
        self.write("sync".to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the local backend does, the memory one does: the two are checked side by side.
    #[tokio::test]
    async fn the_memory_backend_keeps_the_local_backends_contract() {
        let tmp = tempfile::tempdir().unwrap();
        let local = crate::repository::local::LocalBackend::open(&tmp.path().join("r"), true)
            .await
            .unwrap();
        let memory = MemoryBackend::new();
        for b in [&local as &dyn Backend, &memory] {
            let at = b.location();
            assert!(
                b.put_bytes("a/x", Bytes::from_static(b"12345"))
                    .await
                    .unwrap(),
                "{at}"
            );
            assert!(
                !b.put_bytes("a/x", Bytes::from_static(b"54321"))
                    .await
                    .unwrap(),
                "{at}"
            );
            assert_eq!(
                b.get_bytes("a/x").await.unwrap(),
                "12345",
                "{at}: kept whole"
            );
            assert!(
                b.put_bytes("a/x", Bytes::from_static(b"12")).await.unwrap(),
                "{at}"
            );
            assert_eq!(
                b.get_bytes("a/x").await.unwrap(),
                "12",
                "{at}: another size replaced"
            );
            b.replace_bytes("a/x", Bytes::from_static(b"99"))
                .await
                .unwrap();
            assert_eq!(b.get_bytes("a/x").await.unwrap(), "99", "{at}");
            let staged = b.staging_dir().join("staged");
            std::fs::write(&staged, b"file").unwrap();
            assert!(b.put_file("a/y/z", &staged, 4).await.unwrap(), "{at}");
            assert!(!staged.exists(), "{at}: the staged file is consumed");
            std::fs::write(&staged, b"file").unwrap();
            assert!(!b.put_file("a/y/z", &staged, 4).await.unwrap(), "{at}");
            b.put_bytes("ab", Bytes::from_static(b"1")).await.unwrap();
            assert_eq!(
                b.list("a/").await.unwrap(),
                [("a/x".to_owned(), 2), ("a/y/z".to_owned(), 4)],
                "{at}"
            );
            assert_eq!(b.size("a/y/z").await.unwrap(), Some(4), "{at}");
            let f = b.local_file("a/y/z").await.unwrap();
            assert_eq!(std::fs::read(f.path()).unwrap(), b"file", "{at}");
            b.delete(&["a/x".into(), "nothing".into()]).await.unwrap();
            assert_eq!(b.size("a/x").await.unwrap(), None, "{at}");
            let e = b.get_bytes("a/x").await.unwrap_err();
            assert_eq!(e.kind(), crate::ErrorKind::NotFound, "{at}");
            let e = b.local_file("a/x").await.unwrap_err();
            assert_eq!(e.kind(), crate::ErrorKind::NotFound, "{at}");
        }
        memory.set_mode(Mode::ReadOnly);
        let e = memory.put_bytes("b", Bytes::new()).await.unwrap_err();
        assert!(e.message().contains("read-only"), "{e}");
        assert_eq!(memory.size("b").await.unwrap(), None);
    }
}
