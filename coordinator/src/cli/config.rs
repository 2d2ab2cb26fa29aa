//! The TOML config file (`--config`): a top-level `etcd` and one section per options struct, with
//! the same kebab-case names as the long flags' fields:
//!
//! ```toml
//! etcd = "http://10.0.0.1:4001"
//! [repository]
//! location = "s3://backups/deis"
//! [snapshot]
//! pre-hook = "wal-e-backup-push"
//! [prune]
//! keep-daily = 7
//! ```
//!
//! Invariants: unknown sections and keys are errors (a typo never silently does nothing); a value
//! given on the command line or through the environment wins over the file, the file over the
//! built-in default.

use std::collections::BTreeMap;
use std::path::Path;

use clap::ArgMatches;
use clap::parser::ValueSource;
use deis_backup_coordinator::agents::AgentOptions;
use deis_backup_coordinator::prune::PruneOptions;
use deis_backup_coordinator::repository::RepositoryOptions;
use deis_backup_coordinator::restore::RestoreOptions;
use deis_backup_coordinator::s3::GatewayOptions;
use deis_backup_coordinator::snapshot::SnapshotOptions;
use deis_backup_coordinator::{Error, Result};
use serde::de::DeserializeOwned;

const SECTIONS: &[&str] = &[
    "repository",
    "gateway",
    "agents",
    "snapshot",
    "restore",
    "prune",
];

#[derive(Debug, Default)]
pub struct ConfigFile {
    pub etcd: Option<String>,
    sections: BTreeMap<String, toml::Table>,
    path: String,
}

/// True when `id` was given on the command line or through its environment variable.
pub fn given(m: &ArgMatches, id: &str) -> bool {
    matches!(
        m.try_get_raw(id).ok().and_then(|_| m.value_source(id)),
        Some(ValueSource::CommandLine | ValueSource::EnvVariable)
    )
}

impl ConfigFile {
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::config(format!(
                "cannot read the config file {}: {e}",
                path.display()
            ))
        })?;
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            Error::config(format!(
                "{} is not valid TOML: {}",
                path.display(),
                e.message()
            ))
        })?;
        let mut out = ConfigFile {
            path: path.display().to_string(),
            ..ConfigFile::default()
        };
        for (k, v) in table {
            match (k.as_str(), v) {
                ("etcd", toml::Value::String(s)) => out.etcd = Some(s),
                (s, toml::Value::Table(t)) if SECTIONS.contains(&s) => {
                    out.sections.insert(k, t);
                }
                _ => {
                    return Err(Error::config(format!(
                        "{}: unknown setting '{k}' (allowed: etcd, and the sections {})",
                        out.path,
                        SECTIONS.join(", ")
                    )));
                }
            }
        }
        Ok(out)
    }

    fn section<T: DeserializeOwned>(&self, name: &str) -> Result<Option<(T, &toml::Table)>> {
        let Some(t) = self.sections.get(name) else {
            return Ok(None);
        };
        let v: T = t.clone().try_into().map_err(|e: toml::de::Error| {
            Error::config(format!("{}: [{name}]: {}", self.path, e.message()))
        })?;
        Ok(Some((v, t)))
    }
}

/// Takes each listed field from the file when the file sets it and the command line does not.
/// Also lists the clap ids it merges (`<section>::IDS`), so a test catches an option that is
/// added to a struct but not here.
macro_rules! merge_fields {
    (@id $field:ident) => { stringify!($field) };
    (@id $field:ident $id:literal) => { $id };
    ($name:ident, $ty:ty, $section:literal, [$($field:ident $(as $id:literal)?),* $(,)?]) => {
        impl ConfigFile {
            pub fn $name(&self, cli: $ty, m: &ArgMatches) -> Result<$ty> {
                let mut out = cli;
                if let Some((file, table)) = self.section::<$ty>($section)? {
                    $(
                        if !given(m, merge_fields!(@id $field $($id)?))
                            && table.contains_key(&stringify!($field).replace('_', "-"))
                        {
                            out.$field = file.$field;
                        }
                    )*
                }
                Ok(out)
            }
        }
        #[cfg(test)]
        pub(crate) mod $name {
            pub const IDS: &[&str] = &[$(merge_fields!(@id $field $($id)?)),*];
        }
    };
}

