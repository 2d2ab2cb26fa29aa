//! The cluster's agents: found through etcd (`/deis/backup/agents/*`, where every agent registers)
//! or given as addresses, and reached over mutual TLS with the cluster CA, plus the shared bearer
//! token as a second factor.
//!
//! Invariants:
//! - A registration in etcd is a claim, not a credential: anyone on the cluster can write one. The
//!   coordinator connects to a registered address only if the peer proves, with a certificate from
//!   the cluster CA, that it is the host id it registered under (`<id>.agent.deis-backup`); a
//!   host id that no certificate can name is refused. So the token and every byte of a restore go
//!   only to the agent of that host.
//! - TLS is on unless `--insecure-plaintext` is given, and every run that uses it says so.
//! - Every call carries `authorization: Bearer <token>` (a sensitive header); the token is held as a
//!   [`SecretString`], zeroized on drop and never printed, and exposed only to make that header.
//! - An agent that cannot be reached or described is reported by host and address, never silently
//!   dropped: the caller decides whether a plan can do without it.
//! - A gRPC status from an agent becomes one [`Error`] of kind `Agent` naming the host and the call.

use std::path::PathBuf;
use std::time::Duration;

use deis_backup_proto::registration::{AGENTS_DIR, Registration};
use deis_backup_proto::v1::DescribeReply;
use deis_backup_proto::v1::agent_client::AgentClient;
use serde::Deserialize;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::error::{Error, ErrorKind, Result};
use crate::secret::{ExposeSecret, SecretString};

/// How to find and reach the agents. Serves the CLI, the config file and the library.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, clap::Args, merge::Merge)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
#[merge(strategy = merge::option::overwrite_none)]
pub struct AgentOptions {
    /// Agents as HOST_ID@host:port, instead of discovery through etcd; repeat or comma-separate.
    /// The host id is the name its certificate must carry (plain host:port only with
    /// --insecure-plaintext).
    #[arg(long = "agent", env = "DEIS_BACKUP_AGENTS", value_delimiter = ',')]
    #[merge(strategy = merge::vec::overwrite_empty)]
    pub agents: Vec<String>,
    /// File holding the agents' bearer token; otherwise $DEIS_BACKUP_TOKEN.
    #[arg(long = "agent-token-file", env = "DEIS_BACKUP_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// The cluster CA (PEM) agents' certificates must chain to [default:
    /// /etc/deis-backup/pki/ca.pem].
    #[arg(long = "agent-tls-ca", env = "DEIS_BACKUP_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// The coordinator's client certificate (PEM) [default: /etc/deis-backup/pki/coordinator.pem].
    #[arg(long = "agent-tls-cert", env = "DEIS_BACKUP_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// Its private key, mode 600 [default: /etc/deis-backup/pki/coordinator.key].
    #[arg(long = "agent-tls-key", env = "DEIS_BACKUP_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Talk to agents over plain HTTP/2: no proof of who answers, and the token in clear. For a
    /// throwaway test network only; the agents must run with it too.
    #[arg(long)]
    #[merge(strategy = merge::bool::overwrite_false)]
    pub insecure_plaintext: bool,
}

impl AgentOptions {
    fn pki_file(given: Option<&PathBuf>, name: &str) -> PathBuf {
        given.cloned().unwrap_or_else(|| {
            PathBuf::from(deis_backup_proto::identity::DEFAULT_PKI_DIR).join(name)
        })
    }

    /// The cluster CA agents' certificates must chain to.
    pub fn tls_ca(&self) -> PathBuf {
        Self::pki_file(self.tls_ca.as_ref(), "ca.pem")
    }

    /// The coordinator's client certificate.
    pub fn tls_cert(&self) -> PathBuf {
        Self::pki_file(self.tls_cert.as_ref(), "coordinator.pem")
    }

    /// The coordinator's private key.
    pub fn tls_key(&self) -> PathBuf {
        Self::pki_file(self.tls_key.as_ref(), "coordinator.key")
    }
}

