//! The agent's configuration: one struct that serves the TOML file (`--config`), the command line
//! and the library.
//!
//! Invariants:
//! - Every field is optional (no clap default); the effective value comes from the accessor
//!   methods, so a default lives in exactly one place. Command-line values (flags and their
//!   environment variables) override the file's ([`deis_backup_proto::config`], the convention
//!   the coordinator follows too).
//! - Hooks come only from the file: the API names a hook, it never carries a command.
//! - The struct holds no secret: the bearer token is read from `DEIS_BACKUP_TOKEN` or from the file
//!   named by `token-file` into a [`SecretString`], so it never appears in `Debug` output or logs
//!   and is zeroized when dropped.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use deis_backup_proto::config;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Hooks merge by name; the command line names none, so the file's all stay.
fn extend(over: &mut BTreeMap<String, Hook>, file: BTreeMap<String, Hook>) {
    for (name, hook) in file {
        over.entry(name).or_insert(hook);
    }
}

/// Default Docker socket (mounted into the agent's container).
pub const DEFAULT_DOCKER: &str = "unix:///var/run/docker.sock";
/// Default database container, as Deis v1 names it.
pub const DEFAULT_DATABASE_CONTAINER: &str = "deis-database";
/// The Deis platform containers whose running on a host makes a restore unsafe there.
pub const DEFAULT_PLATFORM_CONTAINERS: &[&str] = &[
    "deis-database",
    "deis-registry",
    "deis-controller",
    "deis-logger",
    "deis-builder",
];
/// Default allow-listed store path: where store-volume mounts CephFS on every host.
pub const DEFAULT_STORE_PATH: &str = "/var/lib/deis/store";
pub use deis_backup_proto::{DEFAULT_ETCD, TOKEN_ENV};

/// A command run by name inside a container (`[hooks.<name>]` in the config file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Hook {
    /// Container to run in; the database container when absent.
    #[serde(default)]
    pub container: Option<String>,
    /// User to run as inside the container (`postgres`); the container's default when absent.
    #[serde(default)]
    pub user: Option<String>,
    /// The command and its arguments, run without a shell.
    pub command: Vec<String>,
}

