//! Encryption at rest: how an encrypted repository seals its files (`docs/FORMAT.md`, "Encrypted
//! repositories").
//!
//! Owns: an encrypted repository's keys ([`Keys`]: the operators' recipients, the snapshot host's
//! key, the name key), sealing and opening small files ([`seal_bytes`], [`open_bytes`]) and blobs
//! ([`seal_file`], [`open_file`]), keyed blob names ([`Keys::blob_prefix`]), and the identity and
//! recipients files ([`read_identities`], [`read_recipients`], [`write_identity`]).
//! Invariants:
//! - Everything sealed is zstd-compressed, then an age file to X25519 recipients: Debian's
//!   `age -d -i KEY FILE | zstd -d` opens any of them.
//! - Blobs are sealed to the operators' recipients only. Metadata (manifests, listings, runs and
//!   `keys.age`) is sealed to them and to the snapshot host's key as well: the host reads what an
//!   incremental snapshot reuses (listing keys, ETags, segment fingerprints, blob names) and no
//!   blob's bytes.
//! - A blob's name is an HMAC-SHA-256, under the name key, of its SHA-256: a reader of the bucket
//!   cannot tell whether it holds a given file, and equal bytes still get one name.
//! - The name key and identities live only in memory and, sealed, in `keys.age` and the mode-600
//!   identity files; `Debug` prints none of them, and no error quotes them.
//! - An identity file that group or others can read is refused, as the agents' keys are.

use std::fmt;
use std::io::{BufRead as _, BufReader, Read, Write};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;
use std::str::FromStr as _;

use age::secrecy::ExposeSecret as _;
use age::x25519::{Identity, Recipient};
use hmac::Mac as _;
use secrecy::SecretBox;
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use super::format::{BLOBS_KEYED_DIR, Encryption, SCHEME, Sha256};
use crate::error::{Error, ErrorKind, Result};

/// zstd level of metadata (small JSON, read whole).
const METADATA_LEVEL: i32 = 3;
/// zstd level of blobs: most are compressed already (zstd parts, lzop WAL, gzip layers), so the
/// fastest level, which stores what does not shrink.
const BLOB_LEVEL: i32 = 1;
/// The most a small sealed file (manifest, listing, run) may open to.
const MAX_METADATA: u64 = 1 << 30;

/// The keys of an open encrypted repository.
pub struct Keys {
    operators: Vec<Recipient>,
    host: Recipient,
    identities: Vec<Identity>,
    name_key: SecretBox<[u8; 32]>,
}

impl fmt::Debug for Keys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keys")
            .field("operators", &self.operators.len())
            .field("identities", &self.identities.len())
            .field("reads_blobs", &self.reads_blobs())
            .finish_non_exhaustive()
    }
}

/// What `keys.age` holds.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct KeyFile {
    name_key: String,
}

impl Keys {
    /// New keys for a new repository sealed to `operators`: a new host key (returned, for its
    /// file) and a new name key.
    pub fn create(operators: Vec<Recipient>) -> Result<(Self, Identity)> {
        if operators.is_empty() {
            return Err(Error::config(
                "an encrypted repository needs at least one recipient (age1…)",
            ));
        }
        let host = Identity::generate();
        let mut key = [0u8; 32];
        getrandom::fill(&mut key)
            .map_err(|e| Error::repository(format!("no randomness for the name key: {e}")))?;
        let keys = Self {
            operators,
            host: host.to_public(),
            identities: Vec::new(),
            name_key: SecretBox::new(Box::new(key)),
        };
        Ok((keys, host))
    }