/// Environment variable holding the bearer token (the agent reads the same one).
pub use deis_backup_proto::TOKEN_ENV;

/// The gRPC client of one agent, with the token on every call.
pub type Client = AgentClient<InterceptedService<Channel, Bearer>>;

/// Adds `authorization: Bearer <token>` to every request; holds that header's value (checked to
/// be one when the token was loaded).
#[derive(Debug, Clone)]
pub struct Bearer(SecretString);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let mut value = MetadataValue::try_from(self.0.expose_secret())
            .map_err(|_| tonic::Status::internal("the agent token is not a header value"))?;
        value.set_sensitive(true);
        req.metadata_mut()
            .insert(deis_backup_proto::AUTHORIZATION, value);
        Ok(req)
    }
}

/// One agent: who it is, where, and a connected client.
#[derive(Debug, Clone)]
pub struct Agent {
    /// The host id it registered under (or its address when given statically).
    pub host_id: String,
    pub address: String,
    pub client: Client,
}

/// An agent together with what it reported about its host.
#[derive(Debug, Clone)]
pub struct Described {
    pub agent: Agent,
    pub info: DescribeReply,
}

/// Where an agent is, before connecting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub host_id: String,
    pub address: String,
}

/// The agents to use: the static list when given, else every registration in etcd.
pub async fn locate(
    options: &AgentOptions,
    etcd: Option<&deis_backup_etcd::Client>,
) -> Result<Vec<Location>> {
    if !options.agents.is_empty() {
        return options
            .agents
            .iter()
            .map(|a| match a.split_once('@') {
                Some((host_id, address)) => Ok(Location {
                    host_id: host_id.to_owned(),
                    address: address.to_owned(),
                }),
                None if options.insecure_plaintext => Ok(Location {
                    host_id: a.clone(),
                    address: a.clone(),
                }),
                None => Err(Error::config(format!(
                    "--agent {a} names no host: give HOST_ID@{a}, where HOST_ID is the host id \
                     in the agent's certificate"
                ))),
            })
            .collect();
    }
    let Some(etcd) = etcd else {
        return Err(Error::config(
            "no agent addresses and no etcd to discover them: pass --agent or --etcd",
        ));
    };
    let mut out = Vec::new();
    if let Some(dir) = etcd.get_node(AGENTS_DIR, true).await? {
        for leaf in dir.leaves() {
            let Some(value) = &leaf.value else { continue };
            match serde_json::from_str::<Registration>(value) {
                Ok(r) => out.push(Location {
                    host_id: leaf.name().to_owned(),
                    address: r.address,
                }),
                Err(e) => {
                    tracing::warn!(key = %leaf.key, "ignoring a malformed agent registration: {e}");
                }
            }
        }
    }
    if out.is_empty() {
        return Err(Error::new(
            ErrorKind::Agent,
            format!("no agent is registered under {AGENTS_DIR} in etcd"),
            "start the agents (fleetctl start deis-backup-agent.service) or pass --agent host:port",
        ));
    }
    Ok(out)
}