/// deis-backup agent: serves the database dump, the store archive, their restores and named hooks
/// to the coordinator over authenticated gRPC.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, clap::Args, merge::Merge)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
#[merge(strategy = merge::option::overwrite_none)]
pub struct Config {
    /// Address to serve gRPC on [default: $COREOS_PRIVATE_IPV4:4195].
    #[arg(long, env = "DEIS_BACKUP_AGENT_LISTEN")]
    pub listen: Option<String>,
    /// etcd v2 endpoints, comma-separated [default: http://127.0.0.1:4001].
    #[arg(long, env = "ETCDCTL_PEERS")]
    pub etcd: Option<String>,
    /// Do not register in etcd (for running by hand).
    #[arg(long)]
    #[merge(strategy = merge::bool::overwrite_false)]
    pub no_register: bool,
    /// Identity of this host in etcd and Describe [default: the contents of --machine-id-file].
    #[arg(long)]
    pub host_id: Option<String>,
    /// File holding the host's machine id [default: /etc/machine-id].
    #[arg(long)]
    pub machine_id_file: Option<PathBuf>,
    /// File holding the bearer token; otherwise $DEIS_BACKUP_TOKEN.
    #[arg(long, env = "DEIS_BACKUP_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// This agent's certificate (PEM), naming its host id [default: /etc/deis-backup/pki/agent.pem].
    #[arg(long, env = "DEIS_BACKUP_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// Its private key, mode 600 [default: /etc/deis-backup/pki/agent.key].
    #[arg(long, env = "DEIS_BACKUP_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// The cluster CA (PEM) the coordinator's certificate must chain to [default:
    /// /etc/deis-backup/pki/ca.pem].
    #[arg(long, env = "DEIS_BACKUP_TLS_CA")]
    pub tls_client_ca: Option<PathBuf>,
    /// Docker daemon socket [default: unix:///var/run/docker.sock].
    #[arg(long, env = "DOCKER_HOST")]
    pub docker: Option<String>,
    /// Name of the database container [default: deis-database].
    #[arg(long)]
    pub database_container: Option<String>,
    /// A store path the agent may archive and restore; repeat for several [default: /var/lib/deis/store].
    #[arg(long = "store-path")]
    #[merge(strategy = merge::vec::overwrite_empty)]
    pub store_paths: Vec<PathBuf>,
    /// A platform container Describe reports when it runs; repeat for several [default:
    /// deis-database, deis-registry, deis-controller, deis-logger, deis-builder, and the database
    /// container].
    #[arg(long = "platform-container")]
    #[merge(strategy = merge::vec::overwrite_empty)]
    pub platform_containers: Vec<String>,
    /// Default zstd level for dumps and archives [default: 3].
    #[arg(long)]
    pub zstd_level: Option<i32>,
    /// zstd worker threads for archives; 0 means one per CPU [default: 0].
    #[arg(long)]
    pub zstd_workers: Option<u32>,
    /// Serve plain HTTP/2 without TLS: the token then travels in clear and any caller that has it
    /// is served. For a throwaway test network only; every start says so in the log.
    #[arg(long)]
    #[merge(strategy = merge::bool::overwrite_false)]
    pub insecure_plaintext: bool,
    /// Restore the numeric owners an archive records, uid/gid 0 included [default: true].
    #[arg(long)]
    pub restore_owners: Option<bool>,
    /// Keep the setuid/setgid bits an archive records [default: true].
    #[arg(long)]
    pub restore_setid: Option<bool>,
    /// Create the device nodes an archive records [default: false: refused].
    #[arg(long)]
    pub allow_devices: Option<bool>,
    /// Most bytes one store restore may unpack (tar bytes after decompression) [default: 4 TiB].
    #[arg(long)]
    pub max_restore_bytes: Option<u64>,
    /// Highest zstd level a caller may ask for [default: 19].
    #[arg(long)]
    pub max_zstd_level: Option<i32>,
    /// Largest zstd window, as log2 of bytes, a restore may need to decompress [default: 27].
    #[arg(long)]
    pub max_zstd_window_log: Option<u32>,
    /// Serve RestoreDatabase, which runs the caller's SQL as the database superuser [default:
    /// false].
    #[arg(long)]
    pub restore_database: Option<bool>,
    /// Serve DrillDatabase: a snapshot's dump loaded into a throwaway container of the database
    /// container's image, with no network, removed afterwards [default: true].
    #[arg(long)]
    pub drill: Option<bool>,
    /// Longest line RestoreDatabase accepts in the SQL, in bytes [default: 64 MiB].
    #[arg(long)]
    pub max_sql_line: Option<u64>,
    /// Directory RestoreDatabase spools the SQL into before checking it [default: the system's
    /// temporary directory].
    #[arg(long)]
    pub spool_dir: Option<PathBuf>,
    /// Most connections served at once [default: 32].
    #[arg(long)]
    pub max_connections: Option<u32>,
    /// Most concurrent calls on one connection [default: 16].
    #[arg(long)]
    pub max_streams: Option<u32>,
    /// Seconds a connection may sit without a call before it is closed [default: 300].
    #[arg(long)]
    pub idle_timeout: Option<u64>,
    /// Address to serve Prometheus metrics on, as plain HTTP `GET /metrics` without
    /// authentication (they carry no secret) [default: off].
    #[arg(long, env = "DEIS_BACKUP_AGENT_METRICS_LISTEN", value_name = "ADDR")]
    pub metrics_listen: Option<String>,
    /// Hooks by name (config file only).
    #[arg(skip)]
    #[merge(strategy = extend)]
    pub hooks: BTreeMap<String, Hook>,
}

/// What a store restore may do, from the agent's own configuration; the caller cannot widen it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestorePolicy {
    /// Restore recorded numeric owners (uid/gid 0 included); otherwise files belong to the agent.
    pub owners: bool,
    /// Keep setuid/setgid bits; otherwise they are cleared.
    pub setid: bool,
    /// Create device nodes; otherwise an archive holding one is refused.
    pub devices: bool,
    /// Most tar bytes one restore may unpack.
    pub max_bytes: u64,
    /// Largest zstd window (log2 bytes) the decoder accepts.
    pub max_window_log: u32,
}

/// What RestoreDatabase may do, from the agent's own configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatabaseRestorePolicy {
    /// Whether RestoreDatabase is served at all.
    pub enabled: bool,
    /// Whether DrillDatabase is served.
    pub drill: bool,
    /// Longest SQL line accepted, in bytes.
    pub max_line: u64,
    /// Where the SQL is spooled before its digest is checked.
    pub spool_dir: PathBuf,
}