    /// The keys of a repository whose config says `encryption`, opened from its sealed `keys.age`
    /// with the first identity that can.
    pub fn open(
        encryption: &Encryption,
        identities: Vec<Identity>,
        keys_file: &[u8],
        location: &str,
    ) -> Result<Self> {
        if encryption.scheme != SCHEME {
            return Err(Error::repository(format!(
                "{location} is encrypted with {}, this deis-backup knows {SCHEME}",
                encryption.scheme
            )));
        }
        let operators = encryption
            .recipients
            .iter()
            .map(|r| parse_recipient(r, "the repository config"))
            .collect::<Result<Vec<_>>>()?;
        let host = parse_recipient(&encryption.host_recipient, "the repository config")?;
        if identities.is_empty() {
            return Err(Error::new(
                ErrorKind::Config,
                format!("{location} is encrypted and no key was given"),
                "give --identity-file (an operator's age identity) or --host-key-file (the \
                 snapshot host's key made by `deis-backup init`)",
            ));
        }
        let plain = open_bytes(keys_file, &identities, super::format::KEYS_FILE).map_err(|e| {
            if e.kind() == ErrorKind::Config {
                Error::new(
                    ErrorKind::Config,
                    format!("no key given opens {location}: it is sealed to other recipients"),
                    "give an identity whose public key is among the repository's recipients, or \
                     the host key `deis-backup init` wrote for it",
                )
            } else {
                e
            }
        })?;
        let file: KeyFile = serde_json::from_slice(&plain).map_err(|e| {
            Error::repository(format!("{location}: bad {}: {e}", super::format::KEYS_FILE))
        })?;
        let mut key = [0u8; 32];
        hex::decode_to_slice(&file.name_key, &mut key).map_err(|_| {
            Error::repository(format!(
                "{location}: bad {}: the name key is not 32 bytes of hex",
                super::format::KEYS_FILE
            ))
        })?;
        Ok(Self {
            operators,
            host,
            identities,
            name_key: SecretBox::new(Box::new(key)),
        })
    }

    /// The config's `encryption` section for these keys.
    pub fn encryption(&self) -> Encryption {
        Encryption {
            scheme: SCHEME.to_owned(),
            recipients: self.operators.iter().map(ToString::to_string).collect(),
            host_recipient: self.host.to_string(),
        }
    }

    /// `keys.age`: the name key, sealed to the operators and the host.
    pub fn keys_file(&self) -> Result<Vec<u8>> {
        let file = KeyFile {
            name_key: hex::encode(self.name_key.expose_secret()),
        };
        let json = serde_json::to_vec(&file).expect("the key file serializes");
        seal_bytes(&json, &self.metadata_recipients())
    }

    /// Whether an operator's identity was given: only then can blobs be read.
    pub fn reads_blobs(&self) -> bool {
        self.identities.iter().any(|i| {
            self.operators
                .iter()
                .any(|r| r.to_string() == i.to_public().to_string())
        })
    }

    /// The identities given.
    pub fn identities(&self) -> &[Identity] {
        &self.identities
    }

    /// Who can open metadata: the operators and the snapshot host.
    pub fn metadata_recipients(&self) -> Vec<&Recipient> {
        self.operators.iter().chain([&self.host]).collect()
    }

    /// Who can open blobs: the operators only.
    pub fn blob_recipients(&self) -> Vec<&Recipient> {
        self.operators.iter().collect()
    }

    /// `blobs/keyed/ab/<hmac>.`: the stored name of the blob with this SHA-256, but for the
    /// sealed size that follows.
    pub fn blob_prefix(&self, sha256: &Sha256) -> String {
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(self.name_key.expose_secret())
            .expect("HMAC takes any key length");
        mac.update(sha256.as_bytes());
        let hex = hex::encode(mac.finalize().into_bytes());
        format!("{BLOBS_KEYED_DIR}{}/{hex}.", &hex[..2])
    }

    /// The error for reading a blob without an operator's identity.
    pub fn blob_refused(&self, location: &str) -> Error {
        Error::new(
            ErrorKind::Config,
            format!("reading the data of {location} needs an operator's identity"),
            "give --identity-file: the snapshot host's key opens only what a snapshot reuses",
        )
    }
}

/// `age1…`, or one clear line.
fn parse_recipient(s: &str, whence: &str) -> Result<Recipient> {
    Recipient::from_str(s.trim()).map_err(|_| {
        Error::config(format!(
            "{whence}: '{}' is not an age X25519 recipient (age1…)",
            s.trim()
        ))
    })
}

/// The recipients in `path`: one `age1…` per line; blank lines and `#` comments are skipped.
pub fn read_recipients(path: &Path) -> Result<Vec<Recipient>> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Error::config(format!(
            "cannot read the recipients file {}: {e}",
            path.display()
        ))
    })?;
    let out = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .map(|(n, l)| parse_recipient(l, &format!("{} line {}", path.display(), n + 1)))
        .collect::<Result<Vec<_>>>()?;
    if out.is_empty() {
        return Err(Error::config(format!(
            "the recipients file {} names no recipient",
            path.display()
        )));
    }
    Ok(out)
}

