//! The repository: where snapshots live, in the format of `docs/FORMAT.md`, plain or encrypted.
//!
//! Owns: the [`Backend`] trait (a flat store of named files, with a local-directory and an S3
//! implementation), [`Repository`] (the format on top of any backend, and its creation:
//! [`Repository::init`]), [`BlobWriter`] (streaming, hashing, content-addressed writes) and
//! [`SnapshotWriter`] (parts + bucket listings + a manifest). The sealing of an encrypted
//! repository's files is `seal`'s; this module decides what is sealed to whom.
//! Invariants:
//! - A repository exists once `deis-backup init` wrote its config (`deis-backup.json`, last);
//!   opening anything else is an error that asks for `init`.
//! - An encrypted repository stores nothing in the clear but its config (recipients, no secret)
//!   and the leases: blobs are sealed to the operators, and metadata (manifests, listings, runs,
//!   `keys.age`) to the operators and the snapshot host; blob names are keyed (`seal`).
//! - Blobs are written whole or not at all (staged, then moved or uploaded), named by the SHA-256
//!   of their bytes (keyed, when encrypted; the sealed size follows the name), and stored once: a
//!   blob that exists whole is never rewritten. A sealed blob is read only after it opened whole and
//!   hashed to its name.
//! - A snapshot's manifest is written last, atomically; a snapshot without one is incomplete and
//!   never listed as a snapshot. Deleting a snapshot removes its manifest first.
//! - Durability is per snapshot, not per blob: [`SnapshotWriter::commit`] makes everything stored
//!   durable ([`Backend::sync`]) before it writes the manifest, and the manifest after. A crash
//!   before that may lose or shorten blobs no manifest names yet; a blob is taken as present only
//!   with its full size, so such a blob is written again by the next snapshot.
//! - Bytes stream through staging files; no blob is held in memory whole.
//! - No file holds a key of the repository's; what holds the cluster's secrets (blobs: the dump, the
//!   etcd export) is sealed in an encrypted repository.

pub mod format;
pub mod local;
pub mod s3;
pub mod seal;

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use serde::Deserialize;
use sha2::Digest as _;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncSeekExt as _, AsyncWriteExt as _};

use crate::error::{Error, ErrorKind, Result};
use crate::secret::SecretString;
pub use format::{
    BaseBackupChain, BlobRef, BucketRef, Manifest, ObjectEntry, PartInfo, PartRef, SegmentRef,
    Sha256, SnapshotId, WalChain,
};

/// A flat store of named files (`a/b/c` names, `/`-separated), the only thing a repository needs.
#[async_trait]
pub trait Backend: Send + Sync + fmt::Debug {
    /// Where it is, for people (no secrets).
    fn location(&self) -> String;
    /// A local directory for staging files before [`Backend::put_file`]; on the same file system
    /// as the store when the store is local, so a put is a rename.
    fn staging_dir(&self) -> &Path;
    /// The size of `name`, `None` when it does not exist.
    async fn size(&self, name: &str) -> Result<Option<u64>>;
    /// Stores the staged file `file` (`size` bytes) as `name`, atomically; `file` is consumed.
    /// False when `name` already existed whole (another writer stored the same name first); a
    /// file of another size there (cut short by a crash) is replaced.
    async fn put_file(&self, name: &str, file: &Path, size: u64) -> Result<bool>;
    /// Stores small `data` as `name`, atomically; false when `name` already existed whole, which
    /// is then kept (every name a repository writes is content-addressed or written once). A file
    /// of another size there (cut short by a crash) is replaced, as by [`Backend::put_file`].
    async fn put_bytes(&self, name: &str, data: Bytes) -> Result<bool>;
    /// Stores small `data` as `name`, atomically, replacing what is there: only for the one kind
    /// of file that changes in place, a run's lease (`leases/`).
    async fn replace_bytes(&self, name: &str, data: Bytes) -> Result<()>;
    /// The whole content of a small file (manifest, listing).
    async fn get_bytes(&self, name: &str) -> Result<Bytes>;
    /// A local file holding `name`'s bytes (the file itself, or a staged download).
    async fn local_file(&self, name: &str) -> Result<LocalFile>;
    /// Every file under `prefix`, with sizes, sorted by name.
    async fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>>;
    /// Deletes the files; missing ones are fine.
    async fn delete(&self, names: &[String]) -> Result<()>;
    /// Makes everything stored so far durable: a crash after it returns loses none of it.
    async fn sync(&self) -> Result<()>;
}

/// A local file with a blob's bytes; a staged copy is removed on drop.
#[derive(Debug)]
pub struct LocalFile {
    path: PathBuf,
    _staged: Option<tempfile::TempPath>,
}

impl LocalFile {
    pub(crate) fn original(path: PathBuf) -> Self {
        Self {
            path,
            _staged: None,
        }
    }

    pub(crate) fn staged(temp: tempfile::TempPath) -> Self {
        Self {
            path: temp.to_path_buf(),
            _staged: Some(temp),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Where the repository is. Serves the CLI, the config file and the library. Every field is
/// unset by default; the accessors apply the defaults.
#[derive(Debug, Clone, Default, Deserialize, clap::Args, merge::Merge)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
#[merge(strategy = merge::option::overwrite_none)]
pub struct RepositoryOptions {
    /// Where snapshots live: a local directory, or s3://bucket/prefix [default:
    /// /var/lib/deis-backup].
    #[arg(long = "repository", short = 'r', env = "DEIS_BACKUP_REPOSITORY")]
    pub location: Option<String>,
    /// S3 endpoint of an s3:// repository. Default: https://s3.<region>.amazonaws.com.
    #[arg(long = "repository-endpoint", env = "DEIS_BACKUP_REPOSITORY_ENDPOINT")]
    pub endpoint: Option<String>,
    /// Region of an s3:// repository [default: us-east-1].
    #[arg(id = "repository_region", long = "repository-region")]
    pub region: Option<String>,
    /// Access key of an s3:// repository.
    #[arg(
        id = "repository_access_key",
        long = "repository-access-key",
        env = "AWS_ACCESS_KEY_ID",
        hide_env_values = true
    )]
    pub access_key: Option<SecretString>,
    /// File holding the secret key of an s3:// repository (mode 600). Default:
    /// $AWS_SECRET_ACCESS_KEY. Never a flag value: argv is public.
    #[arg(
        id = "repository_secret_key_file",
        long = "repository-secret-key-file",
        env = "DEIS_BACKUP_REPOSITORY_SECRET_KEY_FILE"
    )]
    pub secret_key_file: Option<PathBuf>,
    /// The secret key itself: from the config file's `secret-key`, or $AWS_SECRET_ACCESS_KEY.
    #[arg(skip)]
    pub secret_key: Option<SecretString>,
    /// Local directory for staging files of an s3:// repository. Default: the system temp dir.
    #[arg(long = "staging-dir")]
    pub staging_dir: Option<PathBuf>,
    /// Flush the repository to disk before a snapshot's manifest is written, and the manifest
    /// after (local repositories). Off only for throw-away repositories (tests) [default: true].
    #[arg(long = "fsync", action = clap::ArgAction::Set)]
    pub fsync: Option<bool>,
    /// An operator's age identity file (mode 600): opens everything in an encrypted repository
    /// (restore, verify --read-data, drill). It belongs with the operator, not on the cluster.
    #[arg(long = "identity-file", env = "DEIS_BACKUP_IDENTITY_FILE")]
    pub identity_file: Option<PathBuf>,
    /// The snapshot host's key that `deis-backup init` wrote (mode 600): opens what a snapshot
    /// reuses (manifests, listings), never a blob's data.
    #[arg(long = "host-key-file", env = "DEIS_BACKUP_HOST_KEY_FILE")]
    pub host_key_file: Option<PathBuf>,
    /// The operators' age recipients (age1…, one per line): what `init` seals a new repository
    /// to, and what a host that keeps this file expects: a repository sealed to others, or not
    /// at all, is refused.
    #[arg(long = "recipients-file", env = "DEIS_BACKUP_RECIPIENTS_FILE")]
    pub recipients_file: Option<PathBuf>,
}