/// Limits on the gRPC server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerLimits {
    pub max_connections: u32,
    pub max_streams: u32,
    pub idle_timeout: std::time::Duration,
}

impl Config {
    /// Reads a TOML config file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let what = format!("{} is not a valid agent config", path.display());
        config::read(path)
            .and_then(|table| config::parse(table, &what))
            .map_err(|what| Error::Config { what })
    }

    /// This config with every value set in `over` replacing ours (command line over file):
    /// a value `over` leaves unset (`None`, `false`, empty) comes from `self`. Derived
    /// ([`merge::Merge`]): a new optional field merges without a line here; a field of another
    /// type does not compile until it names how.
    #[must_use]
    pub fn merged(self, over: Config) -> Self {
        config::merged(self, over)
    }

    /// The address to serve on: `--listen`, else `$COREOS_PRIVATE_IPV4:4195`.
    pub fn listen_addr(&self) -> Result<SocketAddr> {
        let text = if let Some(l) = &self.listen {
            l.clone()
        } else {
            let ip = std::env::var("COREOS_PRIVATE_IPV4").map_err(|_| Error::Config {
                what: "no --listen given and $COREOS_PRIVATE_IPV4 is not set; set one of them \
                       (units read it from /etc/environment)"
                    .into(),
            })?;
            format!("{ip}:{}", deis_backup_proto::DEFAULT_AGENT_PORT)
        };
        text.parse().map_err(|_| Error::Config {
            what: format!("listen address '{text}' is not ip:port"),
        })
    }

    /// The address to serve `/metrics` on: `--metrics-listen`, else none (not served).
    pub fn metrics_addr(&self) -> Result<Option<SocketAddr>> {
        self.metrics_listen
            .as_deref()
            .map(|text| {
                text.parse().map_err(|_| Error::Config {
                    what: format!("metrics listen address '{text}' is not ip:port"),
                })
            })
            .transpose()
    }

    pub fn etcd(&self) -> &str {
        self.etcd.as_deref().unwrap_or(DEFAULT_ETCD)
    }

    pub fn register(&self) -> bool {
        !self.no_register
    }

    pub fn docker(&self) -> &str {
        self.docker.as_deref().unwrap_or(DEFAULT_DOCKER)
    }

    pub fn database_container(&self) -> &str {
        self.database_container
            .as_deref()
            .unwrap_or(DEFAULT_DATABASE_CONTAINER)
    }

    /// The container names Describe reports as running platform containers.
    pub fn platform_containers(&self) -> Vec<String> {
        let mut names: Vec<String> = if self.platform_containers.is_empty() {
            DEFAULT_PLATFORM_CONTAINERS
                .iter()
                .map(|s| (*s).to_owned())
                .collect()
        } else {
            self.platform_containers.clone()
        };
        let db = self.database_container().to_owned();
        if !names.contains(&db) {
            names.push(db);
        }
        names
    }

    /// The allow-listed store paths.
    pub fn store_paths(&self) -> Vec<PathBuf> {
        if self.store_paths.is_empty() {
            vec![PathBuf::from(DEFAULT_STORE_PATH)]
        } else {
            self.store_paths.clone()
        }
    }

    pub fn zstd_level(&self) -> i32 {
        self.zstd_level.unwrap_or(3).min(self.max_zstd_level())
    }

    /// The highest zstd level a caller may ask for.
    pub fn max_zstd_level(&self) -> i32 {
        self.max_zstd_level.unwrap_or(19).clamp(1, 22)
    }

    /// What a store restore may do.
    pub fn restore_policy(&self) -> RestorePolicy {
        RestorePolicy {
            owners: self.restore_owners.unwrap_or(true),
            setid: self.restore_setid.unwrap_or(true),
            devices: self.allow_devices.unwrap_or(false),
            max_bytes: self.max_restore_bytes.unwrap_or(4 << 40),
            max_window_log: self.max_zstd_window_log.unwrap_or(27).clamp(10, 31),
        }
    }

    /// What RestoreDatabase may do.
    pub fn database_restore_policy(&self) -> DatabaseRestorePolicy {
        DatabaseRestorePolicy {
            enabled: self.restore_database.unwrap_or(false),
            drill: self.drill.unwrap_or(true),
            max_line: self.max_sql_line.unwrap_or(64 << 20),
            spool_dir: self.spool_dir.clone().unwrap_or_else(std::env::temp_dir),
        }
    }

    /// Limits on the gRPC server.
    pub fn server_limits(&self) -> ServerLimits {
        ServerLimits {
            max_connections: self.max_connections.unwrap_or(32).max(1),
            max_streams: self.max_streams.unwrap_or(16).max(1),
            idle_timeout: std::time::Duration::from_secs(self.idle_timeout.unwrap_or(300).max(1)),
        }
    }

    /// zstd worker threads (at least 1).
    pub fn zstd_workers(&self) -> u32 {
        match self.zstd_workers.unwrap_or(0) {
            0 => std::thread::available_parallelism()
                .map_or(1, |n| u32::try_from(n.get()).unwrap_or(1)),
            n => n,
        }
    }

    /// The configured hooks, with the built-in `wal-e-backup-push` unless the file redefines it.
    pub fn hooks(&self) -> BTreeMap<String, Hook> {
        let mut hooks = BTreeMap::from([(
            "wal-e-backup-push".to_owned(),
            Hook {
                container: None,
                user: Some("postgres".into()),
                command: [
                    "envdir",
                    "/etc/wal-e.d/env",
                    "wal-e",
                    "backup-push",
                    "/var/lib/postgresql/9.3/main",
                ]
                .map(String::from)
                .to_vec(),
            },
        )]);
        hooks.extend(self.hooks.clone());
        hooks
    }

    /// The file holding the host's machine id.
    pub fn machine_id_file(&self) -> PathBuf {
        self.machine_id_file
            .clone()
            .unwrap_or_else(|| PathBuf::from("/etc/machine-id"))
    }

    /// The host id: `--host-id`, else the machine id file's first line.
    pub fn host_id(&self) -> Result<String> {
        if let Some(id) = &self.host_id {
            return Ok(id.clone());
        }
        let path = self.machine_id_file();
        let id = std::fs::read_to_string(&path).map_err(|e| Error::Config {
            what: format!(
                "cannot read the machine id from {}: {e}; mount /etc/machine-id or pass --host-id",
                path.display()
            ),
        })?;
        let id = id.trim();
        if id.is_empty() || id.contains('/') {
            return Err(Error::Config {
                what: format!("{} holds no usable machine id", path.display()),
            });
        }
        Ok(id.to_owned())
    }

    /// The TLS files (certificate, key, CA), or `None` with `--insecure-plaintext`.
    pub fn tls_files(&self) -> Option<TlsFiles> {
        if self.insecure_plaintext {
            return None;
        }
        let pki = Path::new(deis_backup_proto::identity::DEFAULT_PKI_DIR);
        let or = |p: &Option<PathBuf>, name: &str| p.clone().unwrap_or_else(|| pki.join(name));
        Some(TlsFiles {
            cert: or(&self.tls_cert, "agent.pem"),
            key: or(&self.tls_key, "agent.key"),
            ca: or(&self.tls_client_ca, "ca.pem"),
        })
    }

    /// The bearer token: the token file's first line (the file must be mode 600), else
    /// `$DEIS_BACKUP_TOKEN`, which the agent warns about (the environment of a process is readable
    /// in more places than a file).
    pub fn token(&self) -> Result<SecretString> {
        let text = if let Some(p) = &self.token_file {
            deis_backup_proto::identity::check_private(p).map_err(|what| Error::Config { what })?;
            std::fs::read_to_string(p).map_err(|e| Error::Config {
                what: format!("cannot read the token file {}: {e}", p.display()),
            })?
        } else {
            let t = std::env::var(TOKEN_ENV).unwrap_or_default();
            if !t.is_empty() {
                tracing::warn!(
                    "the bearer token comes from ${TOKEN_ENV}; prefer --token-file with a mode \
                     600 file (docs/SECURITY.md)"
                );
            }
            t
        };
        let text = SecretString::from(text);
        let t =
            deis_backup_proto::check_token(text.expose_secret()).map_err(|why| Error::Config {
                what: format!("{why}: set ${TOKEN_ENV} or --token-file"),
            })?;
        Ok(SecretString::from(t))
    }
}

