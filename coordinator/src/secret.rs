//! Where a secret (a gateway or repository key, the agents' token) is read from: a file, the
//! config file, the environment, etcd. The secret itself is a [`secrecy::SecretString`].
//!
//! Owns: [`from_file`] and [`resolve`], and the re-export of [`SecretString`] and
//! [`ExposeSecret`] the rest of the coordinator (and its library users) hold secrets with.
//! Invariants:
//! - A secret never appears in `Debug` output, logs or errors (`SecretString` prints
//!   `[REDACTED]`), is zeroized when dropped, and is never serialized (it only deserializes, from
//!   the config file); `expose_secret()` is called only where the key is used: signing, the
//!   agents' `authorization` header, the S3 client's credentials.
//! - A secret file is refused unless its mode is 600 or stricter and it is owned by this user or
//!   root; its first line is the secret, and an empty one is an error.

pub use secrecy::{ExposeSecret, SecretString};

use crate::error::{Error, Result};

/// The secret in `path` (its first line): the file must be mode 600 (or stricter), owned by this
/// user or root.
pub fn from_file(path: &std::path::Path, what: &str) -> Result<SecretString> {
    crate::pki::check_private(path)?;
    let text = SecretString::from(std::fs::read_to_string(path).map_err(|e| {
        Error::config(format!(
            "cannot read the {what} file {}: {e}",
            path.display()
        ))
    })?);
    let line = text.expose_secret().lines().next().unwrap_or("").trim();
    if line.is_empty() {
        return Err(Error::config(format!(
            "the {what} file {} is empty",
            path.display()
        )));
    }
    Ok(SecretString::from(line))
}

/// The first of: the file, the value already set (config file), the environment variable.
pub fn resolve(
    file: Option<&std::path::Path>,
    set: Option<&SecretString>,
    env: &str,
    what: &str,
) -> Result<Option<SecretString>> {
    if let Some(p) = file {
        return from_file(p, what).map(Some);
    }
    if let Some(s) = set {
        return Ok(Some(s.clone()));
    }
    Ok(std::env::var(env)
        .ok()
        .filter(|v| !v.is_empty())
        .map(SecretString::from))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_file_gives_its_first_line_and_never_shows_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, "  verysecret \nsecond line\n").unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let s = from_file(&path, "test key").unwrap();
        assert_eq!(s.expose_secret(), "verysecret");
        assert!(!format!("{s:?}").contains("verysecret"), "{s:?}");

        std::fs::write(&path, "\n").unwrap();
        let e = from_file(&path, "test key").unwrap_err();
        assert!(e.to_string().contains("is empty"), "{e}");
    }
}
