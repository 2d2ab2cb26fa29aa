//! A repository in a local directory (the default backend).
//!
//! Owns: the mapping of repository names to files under the root, and the staging directory
//! `<root>/tmp/`.
//! Invariants:
//! - Staging is inside the root, so storing a staged file is one link (atomic); small files are
//!   written to staging, then renamed. Nothing is flushed file by file: [`Backend::sync`] flushes
//!   the whole file system once (`syncfs`), which costs one disk flush per snapshot instead of
//!   one per blob.
//! - Names are `/`-separated relative paths without `..`; nothing is written outside the root.

use std::io::ErrorKind as IoKind;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use bytes::Bytes;
use std::io::Write as _;

use super::{Backend, LocalFile};
use crate::error::{Error, Result};

/// A repository directory.
#[derive(Debug, Clone)]
pub struct LocalBackend {
    root: PathBuf,
    staging: PathBuf,
}

impl LocalBackend {
    /// Opens `root` (creating it with `create`).
    pub async fn open(root: &Path, create: bool) -> Result<Self> {
        if create {
            tokio::fs::create_dir_all(root)
                .await
                .map_err(|e| Error::io(format!("create repository {}", root.display()), e))?;
        }
        let meta = tokio::fs::metadata(root).await;
        if !meta.is_ok_and(|m| m.is_dir()) {
            return Err(Error::new(
                crate::ErrorKind::Repository,
                format!(
                    "{} is not a deis-backup repository: no such directory",
                    root.display()
                ),
                "check --repository, or create one with `deis-backup init`",
            ));
        }
        let staging = root.join("tmp");
        tokio::fs::create_dir_all(&staging)
            .await
            .map_err(|e| Error::io(format!("create {}", staging.display()), e))?;
        Ok(Self {
            root: root.to_owned(),
            staging,
        })
    }

    fn path(&self, name: &str) -> Result<PathBuf> {
        if name.split('/').any(|s| s == ".." || s == ".") || name.starts_with('/') {
            return Err(Error::repository(format!(
                "'{name}' is not a repository path"
            )));
        }
        Ok(self.root.join(name))
    }
}

/// `data` in a staging file, for a small write to `dest` (whose directory it makes); with the
/// description of the write for errors. Blocking.
fn stage(staging: &Path, dest: &Path, data: &[u8]) -> Result<(tempfile::NamedTempFile, String)> {
    let what = format!("write {}", dest.display());
    if let Some(p) = dest.parent() {
        std::fs::create_dir_all(p).map_err(|e| Error::io(format!("create {}", p.display()), e))?;
    }
    let mut tmp = tempfile::Builder::new()
        .prefix(".put-")
        .tempfile_in(staging)
        .map_err(|e| Error::io(&what, e))?;
    tmp.write_all(data).map_err(|e| Error::io(&what, e))?;
    Ok((tmp, what))
}

async fn parent_dir(path: &Path) -> Result<()> {
    if let Some(p) = path.parent() {
        tokio::fs::create_dir_all(p)
            .await
            .map_err(|e| Error::io(format!("create {}", p.display()), e))?;
    }
    Ok(())
}

#[async_trait]
impl Backend for LocalBackend {
    fn location(&self) -> String {
        self.root.display().to_string()
    }

    fn staging_dir(&self) -> &Path {
        &self.staging
    }