/// Where the agent's TLS certificate, key and the cluster CA are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

#[cfg(test)]
mod tests {
    use super::*;
    use deis_backup_proto::config::precedence::{Case, Section, serde_keys};

    #[test]
    fn file_then_command_line() {
        let file: Config = toml::from_str(
            r#"
            listen = "10.0.0.1:4195"
            store-paths = ["/var/lib/deis/store", "/srv/other"]
            zstd-level = 9
            [hooks.vacuum]
            user = "postgres"
            command = ["vacuumdb", "--all"]
            "#,
        )
        .unwrap();
        let cli = Config {
            listen: Some("127.0.0.1:1".into()),
            ..Config::default()
        };
        let c = file.merged(cli);
        assert_eq!(c.listen_addr().unwrap().to_string(), "127.0.0.1:1");
        assert_eq!(c.store_paths().len(), 2);
        assert_eq!(c.zstd_level(), 9);
        let hooks = c.hooks();
        assert_eq!(hooks["vacuum"].command, ["vacuumdb", "--all"]);
        assert!(hooks.contains_key("wal-e-backup-push"));
        assert_eq!(c.database_container(), "deis-database");
    }

    /// A config with every field set; a field added to `Config` and not here does not compile.
    fn every_field_set() -> Config {
        Config {
            listen: Some("10.0.0.1:1".into()),
            etcd: Some("http://10.0.0.1:4001".into()),
            no_register: true,
            host_id: Some("h".into()),
            machine_id_file: Some("/m".into()),
            token_file: Some("/t".into()),
            tls_cert: Some("/c".into()),
            tls_key: Some("/k".into()),
            tls_client_ca: Some("/ca".into()),
            docker: Some("unix:///d".into()),
            database_container: Some("db".into()),
            store_paths: vec!["/s".into()],
            platform_containers: vec!["p".into()],
            zstd_level: Some(7),
            zstd_workers: Some(3),
            insecure_plaintext: true,
            restore_owners: Some(false),
            restore_setid: Some(false),
            allow_devices: Some(true),
            max_restore_bytes: Some(5),
            max_zstd_level: Some(9),
            max_zstd_window_log: Some(20),
            restore_database: Some(true),
            drill: Some(false),
            max_sql_line: Some(6),
            spool_dir: Some("/sp".into()),
            max_connections: Some(2),
            max_streams: Some(4),
            idle_timeout: Some(8),
            metrics_listen: Some("127.0.0.1:9".into()),
            hooks: BTreeMap::from([(
                "h".into(),
                Hook {
                    container: None,
                    user: None,
                    command: vec!["true".into()],
                },
            )]),
        }
    }

