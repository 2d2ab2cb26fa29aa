//! `deis-backup-agent`: the per-host agent of deis-backup. It turns the host's Docker engine and
//! store directory into the authenticated gRPC streams of `proto/deis/backup/v1/agent.proto`.
//!
//! Modules: `config` (flags and file), `auth` (bearer token), `container` (Docker exec),
//! `database` (dump and restore through the database container), `store` (allow-list, filesystem
//! identity, archive, restore), `hooks` (named commands), `registration` (etcd), `listener`
//! (connection limits), `service` (gRPC), `metrics` (Prometheus counters and their `/metrics`
//! endpoint, off by default).
//!
//! Invariants: the agent serves mutual TLS with the cluster CA unless started with
//! `--insecure-plaintext`, and refuses to start with a certificate that does not name its host id
//! or a key others can read; it runs only the fixed jobs above, for the coordinator's certificate
//! plus the token; secrets never reach a log or the metrics; etcd being away never stops it from
//! serving.

pub mod auth;
pub mod chunks;
pub mod config;
pub mod container;
pub mod database;
pub mod drill;
pub mod error;
pub mod hooks;
pub mod listener;
pub mod metrics;
pub mod registration;
pub mod service;
pub mod store;

use std::future::Future;

use deis_backup_proto::registration::Registration;
use deis_backup_proto::v1::agent_server::AgentServer;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

pub use config::Config;
pub use error::{Error, Result};

/// deis-backup agent: serves the database dump, the store archive, their restores and named hooks
/// to the coordinator over authenticated gRPC.
#[derive(Debug, clap::Parser)]
#[command(name = "deis-backup-agent", version, about, long_about = None)]
pub struct Cli {
    /// TOML config file (kebab-case keys, as the flags; hooks only here).
    #[arg(long, env = "DEIS_BACKUP_AGENT_CONFIG")]
    pub config: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub opts: Config,
}

impl Cli {
    /// The effective configuration: the file (if any) with the command line over it.
    pub fn into_config(self) -> Result<Config> {
        match &self.config {
            Some(p) => Ok(Config::from_file(p)?.merged(self.opts)),
            None => Ok(self.opts),
        }
    }
}

/// The agent's version, as Describe and the registration report it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

fn read(path: &std::path::Path, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::Config {
        what: format!("cannot read the {what} {}: {e}", path.display()),
    })
}

/// The server's TLS: this agent's certificate, which must name `host_id`, and the cluster CA that
/// client certificates must chain to.
fn tls_config(files: &config::TlsFiles, host_id: &str) -> Result<ServerTlsConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    // Both ring and aws-lc-rs may be linked in; the agent uses ring. An already installed provider
    // (when embedded in another program) is kept.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cert = read(&files.cert, "TLS certificate")?;
    deis_backup_proto::identity::check_private(&files.key)
        .map_err(|what| Error::Config { what })?;
    let name = deis_backup_proto::identity::agent_name(host_id).ok_or_else(|| Error::Config {
        what: format!(
            "host id '{host_id}' cannot be named in a certificate; use the machine id (letters, \
             digits and '-')"
        ),
    })?;
    let leaf = CertificateDer::from_pem_slice(&cert).map_err(|e| Error::Config {
        what: format!("{} holds no PEM certificate: {e}", files.cert.display()),
    })?;
    let names_us = ServerName::try_from(name.as_str()).is_ok_and(|n| {
        webpki::EndEntityCert::try_from(&leaf)
            .is_ok_and(|c| c.verify_is_valid_for_subject_name(&n).is_ok())
    });
    if !names_us {
        return Err(Error::Config {
            what: format!(
                "{} does not name this host ({name}); issue one with `deis-backup pki issue \
                 --host {host_id}`",
                files.cert.display()
            ),
        });
    }
    Ok(ServerTlsConfig::new()
        .identity(Identity::from_pem(cert, read(&files.key, "TLS key")?))
        .client_ca_root(Certificate::from_pem(read(&files.ca, "cluster CA")?))
        .timeout(std::time::Duration::from_secs(10)))
}