/// Builds connected clients; each connects lazily, so an unreachable agent fails on first call.
/// With TLS (the default), each client accepts only a certificate from the cluster CA naming the
/// host id of its location.
pub fn connect(options: &AgentOptions, locations: &[Location]) -> Result<Vec<Agent>> {
    let bearer = Bearer(load_token(options)?);
    let tls = tls_config(options)?;
    if tls.is_none() {
        eprintln!(
            "deis-backup: WARNING: --insecure-plaintext: agents are not authenticated and the \
             token travels in clear"
        );
    }
    locations
        .iter()
        .map(|l| {
            let scheme = if tls.is_some() { "https" } else { "http" };
            let tls = match &tls {
                None => None,
                Some(t) => {
                    let name =
                        deis_backup_proto::identity::agent_name(&l.host_id).ok_or_else(|| {
                            Error::new(
                                ErrorKind::Agent,
                                format!(
                                    "agent {} ({}) is refused: its host id cannot be named in a \
                                 certificate",
                                    l.host_id, l.address
                                ),
                                "check who registered it under /deis/backup/agents in etcd; agents \
                             register under their machine id",
                            )
                        })?;
                    Some(t.clone().domain_name(name))
                }
            };
            let mut ep = Endpoint::from_shared(format!("{scheme}://{}", l.address))
                .map_err(|e| Error::config(format!("agent address {}: {e}", l.address)))?
                .connect_timeout(Duration::from_secs(5))
                .tcp_keepalive(Some(Duration::from_secs(30)))
                // A host cut off mid-stream sends nothing, not even a reset: a ping unanswered
                // for 10 s ends the call (about 20 s after the cut) with a clear error.
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(10))
                .keep_alive_while_idle(true)
                // Large HTTP/2 windows and frames: with the defaults (64 KiB window, 16 KiB
                // frames) a fast stream spends its time on window updates and frame headers.
                .initial_stream_window_size(8 << 20)
                .initial_connection_window_size(16 << 20)
                .max_frame_size(1 << 20);
            if let Some(tls) = &tls {
                ep = ep
                    .tls_config(tls.clone())
                    .map_err(|e| Error::config(format!("agent TLS for {}: {e}", l.address)))?;
            }
            let client = AgentClient::with_interceptor(ep.connect_lazy(), bearer.clone())
                .max_decoding_message_size(deis_backup_proto::MAX_MESSAGE_BYTES)
                .max_encoding_message_size(deis_backup_proto::MAX_MESSAGE_BYTES);
            Ok(Agent {
                host_id: l.host_id.clone(),
                address: l.address.clone(),
                client,
            })
        })
        .collect()
}

/// Asks every agent to describe its host, concurrently. One result per agent, in order.
pub async fn describe_all(agents: &[Agent]) -> Vec<(Agent, Result<DescribeReply>)> {
    let calls = agents.iter().map(|a| async move {
        let mut c = a.client.clone();
        let r = tokio::time::timeout(
            Duration::from_secs(15),
            c.describe(deis_backup_proto::v1::DescribeRequest {}),
        )
        .await
        .map_err(|_| {
            Error::new(
                ErrorKind::AgentUnreachable,
                format!(
                    "agent {} ({}) did not answer Describe within 15 s",
                    a.host_id, a.address
                ),
                "check that the agent runs and that this host can reach it",
            )
        })
        .and_then(|r| r.map_err(|s| status_error(a, "Describe", &s)));
        (a.clone(), r.map(tonic::Response::into_inner))
    });
    futures::future::join_all(calls).await
}

/// All agents, described; an agent that does not answer, or that reports another host id than the
/// one it was reached as, is an error naming it.
pub async fn describe_required(agents: &[Agent]) -> Result<Vec<Described>> {
    let mut out = Vec::new();
    for (agent, r) in describe_all(agents).await {
        out.push(checked(agent, r?)?);
    }
    Ok(out)
}

/// An agent whose host did not answer (down, or cut off from this one).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Unanswered {
    pub host: String,
    pub address: String,
    /// Why, in one line.
    pub reason: String,
}

/// The agents that answer, described and checked as by [`describe_required`], and those that did
/// not answer at all. Any other failure (a certificate or token refused, another host id) is an
/// error: only silence may be planned around, never a wrong answer.
pub async fn describe_answering(agents: &[Agent]) -> Result<(Vec<Described>, Vec<Unanswered>)> {
    let mut answered = Vec::new();
    let mut silent = Vec::new();
    for (agent, r) in describe_all(agents).await {
        match r {
            Ok(info) => answered.push(checked(agent, info)?),
            Err(e) if e.kind() == ErrorKind::AgentUnreachable => silent.push(Unanswered {
                host: agent.host_id.clone(),
                address: agent.address.clone(),
                reason: e.message().to_owned(),
            }),
            Err(e) => return Err(e),
        }
    }
    Ok((answered, silent))
}