    async fn size(&self, name: &str) -> Result<Option<u64>> {
        let p = self.path(name)?;
        match tokio::fs::metadata(&p).await {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == IoKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(format!("stat {}", p.display()), e)),
        }
    }

    async fn put_file(&self, name: &str, file: &Path, size: u64) -> Result<bool> {
        let dest = self.path(name)?;
        parent_dir(&dest).await?;
        // A hard link, not a rename: it fails when `dest` exists, so of two writers of the same
        // content-addressed name exactly one learns it created it. One of the wrong size (cut
        // short by a crash before it was flushed) is replaced.
        let what = || format!("link {} to {}", file.display(), dest.display());
        let created = match tokio::fs::hard_link(file, &dest).await {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                if self.size(name).await? == Some(size) {
                    false
                } else {
                    tokio::fs::rename(file, &dest)
                        .await
                        .map_err(|e| Error::io(what(), e))?;
                    return Ok(true);
                }
            }
            Err(e) => return Err(Error::io(what(), e)),
        };
        if let Err(e) = tokio::fs::remove_file(file).await {
            tracing::debug!("removing staged {}: {e}", file.display());
        }
        Ok(created)
    }

    async fn put_bytes(&self, name: &str, data: Bytes) -> Result<bool> {
        let dest = self.path(name)?;
        let staging = self.staging.clone();
        // One blocking task for the whole write: stage, then link into place.
        tokio::task::spawn_blocking(move || {
            let (tmp, what) = stage(&staging, &dest, &data)?;
            match tmp.persist_noclobber(&dest) {
                Ok(_) => Ok(true),
                Err(e) if e.error.kind() == std::io::ErrorKind::AlreadyExists => {
                    // Kept if whole; replaced if cut short by a crash before it was flushed.
                    let there = std::fs::metadata(&dest).map_err(|e| Error::io(&what, e))?;
                    if there.len() == data.len() as u64 {
                        Ok(false)
                    } else {
                        e.file
                            .persist(&dest)
                            .map_err(|e| Error::io(&what, e.error))?;
                        Ok(true)
                    }
                }
                Err(e) => Err(Error::io(&what, e.error)),
            }
        })
        .await
        .map_err(|e| Error::repository(format!("write task failed: {e}")))?
    }

    async fn replace_bytes(&self, name: &str, data: Bytes) -> Result<()> {
        let dest = self.path(name)?;
        let staging = self.staging.clone();
        tokio::task::spawn_blocking(move || {
            let (tmp, what) = stage(&staging, &dest, &data)?;
            tmp.persist(&dest)
                .map(drop)
                .map_err(|e| Error::io(&what, e.error))
        })
        .await
        .map_err(|e| Error::repository(format!("write task failed: {e}")))?
    }

    async fn get_bytes(&self, name: &str) -> Result<Bytes> {
        let p = self.path(name)?;
        match tokio::fs::read(&p).await {
            Ok(d) => Ok(Bytes::from(d)),
            Err(e) if e.kind() == IoKind::NotFound => {
                Err(Error::not_found(format!("{} does not exist", p.display())))
            }
            Err(e) => Err(Error::io(format!("read {}", p.display()), e)),
        }
    }

    async fn local_file(&self, name: &str) -> Result<LocalFile> {
        let p = self.path(name)?;
        if tokio::fs::metadata(&p).await.is_err() {
            return Err(Error::not_found(format!("{} does not exist", p.display())));
        }
        Ok(LocalFile::original(p))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>> {
        let root = self.root.clone();
        // A prefix is a directory (`blobs/`) or a file name's start (`blobs/keyed/ab/12.`): the
        // walk starts at the directory either way.
        let start = self.path(prefix.rsplit_once('/').map_or("", |(dir, _)| dir))?;
        let prefix = prefix.to_owned();
        tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            let mut stack = vec![start];
            while let Some(dir) = stack.pop() {
                let rd = match std::fs::read_dir(&dir) {
                    Ok(rd) => rd,
                    Err(e) if e.kind() == IoKind::NotFound => continue,
                    Err(e) => return Err(Error::io(format!("list {}", dir.display()), e)),
                };
                for ent in rd {
                    let ent = ent.map_err(|e| Error::io(format!("list {}", dir.display()), e))?;
                    let ft = ent
                        .file_type()
                        .map_err(|e| Error::io(format!("list {}", dir.display()), e))?;
                    let p = ent.path();
                    if ft.is_dir() {
                        stack.push(p);
                    } else if ft.is_file() {
                        let rel = p.strip_prefix(&root).unwrap_or(&p);
                        let name = rel
                            .components()
                            .map(|c| c.as_os_str().to_string_lossy())
                            .collect::<Vec<_>>()
                            .join("/");
                        if name.starts_with(&prefix) {
                            let size = ent.metadata().map_or(0, |m| m.len());
                            out.push((name, size));
                        }
                    }
                }
            }
            out.sort();
            Ok(out)
        })
        .await
        .map_err(|e| Error::repository(format!("listing task failed: {e}")))?
    }

    async fn delete(&self, names: &[String]) -> Result<()> {
        for name in names {
            let p = self.path(name)?;
            match tokio::fs::remove_file(&p).await {
                Ok(()) => {}
                Err(e) if e.kind() == IoKind::NotFound => {}
                Err(e) => return Err(Error::io(format!("delete {}", p.display()), e)),
            }
            // Remove directories left empty (snapshot dirs, blob fan-out dirs); ignore the rest.
            let mut dir = p.parent().map(Path::to_path_buf);
            while let Some(d) = dir {
                if d == self.root || tokio::fs::remove_dir(&d).await.is_err() {
                    break;
                }
                dir = d.parent().map(Path::to_path_buf);
            }
        }
        Ok(())
    }

    async fn sync(&self) -> Result<()> {
        let root = self.root.clone();
        tokio::task::spawn_blocking(move || {
            let what = format!("flush {} to disk", root.display());
            let dir = std::fs::File::open(&root).map_err(|e| Error::io(&what, e))?;
            sync_file_system(&dir).map_err(|e| Error::io(&what, e))
        })
        .await
        .map_err(|e| Error::repository(format!("flush task failed: {e}")))?
    }
}

/// Flushes the file system holding `dir` (Linux: `syncfs`, which also reports write-back errors).
#[cfg(target_os = "linux")]
fn sync_file_system(dir: &std::fs::File) -> std::io::Result<()> {
    rustix::fs::syncfs(dir).map_err(std::io::Error::from)
}

/// Flushes every file system (no `syncfs` here), then the directory itself.
#[cfg(not(target_os = "linux"))]
fn sync_file_system(dir: &std::fs::File) -> std::io::Result<()> {
    rustix::fs::sync();
    dir.sync_all()
}
