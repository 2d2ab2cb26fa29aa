//! The config-file convention both binaries share: a TOML file whose keys are the long flags'
//! names in kebab-case, read into the same options structs the command line fills.
//!
//! Owns: reading the file ([`read`]), turning it or one of its sections into an options struct
//! ([`parse`]) and putting the command line over the file ([`merged`]); with the `config-tests`
//! feature, the precedence test both binaries run on every option ([`precedence`]).
//! Invariants:
//! - A value given on the command line or through its environment variable wins over the file's,
//!   the file's over the built-in default. Options structs derive [`merge::Merge`] and their fields
//!   carry no clap default (an unset option is `None`, `false` or empty), so "given" is simply
//!   "set"; the default is applied by the struct's accessor, in one place.
//! - Every error is one line naming the file (and the section); an unknown key is an error.

use std::path::Path;

use serde::de::DeserializeOwned;

#[cfg(feature = "config-tests")]
pub mod precedence;

/// The TOML file at `path`, as a table.
pub fn read(path: &Path) -> Result<toml::Table, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the config file {}: {e}", path.display()))?;
    text.parse().map_err(|e: toml::de::Error| {
        format!("{} is not valid TOML: {}", path.display(), e.message())
    })
}

/// `table` (a whole file or one section of it) as `T`; the error starts with `what` (the file,
/// and the section as `[name]`).
pub fn parse<T: DeserializeOwned>(table: toml::Table, what: &str) -> Result<T, String> {
    table
        .try_into()
        .map_err(|e: toml::de::Error| format!("{what}: {}", e.message()))
}

/// `cli` with every value it leaves unset (`None`, `false`, empty) taken from `file`: the command
/// line (flags and environment) over the config file.
#[must_use]
pub fn merged<T: merge::Merge>(file: T, mut cli: T) -> T {
    cli.merge(file);
    cli
}