/// `agent` with what it reported, once its host id is the one it was reached as.
fn checked(mut agent: Agent, info: DescribeReply) -> Result<Described> {
    if agent.host_id == agent.address && !info.machine_id.is_empty() {
        // A plain address (--insecure-plaintext only): the host names itself.
        agent.host_id.clone_from(&info.machine_id);
    } else if info.machine_id != agent.host_id {
        return Err(Error::new(
            ErrorKind::Agent,
            format!(
                "agent {} ({}) reports host id '{}'",
                agent.host_id, agent.address, info.machine_id
            ),
            "the agent's --host-id must be the id it registers under and its certificate names",
        ));
    }
    Ok(Described { agent, info })
}

/// A gRPC status from `agent`'s `call` as one error.
pub fn status_error(agent: &Agent, call: &str, s: &tonic::Status) -> Error {
    // Silence, not an answer: the transport failed (no status came from the agent itself).
    let silent = std::error::Error::source(s).is_some() && !is_tls_refusal(s);
    let guidance = match s.code() {
        _ if silent => {
            "the connection to the agent failed or was cut: check that its host is up, that the \
             agent runs and that this host can reach it"
        }
        tonic::Code::Unauthenticated => {
            "give the agents' token with --agent-token-file or $DEIS_BACKUP_TOKEN"
        }
        tonic::Code::Unavailable if is_tls_refusal(s) => {
            "the agent did not prove it is that host with a certificate from the cluster CA: \
             check its certificate (deis-backup pki issue --host <id>) and who registered it in \
             etcd"
        }
        tonic::Code::Unavailable => "check that the agent runs and that this host can reach it",
        tonic::Code::PermissionDenied | tonic::Code::InvalidArgument => {
            "check the agent's configuration (store paths, hooks) against what was asked"
        }
        _ => "see the agent's log on that host (journalctl -u deis-backup-agent)",
    };
    let kind = if silent {
        ErrorKind::AgentUnreachable
    } else {
        ErrorKind::Agent
    };
    Error::new(
        kind,
        format!(
            "agent {} ({}) {call}: {}",
            agent.host_id,
            agent.address,
            one_line(s.message())
        ),
        guidance,
    )
}