/// Default repository: a local directory.
pub const DEFAULT_LOCATION: &str = "/var/lib/deis-backup";
/// Default region of an s3:// repository.
pub const DEFAULT_REGION: &str = "us-east-1";

impl RepositoryOptions {
    /// Where snapshots live.
    pub fn location(&self) -> &str {
        self.location.as_deref().unwrap_or(DEFAULT_LOCATION)
    }

    /// Region of an s3:// repository.
    pub fn region(&self) -> &str {
        self.region.as_deref().unwrap_or(DEFAULT_REGION)
    }

    /// Whether a snapshot is flushed to disk before and after its manifest.
    pub fn fsync(&self) -> bool {
        self.fsync.unwrap_or(true)
    }

    /// The identities given: the operator's, then the host's.
    fn identities(&self) -> Result<Vec<age::x25519::Identity>> {
        let mut out = Vec::new();
        if let Some(p) = &self.identity_file {
            out.extend(seal::read_identities(p, "identity file")?);
        }
        if let Some(p) = &self.host_key_file {
            out.extend(seal::read_identities(p, "host key file")?);
        }
        Ok(out)
    }
}

/// How [`Repository::init`] makes a repository.
#[derive(Debug)]
pub enum Init {
    /// Every file in the clear: for a local disk the operator trusts.
    Plain,
    /// Sealed to these operators' recipients; the snapshot host's new key goes to `host_key_file`.
    Encrypted {
        recipients: Vec<age::x25519::Recipient>,
        host_key_file: PathBuf,
    },
}

/// What [`Repository::init`] made.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Initialized {
    pub location: String,
    pub encrypted: bool,
    /// The operators' recipients (public keys).
    pub recipients: Vec<String>,
    /// The snapshot host's key file and its public key.
    pub host_key_file: Option<PathBuf>,
    pub host_recipient: Option<String>,
}

/// A repository: snapshots, their listings and parts, and the blobs they name.
#[derive(Debug, Clone)]
pub struct Repository {
    backend: Arc<dyn Backend>,
    fsync: bool,
    /// An encrypted repository's keys; `None` for a plain one.
    keys: Option<Arc<seal::Keys>>,
}

/// Where a blob is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Found {
    /// Whole, under this name.
    Whole(String),
    Missing,
    /// Under this name with this many bytes, not what it should hold.
    Cut(String, u64),
}

/// What [`Repository::prune_blobs`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PruneStats {
    pub blobs_deleted: u64,
    pub bytes_deleted: u64,
    pub blobs_kept: u64,
}

impl PruneStats {
    /// Deleting `doomed` of the `stored` blobs ([`Repository::unreferenced`] of them).
    pub fn of(stored: &[(String, u64)], doomed: &[&(String, u64)]) -> Self {
        Self {
            blobs_deleted: doomed.len() as u64,
            bytes_deleted: doomed.iter().map(|(_, n)| n).sum(),
            blobs_kept: (stored.len() - doomed.len()) as u64,
        }
    }
}

impl Repository {
    /// Opens an existing repository (made by [`Repository::init`]); an encrypted one with the
    /// identities `options` names.
    pub async fn open(options: &RepositoryOptions) -> Result<Self> {
        let backend = Self::backend_for(options, false).await?;
        let config = Self::read_config(&*backend).await?;
        let keys = match &config.encryption {
            None => {
                // A host that holds a host key or pins recipients writes only sealed files: a
                // config that turned plain is someone else's doing, or the wrong repository.
                if let Some(pinned) = options
                    .recipients_file
                    .as_ref()
                    .or(options.host_key_file.as_ref())
                {
                    return Err(Error::new(
                        ErrorKind::Config,
                        format!(
                            "{} is not encrypted, but {} says it should be",
                            backend.location(),
                            pinned.display()
                        ),
                        "check --repository; a repository whose config lost its encryption is \
                         not written to",
                    ));
                }
                if options.identity_file.is_some() {
                    tracing::warn!(
                        "{} is not encrypted: the identity file is not used",
                        backend.location()
                    );
                }
                None
            }
            Some(encryption) => {
                if let Some(file) = &options.recipients_file {
                    let mut want: Vec<String> = seal::read_recipients(file)?
                        .iter()
                        .map(ToString::to_string)
                        .collect();
                    let mut have = encryption.recipients.clone();
                    want.sort();
                    have.sort();
                    if want != have {
                        return Err(Error::new(
                            ErrorKind::Config,
                            format!(
                                "{} is sealed to other recipients than {} names",
                                backend.location(),
                                file.display()
                            ),
                            "check --repository; if the operators' keys changed, update the \
                             recipients file (a repository's recipients are set by init)",
                        ));
                    }
                }
                let identities = options.identities()?;
                let file = match backend.get_bytes(format::KEYS_FILE).await {
                    Err(e) if e.kind() == ErrorKind::NotFound => {
                        return Err(Error::repository(format!(
                            "{} is encrypted but has no {}",
                            backend.location(),
                            format::KEYS_FILE
                        )));
                    }
                    r => r?,
                };
                Some(Arc::new(seal::Keys::open(
                    encryption,
                    identities,
                    &file,
                    &backend.location(),
                )?))
            }
        };
        Ok(Self {
            backend,
            fsync: options.fsync(),
            keys,
        })
    }

    /// Opens the repository, making it a plain one when it does not exist: for tests and tools,
    /// never the CLI (whose repositories are made by `init`).
    pub async fn open_or_init(options: &RepositoryOptions) -> Result<Self> {
        let backend = Self::backend_for(options, true).await?;
        if backend.size(format::CONFIG_FILE).await?.is_none() {
            Self::init(options, Init::Plain).await?;
        }
        Self::open(options).await
    }