/// The identities in `path` (`AGE-SECRET-KEY-1…` lines, `#` comments), a file only its owner
/// can read. A file that is itself sealed with a passphrase (`age -p`, for a single operator's
/// key) opens with the passphrase in the file `$DEIS_BACKUP_PASSPHRASE_FILE` names (mode 600).
pub fn read_identities(path: &Path, what: &str) -> Result<Vec<Identity>> {
    let passphrase = std::env::var_os(PASSPHRASE_FILE_ENV).map(std::path::PathBuf::from);
    identities_in(path, what, passphrase.as_deref())
}

/// [`read_identities`], the passphrase (if the file needs one) in `passphrase_file`.
fn identities_in(path: &Path, what: &str, passphrase_file: Option<&Path>) -> Result<Vec<Identity>> {
    crate::pki::check_private(path)?;
    let cannot = |e: &dyn fmt::Display| {
        Error::config(format!("cannot read the {what} {}: {e}", path.display()))
    };
    let raw = std::fs::read(path).map_err(|e| cannot(&e))?;
    let text = if raw.starts_with(b"age-encryption.org/") {
        unlock(&raw, path, what, passphrase_file)?
    } else {
        raw
    };
    let mut out = Vec::new();
    for (n, line) in BufReader::new(&text[..]).lines().enumerate() {
        let line = line.map_err(|e| cannot(&e))?;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        // The line is a secret: never quoted.
        out.push(Identity::from_str(line).map_err(|_| {
            Error::config(format!(
                "{} line {}: not an age identity (AGE-SECRET-KEY-1…)",
                path.display(),
                n + 1
            ))
        })?);
    }
    if out.is_empty() {
        return Err(Error::config(format!(
            "the {what} {} holds no identity",
            path.display()
        )));
    }
    Ok(out)
}

/// The variable naming the file of an identity file's passphrase.
pub const PASSPHRASE_FILE_ENV: &str = "DEIS_BACKUP_PASSPHRASE_FILE";

/// The identity file `sealed`, opened with the passphrase of [`PASSPHRASE_FILE_ENV`].
fn unlock(
    sealed: &[u8],
    path: &Path,
    what: &str,
    passphrase_file: Option<&Path>,
) -> Result<Vec<u8>> {
    let file = passphrase_file.ok_or_else(|| {
        Error::new(
            ErrorKind::Config,
            format!("the {what} {} is sealed with a passphrase", path.display()),
            "put the passphrase in a file (mode 600) and name it in $DEIS_BACKUP_PASSPHRASE_FILE",
        )
    })?;
    let passphrase = crate::secret::from_file(file, "passphrase")?;
    let identity = age::scrypt::Identity::new(age::secrecy::SecretString::from(
        passphrase.expose_secret().to_owned(),
    ));
    let label = format!("the {what} {}", path.display());
    let decryptor = age::Decryptor::new_buffered(sealed).map_err(|e| decrypt_error(&e, &label))?;
    let mut out = Vec::new();
    decryptor
        .decrypt(std::iter::once(&identity as &dyn age::Identity))
        .map_err(|e| match e {
            age::DecryptError::DecryptionFailed | age::DecryptError::NoMatchingKeys => {
                Error::config(format!("the passphrase does not open {label}"))
            }
            other => decrypt_error(&other, &label),
        })?
        .read_to_end(&mut out)
        .map_err(|e| Error::integrity(format!("{label} does not open: {e}")))?;
    Ok(out)
}

/// Writes `identity` to a new file `path` (mode 600; an existing file is never replaced).
pub fn write_identity(path: &Path, identity: &Identity, comment: &str) -> Result<()> {
    let what = |e: std::io::Error| Error::config(format!("cannot write {}: {e}", path.display()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                Error::config(format!(
                    "{} already exists; a key is never overwritten",
                    path.display()
                ))
            } else {
                what(e)
            }
        })?;
    writeln!(f, "# {comment}").map_err(what)?;
    writeln!(f, "# public key: {}", identity.to_public()).map_err(what)?;
    writeln!(f, "{}", identity.to_string().expose_secret()).map_err(what)?;
    f.sync_all().map_err(what)
}

