//! Bearer-token authentication of every call.
//!
//! Invariants: the expected token is held only as its SHA-256; a presented token is hashed and the
//! two digests compared in constant time (so neither content nor length leaks through timing). A
//! missing, malformed or wrong token is `UNAUTHENTICATED`, and no token ever reaches a log.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::{Request, Status};

use crate::config::Token;

/// Checks `authorization: Bearer <token>` on each request.
#[derive(Clone)]
pub struct Authenticator {
    digest: [u8; 32],
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Authenticator")
    }
}

impl Authenticator {
    pub fn new(token: &Token) -> Self {
        Self {
            digest: Sha256::digest(token.0.as_bytes()).into(),
        }
    }

    /// Whether `presented` is the token.
    pub fn accepts(&self, presented: &[u8]) -> bool {
        let d: [u8; 32] = Sha256::digest(presented).into();
        bool::from(d.ct_eq(&self.digest))
    }

    /// The tonic interceptor.
    pub fn check<T>(&self, req: Request<T>) -> Result<Request<T>, Status> {
        let Some(value) = req.metadata().get(deis_backup_proto::AUTHORIZATION) else {
            return Err(Status::unauthenticated(
                "no authorization metadata: send `authorization: Bearer <token>` with the agent's token",
            ));
        };
        let Some(token) = value.as_bytes().strip_prefix(b"Bearer ") else {
            return Err(Status::unauthenticated(
                "authorization metadata is not `Bearer <token>`",
            ));
        };
        if self.accepts(token) {
            Ok(req)
        } else {
            tracing::warn!(peer = ?req.remote_addr(), "call refused: wrong bearer token");
            Err(Status::unauthenticated(
                "wrong bearer token: use the token the agent was started with",
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

    #[test]
    fn only_the_exact_token_passes() {
        let a = Authenticator::new(&Token("0123456789abcdef-token".into()));
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
    }
}