/// Serves until `shutdown` completes, registered in etcd meanwhile (unless disabled).
#[expect(
    clippy::too_many_lines,
    reason = "the server's assembly: config, engine, TLS, limits, service, registration and \
              shutdown, each a few lines, in the order they must happen"
)]
pub async fn serve(config: Config, shutdown: impl Future<Output = ()>) -> Result<()> {
    let token = config.token()?;
    let host_id = config.host_id()?;
    let listen = config.listen_addr()?;
    let engine = container::Engine::connect(config.docker()).await?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| Error::Config {
            what: format!("cannot listen on {listen}: {e}"),
        })?;
    let local = listener
        .local_addr()
        .map_err(Error::io("listening on", "socket"))?;
    let metrics_listener = match config.metrics_addr()? {
        Some(addr) => Some(metrics::bind(addr).await?),
        None => None,
    };
    let address = if local.ip().is_unspecified() {
        std::env::var("COREOS_PRIVATE_IPV4")
            .map_or_else(|_| local.to_string(), |ip| format!("{ip}:{}", local.port()))
    } else {
        local.to_string()
    };
    let hostname = rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned();
    let settings = service::Settings {
        host_id: host_id.clone(),
        hostname: hostname.clone(),
        address: address.clone(),
        database_container: config.database_container().to_owned(),
        platform_containers: config.platform_containers(),
        store_paths: config.store_paths(),
        zstd_level: config.zstd_level(),
        max_zstd_level: config.max_zstd_level(),
        zstd_workers: config.zstd_workers(),
        hooks: config.hooks(),
        restore: config.restore_policy(),
        database_restore: config.database_restore_policy(),
    };

    // Restores stream into the agent: large HTTP/2 windows and frames, as for downloads on the
    // coordinator's side.
    let limits = config.server_limits();
    let mut server = Server::builder()
        .initial_stream_window_size(8 << 20)
        .initial_connection_window_size(16 << 20)
        .max_frame_size(1 << 20)
        .max_concurrent_streams(limits.max_streams)
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(20)));
    let tls = config.tls_files();
    if let Some(files) = &tls {
        server = server
            .tls_config(tls_config(files, &host_id)?)
            .map_err(|e| Error::Config {
                what: format!("TLS configuration refused: {e}"),
            })?;
    } else {
        tracing::warn!(
            "--insecure-plaintext: serving without TLS; callers are not authenticated beyond the \
             token, which travels in clear"
        );
    }
    let counters = std::sync::Arc::new(metrics::Metrics::new());
    let auth = auth::Authenticator::new(&token, tls.is_some(), counters.clone());

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let registration = if config.register() {
        let etcd =
            deis_backup_etcd::Client::from_list(config.etcd()).map_err(|e| Error::Config {
                what: e.to_string(),
            })?;
        let record = Registration {
            address: address.clone(),
            version: VERSION.to_owned(),
            host: hostname,
        };
        Some(tokio::spawn(registration::run(
            etcd, host_id, record, stop_rx,
        )))
    } else {
        None
    };

    // Staging directories left by restores that did not finish (a killed agent): removed once
    // stale, off the serving path (a hung network mount must not keep the agent from serving).
    let store_paths = settings.store_paths.clone();
    tokio::task::spawn_blocking(move || store::restore::clean_stale_staging(&store_paths));

    // Served until this function returns (dropping the handle does not stop the task).
    let metrics_server = metrics_listener.map(|l| {
        if let Ok(a) = l.local_addr() {
            tracing::info!("metrics served on http://{a}/metrics");
        }
        tokio::spawn(metrics::serve(l, counters.clone()))
    });
    tracing::info!(%address, version = VERSION, docker_api = %engine.api_version(), "deis-backup-agent serving");
    let svc = service::AgentService::new(settings, engine, counters);
    let result = server
        .add_service(tonic::service::interceptor::InterceptedService::new(
            AgentServer::new(svc)
                .max_decoding_message_size(deis_backup_proto::MAX_MESSAGE_BYTES)
                .max_encoding_message_size(deis_backup_proto::MAX_MESSAGE_BYTES),
            move |req| auth.check(req),
        ))
        .serve_with_incoming_shutdown(listener::incoming(listener, limits), shutdown)
        .await;
    let _ = stop_tx.send(true);
    if let Some(m) = metrics_server {
        m.abort();
    }
    if let Some(r) = registration {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), r).await;
    }
    result.map_err(|e| Error::Config {
        what: format!("the gRPC server stopped: {e}"),
    })
}