/// Whether a transport failure is the TLS handshake refusing the peer's certificate.
fn is_tls_refusal(s: &tonic::Status) -> bool {
    let mut text = s.message().to_owned();
    let mut source = std::error::Error::source(s);
    while let Some(e) = source {
        text.push_str(&e.to_string());
        source = e.source();
    }
    text.contains("certificate") || text.contains("InvalidCertificate") || text.contains("tls")
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// `Bearer <token>`, from the token file or the environment.
fn load_token(options: &AgentOptions) -> Result<SecretString> {
    let text = match &options.token_file {
        Some(p) => {
            crate::pki::check_private(p)?;
            std::fs::read_to_string(p).map_err(|e| {
                Error::config(format!(
                    "cannot read the agent token file {}: {e}",
                    p.display()
                ))
            })?
        }
        None => std::env::var(TOKEN_ENV).map_err(|_| {
            Error::config(format!(
                "no agent token: set ${TOKEN_ENV} or pass --agent-token-file"
            ))
        })?,
    };
    let text = SecretString::from(text);
    let token = deis_backup_proto::check_token(text.expose_secret())
        .map_err(|why| Error::config(format!("{why} (the agent token)")))?;
    let header = SecretString::from(format!("Bearer {token}"));
    if MetadataValue::<tonic::metadata::Ascii>::try_from(header.expose_secret()).is_err() {
        return Err(Error::config(
            "the agent token holds characters a header cannot carry",
        ));
    }
    Ok(header)
}

fn tls_config(options: &AgentOptions) -> Result<Option<ClientTlsConfig>> {
    if options.insecure_plaintext {
        return Ok(None);
    }
    // Both ring and aws-lc-rs are linked in (the S3 client brings the latter); TLS to agents uses
    // ring. A provider already installed is kept.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (ca, cert, key) = (options.tls_ca(), options.tls_cert(), options.tls_key());
    let read = |p: &PathBuf| {
        std::fs::read(p).map_err(|e| {
            Error::config(format!(
                "cannot read {}: {e}; make the cluster's certificates with `deis-backup pki` \
                 (see docs/SECURITY.md), or pass --agent-tls-ca/--agent-tls-cert/--agent-tls-key",
                p.display()
            ))
        })
    };
    crate::pki::check_private(&key)?;
    Ok(Some(
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(&ca)?))
            .identity(Identity::from_pem(read(&cert)?, read(&key)?)),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::{self, FakeAgent, Host};
    use tonic::service::Interceptor as _;

    #[test]
    fn the_token_goes_only_into_a_sensitive_header() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "s3cr3t-s3cr3t-s3cr3t\n").unwrap();
        std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let options = AgentOptions {
            token_file: Some(file),
            ..AgentOptions::default()
        };
        let mut bearer = Bearer(load_token(&options).unwrap());
        assert!(!format!("{bearer:?}").contains("s3cr3t"), "{bearer:?}");
        let req = bearer.call(tonic::Request::new(())).unwrap();
        let value = req
            .metadata()
            .get(deis_backup_proto::AUTHORIZATION)
            .unwrap();
        assert_eq!(value.to_str().unwrap(), "Bearer s3cr3t-s3cr3t-s3cr3t");
        assert!(value.is_sensitive());
        assert!(!format!("{value:?}").contains("s3cr3t"), "{value:?}");
    }

    #[tokio::test]
    async fn agents_are_reached_by_the_address_given_and_must_be_the_host_they_claim() {
        let a = FakeAgent::start(Host::new("a")).await;
        let dir = tempfile::tempdir().unwrap();
        let mut options = testkit::agent_options(dir.path(), &[&a]);
        let described =
            describe_required(&connect(&options, &locate(&options, None).await.unwrap()).unwrap())
                .await
                .unwrap();
        assert_eq!(described[0].agent.host_id, "a");
        assert_eq!(described[0].info.address, a.address());
        // A plain address (plaintext only): the host names itself.
        options.agents = vec![a.address().to_owned()];
        let described =
            describe_required(&connect(&options, &locate(&options, None).await.unwrap()).unwrap())
                .await
                .unwrap();
        assert_eq!(described[0].agent.host_id, "a");
        // Registered as another host: refused, naming both.
        options.agents = vec![format!("b@{}", a.address())];
        let e =
            describe_required(&connect(&options, &locate(&options, None).await.unwrap()).unwrap())
                .await
                .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Agent);
        assert_eq!(
            e.message(),
            format!("agent b ({}) reports host id 'a'", a.address())
        );
    }

    #[tokio::test]
    async fn a_wrong_token_is_an_error_naming_the_agent_and_what_to_give() {
        let a = FakeAgent::start(Host::new("a")).await;
        let dir = tempfile::tempdir().unwrap();
        let options = testkit::agent_options(dir.path(), &[&a]);
        std::fs::write(
            options.token_file.as_ref().unwrap(),
            "another-token-of-16-chars",
        )
        .unwrap();
        let agents = connect(&options, &locate(&options, None).await.unwrap()).unwrap();
        let e = describe_required(&agents).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Agent);
        assert!(
            e.message()
                .starts_with(&format!("agent a ({}) Describe: ", a.address())),
            "{e}"
        );
        assert!(e.guidance().contains("--agent-token-file"), "{e}");
        assert_eq!(a.calls().refused.len(), 1);
    }
}