fn encryptor(to: &[&Recipient]) -> Result<age::Encryptor> {
    age::Encryptor::with_recipients(to.iter().map(|r| *r as &dyn age::Recipient))
        .map_err(|e| Error::repository(format!("cannot seal: {e}")))
}

/// `data`, compressed and sealed to `to`.
pub fn seal_bytes(data: &[u8], to: &[&Recipient]) -> Result<Vec<u8>> {
    let io = |e: std::io::Error| Error::io("seal a repository file", e);
    let packed = zstd::encode_all(data, METADATA_LEVEL).map_err(io)?;
    let mut out = Vec::with_capacity(packed.len() + 256);
    let mut w = encryptor(to)?.wrap_output(&mut out).map_err(io)?;
    w.write_all(&packed).map_err(io)?;
    w.finish().map_err(io)?;
    Ok(out)
}

/// Why an age file did not open: no key of ours (a config error: exit 2), or damaged bytes.
fn decrypt_error(e: &age::DecryptError, what: &str) -> Error {
    match e {
        age::DecryptError::NoMatchingKeys => Error::config(format!(
            "no key given opens {what}: it is sealed to other recipients"
        )),
        other => Error::integrity(format!("{what} does not open: {other}")),
    }
}

/// The bytes sealed in `sealed` (a small file), `what` naming it.
pub fn open_bytes(sealed: &[u8], identities: &[Identity], what: &str) -> Result<Vec<u8>> {
    let decryptor = age::Decryptor::new_buffered(sealed).map_err(|e| decrypt_error(&e, what))?;
    let opened = decryptor
        .decrypt(identities.iter().map(|i| i as &dyn age::Identity))
        .map_err(|e| decrypt_error(&e, what))?;
    let mut out = Vec::new();
    zstd::stream::read::Decoder::new(opened)
        .map_err(|e| Error::io(format!("open {what}"), e))?
        .take(MAX_METADATA)
        .read_to_end(&mut out)
        .map_err(|e| Error::integrity(format!("{what} does not open: {e}")))?;
    Ok(out)
}

/// Seals the file `plain` into a new staging file in `dir` ([`Sealer`]); returns it and its size.
/// Blocking.
pub fn seal_file(plain: &Path, dir: &Path, to: &[&Recipient]) -> Result<(tempfile::TempPath, u64)> {
    let mut src = std::fs::File::open(plain)
        .map_err(|e| Error::io(format!("read {}", plain.display()), e))?;
    let mut sealer = Sealer::start(dir, to)?;
    std::io::copy(&mut src, &mut sealer.out)
        .map_err(|e| Error::io(format!("write {}", sealer.temp.display()), e))?;
    sealer.finish()
}

/// A blob sealed as its bytes arrive (compressed, to the recipients), into a staging file: no copy
/// in the clear ever reaches the disk. Writes are blocking, buffered (1 MiB) file writes.
pub struct Sealer {
    out: zstd::stream::write::Encoder<
        'static,
        age::stream::StreamWriter<std::io::BufWriter<std::fs::File>>,
    >,
    temp: tempfile::TempPath,
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealer")
            .field("temp", &self.temp)
            .finish_non_exhaustive()
    }
}

impl Sealer {
    /// A new staging file in `dir` (named `.blob-*`, as the staging files a run cleans up).
    pub fn start(dir: &Path, to: &[&Recipient]) -> Result<Self> {
        let io =
            |e: std::io::Error| Error::io(format!("create a staging file in {}", dir.display()), e);
        let (file, temp) = tempfile::Builder::new()
            .prefix(".blob-")
            .tempfile_in(dir)
            .map_err(io)?
            .into_parts();
        let w = encryptor(to)?
            .wrap_output(std::io::BufWriter::with_capacity(1 << 20, file))
            .map_err(io)?;
        let out = zstd::stream::write::Encoder::new(w, BLOB_LEVEL).map_err(io)?;
        Ok(Self { out, temp })
    }

    pub fn write(&mut self, data: &[u8]) -> Result<()> {
        self.out
            .write_all(data)
            .map_err(|e| Error::io(format!("write {}", self.temp.display()), e))
    }

