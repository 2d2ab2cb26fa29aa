//! A secret (a gateway or repository key, the agents' token), kept out of sight.
//!
//! Owns: [`Secret`] and where one is read from (a file, the config file, the environment).
//! Invariants:
//! - A secret never appears in `Debug` output, logs or errors, and is never serialized (it only
//!   deserializes, from the config file); [`Secret::expose`] is for signing only.
//! - A secret file is refused unless its mode is 600 or stricter and it is owned by this user or
//!   root; its first line is the secret, and an empty one is an error.

use std::fmt;
use std::str::FromStr;

use serde::Deserialize;

use crate::error::{Error, Result};

/// A secret (gateway key): never printed, never serialized.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// The secret itself, for signing only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl Secret {
    /// The secret in `path` (its first line): the file must be mode 600 (or stricter), owned by
    /// this user or root.
    pub fn from_file(path: &std::path::Path, what: &str) -> Result<Self> {
        crate::pki::check_private(path)?;
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::config(format!(
                "cannot read the {what} file {}: {e}",
                path.display()
            ))
        })?;
        let line = text.lines().next().unwrap_or("").trim();
        if line.is_empty() {
            return Err(Error::config(format!(
                "the {what} file {} is empty",
                path.display()
            )));
        }
        Ok(Self(line.to_owned()))
    }

    /// The first of: the file, the value already set (config file), the environment variable.
    pub fn resolve(
        file: Option<&std::path::Path>,
        set: Option<&Secret>,
        env: &str,
        what: &str,
    ) -> Result<Option<Secret>> {
        if let Some(p) = file {
            return Self::from_file(p, what).map(Some);
        }
        if let Some(s) = set {
            return Ok(Some(s.clone()));
        }
        Ok(std::env::var(env)
            .ok()
            .filter(|v| !v.is_empty())
            .map(Secret))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}