    /// Makes a new repository at `options`' location (creating the directory or bucket): its
    /// config last, so a failed `init` leaves nothing that opens. An existing one is refused.
    pub async fn init(options: &RepositoryOptions, how: Init) -> Result<Initialized> {
        let backend = Self::backend_for(options, true).await?;
        let location = backend.location();
        if backend.size(format::CONFIG_FILE).await?.is_some() {
            return Err(Error::config(format!(
                "{location} is a deis-backup repository already"
            )));
        }
        let mut made = Initialized {
            location: location.clone(),
            encrypted: false,
            recipients: Vec::new(),
            host_key_file: None,
            host_recipient: None,
        };
        let encryption = match how {
            Init::Plain => None,
            Init::Encrypted {
                recipients,
                host_key_file,
            } => {
                if host_key_file.exists() {
                    return Err(Error::config(format!(
                        "{} already exists; a key is never overwritten (give another \
                         --host-key-file)",
                        host_key_file.display()
                    )));
                }
                let (keys, host) = seal::Keys::create(recipients)?;
                backend
                    .put_bytes(format::KEYS_FILE, Bytes::from(keys.keys_file()?))
                    .await?;
                seal::write_identity(
                    &host_key_file,
                    &host,
                    &format!("deis-backup snapshot host key of {location}"),
                )?;
                let encryption = keys.encryption();
                made.encrypted = true;
                made.recipients.clone_from(&encryption.recipients);
                made.host_recipient = Some(encryption.host_recipient.clone());
                made.host_key_file = Some(host_key_file);
                Some(encryption)
            }
        };
        let config = format::RepositoryConfig {
            format: format::FORMAT.to_owned(),
            created: time::OffsetDateTime::now_utc(),
            encryption,
        };
        let data = serde_json::to_vec_pretty(&config).expect("config serializes");
        backend.sync().await?;
        backend
            .put_bytes(format::CONFIG_FILE, Bytes::from(data))
            .await?;
        backend.sync().await?;
        Ok(made)
    }

    /// A plain repository over any backend (no config check).
    pub fn with_backend(backend: Arc<dyn Backend>, fsync: bool) -> Self {
        Self {
            backend,
            fsync,
            keys: None,
        }
    }

    async fn backend_for(options: &RepositoryOptions, create: bool) -> Result<Arc<dyn Backend>> {
        if options.location().starts_with("s3://") {
            Ok(Arc::new(s3::S3Backend::connect(options, create).await?))
        } else {
            Ok(Arc::new(
                local::LocalBackend::open(Path::new(options.location()), create).await?,
            ))
        }
    }

