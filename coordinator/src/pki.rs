//! The cluster's small PKI: one CA, a server certificate per agent naming its host id, and one
//! client certificate for the coordinator (`deis-backup pki init` / `pki issue`).
//!
//! Owns: the files of a PKI directory (default `/etc/deis-backup/pki`):
//! - `ca.pem` (mode 644) and `ca.key` (mode 600): the cluster CA, ECDSA P-256, valid 10 years;
//! - `agent-<host id>.pem` / `.key`: an agent's certificate, DNS name
//!   `<host id>.agent.deis-backup`, for server authentication only;
//! - `coordinator.pem` / `.key`: the coordinator's, DNS name `coordinator.deis-backup`, for client
//!   authentication only.
//!
//! Invariants:
//! - A private key is created with mode 600 and `O_EXCL`: it is never world-readable, not even for
//!   an instant, and an existing file is never overwritten (issuing again needs the old files
//!   removed by hand, so a working host is not broken by accident).
//! - Leaf certificates carry exactly one extended key usage, so an agent's key cannot act as the
//!   coordinator, and the coordinator's cannot serve as an agent.
//! - Keys are checked for loose modes when read ([`check_private`]); both binaries refuse a key or
//!   token that group or others can read.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use deis_backup_proto::identity::{self, COORDINATOR_NAME};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};

use crate::error::{Error, Result};

/// How long the CA is valid.
const CA_DAYS: i64 = 3650;
/// How long an issued certificate is valid.
const LEAF_DAYS: i64 = 825;

/// Whom a certificate is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    /// The agent of this host id.
    Agent(String),
    /// The coordinator (the `deis-backup` CLI and the fleet timer).
    Coordinator,
}

impl Subject {
    /// The file stem the certificate and key are written under.
    pub fn stem(&self) -> String {
        match self {
            Subject::Agent(id) => format!("agent-{id}"),
            Subject::Coordinator => "coordinator".into(),
        }
    }
}

/// Paths of a written certificate and its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn pki_error(what: impl std::fmt::Display) -> Error {
    Error::config(format!("PKI: {what}"))
}

/// Writes `bytes` to a new file with `mode`, refusing to overwrite.
fn create(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                pki_error(format!(
                    "{} already exists; remove it first to replace it",
                    path.display()
                ))
            } else {
                pki_error(format!("cannot create {}: {e}", path.display()))
            }
        })?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| pki_error(format!("cannot write {}: {e}", path.display())))
}

fn validity(params: &mut CertificateParams, days: i64) {
    let now = OffsetDateTime::now_utc();
    // A little slack for clocks that differ between hosts.
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(days);
}

/// Creates the cluster CA in `dir` (made mode 700 when missing).
pub fn init(dir: &Path) -> Result<Issued> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| pki_error(format!("cannot create {}: {e}", dir.display())))?;
    let key = KeyPair::generate().map_err(pki_error)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "deis-backup cluster CA");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut params, CA_DAYS);
    let cert = params.self_signed(&key).map_err(pki_error)?;
    let out = Issued {
        cert: dir.join("ca.pem"),
        key: dir.join("ca.key"),
    };
    // The key first: a CA certificate without its key would be useless.
    create(&out.key, key.serialize_pem().as_bytes(), 0o600)?;
    create(&out.cert, cert.pem().as_bytes(), 0o644)?;
    Ok(out)
}

/// Issues a certificate for `subject` with the CA in `dir`, written into `out` (default `dir`).
pub fn issue(dir: &Path, subject: &Subject, out: Option<&Path>) -> Result<Issued> {
    let ca_cert = std::fs::read_to_string(dir.join("ca.pem")).map_err(|e| {
        pki_error(format!(
            "cannot read {}: {e}; create the CA with `deis-backup pki init`",
            dir.join("ca.pem").display()
        ))
    })?;
    let ca_key_path = dir.join("ca.key");
    check_private(&ca_key_path)?;
    let ca_key = std::fs::read_to_string(&ca_key_path)
        .map_err(|e| pki_error(format!("cannot read {}: {e}", ca_key_path.display())))?;
    let ca_key = KeyPair::from_pem(&ca_key)
        .map_err(|e| pki_error(format!("{} is not a key: {e}", ca_key_path.display())))?;
    let issuer = Issuer::from_ca_cert_pem(&ca_cert, ca_key)
        .map_err(|e| pki_error(format!("ca.pem is not a certificate: {e}")))?;

    let (name, usage, common) = match subject {
        Subject::Agent(id) => (
            identity::agent_name(id).ok_or_else(|| {
                pki_error(format!(
                    "host id '{id}' cannot be named in a certificate: use the host's machine id \
                     (letters, digits and '-', at most 63)"
                ))
            })?,
            ExtendedKeyUsagePurpose::ServerAuth,
            format!("deis-backup agent {id}"),
        ),
        Subject::Coordinator => (
            COORDINATOR_NAME.to_owned(),
            ExtendedKeyUsagePurpose::ClientAuth,
            "deis-backup coordinator".to_owned(),
        ),
    };
    let mut params = CertificateParams::new(vec![name]).map_err(pki_error)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common);
    params.distinguished_name = dn;
    params.extended_key_usages = vec![usage];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    validity(&mut params, LEAF_DAYS);
    let key = KeyPair::generate().map_err(pki_error)?;
    let cert = params.signed_by(&key, &issuer).map_err(pki_error)?;

    let out_dir = out.unwrap_or(dir);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(out_dir)
        .map_err(|e| pki_error(format!("cannot create {}: {e}", out_dir.display())))?;
    let stem = subject.stem();
    let issued = Issued {
        cert: out_dir.join(format!("{stem}.pem")),
        key: out_dir.join(format!("{stem}.key")),
    };
    create(&issued.key, key.serialize_pem().as_bytes(), 0o600)?;
    create(&issued.cert, cert.pem().as_bytes(), 0o644)?;
    Ok(issued)
}

/// Refuses a secret file (key, token) that group or others may read, or that someone else owns.
pub fn check_private(path: &Path) -> Result<()> {
    identity::check_private(path).map_err(Error::config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn issued_keys_are_private_and_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let ca = init(dir.path()).unwrap();
        assert_eq!(
            std::fs::metadata(&ca.key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let a = issue(dir.path(), &Subject::Agent("host-1".into()), None).unwrap();
        assert_eq!(
            std::fs::metadata(&a.key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(a.cert.ends_with("agent-host-1.pem"));
        let again = issue(dir.path(), &Subject::Agent("host-1".into()), None).unwrap_err();
        assert!(again.to_string().contains("already exists"), "{again}");
        assert!(init(dir.path()).is_err());
        let bad = issue(dir.path(), &Subject::Agent("a/../b".into()), None).unwrap_err();
        assert!(bad.to_string().contains("cannot be named"), "{bad}");
    }

    #[test]
    fn a_loose_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        std::fs::write(&p, "x").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = check_private(&p).unwrap_err();
        assert!(e.to_string().contains("chmod 600"), "{e}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        check_private(&p).unwrap();
    }
}
