//! What a failed S3 attempt means, and the error it becomes.
//!
//! Owns: [`Failure`] (one failed attempt, with its [`Class`]), the classification of SDK errors and
//! HTTP statuses, and the crate [`Error`] each class turns into (with its guidance line).
//! Invariants:
//! - A 503 or `SlowDown`, a timeout, a reset connection or a body cut short is an overload (back
//!   off, cut concurrency, retry); a refused connection or a failed DNS lookup is "unreachable".
//! - A 403, or a 400 that refuses the signature or the keys, is an authentication failure: under
//!   `signature = auto` it is what switches the client to SigV2.
//! - A 404 is "not found", which some operations answer as `false` or `None`.
//! - A local I/O failure (the sink, the file being sent) and anything unrecognised give up at once.

use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};

use crate::error::{Error, ErrorKind};

/// How a failed attempt is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Class {
    /// 503/SlowDown, timeouts, reset connections: back off, cut concurrency, retry.
    Overload,
    /// Other server-side or transfer errors: retry.
    Transient,
    /// The connection could not be made: retry a few times, then "unreachable".
    Unreachable,
    /// The signature or keys were refused.
    Auth,
    /// The object or bucket does not exist.
    NotFound,
    /// Anything else: give up at once.
    Fatal,
    /// A local I/O failure (the sink): give up at once.
    Local,
}

/// A classified failure of one attempt.
#[derive(Debug)]
pub(crate) struct Failure {
    pub(super) class: Class,
    pub(super) code: Option<String>,
    pub(super) message: String,
}

impl Failure {
    pub(super) fn new(class: Class, message: impl Into<String>) -> Self {
        Self {
            class,
            code: None,
            message: message.into(),
        }
    }

    pub(super) fn from_sdk<E>(e: &SdkError<E, aws_smithy_runtime_api::http::Response>) -> Self
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        let message = DisplayErrorContext(e).to_string();
        let class = match e {
            SdkError::TimeoutError(_) | SdkError::ResponseError(_) => Class::Overload,
            SdkError::DispatchFailure(d) => {
                if d.is_timeout() {
                    Class::Overload
                } else if d.is_io() && is_connect_failure(&message) {
                    Class::Unreachable
                } else if d.is_io() {
                    Class::Overload
                } else {
                    Class::Transient
                }
            }
            SdkError::ServiceError(s) => {
                let status = s.raw().status().as_u16();
                let code = s.err().code().map(str::to_owned);
                let class = classify_status(status, code.as_deref());
                return Self {
                    class,
                    message: format!(
                        "HTTP {status} {}{}",
                        code.as_deref().unwrap_or(""),
                        s.err()
                            .message()
                            .map(|m| format!(": {m}"))
                            .unwrap_or_default()
                    ),
                    code,
                };
            }
            _ => Class::Fatal,
        };
        Self {
            class,
            code: None,
            message,
        }
    }

    pub(crate) fn is_not_found(&self) -> bool {
        self.class == Class::NotFound
    }

    pub(super) fn into_error(self, what: &str, endpoint: &str) -> Error {
        match self.class {
            Class::Auth => Error::new(
                ErrorKind::GatewayAuth,
                format!(
                    "the gateway at {endpoint} refused the credentials for {what} ({})",
                    self.message
                ),
                "check /deis/store/gateway/accessKey and secretKey (a new cluster has new keys), \
                 or force --gateway-signature v2 for Ceph Hammer",
            ),
            Class::Unreachable => Error::new(
                ErrorKind::GatewayUnreachable,
                format!(
                    "cannot reach the gateway at {endpoint} for {what}: {}",
                    self.message
                ),
                "check that the store-gateway runs (`deisctl status store-gateway`) and that \
                 its host:port is reachable from here",
            ),
            Class::NotFound => Error::not_found(format!("{what}: {}", self.message)),
            Class::Local => Error::new(
                ErrorKind::Io,
                format!("{what}: {}", self.message),
                "check the local disk",
            ),
            Class::Overload | Class::Transient | Class::Fatal => Error::new(
                ErrorKind::Gateway,
                format!("the gateway at {endpoint} failed {what}: {}", self.message),
                "run again later; lower --gateway-concurrency if the gateway is overloaded",
            ),
        }
    }
}

fn is_connect_failure(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("connection refused")
        || m.contains("tcp connect error")
        || m.contains("no route to host")
        || m.contains("dns error")
        || m.contains("failed to lookup")
}

fn classify_status(status: u16, code: Option<&str>) -> Class {
    match (status, code) {
        (_, Some("SlowDown")) | (503, _) => Class::Overload,
        (
            400 | 403,
            Some(
                "AccessDenied"
                | "SignatureDoesNotMatch"
                | "InvalidAccessKeyId"
                | "AuthorizationHeaderMalformed"
                | "InvalidRequest"
                | "InvalidArgument"
                | "RequestTimeTooSkewed",
            ),
        )
        | (403, _) => Class::Auth,
        (404, _) => Class::NotFound,
        (408 | 429 | 500..=599, _) | (400, Some("RequestTimeout" | "IncompleteBody")) => {
            Class::Transient
        }
        _ => Class::Fatal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_classify() {
        assert_eq!(classify_status(503, None), Class::Overload);
        assert_eq!(classify_status(400, Some("SlowDown")), Class::Overload);
        assert_eq!(
            classify_status(403, Some("SignatureDoesNotMatch")),
            Class::Auth
        );
        assert_eq!(
            classify_status(400, Some("AuthorizationHeaderMalformed")),
            Class::Auth
        );
        assert_eq!(classify_status(404, Some("NoSuchKey")), Class::NotFound);
        assert_eq!(classify_status(500, None), Class::Transient);
        assert_eq!(classify_status(409, Some("BucketNotEmpty")), Class::Fatal);
    }
}