    async fn read_config(backend: &dyn Backend) -> Result<format::RepositoryConfig> {
        let location = backend.location();
        let data = match backend.get_bytes(format::CONFIG_FILE).await {
            Ok(d) => d,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Err(Error::new(
                    ErrorKind::Repository,
                    format!("{location} is not a deis-backup repository"),
                    "check --repository, or create one with `deis-backup init`",
                ));
            }
            Err(e) => return Err(e),
        };
        let config: format::RepositoryConfig = serde_json::from_slice(&data).map_err(|e| {
            Error::repository(format!("{location}: bad {}: {e}", format::CONFIG_FILE))
        })?;
        if config.format != format::FORMAT {
            return Err(Error::repository(format!(
                "{location} has format {}, this deis-backup reads {}",
                config.format,
                format::FORMAT
            )));
        }
        Ok(config)
    }

    /// Whether the repository is encrypted.
    pub fn encrypted(&self) -> bool {
        self.keys.is_some()
    }

    /// Whether blobs can be read: a plain repository, or an operator's identity was given.
    pub fn reads_blobs(&self) -> bool {
        self.keys.as_ref().is_none_or(|k| k.reads_blobs())
    }

    /// A small file's content, opened when the repository is encrypted (`what` names it).
    pub async fn get_meta(&self, name: &str) -> Result<Vec<u8>> {
        let data = self.backend.get_bytes(name).await?;
        match &self.keys {
            None => Ok(data.to_vec()),
            Some(k) => seal::open_bytes(&data, k.identities(), name),
        }
    }

    /// Stores a small file that changes in place (a run's entry), sealed as [`Repository::put_meta`]
    /// seals.
    pub async fn replace_meta(&self, name: &str, data: Vec<u8>) -> Result<()> {
        let data = self.seal_meta(data)?;
        self.backend.replace_bytes(name, data).await
    }

    /// A small file's bytes as stored: sealed to the operators and the snapshot host when the
    /// repository is encrypted.
    fn seal_meta(&self, data: Vec<u8>) -> Result<Bytes> {
        Ok(Bytes::from(match &self.keys {
            None => data,
            Some(k) => seal::seal_bytes(&data, &k.metadata_recipients())?,
        }))
    }

    /// Stores a small file (manifest, listing, run), sealed to the operators and the snapshot
    /// host when the repository is encrypted. False when it existed already (kept).
    pub async fn put_meta(&self, name: &str, data: Vec<u8>) -> Result<bool> {
        let data = self.seal_meta(data)?;
        self.backend.put_bytes(name, data).await
    }

    pub fn location(&self) -> String {
        self.backend.location()
    }

    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// Complete snapshots (with a manifest), oldest first.
    pub async fn snapshots(&self) -> Result<Vec<SnapshotId>> {
        Ok(self.snapshot_dirs().await?.0)
    }

    /// Snapshot directories without a manifest (interrupted runs), oldest first.
    pub async fn incomplete_snapshots(&self) -> Result<Vec<SnapshotId>> {
        Ok(self.snapshot_dirs().await?.1)
    }

    async fn snapshot_dirs(&self) -> Result<(Vec<SnapshotId>, Vec<SnapshotId>)> {
        let files = self.backend.list(format::SNAPSHOTS_DIR).await?;
        let mut complete = BTreeMap::new();
        for (name, _) in files {
            let Some(rest) = name.strip_prefix(format::SNAPSHOTS_DIR) else {
                continue;
            };
            let Some((id, file)) = rest.split_once('/') else {
                continue;
            };
            let Ok(id) = id.parse::<SnapshotId>() else {
                continue;
            };
            let done = complete.entry(id).or_insert(false);
            *done |= file == format::MANIFEST_FILE;
        }
        let (c, i): (Vec<_>, Vec<_>) = complete.into_iter().partition(|(_, done)| *done);
        Ok((
            c.into_iter().map(|(id, _)| id).collect(),
            i.into_iter().map(|(id, _)| id).collect(),
        ))
    }

    /// The manifest of snapshot `id`.
    pub async fn manifest(&self, id: &SnapshotId) -> Result<Manifest> {
        let data = self
            .get_meta(&format::manifest_path(id))
            .await
            .map_err(|e| e.context(format!("snapshot {id}")))?;
        format::decode_manifest(&data, id)
    }

    /// The newest complete snapshot's manifest.
    pub async fn latest(&self) -> Result<Option<Manifest>> {
        match self.snapshots().await?.last() {
            Some(id) => Ok(Some(self.manifest(id).await?)),
            None => Ok(None),
        }
    }

    /// The listing of `bucket` in a snapshot, checked against the manifest's SHA-256.
    pub async fn listing(&self, manifest: &Manifest, bucket: &str) -> Result<Vec<ObjectEntry>> {
        let b = manifest.buckets.get(bucket).ok_or_else(|| {
            Error::not_found(format!("snapshot {} holds no bucket {bucket}", manifest.id))
        })?;
        let data = self.get_meta(&b.listing).await?;
        let sha = Sha256::of(&data);
        if sha != b.listing_sha256 {
            return Err(Error::integrity(format!(
                "snapshot {}: listing {} has SHA-256 {sha}, the manifest says {}",
                manifest.id, b.listing, b.listing_sha256
            )));
        }
        format::decode_listing(&data, &b.listing)
    }

    /// Where `blob` is stored: whole (its recorded size; sealed, the size its name says), cut
    /// short, or missing.
    async fn find_blob(&self, blob: &BlobRef) -> Result<Found> {
        match &self.keys {
            None => {
                let name = format::blob_path(&blob.sha256);
                Ok(match self.backend.size(&name).await? {
                    None => Found::Missing,
                    Some(n) if n == blob.size => Found::Whole(name),
                    Some(n) => Found::Cut(name, n),
                })
            }
            Some(k) => self.find_sealed(&k.blob_prefix(&blob.sha256)).await,
        }
    }

    /// The sealed blob `<prefix><sealed size>` whose size is what its name says.
    async fn find_sealed(&self, prefix: &str) -> Result<Found> {
        let mut cut = None;
        for (name, size) in self.backend.list(prefix).await? {
            let Some(said) = name.strip_prefix(prefix) else {
                continue;
            };
            if said.parse::<u64>().ok() == Some(size) {
                return Ok(Found::Whole(name));
            }
            cut.get_or_insert((name, size));
        }
        Ok(cut.map_or(Found::Missing, |(n, s)| Found::Cut(n, s)))
    }

    /// Whether `blob` is stored whole.
    pub async fn has_blob(&self, blob: &BlobRef) -> Result<bool> {
        Ok(matches!(self.find_blob(blob).await?, Found::Whole(_)))
    }

    /// Checks a blob: present with its recorded size (sealed: the size its name says), and, with
    /// `rehash`, read whole (sealed: opened) to see it still hashes to its name. Also returns the
    /// bytes read.
    pub async fn check_blob(&self, blob: &BlobRef, rehash: bool) -> Result<(BlobCheck, u64)> {
        let name = match self.find_blob(blob).await? {
            Found::Missing => return Ok((BlobCheck::Missing, 0)),
            Found::Cut(name, n) if self.keys.is_some() => {
                let said = name.rsplit_once('.').map_or("?", |(_, s)| s);
                return Ok((
                    BlobCheck::Unreadable(format!(
                        "blob {} is cut short: {n} bytes stored, its name says {said}",
                        blob.sha256
                    )),
                    0,
                ));
            }
            Found::Cut(_, n) => return Ok((BlobCheck::WrongSize(n), 0)),
            Found::Whole(_) if !rehash => return Ok((BlobCheck::Intact, 0)),
            Found::Whole(name) => name,
        };
        if self.keys.is_some() {
            return match self.open_sealed(&name, &blob.sha256).await {
                Ok((_, got, n)) if got == blob.sha256 => Ok((BlobCheck::Intact, n)),
                Ok((_, got, n)) => Ok((BlobCheck::Corrupt(got), n)),
                Err(e) if e.kind() == ErrorKind::Integrity => {
                    Ok((BlobCheck::Unreadable(e.message().to_owned()), 0))
                }
                Err(e) => Err(e),
            };
        }
        let mut reader = self.open_blob(&blob.sha256).await?;
        let mut h = sha2::Sha256::new();
        let mut buf = vec![0u8; BUF_SIZE];
        let mut read = 0u64;
        loop {
            let n = reader
                .read(&mut buf)
                .await
                .map_err(|e| Error::io(format!("read blob {}", blob.sha256), e))?;
            if n == 0 {
                break;
            }
            read += n as u64;
            h.update(&buf[..n]);
        }
        let got = Sha256::finish(h);
        Ok((
            if got == blob.sha256 {
                BlobCheck::Intact
            } else {
                BlobCheck::Corrupt(got)
            },
            read,
        ))
    }

    /// Opens the sealed blob `name` into a staging file: the file, what its bytes hash to, and
    /// how many there are. Needs an operator's identity.
    async fn open_sealed(&self, name: &str, sha256: &Sha256) -> Result<(LocalFile, Sha256, u64)> {
        let keys = self.keys.clone().expect("a sealed repository");
        if !keys.reads_blobs() {
            return Err(keys.blob_refused(&self.location()));
        }
        let sealed = self.backend.local_file(name).await?;
        let plain = self.staging_file().await?;
        let (src, dst) = (sealed.path().to_owned(), plain.to_path_buf());
        let what = format!("blob {sha256}");
        let (got, n) = tokio::task::spawn_blocking(move || {
            seal::open_file(&src, &dst, keys.identities(), &what)
        })
        .await
        .map_err(|e| Error::repository(format!("opening a blob failed: {e}")))??;
        drop(sealed);
        Ok((LocalFile::staged(plain), got, n))
    }

    /// A local file with the blob's bytes (for uploads by range). Sealed, it is opened whole and
    /// must hash to its name first: a damaged, cut or swapped blob is an error before any byte is
    /// used.
    pub async fn blob_file(&self, sha256: &Sha256) -> Result<LocalFile> {
        let Some(keys) = &self.keys else {
            return self
                .backend
                .local_file(&format::blob_path(sha256))
                .await
                .map_err(|e| e.context(format!("blob {sha256}")));
        };
        let name = match self.find_sealed(&keys.blob_prefix(sha256)).await? {
            Found::Whole(name) => name,
            Found::Missing => {
                return Err(Error::not_found(format!("blob {sha256} is missing")));
            }
            Found::Cut(_, n) => {
                return Err(Error::integrity(format!(
                    "blob {sha256} is cut short ({n} bytes stored)"
                )));
            }
        };
        let (file, got, _) = self.open_sealed(&name, sha256).await?;
        if got != *sha256 {
            return Err(Error::integrity(format!(
                "blob {sha256} holds other bytes (they hash to {got}): swapped or damaged"
            )));
        }
        Ok(file)
    }

    /// Streams a blob.
    pub async fn open_blob(&self, sha256: &Sha256) -> Result<BlobReader> {
        let file = self.blob_file(sha256).await?;
        let f = tokio::fs::File::open(file.path())
            .await
            .map_err(|e| Error::io(format!("open {}", file.path().display()), e))?;
        Ok(BlobReader {
            file: f,
            _local: file,
        })
    }

    /// A small blob's bytes, at most `max` of them (a listing's JSON object, an export): read
    /// whole, `what` naming it in an error.
    pub async fn read_blob(&self, sha256: &Sha256, max: u64, what: &str) -> Result<Vec<u8>> {
        let mut body = Vec::new();
        self.open_blob(sha256)
            .await?
            .take(max)
            .read_to_end(&mut body)
            .await
            .map_err(|e| Error::io(format!("reading {what}"), e))?;
        Ok(body)
    }

    /// A writer for a new blob; [`BlobWriter::finish`] stores it (once).
    // Async and fallible for callers' sake: a backend may need to prepare staging; today the
    // staging file is only created once a blob outgrows the in-memory buffer.
    #[allow(clippy::unused_async)]
    pub async fn blob_writer(&self) -> Result<BlobWriter> {
        Ok(BlobWriter {
            repo: self.clone(),
            staged: None,
            sealer: None,
            buf: Vec::with_capacity(64 * 1024),
            hasher: sha2::Sha256::new(),
            size: 0,
        })
    }

    /// Removes staging files (`.blob-*`, `.put-*`) older than `age` that a killed run left behind,
    /// and returns how many went. Only files with those prefixes are touched: an S3 repository's
    /// staging directory may be the system's temporary directory. Run it under the cluster lock; the
    /// age keeps it off files another process (a restore reading blobs) is still using.
    pub async fn clean_staging(&self, age: std::time::Duration) -> Result<usize> {
        let dir = self.backend.staging_dir().to_owned();
        tokio::task::spawn_blocking(move || {
            let what = |e: std::io::Error| Error::io(format!("clean {}", dir.display()), e);
            let entries = match std::fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
                Err(e) => return Err(what(e)),
            };
            let mut removed = 0;
            for entry in entries {
                let entry = entry.map_err(what)?;
                let name = entry.file_name();
                let ours = name.to_str().is_some_and(|n| n.starts_with(".blob-") || n.starts_with(".put-"));
                let Ok(md) = entry.metadata() else { continue };
                let old = md.modified().ok().and_then(|m| m.elapsed().ok()).is_some_and(|e| e >= age);
                if ours && md.is_file() && old {
                    match std::fs::remove_file(entry.path()) {
                        Ok(()) => {
                            tracing::info!(file = %entry.path().display(), "removed a stale staging file");
                            removed += 1;
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => return Err(what(e)),
                    }
                }
            }
            Ok(removed)
        })
        .await
        .map_err(|e| Error::repository(format!("cleaning the staging directory failed: {e}")))?
    }

    /// A new empty file in the staging directory, for downloads that write at offsets; hand it to
    /// [`Repository::store_staged`]. Removed on drop if not stored.
    pub async fn staging_file(&self) -> Result<tempfile::TempPath> {
        let dir = self.backend.staging_dir().to_owned();
        tokio::task::spawn_blocking(move || {
            tempfile::Builder::new()
                .prefix(".blob-")
                .tempfile_in(&dir)
                .map(tempfile::NamedTempFile::into_temp_path)
                .map_err(|e| Error::io(format!("create a staging file in {}", dir.display()), e))
        })
        .await
        .map_err(|e| Error::repository(format!("staging task failed: {e}")))?
    }

    /// Makes everything stored so far durable (unless the repository was opened without fsync).
    pub async fn sync(&self) -> Result<()> {
        if self.fsync {
            self.backend.sync().await?;
        }
        Ok(())
    }

    /// Stores a staged file whose bytes hash to `blob` as that blob (unless it is stored already).
    /// The caller computed `blob` from the file itself (e.g. while checking a download).
    pub async fn store_staged(
        &self,
        temp: tempfile::TempPath,
        blob: BlobRef,
    ) -> Result<StoredBlob> {
        if self.has_blob(&blob).await? {
            return Ok(StoredBlob { blob, new: false });
        }
        let new = self.put_blob_file(&blob, &temp).await?;
        Ok(StoredBlob { blob, new })
    }

    /// Stores the staged file `plain` (whose bytes are `blob`'s) as `blob`: moved there (plain),
    /// or sealed into another staging file that is (encrypted; `plain` stays the caller's).
    async fn put_blob_file(&self, blob: &BlobRef, plain: &Path) -> Result<bool> {
        let Some(keys) = self.keys.clone() else {
            return self
                .backend
                .put_file(&format::blob_path(&blob.sha256), plain, blob.size)
                .await;
        };
        let (src, dir) = (plain.to_owned(), self.backend.staging_dir().to_owned());
        let k = keys.clone();
        let (sealed, size) =
            tokio::task::spawn_blocking(move || seal::seal_file(&src, &dir, &k.blob_recipients()))
                .await
                .map_err(|e| Error::repository(format!("sealing a blob failed: {e}")))??;
        let name = format!("{}{size}", keys.blob_prefix(&blob.sha256));
        self.backend.put_file(&name, &sealed, size).await
    }

    /// Stores small `data` (`blob`'s bytes) in one write.
    async fn put_blob_bytes(&self, blob: &BlobRef, data: Vec<u8>) -> Result<bool> {
        let Some(keys) = &self.keys else {
            return self
                .backend
                .put_bytes(&format::blob_path(&blob.sha256), Bytes::from(data))
                .await;
        };
        let sealed = seal::seal_bytes(&data, &keys.blob_recipients())?;
        let name = format!("{}{}", keys.blob_prefix(&blob.sha256), sealed.len());
        self.backend.put_bytes(&name, Bytes::from(sealed)).await
    }

    /// Stores everything `reader` yields as a blob.
    pub async fn write_blob_from<R: AsyncRead + Unpin + Send>(
        &self,
        mut reader: R,
    ) -> Result<StoredBlob> {
        let mut w = self.blob_writer().await?;
        let mut buf = vec![0u8; BUF_SIZE];
        loop {
            let n = reader
                .read(&mut buf)
                .await
                .map_err(|e| Error::io("read a part's stream", e))?;
            if n == 0 {
                break;
            }
            w.write(&buf[..n]).await?;
        }
        w.finish().await
    }

    /// Starts a snapshot; nothing is visible as a snapshot until [`SnapshotWriter::commit`].
    pub fn start_snapshot(&self, id: SnapshotId) -> SnapshotWriter {
        SnapshotWriter {
            repo: self.clone(),
            id,
            started: time::OffsetDateTime::now_utc(),
            labels: BTreeMap::new(),
            parts: BTreeMap::new(),
            buckets: BTreeMap::new(),
            part_info: BTreeMap::new(),
            wal_e: None,
            warnings: Vec::new(),
        }
    }

    /// Deletes a snapshot: its manifest first (so it is never half-there and complete), then the
    /// rest of its directory. Works on incomplete snapshots too. Blobs stay until
    /// [`Repository::prune_blobs`].
    pub async fn delete_snapshot(&self, id: &SnapshotId) -> Result<()> {
        self.backend.delete(&[format::manifest_path(id)]).await?;
        let rest: Vec<String> = self
            .backend
            .list(&format::snapshot_dir(id))
            .await?
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        self.backend.delete(&rest).await
    }

    /// Every blob any complete snapshot names (parts and listed objects).
    pub async fn referenced_blobs(&self) -> Result<HashSet<Sha256>> {
        let mut out = HashSet::new();
        for id in self.snapshots().await? {
            let m = self.manifest(&id).await?;
            out.extend(m.parts.values().flat_map(PartRef::blobs).map(|b| b.sha256));
            for bucket in m.buckets.keys() {
                out.extend(
                    self.listing(&m, bucket)
                        .await?
                        .into_iter()
                        .map(|e| e.sha256),
                );
            }
        }
        Ok(out)
    }

    /// Every stored blob: its name in the repository and its size.
    pub async fn blobs(&self) -> Result<Vec<(String, u64)>> {
        let dir = if self.keys.is_some() {
            format::BLOBS_KEYED_DIR
        } else {
            format::BLOBS_DIR
        };
        self.backend.list(dir).await
    }

    /// The blobs among `stored` (from [`Repository::blobs`]) that none of `keep` is stored as.
    pub fn unreferenced<'a>(
        &self,
        stored: &'a [(String, u64)],
        keep: &HashSet<Sha256>,
    ) -> Vec<&'a (String, u64)> {
        // A sealed blob is stored as its keyed prefix and its sealed size.
        let stem = |name: &'a str| match self.keys {
            None => name,
            Some(_) => name
                .rsplit_once('.')
                .map_or(name, |(s, _)| &name[..=s.len()]),
        };
        let kept: HashSet<String> = keep
            .iter()
            .map(|sha| match &self.keys {
                None => format::blob_path(sha),
                Some(k) => k.blob_prefix(sha),
            })
            .collect();
        stored
            .iter()
            .filter(|(name, _)| !kept.contains(stem(name)))
            .collect()
    }

    /// Deletes every blob no complete snapshot names, in batches, calling `still_held` before each
    /// batch (it returns an error once the caller's lock is lost). Run it only while no snapshot is
    /// being written (the caller holds the cluster lock): an in-progress snapshot's blobs are not
    /// yet named by any manifest.
    pub async fn prune_blobs(&self, still_held: impl Fn() -> Result<()>) -> Result<PruneStats> {
        let keep = self.referenced_blobs().await?;
        let stored = self.blobs().await?;
        let unreferenced = self.unreferenced(&stored, &keep);
        let stats = PruneStats::of(&stored, &unreferenced);
        let doomed: Vec<String> = unreferenced.into_iter().map(|(n, _)| n.clone()).collect();
        for batch in doomed.chunks(PRUNE_BATCH) {
            still_held()?;
            self.backend.delete(batch).await?;
        }
        Ok(stats)
    }
}

