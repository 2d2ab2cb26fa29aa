//! Authentication of every call: the caller's certificate, then its bearer token.
//!
//! Invariants:
//! - With TLS (the default), TLS itself accepts only a client certificate from the cluster CA for
//!   client authentication; every call is then checked to come from a certificate naming the
//!   coordinator (`coordinator.deis-backup`), so no other holder of a CA-signed key (an agent of
//!   another host) is served. The bearer token is a second factor on top.
//! - The expected token is held only as its SHA-256; a presented token is hashed and the two
//!   digests compared in constant time (so neither content nor length leaks through timing). A
//!   missing, malformed or wrong token is `UNAUTHENTICATED`, and no token ever reaches a log.
//! - Refusals are logged with the peer's address, at most once per 10 s, with the count of those
//!   left out, so a flood of bad calls cannot flood the journal. Every refusal is counted in the
//!   agent's metrics (`deis_backup_agent_authentication_failures_total`).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use deis_backup_proto::identity::COORDINATOR_NAME;
use rustls::pki_types::{CertificateDer, ServerName};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::{Request, Status};

use crate::metrics::Metrics;

/// Lets one log line through per period, counting the ones it holds back.
#[derive(Debug)]
pub struct RateLimitedLog {
    period: Duration,
    state: Mutex<(Option<Instant>, u64)>,
}

impl RateLimitedLog {
    pub fn new(period: Duration) -> Self {
        Self {
            period,
            state: Mutex::new((None, 0)),
        }
    }

    /// `Some(suppressed since the last line)` when a line may be logged now.
    pub fn allow(&self) -> Option<u64> {
        let mut s = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        match s.0 {
            Some(last) if now.duration_since(last) < self.period => {
                s.1 += 1;
                None
            }
            _ => {
                let suppressed = s.1;
                *s = (Some(now), 0);
                Some(suppressed)
            }
        }
    }
}

/// Whether this DER certificate names the coordinator.
fn names_coordinator(der: &CertificateDer<'_>) -> bool {
    let Ok(name) = ServerName::try_from(COORDINATOR_NAME) else {
        return false;
    };
    webpki::EndEntityCert::try_from(der)
        .is_ok_and(|c| c.verify_is_valid_for_subject_name(&name).is_ok())
}

/// Checks the caller's certificate (with TLS) and `authorization: Bearer <token>` on each request.
#[derive(Clone)]
pub struct Authenticator {
    digest: [u8; 32],
    /// Whether the connection is TLS, so a coordinator certificate is required.
    tls: bool,
    refusals: std::sync::Arc<RateLimitedLog>,
    metrics: std::sync::Arc<Metrics>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Authenticator")
    }
}

impl Authenticator {
    pub fn new(token: &SecretString, tls: bool, metrics: std::sync::Arc<Metrics>) -> Self {
        Self {
            digest: Sha256::digest(token.expose_secret().as_bytes()).into(),
            tls,
            refusals: std::sync::Arc::new(RateLimitedLog::new(Duration::from_secs(10))),
            metrics,
        }
    }

    fn refuse<T>(&self, req: &Request<T>, why: &'static str, status: Status) -> Status {
        self.metrics.authentication_failed();
        if let Some(suppressed) = self.refusals.allow() {
            tracing::warn!(peer = ?req.remote_addr(), suppressed, "call refused: {why}");
        }
        status
    }

    /// Whether `presented` is the token.
    pub fn accepts(&self, presented: &[u8]) -> bool {
        let d: [u8; 32] = Sha256::digest(presented).into();
        bool::from(d.ct_eq(&self.digest))
    }

    /// The tonic interceptor.
    pub fn check<T>(&self, req: Request<T>) -> Result<Request<T>, Status> {
        if self.tls {
            let certs = req.peer_certs();
            if !certs
                .as_deref()
                .and_then(|c| c.first())
                .is_some_and(names_coordinator)
            {
                return Err(self.refuse(
                    &req,
                    "the client certificate does not name the coordinator",
                    Status::unauthenticated(format!(
                        "the client certificate does not name {COORDINATOR_NAME}: use the \
                         coordinator's certificate (deis-backup pki issue --coordinator)"
                    )),
                ));
            }
        }
        let Some(value) = req.metadata().get(deis_backup_proto::AUTHORIZATION) else {
            return Err(self.refuse(
                &req,
                "no bearer token",
                Status::unauthenticated(
                    "no authorization metadata: send `authorization: Bearer <token>` with the agent's token",
                ),
            ));
        };
        let Some(token) = value.as_bytes().strip_prefix(b"Bearer ") else {
            return Err(self.refuse(
                &req,
                "malformed authorization",
                Status::unauthenticated("authorization metadata is not `Bearer <token>`"),
            ));
        };
        if self.accepts(token) {
            Ok(req)
        } else {
            Err(self.refuse(
                &req,
                "wrong bearer token",
                Status::unauthenticated(
                    "wrong bearer token: use the token the agent was started with",
                ),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(auth: Option<&str>) -> Request<()> {
        let mut r = Request::new(());
        if let Some(a) = auth {
            r.metadata_mut()
                .insert(deis_backup_proto::AUTHORIZATION, a.parse().unwrap());
        }
        r
    }

    fn authenticator(tls: bool) -> (Authenticator, std::sync::Arc<Metrics>) {
        let metrics = std::sync::Arc::new(Metrics::new());
        let token = SecretString::from("0123456789abcdef-token");
        (Authenticator::new(&token, tls, metrics.clone()), metrics)
    }

    fn failures(m: &Metrics) -> String {
        m.encode()
            .lines()
            .find(|l| l.starts_with("deis_backup_agent_authentication_failures_total "))
            .unwrap()
            .to_owned()
    }

    #[test]
    fn only_the_exact_token_passes_and_each_refusal_is_counted() {
        let (a, metrics) = authenticator(false);
        assert!(
            a.check(request(Some("Bearer 0123456789abcdef-token")))
                .is_ok()
        );
        for bad in [
            None,
            Some("Bearer 0123456789abcdef-toke"),
            Some("Bearer 0123456789abcdef-token "),
            Some("bearer 0123456789abcdef-token"),
            Some("0123456789abcdef-token"),
        ] {
            let e = a.check(request(bad)).unwrap_err();
            assert_eq!(e.code(), tonic::Code::Unauthenticated, "{bad:?}");
        }
        assert_eq!(
            failures(&metrics),
            "deis_backup_agent_authentication_failures_total 5"
        );
    }

    #[test]
    fn with_tls_a_right_token_without_the_coordinator_certificate_is_refused() {
        let (a, metrics) = authenticator(true);
        let e = a
            .check(request(Some("Bearer 0123456789abcdef-token")))
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        assert!(e.message().contains(COORDINATOR_NAME), "{e}");
        assert_eq!(
            failures(&metrics),
            "deis_backup_agent_authentication_failures_total 1"
        );
    }

    #[test]
    fn refusals_are_logged_at_most_once_per_period() {
        let log = RateLimitedLog::new(Duration::from_secs(3600));
        assert_eq!(log.allow(), Some(0));
        for _ in 0..1000 {
            assert_eq!(log.allow(), None);
        }
        let log = RateLimitedLog::new(Duration::ZERO);
        assert_eq!(log.allow(), Some(0));
        assert_eq!(log.allow(), Some(0));
    }
}