    /// The sealed file and its size.
    pub fn finish(self) -> Result<(tempfile::TempPath, u64)> {
        let io = |e: std::io::Error| Error::io(format!("write {}", self.temp.display()), e);
        let mut buffered = self.out.finish().map_err(io)?.finish().map_err(io)?;
        buffered.flush().map_err(io)?;
        let file = buffered.into_inner().map_err(|e| io(e.into_error()))?;
        let size = file.metadata().map_err(io)?.len();
        Ok((self.temp, size))
    }
}

/// Opens the sealed blob `sealed` into the file `plain`; returns the SHA-256 and size of what it
/// holds. A file that does not open (damaged, cut short, sealed to others) is an error naming
/// `what`. Blocking.
pub fn open_file(
    sealed: &Path,
    plain: &Path,
    identities: &[Identity],
    what: &str,
) -> Result<(Sha256, u64)> {
    let io = |e: std::io::Error| Error::io(format!("open {what}"), e);
    let src = std::fs::File::open(sealed).map_err(io)?;
    let decryptor = age::Decryptor::new_buffered(BufReader::with_capacity(1 << 20, src))
        .map_err(|e| decrypt_error(&e, what))?;
    let opened = decryptor
        .decrypt(identities.iter().map(|i| i as &dyn age::Identity))
        .map_err(|e| decrypt_error(&e, what))?;
    let mut z = zstd::stream::read::Decoder::new(opened).map_err(io)?;
    let mut out = std::io::BufWriter::with_capacity(
        1 << 20,
        std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(plain)
            .map_err(io)?,
    );
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = match z.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            // Age's STREAM refuses a changed, swapped or missing chunk here.
            Err(e) => return Err(Error::integrity(format!("{what} does not open: {e}"))),
        };
        h.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(io)?;
        size += n as u64;
    }
    out.flush().map_err(io)?;
    Ok((Sha256::finish(h), size))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> (Keys, Identity, Identity) {
        let operator = Identity::generate();
        let (mut keys, host) = Keys::create(vec![operator.to_public()]).unwrap();
        keys.identities = vec![operator.clone()];
        (keys, operator, host)
    }

    #[test]
    fn metadata_opens_for_operator_and_host_blobs_for_the_operator_only() {
        let (keys, operator, host) = keys();
        let meta = seal_bytes(b"{\"listing\":1}", &keys.metadata_recipients()).unwrap();
        for who in [&operator, &host] {
            assert_eq!(
                open_bytes(&meta, std::slice::from_ref(who), "m").unwrap(),
                b"{\"listing\":1}"
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let (plain, back) = (dir.path().join("p"), dir.path().join("b"));
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&plain, &data).unwrap();
        std::fs::write(&back, b"").unwrap();
        let (sealed, size) = seal_file(&plain, dir.path(), &keys.blob_recipients()).unwrap();
        assert_eq!(std::fs::metadata(&sealed).unwrap().len(), size);
        assert!(size < data.len() as u64, "compressed before sealing");
        let (sha, n) = open_file(&sealed, &back, std::slice::from_ref(&operator), "b").unwrap();
        assert_eq!((sha, n), (Sha256::of(&data), data.len() as u64));
        assert_eq!(std::fs::read(&back).unwrap(), data);
        let e = open_file(&sealed, &back, std::slice::from_ref(&host), "blob x").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config, "{e}");
        assert!(e.to_string().contains("no key given opens blob x"), "{e}");
    }

    #[test]
    fn a_flipped_or_cut_byte_does_not_open() {
        let (keys, operator, _) = keys();
        let dir = tempfile::tempdir().unwrap();
        let (plain, back) = (dir.path().join("p"), dir.path().join("b"));
        // Incompressible, so the sealed file is as long as the data.
        let mut data = vec![0u8; 200_000];
        fastrand::Rng::with_seed(7).fill(&mut data);
        std::fs::write(&plain, &data).unwrap();
        std::fs::write(&back, b"").unwrap();
        let (sealed, _) = seal_file(&plain, dir.path(), &keys.blob_recipients()).unwrap();
        let good = std::fs::read(&sealed).unwrap();
        let mut flipped = good.clone();
        let at = flipped.len() / 2;
        flipped[at] ^= 1;
        let cut = &good[..good.len() - 100];
        for (name, bad) in [("flipped", &flipped[..]), ("cut", cut)] {
            std::fs::write(&sealed, bad).unwrap();
            let e =
                open_file(&sealed, &back, std::slice::from_ref(&operator), "blob y").unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Integrity, "{name}: {e}");
            assert!(
                e.to_string().contains("blob y does not open"),
                "{name}: {e}"
            );
        }
    }

    #[test]
    fn names_are_keyed_and_stable() {
        let (a, ..) = keys();
        let (b, ..) = keys();
        let sha = Sha256::of(b"known file");
        assert_eq!(a.blob_prefix(&sha), a.blob_prefix(&sha));
        assert_ne!(a.blob_prefix(&sha), b.blob_prefix(&sha));
        assert!(!a.blob_prefix(&sha).contains(&sha.to_hex()));
        assert!(a.blob_prefix(&sha).starts_with(BLOBS_KEYED_DIR));
    }

    #[test]
    fn keys_file_opens_with_either_key_and_not_with_a_stranger() {
        let (keys, operator, host) = keys();
        let file = keys.keys_file().unwrap();
        let enc = keys.encryption();
        for who in [operator, host] {
            let k = Keys::open(&enc, vec![who], &file, "repo").unwrap();
            let sha = Sha256::of(b"x");
            assert_eq!(k.blob_prefix(&sha), keys.blob_prefix(&sha));
        }
        let e = Keys::open(&enc, vec![Identity::generate()], &file, "repo").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config);
        assert!(e.to_string().contains("no key given opens repo"), "{e}");
        let e = Keys::open(&enc, vec![], &file, "repo").unwrap_err();
        assert!(e.to_string().contains("no key was given"), "{e}");
    }

    #[test]
    fn a_passphrase_sealed_identity_file_opens_with_its_passphrase_only() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let private = |p: &Path| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600)).unwrap();
        };
        let id = Identity::generate();
        let sealed = {
            let mut out = Vec::new();
            let enc = age::Encryptor::with_user_passphrase(age::secrecy::SecretString::from(
                "correct horse".to_owned(),
            ));
            let mut w = enc.wrap_output(&mut out).unwrap();
            writeln!(w, "{}", id.to_string().expose_secret()).unwrap();
            w.finish().unwrap();
            out
        };
        let key = dir.path().join("operator.key.age");
        std::fs::write(&key, sealed).unwrap();
        private(&key);
        let Err(e) = identities_in(&key, "identity file", None) else {
            panic!("opened without a passphrase")
        };
        assert!(e.to_string().contains("DEIS_BACKUP_PASSPHRASE_FILE"), "{e}");
        let wrong = dir.path().join("wrong");
        std::fs::write(&wrong, "battery staple\n").unwrap();
        private(&wrong);
        let Err(e) = identities_in(&key, "identity file", Some(&wrong)) else {
            panic!("opened with the wrong passphrase")
        };
        assert!(e.message().contains("passphrase does not open"), "{e}");
        let right = dir.path().join("right");
        std::fs::write(&right, "correct horse\n").unwrap();
        private(&right);
        let got = identities_in(&key, "identity file", Some(&right)).unwrap();
        assert_eq!(got[0].to_public().to_string(), id.to_public().to_string());
    }

    #[test]
    fn identity_files_are_private_and_never_quoted() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let id = Identity::generate();
        let path = dir.path().join("key");
        write_identity(&path, &id, "test").unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(
            write_identity(&path, &id, "again").is_err(),
            "never overwritten"
        );
        let read = read_identities(&path, "identity file").unwrap();
        assert_eq!(read[0].to_public().to_string(), id.to_public().to_string());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(
            read_identities(&path, "identity file").is_err_and(|e| e.kind() == ErrorKind::Config)
        );
        let bad = dir.path().join("bad");
        std::fs::write(&bad, "AGE-SECRET-KEY-1NOTAKEY\n").unwrap();
        std::fs::set_permissions(&bad, std::fs::Permissions::from_mode(0o600)).unwrap();
        let Err(e) = read_identities(&bad, "identity file") else {
            panic!("a bad identity was read")
        };
        assert!(!e.to_string().contains("NOTAKEY"), "{e}");
    }
}