const BUF_SIZE: usize = 1024 * 1024;
/// Age past which a staging file no run can still be using is removed (at a snapshot's or a
/// prune's start, under the cluster lock).
pub const STALE_STAGING_AGE: std::time::Duration = std::time::Duration::from_secs(6 * 3600);
/// Blobs deleted between two checks of the cluster lock.
const PRUNE_BATCH: usize = 500;

/// What [`Repository::check_blob`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlobCheck {
    Intact,
    Missing,
    /// Present with this many bytes instead of the recorded size.
    WrongSize(u64),
    /// The right size, but the bytes hash to this instead of the blob's name.
    Corrupt(Sha256),
    /// Sealed, and cut short (shorter than its name says), or it does not open: changed or cut
    /// bytes (age's authentication says so). The text says which.
    Unreadable(String),
}

/// A blob being read.
#[derive(Debug)]
pub struct BlobReader {
    file: tokio::fs::File,
    _local: LocalFile,
}

impl AsyncRead for BlobReader {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.file).poll_read(cx, buf)
    }
}

/// A blob stored by [`BlobWriter::finish`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredBlob {
    pub blob: BlobRef,
    /// False when the same bytes were already stored.
    pub new: bool,
}

/// Writes a blob while computing its SHA-256; `finish` stores it under its hash unless a blob
/// with that hash exists. Up to 1 MiB stays in a buffer (small objects never touch a staging file
/// and are stored with one atomic write); larger blobs stream through a staging file, which in an
/// encrypted repository holds them sealed as they arrive (never in the clear).
#[derive(Debug)]
pub struct BlobWriter {
    repo: Repository,
    staged: Option<(tokio::fs::File, tempfile::TempPath)>,
    /// Encrypted repositories: a blob that outgrew the buffer, sealed as it is written.
    sealer: Option<seal::Sealer>,
    buf: Vec<u8>,
    hasher: sha2::Sha256,
    size: u64,
}

