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
//! Owns: [`ConfigFile`] and the merge of each section under the command line
//! ([`ConfigFile::merged`]).
//! Invariants: unknown sections and keys are errors (a typo never silently does nothing); a
//! section is deserialized into the same options struct the command line fills, whose options
//! have no clap default, and merged under it ([`deis_backup_proto::config::merged`]): a value given
//! on the command line or through the environment wins over the file, the file over the default,
//! which the struct's accessors apply.

use std::collections::BTreeMap;
use std::path::Path;

use deis_backup_coordinator::{Error, Result};
use deis_backup_proto::config;
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
    etcd: Option<String>,
    sections: BTreeMap<String, toml::Table>,
    path: String,
}

impl ConfigFile {
    pub fn read(path: &Path) -> Result<Self> {
        let table = config::read(path).map_err(Error::config)?;
        Self::from_table(table, path.display().to_string())
    }

    fn from_table(table: toml::Table, path: String) -> Result<Self> {
        let mut out = ConfigFile {
            path,
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

    /// `cli` with every option it leaves unset taken from the file's `[section]`. The section is
    /// read here, so only the sections a command uses can fail it.
    pub fn merged<T: DeserializeOwned + merge::Merge>(&self, section: &str, cli: T) -> Result<T> {
        debug_assert!(SECTIONS.contains(&section), "{section}");
        let Some(table) = self.sections.get(section) else {
            return Ok(cli);
        };
        let what = format!("{}: [{section}]", self.path);
        let file = config::parse(table.clone(), &what).map_err(Error::config)?;
        Ok(config::merged(file, cli))
    }

    /// The etcd endpoints: `cli` (the flag or `$ETCDCTL_PEERS`), else the file's, else the
    /// default.
    pub fn etcd<'a>(&'a self, cli: Option<&'a str>) -> &'a str {
        cli.or(self.etcd.as_deref())
            .unwrap_or(deis_backup_proto::DEFAULT_ETCD)
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::cli::{Cli, Command};
    use clap::{Args, CommandFactory as _, Parser as _};
    use deis_backup_coordinator::agents::AgentOptions;
    use deis_backup_coordinator::prune::PruneOptions;
    use deis_backup_coordinator::repository::RepositoryOptions;
    use deis_backup_coordinator::restore::RestoreOptions;
    use deis_backup_coordinator::s3::GatewayOptions;
    use deis_backup_coordinator::snapshot::SnapshotOptions;
    use deis_backup_proto::config::precedence::{Case, Section, serde_keys};

    fn parse(text: &str) -> Result<ConfigFile> {
        let table = text.parse().map_err(|e: toml::de::Error| {
            Error::config(format!("c.toml is not valid TOML: {}", e.message()))
        })?;
        ConfigFile::from_table(table, "c.toml".into())
    }

    /// Resolves `[section]` as `run` does: the command line `deis-backup <subcommand> <args>`, the
    /// section's options taken out of it by `pick`, the file's section merged under them.
    fn resolver<T: DeserializeOwned + merge::Merge>(
        subcommand: &'static [&'static str],
        section: &'static str,
        pick: fn(Command) -> Option<T>,
    ) -> impl Fn(&[String], &str) -> std::result::Result<T, String> {
        move |args, body| {
            let file = parse(&format!("[{section}]\n{body}")).map_err(|e| e.to_string())?;
            let argv = ["deis-backup"]
                .iter()
                .chain(subcommand)
                .map(ToString::to_string)
                .chain(args.iter().cloned());
            let cli = Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
            let options = pick(cli.command).expect("the subcommand takes the section");
            file.merged(section, options).map_err(|e| e.to_string())
        }
    }

    /// One section's precedence test (see `deis_backup_proto::config::precedence`).
    fn check<T: Args + DeserializeOwned + merge::Merge>(
        test: &str,
        section: &'static str,
        refused: &[&str],
        cases: Vec<Case<T>>,
        subcommand: &'static [&'static str],
        pick: fn(Command) -> Option<T>,
    ) {
        Section {
            name: section,
            command: T::augment_args(clap::Command::new("t")),
            keys: serde_keys::<T>(),
            refused,
            cases,
            resolve: &resolver(subcommand, section, pick),
            base_env: &[],
        }
        .check(module_path!(), test);
    }

    fn text(v: Option<&String>) -> String {
        v.cloned().unwrap_or_default()
    }

    fn path(v: Option<&PathBuf>) -> String {
        v.map(|p| p.display().to_string()).unwrap_or_default()
    }

    fn secret(v: Option<&deis_backup_coordinator::secret::SecretString>) -> String {
        use deis_backup_coordinator::secret::ExposeSecret as _;
        v.map(|s| s.expose_secret().to_owned()).unwrap_or_default()
    }

    fn number<N: ToString>(v: Option<N>) -> String {
        v.map(|n| n.to_string()).unwrap_or_default()
    }

    #[test]
    #[expect(
        clippy::too_many_lines,
        reason = "one case per option of `RepositoryOptions`, in its order"
    )]
    fn repository_options_take_the_flag_over_the_environment_over_the_file_over_the_default() {
        type O = RepositoryOptions;
        let cases: Vec<Case<O>> = vec![
            Case::opt(
                "location",
                "location",
                ("/srv/flag", Some("/srv/env"), "\"/srv/file\""),
                ["/srv/flag", "/srv/env", "/srv/file", "/var/lib/deis-backup"],
                |o: &O| o.location().to_owned(),
            ),
            Case::opt(
                "endpoint",
                "endpoint",
                ("http://flag", Some("http://env"), "\"http://file\""),
                ["http://flag", "http://env", "http://file", ""],
                |o: &O| text(o.endpoint.as_ref()),
            ),
            Case::opt(
                "region",
                "repository_region",
                ("eu-west-1", None, "\"eu-central-1\""),
                ["eu-west-1", "", "eu-central-1", "us-east-1"],
                |o: &O| o.region().to_owned(),
            ),
            Case::opt(
                "access-key",
                "repository_access_key",
                ("AKFLAG", Some("AKENV"), "\"AKFILE\""),
                ["AKFLAG", "AKENV", "AKFILE", ""],
                |o: &O| secret(o.access_key.as_ref()),
            ),
            Case::opt(
                "secret-key-file",
                "repository_secret_key_file",
                ("/k/flag", Some("/k/env"), "\"/k/file\""),
                ["/k/flag", "/k/env", "/k/file", ""],
                |o: &O| path(o.secret_key_file.as_ref()),
            ),
            Case::file_only("secret-key", "\"sk-file\"", "sk-file", |o: &O| {
                secret(o.secret_key.as_ref())
            }),
            Case::opt(
                "staging-dir",
                "staging_dir",
                ("/st/flag", None, "\"/st/file\""),
                ["/st/flag", "", "/st/file", ""],
                |o: &O| path(o.staging_dir.as_ref()),
            ),
            Case::opt(
                "fsync",
                "fsync",
                ("true", None, "false"),
                ["true", "", "false", "true"],
                |o: &O| o.fsync().to_string(),
            ),
            Case::opt(
                "identity-file",
                "identity_file",
                ("/id/flag", Some("/id/env"), "\"/id/file\""),
                ["/id/flag", "/id/env", "/id/file", ""],
                |o: &O| path(o.identity_file.as_ref()),
            ),
            Case::opt(
                "host-key-file",
                "host_key_file",
                ("/hk/flag", Some("/hk/env"), "\"/hk/file\""),
                ["/hk/flag", "/hk/env", "/hk/file", ""],
                |o: &O| path(o.host_key_file.as_ref()),
            ),
            Case::opt(
                "recipients-file",
                "recipients_file",
                ("/rc/flag", Some("/rc/env"), "\"/rc/file\""),
                ["/rc/flag", "/rc/env", "/rc/file", ""],
                |o: &O| path(o.recipients_file.as_ref()),
            ),
        ];
        check(
            "repository_options_take_the_flag_over_the_environment_over_the_file_over_the_default",
            "repository",
            &[],
            cases,
            &["list"],
            |c| match c {
                Command::List { repository } => Some(repository),
                _ => None,
            },
        );
    }

    #[test]
    #[expect(
        clippy::too_many_lines,
        reason = "one case per option of `GatewayOptions`, in its order"
    )]
    fn gateway_options_take_the_flag_over_the_environment_over_the_file_over_the_default() {
        type O = GatewayOptions;
        let cases: Vec<Case<O>> = vec![
            Case::opt(
                "endpoints",
                "endpoints",
                (
                    "10.0.0.1:1",
                    Some("10.0.0.2:1,10.0.0.3:1"),
                    "[\"10.0.0.4:1\"]",
                ),
                ["10.0.0.1:1", "10.0.0.2:1,10.0.0.3:1", "10.0.0.4:1", ""],
                |o: &O| o.endpoints.join(","),
            ),
            Case::opt(
                "access-key",
                "access_key",
                ("GWFLAG", Some("GWENV"), "\"GWFILE\""),
                ["GWFLAG", "GWENV", "GWFILE", ""],
                |o: &O| secret(o.access_key.as_ref()),
            ),
            Case::opt(
                "secret-key-file",
                "secret_key_file",
                ("/g/flag", Some("/g/env"), "\"/g/file\""),
                ["/g/flag", "/g/env", "/g/file", ""],
                |o: &O| path(o.secret_key_file.as_ref()),
            ),
            Case::file_only("secret-key", "\"gsk-file\"", "gsk-file", |o: &O| {
                secret(o.secret_key.as_ref())
            }),
            Case::opt(
                "signature",
                "signature",
                ("v2", None, "\"v4\""),
                ["V2", "", "V4", "Auto"],
                |o: &O| format!("{:?}", o.signature()),
            ),
            Case::opt(
                "region",
                "region",
                ("r-flag", None, "\"r-file\""),
                ["r-flag", "", "r-file", "us-east-1"],
                |o: &O| o.region().to_owned(),
            ),
            Case::opt(
                "concurrency",
                "concurrency",
                ("4", None, "5"),
                ["4", "", "5", "32"],
                |o: &O| o.concurrency().to_string(),
            ),
            Case::opt(
                "retries",
                "retries",
                ("1", None, "2"),
                ["1", "", "2", "8"],
                |o: &O| o.retries().to_string(),
            ),
            Case::opt(
                "bandwidth-limit",
                "bandwidth_limit",
                ("1MiB", None, "\"2MiB\""),
                ["1048576", "", "2097152", ""],
                |o: &O| number(o.bandwidth_limit),
            ),
            Case::opt(
                "multipart-threshold",
                "multipart_threshold",
                ("8MiB", None, "\"10MiB\""),
                ["8388608", "", "10485760", "67108864"],
                |o: &O| o.multipart_threshold().to_string(),
            ),
            Case::opt(
                "part-size",
                "part_size",
                ("6MiB", None, "7340032"),
                ["6291456", "", "7340032", "16777216"],
                |o: &O| o.part_size().to_string(),
            ),
            Case::opt(
                "connect-timeout-secs",
                "connect_timeout_secs",
                ("1", None, "2"),
                ["1", "", "2", "5"],
                |o: &O| o.connect_timeout_secs().to_string(),
            ),
            Case::opt(
                "read-timeout-secs",
                "read_timeout_secs",
                ("3", None, "4"),
                ["3", "", "4", "60"],
                |o: &O| o.read_timeout_secs().to_string(),
            ),
        ];
        check(
            "gateway_options_take_the_flag_over_the_environment_over_the_file_over_the_default",
            "gateway",
            &[],
            cases,
            &["snapshot"],
            |c| match c {
                Command::Snapshot { gateway, .. } => Some(gateway),
                _ => None,
            },
        );
    }

    #[test]
    fn agent_options_take_the_flag_over_the_environment_over_the_file_over_the_default() {
        type O = AgentOptions;
        let cases: Vec<Case<O>> = vec![
            Case::opt(
                "agents",
                "agents",
                (
                    "a@10.0.0.1:1",
                    Some("b@10.0.0.2:1,c@10.0.0.3:1"),
                    "[\"d@10.0.0.4:1\"]",
                ),
                [
                    "a@10.0.0.1:1",
                    "b@10.0.0.2:1,c@10.0.0.3:1",
                    "d@10.0.0.4:1",
                    "",
                ],
                |o: &O| o.agents.join(","),
            ),
            Case::opt(
                "token-file",
                "token_file",
                ("/t/flag", Some("/t/env"), "\"/t/file\""),
                ["/t/flag", "/t/env", "/t/file", ""],
                |o: &O| path(o.token_file.as_ref()),
            ),
            Case::opt(
                "tls-ca",
                "tls_ca",
                ("/ca/flag", Some("/ca/env"), "\"/ca/file\""),
                [
                    "/ca/flag",
                    "/ca/env",
                    "/ca/file",
                    "/etc/deis-backup/pki/ca.pem",
                ],
                |o: &O| o.tls_ca().display().to_string(),
            ),
            Case::opt(
                "tls-cert",
                "tls_cert",
                ("/c/flag", Some("/c/env"), "\"/c/file\""),
                [
                    "/c/flag",
                    "/c/env",
                    "/c/file",
                    "/etc/deis-backup/pki/coordinator.pem",
                ],
                |o: &O| o.tls_cert().display().to_string(),
            ),
            Case::opt(
                "tls-key",
                "tls_key",
                ("/k/flag", Some("/k/env"), "\"/k/file\""),
                [
                    "/k/flag",
                    "/k/env",
                    "/k/file",
                    "/etc/deis-backup/pki/coordinator.key",
                ],
                |o: &O| o.tls_key().display().to_string(),
            ),
            Case::switch("insecure-plaintext", "insecure_plaintext", |o: &O| {
                o.insecure_plaintext.to_string()
            }),
        ];
        check(
            "agent_options_take_the_flag_over_the_environment_over_the_file_over_the_default",
            "agents",
            &[],
            cases,
            &["agents"],
            |c| match c {
                Command::Agents { agents } => Some(agents),
                _ => None,
            },
        );
    }

    #[test]
    fn snapshot_options_take_the_flag_over_the_file_over_the_default() {
        type O = SnapshotOptions;
        let cases: Vec<Case<O>> = vec![
            Case::opt(
                "pre-hook",
                "pre_hook",
                ("hook-flag", None, "\"hook-file\""),
                ["hook-flag", "", "hook-file", ""],
                |o: &O| text(o.pre_hook.as_ref()),
            ),
            Case::opt(
                "zstd-level",
                "zstd_level",
                ("5", None, "7"),
                ["5", "", "7", ""],
                |o: &O| number(o.zstd_level),
            ),
            Case::switch("no-database", "no_database", |o: &O| {
                o.no_database.to_string()
            }),
            Case::switch("no-store", "no_store", |o: &O| o.no_store.to_string()),
            Case::switch("no-buckets", "no_buckets", |o: &O| o.no_buckets.to_string()),
            Case::switch("full", "full", |o: &O| o.full.to_string()),
        ];
        check(
            "snapshot_options_take_the_flag_over_the_file_over_the_default",
            "snapshot",
            &["dry_run", "forget_hosts"],
            cases,
            &["snapshot"],
            |c| match c {
                Command::Snapshot { options, .. } => Some(options),
                _ => None,
            },
        );
    }

    #[test]
    fn restore_options_take_the_flag_over_the_file_over_the_default() {
        type O = RestoreOptions;
        let cases: Vec<Case<O>> = vec![
            Case::opt(
                "existing",
                "existing",
                ("merge", None, "\"overwrite\""),
                ["Merge", "", "Overwrite", "Refuse"],
                |o: &O| format!("{:?}", o.existing()),
            ),
            Case::switch("overwrite-store", "overwrite_store", |o: &O| {
                o.overwrite_store.to_string()
            }),
            Case::switch("database-sql", "database_sql", |o: &O| {
                o.database_sql.to_string()
            }),
            Case::switch("etcd-keys", "etcd_keys", |o: &O| o.etcd_keys.to_string()),
            Case::switch("no-buckets", "no_buckets", |o: &O| o.no_buckets.to_string()),
            Case::switch("no-store", "no_store", |o: &O| o.no_store.to_string()),
        ];
        check(
            "restore_options_take_the_flag_over_the_file_over_the_default",
            "restore",
            &["dry_run", "force"],
            cases,
            &["restore", "latest"],
            |c| match c {
                Command::Restore { options, .. } => Some(options),
                _ => None,
            },
        );
    }

    #[test]
    fn prune_options_take_the_flag_over_the_file_over_the_default() {
        type O = PruneOptions;
        let cases: Vec<Case<O>> = vec![
            Case::opt(
                "keep-last",
                "keep_last",
                ("1", None, "2"),
                ["1", "", "2", "0"],
                |o: &O| o.policy().last.to_string(),
            ),
            Case::opt(
                "keep-daily",
                "keep_daily",
                ("3", None, "4"),
                ["3", "", "4", "0"],
                |o: &O| o.policy().daily.to_string(),
            ),
            Case::opt(
                "keep-weekly",
                "keep_weekly",
                ("5", None, "6"),
                ["5", "", "6", "0"],
                |o: &O| o.policy().weekly.to_string(),
            ),
            Case::opt(
                "keep-monthly",
                "keep_monthly",
                ("7", None, "8"),
                ["7", "", "8", "0"],
                |o: &O| o.policy().monthly.to_string(),
            ),
        ];
        check(
            "prune_options_take_the_flag_over_the_file_over_the_default",
            "prune",
            &["dry_run"],
            cases,
            &["prune"],
            |c| match c {
                Command::Prune { options, .. } => Some(options),
                _ => None,
            },
        );
    }

    /// The top level's one option, `etcd` (the sections have their own tests above).
    #[test]
    fn etcd_takes_the_flag_over_the_environment_over_the_file_over_the_default() {
        let etcd = Cli::command()
            .get_arguments()
            .find(|a| a.get_id() == "etcd")
            .expect("--etcd")
            .clone();
        let resolve = |args: &[String], body: &str| {
            let file = parse(body).map_err(|e| e.to_string())?;
            let argv = ["deis-backup", "list"]
                .into_iter()
                .map(ToString::to_string)
                .chain(args.iter().cloned());
            let cli = Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
            Ok(file.etcd(cli.etcd.as_deref()).to_owned())
        };
        Section {
            name: "top level",
            command: clap::Command::new("t").arg(etcd),
            keys: vec!["etcd".to_owned()],
            refused: &[],
            cases: vec![Case::opt(
                "etcd",
                "etcd",
                (
                    "http://10.0.0.1:4001",
                    Some("http://10.0.0.2:4001"),
                    "\"http://10.0.0.3:4001\"",
                ),
                [
                    "http://10.0.0.1:4001",
                    "http://10.0.0.2:4001",
                    "http://10.0.0.3:4001",
                    "http://127.0.0.1:4001",
                ],
                String::clone,
            )],
            resolve: &resolve,
            base_env: &[],
        }
        .check(
            module_path!(),
            "etcd_takes_the_flag_over_the_environment_over_the_file_over_the_default",
        );
    }

    #[test]
    fn per_run_decisions_are_refused_in_the_config_file() {
        for (section, key) in [
            ("snapshot", "dry-run"),
            ("restore", "force"),
            ("prune", "dry-run"),
        ] {
            let config = parse(&format!("[{section}]\n{key} = true\n")).unwrap();
            let e = match section {
                "snapshot" => config.merged(section, SnapshotOptions::default()).map(drop),
                "restore" => config.merged(section, RestoreOptions::default()).map(drop),
                _ => config.merged(section, PruneOptions::default()).map(drop),
            }
            .unwrap_err();
            assert!(e.message().contains("unknown field"), "{e}");
        }
    }

    #[test]
    fn unknown_settings_and_keys_are_one_line_errors_naming_the_file() {
        let e = parse("[snapshots]\nfull = true\n").unwrap_err();
        assert_eq!(
            e.message(),
            "c.toml: unknown setting 'snapshots' (allowed: etcd, and the sections repository, \
             gateway, agents, snapshot, restore, prune)"
        );
        let e = parse("[snapshot]\nful = true\n")
            .unwrap()
            .merged("snapshot", SnapshotOptions::default())
            .unwrap_err();
        assert!(
            e.message()
                .starts_with("c.toml: [snapshot]: unknown field `ful`"),
            "{e}"
        );
        assert!(!e.message().contains('\n'), "{e}");
    }

    /// The file and the command line, parsed and merged as `run` does.
    fn snapshot_options(file: &str, args: &[&str]) -> SnapshotOptions {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, file).unwrap();
        let config = ConfigFile::read(&path).unwrap();
        let cli = Cli::try_parse_from([&["deis-backup", "snapshot"], args].concat()).unwrap();
        let Command::Snapshot { options, .. } = cli.command else {
            unreachable!("parsed `snapshot`")
        };
        config.merged("snapshot", options).unwrap()
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