merge_fields!(repository, RepositoryOptions, "repository", [
    location, endpoint, region as "repository_region", access_key as "repository_access_key",
    secret_key, secret_key_file as "repository_secret_key_file", staging_dir, fsync
]);
merge_fields!(
    gateway,
    GatewayOptions,
    "gateway",
    [
        endpoints,
        access_key,
        secret_key,
        secret_key_file,
        signature,
        region,
        concurrency,
        retries,
        bandwidth_limit,
        multipart_threshold,
        part_size,
        connect_timeout_secs,
        read_timeout_secs
    ]
);
merge_fields!(
    agents,
    AgentOptions,
    "agents",
    [
        agents,
        token_file,
        tls_ca,
        tls_cert,
        tls_key,
        insecure_plaintext
    ]
);
merge_fields!(
    snapshot,
    SnapshotOptions,
    "snapshot",
    [
        pre_hook,
        zstd_level,
        no_database,
        no_store,
        no_buckets,
        full
    ]
);
merge_fields!(
    restore,
    RestoreOptions,
    "restore",
    [
        existing,
        overwrite_store,
        database_sql,
        etcd_keys,
        no_buckets,
        no_store
    ]
);
merge_fields!(
    prune,
    PruneOptions,
    "prune",
    [keep_last, keep_daily, keep_weekly, keep_monthly]
);

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Args, CommandFactory as _, FromArgMatches as _};

    /// The clap ids of `T`'s options that the config file may set: all but the per-run decisions
    /// `--dry-run` and `--force`, which the file refuses (`#[serde(skip)]`).
    fn arg_ids<T: Args>() -> Vec<String> {
        T::augment_args(clap::Command::new("t"))
            .get_arguments()
            .map(|a| a.get_id().to_string())
            .filter(|id| id != "dry_run" && id != "force")
            .collect()
    }

    #[test]
    fn per_run_decisions_are_refused_in_the_config_file() {
        for (section, key) in [("snapshot", "dry-run"), ("restore", "force")] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("c.toml");
            std::fs::write(&path, format!("[{section}]\n{key} = true\n")).unwrap();
            let config = ConfigFile::read(&path).unwrap();
            let e = match section {
                "snapshot" => config.section::<SnapshotOptions>(section).map(drop),
                _ => config.section::<RestoreOptions>(section).map(drop),
            }
            .unwrap_err();
            assert!(e.message().contains("unknown field"), "{e}");
        }
    }

    #[test]
    fn every_option_of_every_section_is_read_from_the_config_file() {
        for (section, ids, merged) in [
            (
                "repository",
                arg_ids::<RepositoryOptions>(),
                repository::IDS,
            ),
            ("gateway", arg_ids::<GatewayOptions>(), gateway::IDS),
            ("agents", arg_ids::<AgentOptions>(), agents::IDS),
            ("snapshot", arg_ids::<SnapshotOptions>(), snapshot::IDS),
            ("restore", arg_ids::<RestoreOptions>(), restore::IDS),
            ("prune", arg_ids::<PruneOptions>(), prune::IDS),
        ] {
            let missing: Vec<&String> = ids
                .iter()
                .filter(|id| !merged.contains(&id.as_str()))
                .collect();
            assert!(
                missing.is_empty(),
                "[{section}]: options not merged from the config file: {missing:?}"
            );
        }
    }

    /// The file and the command line, parsed and merged as `run` does.
    fn snapshot_options(file: &str, args: &[&str]) -> SnapshotOptions {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, file).unwrap();
        let config = ConfigFile::read(&path).unwrap();
        let m = crate::cli::Cli::command()
            .try_get_matches_from([&["deis-backup", "snapshot"], args].concat())
            .unwrap();
        let (_, sub) = m.subcommand().unwrap();
        let options = SnapshotOptions::from_arg_matches(sub).unwrap();
        config.snapshot(options, sub).unwrap()
    }

    #[test]
    fn snapshot_full_in_the_config_file_is_honoured() {
        assert!(snapshot_options("[snapshot]\nfull = true\n", &[]).full);
        assert!(!snapshot_options("[snapshot]\nfull = false\n", &[]).full);
        assert!(!snapshot_options("", &[]).full);
        assert!(snapshot_options("", &["--full"]).full);
    }

    #[test]
    fn the_command_line_wins_over_the_file_and_the_file_over_the_default() {
        let o = snapshot_options(
            "[snapshot]\nzstd-level = 9\npre-hook = \"a\"\n",
            &["--zstd-level", "3"],
        );
        assert_eq!(o.zstd_level, Some(3));
        assert_eq!(o.pre_hook.as_deref(), Some("a"));
        assert_eq!(snapshot_options("", &[]).zstd_level, None);
    }
}