impl BlobWriter {
    pub async fn write(&mut self, data: &[u8]) -> Result<()> {
        self.hasher.update(data);
        self.size += data.len() as u64;
        if let Some(keys) = &self.repo.keys
            && (self.sealer.is_some() || self.buf.len() + data.len() > BUF_SIZE)
        {
            if self.sealer.is_none() {
                let mut s =
                    seal::Sealer::start(self.repo.backend.staging_dir(), &keys.blob_recipients())?;
                s.write(&std::mem::take(&mut self.buf))?;
                self.sealer = Some(s);
            }
            return self.sealer.as_mut().expect("started above").write(data);
        }
        if self.buf.len() + data.len() > BUF_SIZE {
            self.flush_buf().await?;
        }
        if data.len() >= BUF_SIZE {
            let (file, temp) = self.staging_file().await?;
            file.write_all(data)
                .await
                .map_err(|e| Error::io(format!("write {}", temp.display()), e))?;
        } else {
            self.buf.extend_from_slice(data);
        }
        Ok(())
    }

    async fn staging_file(&mut self) -> Result<&mut (tokio::fs::File, tempfile::TempPath)> {
        if self.staged.is_none() {
            let dir = self.repo.backend.staging_dir().to_owned();
            let (file, temp) = tokio::task::spawn_blocking(move || {
                tempfile::Builder::new()
                    .prefix(".blob-")
                    .tempfile_in(&dir)
                    .map_err(|e| {
                        Error::io(format!("create a staging file in {}", dir.display()), e)
                    })
            })
            .await
            .map_err(|e| Error::repository(format!("staging task failed: {e}")))??
            .into_parts();
            self.staged = Some((tokio::fs::File::from_std(file), temp));
        }
        Ok(self.staged.as_mut().expect("just created"))
    }

    async fn flush_buf(&mut self) -> Result<()> {
        if !self.buf.is_empty() {
            let buf = std::mem::take(&mut self.buf);
            let (file, temp) = self.staging_file().await?;
            file.write_all(&buf)
                .await
                .map_err(|e| Error::io(format!("write {}", temp.display()), e))?;
            self.buf = buf;
            self.buf.clear();
        }
        Ok(())
    }

    /// Forgets everything written (a download starts over).
    pub async fn reset(&mut self) -> Result<()> {
        self.buf.clear();
        self.sealer = None;
        self.hasher = sha2::Sha256::new();
        self.size = 0;
        if let Some((file, temp)) = &mut self.staged {
            let what = format!("truncate {}", temp.display());
            file.set_len(0).await.map_err(|e| Error::io(&what, e))?;
            file.seek(std::io::SeekFrom::Start(0))
                .await
                .map_err(|e| Error::io(&what, e))?;
        }
        Ok(())
    }

    /// Bytes written so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Stores the blob (unless its bytes are already stored) and returns its reference.
    pub async fn finish(mut self) -> Result<StoredBlob> {
        let blob = BlobRef {
            sha256: Sha256::from(<[u8; 32]>::from(self.hasher.finalize_reset())),
            size: self.size,
        };
        if self.repo.has_blob(&blob).await? {
            return Ok(StoredBlob { blob, new: false });
        }
        if let Some(sealer) = self.sealer.take() {
            let (temp, size) = sealer.finish()?;
            let keys = self
                .repo
                .keys
                .as_ref()
                .expect("sealed only in a sealed repository");
            let name = format!("{}{size}", keys.blob_prefix(&blob.sha256));
            let new = self.repo.backend.put_file(&name, &temp, size).await?;
            return Ok(StoredBlob { blob, new });
        }
        if self.staged.is_none() {
            // Small: one atomic (and durable) write, no staging file of our own.
            let data = std::mem::take(&mut self.buf);
            let new = self.repo.put_blob_bytes(&blob, data).await?;
            return Ok(StoredBlob { blob, new });
        }
        self.flush_buf().await?;
        let (mut file, temp) = self.staged.take().expect("staged above");
        let what = format!("write {}", temp.display());
        file.flush().await.map_err(|e| Error::io(&what, e))?;
        drop(file);
        let new = self.repo.put_blob_file(&blob, &temp).await?;
        Ok(StoredBlob { blob, new })
    }
}