    #[test]
    fn every_field_merges_from_the_file_and_from_the_command_line() {
        let all = every_field_set();
        // From the file, under an empty command line; from the command line, over an empty file.
        assert_eq!(all.clone().merged(Config::default()), all);
        assert_eq!(Config::default().merged(all.clone()), all);
        // The command line wins, `Some(false)` included.
        let file = Config {
            restore_owners: Some(true),
            zstd_level: Some(1),
            ..Config::default()
        };
        let c = file.merged(all.clone());
        assert_eq!(c.restore_owners, Some(false));
        assert_eq!(c.zstd_level, Some(7));
    }

    fn path(p: Option<&PathBuf>) -> String {
        p.map(|p| p.display().to_string()).unwrap_or_default()
    }

    fn tls(c: &Config, pick: fn(&TlsFiles) -> &PathBuf) -> String {
        c.tls_files()
            .map(|f| pick(&f).display().to_string())
            .unwrap_or_default()
    }

    #[expect(
        clippy::too_many_lines,
        reason = "one case per option of the agent, in the order of `Config`"
    )]
    fn cases() -> Vec<Case<Config>> {
        vec![
            Case::opt(
                "listen",
                "listen",
                ("127.0.0.1:1", Some("127.0.0.1:2"), "\"127.0.0.1:3\""),
                ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3", "10.9.9.9:4195"],
                |c| {
                    c.listen_addr()
                        .map_or_else(|e| e.to_string(), |a| a.to_string())
                },
            ),
            Case::opt(
                "etcd",
                "etcd",
                (
                    "http://e-flag:1",
                    Some("http://e-env:1"),
                    "\"http://e-file:1\"",
                ),
                [
                    "http://e-flag:1",
                    "http://e-env:1",
                    "http://e-file:1",
                    DEFAULT_ETCD,
                ],
                |c| c.etcd().to_owned(),
            ),
            Case::switch("no-register", "no_register", |c| {
                (!c.register()).to_string()
            }),
            Case::opt(
                "host-id",
                "host_id",
                ("h-flag", None, "\"h-file\""),
                // Unset: the machine id file's content, which depends on the host.
                ["h-flag", "", "h-file", ""],
                |c| c.host_id.clone().unwrap_or_default(),
            ),
            Case::opt(
                "machine-id-file",
                "machine_id_file",
                ("/m/flag", None, "\"/m/file\""),
                ["/m/flag", "", "/m/file", "/etc/machine-id"],
                |c| c.machine_id_file().display().to_string(),
            ),
            Case::opt(
                "token-file",
                "token_file",
                ("/t/flag", Some("/t/env"), "\"/t/file\""),
                ["/t/flag", "/t/env", "/t/file", ""],
                |c| path(c.token_file.as_ref()),
            ),
            Case::opt(
                "tls-cert",
                "tls_cert",
                ("/c/flag", Some("/c/env"), "\"/c/file\""),
                [
                    "/c/flag",
                    "/c/env",
                    "/c/file",
                    "/etc/deis-backup/pki/agent.pem",
                ],
                |c| tls(c, |f| &f.cert),
            ),
            Case::opt(
                "tls-key",
                "tls_key",
                ("/k/flag", Some("/k/env"), "\"/k/file\""),
                [
                    "/k/flag",
                    "/k/env",
                    "/k/file",
                    "/etc/deis-backup/pki/agent.key",
                ],
                |c| tls(c, |f| &f.key),
            ),
            Case::opt(
                "tls-client-ca",
                "tls_client_ca",
                ("/ca/flag", Some("/ca/env"), "\"/ca/file\""),
                [
                    "/ca/flag",
                    "/ca/env",
                    "/ca/file",
                    "/etc/deis-backup/pki/ca.pem",
                ],
                |c| tls(c, |f| &f.ca),
            ),
            Case::opt(
                "docker",
                "docker",
                ("unix:///flag", Some("unix:///env"), "\"unix:///file\""),
                [
                    "unix:///flag",
                    "unix:///env",
                    "unix:///file",
                    DEFAULT_DOCKER,
                ],
                |c| c.docker().to_owned(),
            ),
            Case::opt(
                "database-container",
                "database_container",
                ("db-flag", None, "\"db-file\""),
                ["db-flag", "", "db-file", DEFAULT_DATABASE_CONTAINER],
                |c| c.database_container().to_owned(),
            ),
            Case::opt(
                "store-paths",
                "store_paths",
                ("/s/flag", None, "[\"/s/file\"]"),
                ["/s/flag", "", "/s/file", DEFAULT_STORE_PATH],
                |c| {
                    c.store_paths()
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(",")
                },
            ),
            Case::opt(
                "platform-containers",
                "platform_containers",
                ("p-flag", None, "[\"p-file\"]"),
                [
                    "p-flag,deis-database",
                    "",
                    "p-file,deis-database",
                    "deis-database,deis-registry,deis-controller,deis-logger,deis-builder",
                ],
                |c| c.platform_containers().join(","),
            ),
            Case::opt(
                "zstd-level",
                "zstd_level",
                ("5", None, "7"),
                ["5", "", "7", "3"],
                |c| c.zstd_level().to_string(),
            ),
            Case::opt(
                "zstd-workers",
                "zstd_workers",
                ("2", None, "3"),
                // Unset: one per CPU, which depends on the host.
                ["2", "", "3", ""],
                |c| c.zstd_workers.map(|n| n.to_string()).unwrap_or_default(),
            ),
            Case::switch("insecure-plaintext", "insecure_plaintext", |c| {
                c.tls_files().is_none().to_string()
            }),
            Case::opt(
                "restore-owners",
                "restore_owners",
                ("true", None, "false"),
                ["true", "", "false", "true"],
                |c| c.restore_policy().owners.to_string(),
            ),
            Case::opt(
                "restore-setid",
                "restore_setid",
                ("true", None, "false"),
                ["true", "", "false", "true"],
                |c| c.restore_policy().setid.to_string(),
            ),
            Case::opt(
                "allow-devices",
                "allow_devices",
                ("false", None, "true"),
                ["false", "", "true", "false"],
                |c| c.restore_policy().devices.to_string(),
            ),
            Case::opt(
                "max-restore-bytes",
                "max_restore_bytes",
                ("5", None, "6"),
                ["5", "", "6", "4398046511104"],
                |c| c.restore_policy().max_bytes.to_string(),
            ),
            Case::opt(
                "max-zstd-level",
                "max_zstd_level",
                ("9", None, "10"),
                ["9", "", "10", "19"],
                |c| c.max_zstd_level().to_string(),
            ),
            Case::opt(
                "max-zstd-window-log",
                "max_zstd_window_log",
                ("20", None, "21"),
                ["20", "", "21", "27"],
                |c| c.restore_policy().max_window_log.to_string(),
            ),
            Case::opt(
                "restore-database",
                "restore_database",
                ("false", None, "true"),
                ["false", "", "true", "false"],
                |c| c.database_restore_policy().enabled.to_string(),
            ),
            Case::opt(
                "drill",
                "drill",
                ("true", None, "false"),
                ["true", "", "false", "true"],
                |c| c.database_restore_policy().drill.to_string(),
            ),
            Case::opt(
                "max-sql-line",
                "max_sql_line",
                ("5", None, "6"),
                ["5", "", "6", "67108864"],
                |c| c.database_restore_policy().max_line.to_string(),
            ),
            Case::opt(
                "spool-dir",
                "spool_dir",
                ("/sp/flag", None, "\"/sp/file\""),
                // The child processes run without $TMPDIR.
                ["/sp/flag", "", "/sp/file", "/tmp"],
                |c| c.database_restore_policy().spool_dir.display().to_string(),
            ),
            Case::opt(
                "max-connections",
                "max_connections",
                ("2", None, "3"),
                ["2", "", "3", "32"],
                |c| c.server_limits().max_connections.to_string(),
            ),
            Case::opt(
                "max-streams",
                "max_streams",
                ("4", None, "5"),
                ["4", "", "5", "16"],
                |c| c.server_limits().max_streams.to_string(),
            ),
            Case::opt(
                "idle-timeout",
                "idle_timeout",
                ("7", None, "8"),
                ["7", "", "8", "300"],
                |c| c.server_limits().idle_timeout.as_secs().to_string(),
            ),
            Case::opt(
                "metrics-listen",
                "metrics_listen",
                ("127.0.0.1:1", Some("127.0.0.1:2"), "\"127.0.0.1:3\""),
                // Unset: not served.
                ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3", "off"],
                |c| {
                    c.metrics_addr().map_or_else(
                        |e| e.to_string(),
                        |a| a.map_or_else(|| "off".to_owned(), |a| a.to_string()),
                    )
                },
            ),
            Case {
                key: "hooks",
                id: None,
                flag: None,
                env: None,
                file: "{ vacuum = { command = [\"vacuumdb\"] } }",
                want: ["", "", "vacuum,wal-e-backup-push", "wal-e-backup-push"],
                get: |c| c.hooks().into_keys().collect::<Vec<_>>().join(","),
            },
        ]
    }

    /// The command line and the file (written out and named by `--config`), resolved as the
    /// binary does ([`crate::Cli::into_config`]).
    fn resolve(args: &[String], file: &str) -> std::result::Result<Config, String> {
        use clap::Parser as _;
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, file).map_err(|e| e.to_string())?;
        let argv = [
            "deis-backup-agent".into(),
            "--config".into(),
            path.display().to_string(),
        ]
        .into_iter()
        .chain(args.iter().cloned());
        let cli = crate::Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
        cli.into_config().map_err(|e| e.to_string())
    }

    #[test]
    fn every_option_takes_the_flag_over_the_environment_over_the_file_over_the_default() {
        use clap::Args as _;
        Section {
            name: "agent",
            command: Config::augment_args(clap::Command::new("t")),
            keys: serde_keys::<Config>(),
            refused: &[],
            cases: cases(),
            resolve: &resolve,
            base_env: &[("COREOS_PRIVATE_IPV4", "10.9.9.9")],
        }
        .check(
            module_path!(),
            "every_option_takes_the_flag_over_the_environment_over_the_file_over_the_default",
        );
    }

    #[test]
    fn unknown_keys_are_refused() {
        let e = toml::from_str::<Config>("listn = \"x\"").unwrap_err();
        assert!(e.message().contains("unknown field"), "{e}");
    }

    #[test]
    fn token_is_never_shown() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "s3cr3t-s3cr3t-s3cr3t\n").unwrap();
        std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let c = Config {
            token_file: Some(file),
            ..Config::default()
        };
        let t = c.token().unwrap();
        assert_eq!(t.expose_secret(), "s3cr3t-s3cr3t-s3cr3t");
        assert!(!format!("{t:?}").contains("s3cr3t"));
    }
}