/// A snapshot being written: parts and bucket listings, then the manifest.
#[derive(Debug)]
pub struct SnapshotWriter {
    repo: Repository,
    id: SnapshotId,
    started: time::OffsetDateTime,
    labels: BTreeMap<String, String>,
    parts: BTreeMap<String, PartRef>,
    buckets: BTreeMap<String, BucketRef>,
    part_info: BTreeMap<String, format::PartInfo>,
    wal_e: Option<WalChain>,
    warnings: Vec<String>,
}

impl SnapshotWriter {
    pub fn id(&self) -> &SnapshotId {
        &self.id
    }

    pub fn repository(&self) -> &Repository {
        &self.repo
    }

    /// Records where part `name` came from and how taking it went.
    pub fn describe_part(&mut self, name: &str, info: format::PartInfo) {
        self.part_info.insert(name.to_owned(), info);
    }

    /// Records a free-form fact in the manifest (never a secret).
    pub fn label(&mut self, key: impl Into<String>, value: impl Into<String>) {
        self.labels.insert(key.into(), value.into());
    }

    /// Adds stored blobs as the part `name` (e.g. `database/pg_dumpall.sql.zst`).
    pub fn add_part(&mut self, name: &str, part: impl Into<PartRef>) -> Result<()> {
        if name.is_empty() || name.contains(['\0', '\n']) {
            return Err(Error::config(format!("'{name}' is not a part name")));
        }
        if self.parts.contains_key(name) {
            return Err(Error::config(format!(
                "snapshot {} already has a part {name}",
                self.id
            )));
        }
        self.parts.insert(name.to_owned(), part.into());
        Ok(())
    }

    /// Streams `reader` into a blob and adds it as the part `name`.
    pub async fn add_part_from_reader<R: AsyncRead + Unpin + Send>(
        &mut self,
        name: &str,
        reader: R,
    ) -> Result<BlobRef> {
        let stored = self.repo.write_blob_from(reader).await?;
        self.add_part(name, stored.blob)?;
        Ok(stored.blob)
    }

    /// Writes `bucket`'s listing (the objects' blobs must be stored already).
    pub async fn add_bucket(&mut self, bucket: &str, entries: &[ObjectEntry]) -> Result<BucketRef> {
        if !format::safe_name(bucket) {
            return Err(Error::config(format!(
                "'{bucket}' is not a bucket name this format stores"
            )));
        }
        let data = format::encode_listing(entries)?;
        let listing = format::listing_path(&self.id, bucket);
        let b = BucketRef {
            listing: listing.clone(),
            listing_sha256: Sha256::of(&data),
            objects: entries.len() as u64,
            bytes: entries.iter().map(|e| e.size).sum(),
            vanished: Vec::new(),
        };
        self.repo.put_meta(&listing, data).await?;
        self.buckets.insert(bucket.to_owned(), b.clone());
        Ok(b)
    }

    /// Records the keys of `bucket` (added already) that were listed but gone before their
    /// download.
    pub fn bucket_vanished(&mut self, bucket: &str, keys: Vec<String>) {
        if let Some(b) = self.buckets.get_mut(bucket) {
            b.vanished = keys;
        }
    }

    /// Records the database bucket's WAL-E chain.
    pub fn wal_chain(&mut self, chain: WalChain) {
        self.wal_e = Some(chain);
    }

    /// Records a warning about the snapshot as a whole (never a secret).
    pub fn warn(&mut self, warning: impl Into<String>) {
        self.warnings.push(warning.into());
    }

    /// Writes the manifest, last: from now on the snapshot is complete.
    pub async fn commit(self) -> Result<Manifest> {
        let m = Manifest {
            format: format::FORMAT.to_owned(),
            id: self.id,
            started: self.started,
            completed: time::OffsetDateTime::now_utc(),
            labels: self.labels,
            parts: self.parts,
            buckets: self.buckets,
            part_info: self.part_info,
            wal_e: self.wal_e,
            warnings: self.warnings,
        };
        let data = serde_json::to_vec_pretty(&m).expect("a manifest serializes");
        // Everything the manifest names reaches the disk before the manifest does.
        self.repo.sync().await?;
        self.repo
            .put_meta(&format::manifest_path(&m.id), data)
            .await?;
        self.repo.sync().await?;
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn repo(dir: &Path) -> Repository {
        Repository::open_or_init(&RepositoryOptions {
            location: Some(dir.join("repo").display().to_string()),
            fsync: Some(false),
            ..RepositoryOptions::default()
        })
        .await
        .unwrap()
    }

    fn entry(key: &str, blob: &BlobRef) -> ObjectEntry {
        ObjectEntry {
            key: key.into(),
            size: blob.size,
            etag: "x".into(),
            sha256: blob.sha256,
            last_modified: None,
            meta: crate::s3::ObjectMeta::default(),
        }
    }

    #[tokio::test]
    async fn repository_blobs_are_content_addressed_and_stored_once() {
        let tmp = tempfile::tempdir().unwrap();
        let r = repo(tmp.path()).await;
        let a = r.write_blob_from(&b"hello"[..]).await.unwrap();
        assert!(a.new);
        assert_eq!(
            a.blob.sha256.to_string(),
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        let b = r.write_blob_from(&b"hello"[..]).await.unwrap();
        assert!(!b.new, "same bytes are stored once");
        assert_eq!(r.blobs().await.unwrap().len(), 1);
        let mut back = Vec::new();
        r.open_blob(&a.blob.sha256)
            .await
            .unwrap()
            .read_to_end(&mut back)
            .await
            .unwrap();
        assert_eq!(back, b"hello");
        // A reset writer forgets what it had.
        let mut w = r.blob_writer().await.unwrap();
        w.write(b"garbage").await.unwrap();
        w.reset().await.unwrap();
        w.write(b"hello").await.unwrap();
        assert_eq!(w.finish().await.unwrap().blob, a.blob);
        // A blob larger than the buffer goes through a staging file, reset included.
        let big: Vec<u8> = (0..3 * BUF_SIZE + 7)
            .map(|i| u8::try_from(i % 251).unwrap())
            .collect();
        let mut w = r.blob_writer().await.unwrap();
        w.write(&big[..=BUF_SIZE]).await.unwrap();
        w.reset().await.unwrap();
        for chunk in big.chunks(100_000) {
            w.write(chunk).await.unwrap();
        }
        let stored = w.finish().await.unwrap();
        assert_eq!(stored.blob.size, big.len() as u64);
        assert_eq!(stored.blob.sha256, Sha256::of(&big));
        let mut back = Vec::new();
        r.open_blob(&stored.blob.sha256)
            .await
            .unwrap()
            .read_to_end(&mut back)
            .await
            .unwrap();
        assert!(back == big, "big blob round-trips");
        // Nothing is left in staging.
        let staged = std::fs::read_dir(tmp.path().join("repo/tmp"))
            .unwrap()
            .count();
        assert_eq!(staged, 0);
    }

    #[tokio::test]
    async fn stale_staging_files_are_cleaned_and_fresh_ones_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let r = repo(tmp.path()).await;
        let staging = tmp.path().join("repo/tmp");
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(7 * 3600);
        for name in [".blob-old", ".put-old", ".blob-new", "not-ours"] {
            let f = std::fs::File::create(staging.join(name)).unwrap();
            if name != ".blob-new" {
                f.set_modified(old).unwrap();
            }
        }
        assert_eq!(r.clean_staging(STALE_STAGING_AGE).await.unwrap(), 2);
        let mut left: Vec<String> = std::fs::read_dir(&staging)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, [".blob-new", "not-ours"]);
    }

    #[tokio::test]
    async fn repository_snapshot_is_complete_only_with_its_manifest() {
        let tmp = tempfile::tempdir().unwrap();
        let r = repo(tmp.path()).await;
        let id: SnapshotId = "20260101T000000Z-0001".parse().unwrap();
        let mut s = r.start_snapshot(id.clone());
        let part = s
            .add_part_from_reader("etcd/export.json", &b"{}"[..])
            .await
            .unwrap();
        let obj = r.write_blob_from(&b"object"[..]).await.unwrap().blob;
        s.add_bucket("db_wal", &[entry("a b+%/ü", &obj)])
            .await
            .unwrap();
        assert!(r.snapshots().await.unwrap().is_empty(), "no manifest yet");
        assert_eq!(r.incomplete_snapshots().await.unwrap(), vec![id.clone()]);
        s.label("cluster", "local");
        let m = s.commit().await.unwrap();
        assert_eq!(r.snapshots().await.unwrap(), vec![id.clone()]);
        assert!(r.incomplete_snapshots().await.unwrap().is_empty());
        let back = r.manifest(&id).await.unwrap();
        assert_eq!(back, m);
        assert_eq!(back.parts["etcd/export.json"], PartRef::Blob(part));
        let listing = r.listing(&back, "db_wal").await.unwrap();
        assert_eq!(listing[0].key, "a b+%/ü");
        assert_eq!(r.latest().await.unwrap().unwrap().id, id);
        // A tampered listing is caught.
        let path = tmp
            .path()
            .join("repo")
            .join(&back.buckets["db_wal"].listing);
        std::fs::write(&path, b"{}\n").unwrap();
        let err = r.listing(&back, "db_wal").await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Integrity);
    }

    #[tokio::test]
    async fn repository_blob_cut_short_is_written_again() {
        let tmp = tempfile::tempdir().unwrap();
        let r = repo(tmp.path()).await;
        let small = r.write_blob_from(&b"small blob"[..]).await.unwrap().blob;
        let big_bytes = vec![5u8; BUF_SIZE + 10];
        let big = r.write_blob_from(&big_bytes[..]).await.unwrap().blob;
        // As a crash before the flush may leave them: present, but short.
        for b in [&small, &big] {
            let path = tmp.path().join("repo").join(format::blob_path(&b.sha256));
            std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .unwrap()
                .set_len(3)
                .unwrap();
        }
        let again = r.write_blob_from(&b"small blob"[..]).await.unwrap();
        assert!(again.new, "a short blob is replaced");
        let again = r.write_blob_from(&big_bytes[..]).await.unwrap();
        assert!(again.new, "a short staged blob is replaced");
        for (b, len) in [(&small, 10), (&big, BUF_SIZE + 10)] {
            assert_eq!(r.check_blob(b, true).await.unwrap().0, BlobCheck::Intact);
            assert_eq!(b.size, len as u64);
        }
    }

    #[tokio::test]
    async fn repository_manifest_reaches_the_disk_after_everything_it_names() {
        let backend = Arc::new(crate::testkit::MemoryBackend::new());
        let r = Repository::with_backend(backend.clone(), true);
        let id: SnapshotId = "20260101T000000Z-0002".parse().unwrap();
        let mut s = r.start_snapshot(id.clone());
        let big = vec![9u8; 2 * BUF_SIZE];
        s.add_part_from_reader("store/store.tar.zst", &big[..])
            .await
            .unwrap();
        let obj = r.write_blob_from(&b"object"[..]).await.unwrap().blob;
        s.add_bucket("registry", &[entry("k", &obj)]).await.unwrap();
        assert!(
            !backend.log().contains(&"sync".to_owned()),
            "blobs are not flushed one by one"
        );
        s.commit().await.unwrap();
        let log = backend.log();
        let manifest = format!("put {}", format::manifest_path(&id));
        let at = log.iter().position(|l| *l == manifest).unwrap();
        assert_eq!(log[at - 1], "sync", "flushed before the manifest: {log:?}");
        assert_eq!(
            log[at + 1..],
            ["sync"],
            "the manifest flushed last: {log:?}"
        );
        assert_eq!(log.iter().filter(|l| l.starts_with("put ")).count(), 4);
        // Opened without fsync (throw-away repositories), nothing is flushed.
        backend.clear_log();
        let r = Repository::with_backend(backend.clone(), false);
        let s = r.start_snapshot("20260101T000001Z-0003".parse().unwrap());
        s.commit().await.unwrap();
        assert!(!backend.log().contains(&"sync".to_owned()));
    }

    #[tokio::test]
    async fn repository_prune_deletes_only_unreferenced_blobs() {
        let tmp = tempfile::tempdir().unwrap();
        let r = repo(tmp.path()).await;
        let kept = r.write_blob_from(&b"kept"[..]).await.unwrap().blob;
        let part = r.write_blob_from(&b"part"[..]).await.unwrap().blob;
        let orphan = r.write_blob_from(&b"orphan"[..]).await.unwrap().blob;
        let id: SnapshotId = "s1".parse().unwrap();
        let mut s = r.start_snapshot(id.clone());
        s.add_bucket("registry", &[entry("k", &kept)])
            .await
            .unwrap();
        s.add_part("p", part).unwrap();
        s.commit().await.unwrap();
        assert_eq!(
            r.check_blob(&kept, true).await.unwrap().0,
            BlobCheck::Intact
        );
        let wrong = BlobRef { size: 5, ..kept };
        assert_eq!(
            r.check_blob(&wrong, true).await.unwrap().0,
            BlobCheck::WrongSize(4)
        );
        let path = tmp
            .path()
            .join("repo")
            .join(format::blob_path(&orphan.sha256));
        std::fs::write(&path, b"ORPHAN").unwrap();
        assert!(matches!(
            r.check_blob(&orphan, true).await.unwrap().0,
            BlobCheck::Corrupt(_)
        ));
        let stats = r.prune_blobs(|| Ok(())).await.unwrap();
        assert_eq!(stats.blobs_deleted, 1);
        assert_eq!(stats.bytes_deleted, orphan.size);
        assert!(!r.has_blob(&orphan).await.unwrap());
        assert_eq!(
            r.check_blob(&orphan, true).await.unwrap().0,
            BlobCheck::Missing
        );
        assert!(r.has_blob(&kept).await.unwrap());
        r.delete_snapshot(&id).await.unwrap();
        assert!(r.snapshots().await.unwrap().is_empty());
        assert!(r.incomplete_snapshots().await.unwrap().is_empty());
        assert_eq!(r.prune_blobs(|| Ok(())).await.unwrap().blobs_deleted, 2);
    }

    #[tokio::test]
    async fn repository_open_refuses_a_plain_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let err = Repository::open(&RepositoryOptions {
            location: Some(tmp.path().display().to_string()),
            ..RepositoryOptions::default()
        })
        .await
        .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Repository, "{err}");
    }
}

#[cfg(test)]
mod encrypted_tests;
