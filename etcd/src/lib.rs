//! A small client for the etcd **v2** HTTP API (`/v2/keys`), which is what Deis v1 components read
//! and write (clients on port 4001 or 2379).
//!
//! Invariants:
//! - Endpoints are tried in order; a connection failure moves to the next one, an answer from etcd
//!   (even an error) is final.
//! - Values never appear in errors or logs: they may be secrets (gateway keys, database password).
//!   Neither does the user info of an endpoint URL (`http://user:password@host`): endpoints are
//!   shown through [`shown`].
//! - Every key is checked segment by segment before a request is built ([`key_path`]): no empty
//!   segment, `.`, `..`, `?`, `#` or `%`, and each segment is percent-encoded, so a key read from a
//!   snapshot or from etcd itself can never address another key than the one it names.
//! - "Key not found" is `Ok(None)`, not an error.

use std::time::Duration;

use serde::Deserialize;
use url::Url;

/// A node of the v2 key space: a value or a directory.
#[derive(Debug, Clone, Deserialize, Default)]
pub struct Node {
    pub key: String,
    #[serde(default)]
    pub value: Option<String>,
    #[serde(default)]
    pub dir: bool,
    #[serde(default)]
    pub nodes: Vec<Node>,
    #[serde(default)]
    pub ttl: Option<i64>,
    #[serde(default, rename = "modifiedIndex")]
    pub modified_index: u64,
}

impl Node {
    /// The last path segment of the key (`/deis/store/gateway/host` -> `host`).
    pub fn name(&self) -> &str {
        self.key.rsplit('/').next().unwrap_or(&self.key)
    }

    /// The child named `name`, if this is a directory holding it.
    pub fn child(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name() == name)
    }

    /// Every leaf under this node (itself if it is a value), depth first, in key order.
    pub fn leaves(&self) -> Vec<&Node> {
        let mut out = Vec::new();
        self.collect_leaves(&mut out);
        out.sort_by(|a, b| a.key.cmp(&b.key));
        out
    }

    fn collect_leaves<'a>(&'a self, out: &mut Vec<&'a Node>) {
        if self.dir {
            for n in &self.nodes {
                n.collect_leaves(out);
            }
        } else {
            out.push(self);
        }
    }
}

#[derive(Debug, Deserialize)]
struct Response {
    node: Option<Node>,
    #[serde(rename = "prevNode")]
    prev_node: Option<Node>,
}

#[derive(Debug, Deserialize)]
struct ErrorBody {
    #[serde(rename = "errorCode")]
    error_code: u32,
    message: String,
    #[serde(default)]
    cause: String,
}

/// etcd v2 error codes this crate reacts to.
const KEY_NOT_FOUND: u32 = 100;
const COMPARE_FAILED: u32 = 101;
const NODE_EXISTS: u32 = 105;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("'{key}' is not a safe etcd key: {why}")]
    BadKey { key: String, why: &'static str },
    #[error("no etcd endpoint given: pass at least one, e.g. http://127.0.0.1:4001")]
    NoEndpoints,
    #[error("'{0}' is not an etcd endpoint URL: use the form http://host:port")]
    BadEndpoint(String),
    #[error(
        "cannot reach etcd at {endpoints}: {source}; check that etcd runs and serves the v2 API"
    )]
    Unreachable {
        endpoints: String,
        #[source]
        source: reqwest::Error,
    },
    #[error(
        "etcd refused {op} on {key}: {message} (code {code}){hint}",
        hint = if *code == 404 { "; is the v2 API enabled (--enable-v2)?" } else { "" }
    )]
    Refused {
        op: &'static str,
        key: String,
        code: u32,
        message: String,
    },
    #[error("etcd sent an answer to {op} on {key} that is not v2 JSON: {source}")]
    BadAnswer {
        op: &'static str,
        key: String,
        #[source]
        source: reqwest::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Outcome of a conditional write.
#[derive(Debug)]
pub enum Conditional {
    /// The write happened.
    Done(Node),
    /// The condition did not hold; carries the current node when etcd reported it.
    Failed(Option<Node>),
}

/// A client for one etcd cluster.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    endpoints: Vec<Url>,
}

impl Client {
    /// A client for these endpoints (`http://host:port`), tried in order.
    pub fn new<S: AsRef<str>>(endpoints: &[S]) -> Result<Self> {
        if endpoints.is_empty() {
            return Err(Error::NoEndpoints);
        }
        let endpoints = endpoints
            .iter()
            .map(|e| {
                let e = e.as_ref().trim();
                Url::parse(e)
                    .ok()
                    .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
                    .ok_or_else(|| {
                        Error::BadEndpoint(
                            Url::parse(e).map_or_else(|_| "(unparsable)".to_owned(), |u| shown(&u)),
                        )
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(15))
            .build()
            .map_err(|source| Error::Unreachable {
                endpoints: String::new(),
                source,
            })?;
        Ok(Self { http, endpoints })
    }

    /// A client from a comma-separated list, as `ETCDCTL_PEERS` and `--etcd` take it.
    pub fn from_list(list: &str) -> Result<Self> {
        let v: Vec<&str> = list.split(',').filter(|s| !s.trim().is_empty()).collect();
        Self::new(&v)
    }

    /// The value at `key`, or `None` when the key does not exist.
    pub async fn get(&self, key: &str) -> Result<Option<String>> {
        Ok(self.get_node(key, false).await?.and_then(|n| n.value))
    }

    /// The node at `key`; with `recursive`, the whole tree under it.
    pub async fn get_node(&self, key: &str, recursive: bool) -> Result<Option<Node>> {
        let query: &[(&str, &str)] = if recursive {
            &[("recursive", "true"), ("sorted", "true")]
        } else {
            &[]
        };
        match self
            .call("get", reqwest::Method::GET, key, query, &[])
            .await?
        {
            Ok(r) => Ok(r.node),
            Err(e) if e.error_code == KEY_NOT_FOUND => Ok(None),
            Err(e) => Err(refused("get", key, e)),
        }
    }

    /// Sets `key` to `value`, with an optional TTL.
    pub async fn set(&self, key: &str, value: &str, ttl: Option<Duration>) -> Result<Node> {
        let ttl = ttl_secs(ttl);
        let form = value_form(value, ttl.as_deref());
        match self
            .call("set", reqwest::Method::PUT, key, &[], &form)
            .await?
        {
            Ok(r) => Ok(r.node.unwrap_or_default()),
            Err(e) => Err(refused("set", key, e)),
        }
    }

    /// Creates `key` only if it does not exist (`prevExist=false`).
    pub async fn create(
        &self,
        key: &str,
        value: &str,
        ttl: Option<Duration>,
    ) -> Result<Conditional> {
        let ttl = ttl_secs(ttl);
        let form = value_form(value, ttl.as_deref());
        let q = [("prevExist", "false")];
        match self
            .call("create", reqwest::Method::PUT, key, &q, &form)
            .await?
        {
            Ok(r) => Ok(Conditional::Done(r.node.unwrap_or_default())),
            Err(e) if e.error_code == NODE_EXISTS => {
                Ok(Conditional::Failed(self.get_node(key, false).await?))
            }
            Err(e) => Err(refused("create", key, e)),
        }
    }

    /// Sets `key` to `value` only if it currently holds `prev` (compare-and-swap); used to refresh
    /// a lock or a registration without taking over someone else's.
    pub async fn swap(
        &self,
        key: &str,
        prev: &str,
        value: &str,
        ttl: Option<Duration>,
    ) -> Result<Conditional> {
        let ttl = ttl_secs(ttl);
        let form = value_form(value, ttl.as_deref());
        let q = [("prevValue", prev)];
        match self
            .call("swap", reqwest::Method::PUT, key, &q, &form)
            .await?
        {
            Ok(r) => Ok(Conditional::Done(r.node.unwrap_or_default())),
            Err(e) if matches!(e.error_code, COMPARE_FAILED | KEY_NOT_FOUND) => {
                Ok(Conditional::Failed(self.get_node(key, false).await?))
            }
            Err(e) => Err(refused("swap", key, e)),
        }
    }

    /// Deletes `key`; with `prev`, only if it still holds that value. A missing key is not an error.
    pub async fn delete(&self, key: &str, prev: Option<&str>) -> Result<bool> {
        let q: Vec<(&str, &str)> = prev.map(|p| vec![("prevValue", p)]).unwrap_or_default();
        match self
            .call("delete", reqwest::Method::DELETE, key, &q, &[])
            .await?
        {
            Ok(r) => Ok(r.prev_node.is_some() || r.node.is_some()),
            Err(e) if matches!(e.error_code, KEY_NOT_FOUND | COMPARE_FAILED) => Ok(false),
            Err(e) => Err(refused("delete", key, e)),
        }
    }

    async fn call(
        &self,
        op: &'static str,
        method: reqwest::Method,
        key: &str,
        query: &[(&str, &str)],
        form: &[(&str, &str)],
    ) -> Result<std::result::Result<Response, ErrorBody>> {
        let path = format!("v2/keys/{}", key_path(key)?);
        let mut last = None;
        for base in &self.endpoints {
            let url = base
                .join(&path)
                .map_err(|_| Error::BadEndpoint(shown(base)))?;
            let mut req = self.http.request(method.clone(), url).query(query);
            if !form.is_empty() {
                req = req.form(form);
            }
            match req.send().await {
                Ok(resp) => return decode(op, key, resp).await,
                Err(e) if e.is_connect() || e.is_timeout() => {
                    tracing::debug!(endpoint = %shown(base), "etcd endpoint unreachable, trying the next");
                    last = Some(e.without_url());
                }
                Err(e) => last = Some(e.without_url()),
            }
        }
        Err(Error::Unreachable {
            endpoints: self
                .endpoints
                .iter()
                .map(shown)
                .collect::<Vec<_>>()
                .join(","),
            source: last.expect("at least one endpoint"),
        })
    }
}

/// An endpoint as it may be shown: without user name or password.
pub fn shown(url: &Url) -> String {
    let mut u = url.clone();
    let _ = u.set_username("");
    let _ = u.set_password(None);
    u.to_string()
}

/// Characters percent-encoded in a key segment: everything but unreserved characters.
const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// The URL path of `key` under `/v2/keys/`: each segment checked and percent-encoded. `/` (the
/// root) is the empty path.
pub fn key_path(key: &str) -> Result<String> {
    let bad = |why| Error::BadKey {
        key: key.chars().take(200).collect(),
        why,
    };
    let trimmed = key
        .strip_prefix('/')
        .ok_or_else(|| bad("it does not start with /"))?;
    if trimmed.is_empty() {
        return Ok(String::new());
    }
    let mut out = Vec::new();
    for seg in trimmed.split('/') {
        match seg {
            "" => return Err(bad("it has an empty segment (// or a trailing /)")),
            "." | ".." => return Err(bad("it has a . or .. segment")),
            s if s.contains(['?', '#', '%']) => return Err(bad("a segment holds ?, # or %")),
            s if s.chars().any(char::is_control) => {
                return Err(bad("a segment holds a control character"));
            }
            s => out.push(percent_encoding::utf8_percent_encode(s, SEGMENT).to_string()),
        }
    }
    Ok(out.join("/"))
}

async fn decode(
    op: &'static str,
    key: &str,
    resp: reqwest::Response,
) -> Result<std::result::Result<Response, ErrorBody>> {
    let status = resp.status();
    let bad = |source| Error::BadAnswer {
        op,
        key: key.to_owned(),
        source,
    };
    if status.is_success() {
        return resp.json::<Response>().await.map(Ok).map_err(bad);
    }
    match resp.json::<ErrorBody>().await {
        Ok(body) => Ok(Err(body)),
        // Not a v2 error body: etcd v3 without --enable-v2 answers 404 with plain text.
        Err(_) => Err(Error::Refused {
            op,
            key: key.to_owned(),
            code: u32::from(status.as_u16()),
            message: status.canonical_reason().unwrap_or("error").to_owned(),
        }),
    }
}

fn refused(op: &'static str, key: &str, e: ErrorBody) -> Error {
    let message = if e.cause.is_empty() || e.cause == key {
        e.message
    } else {
        format!("{} ({})", e.message, e.cause)
    };
    Error::Refused {
        op,
        key: key.to_owned(),
        code: e.error_code,
        message,
    }
}

/// A TTL as etcd's form takes it: whole seconds, at least one (etcd reads 0 as "no TTL").
fn ttl_secs(ttl: Option<Duration>) -> Option<String> {
    ttl.map(|t| t.as_secs().max(1).to_string())
}

/// The form of a write: the value, and the TTL when there is one.
fn value_form<'a>(value: &'a str, ttl: Option<&'a str>) -> Vec<(&'static str, &'a str)> {
    let mut form = vec![("value", value)];
    form.extend(ttl.map(|t| ("ttl", t)));
    form
}

#[cfg(test)]
mod proptests;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_validated() {
        assert!(matches!(Client::new::<&str>(&[]), Err(Error::NoEndpoints)));
        assert!(matches!(
            Client::from_list("127.0.0.1:4001"),
            Err(Error::BadEndpoint(_))
        ));
        assert!(Client::from_list("http://127.0.0.1:4001,http://127.0.0.1:2379").is_ok());
    }

    #[test]
    fn unsafe_keys_are_refused_and_segments_encoded() {
        assert_eq!(
            key_path("/deis/store/gateway").unwrap(),
            "deis/store/gateway"
        );
        assert_eq!(key_path("/").unwrap(), "");
        assert_eq!(key_path("/deis/a b+c").unwrap(), "deis/a%20b%2Bc");
        for bad in [
            "deis/x",
            "/deis/../store/gateway/accessKey",
            "/deis/./x",
            "/deis//x",
            "/deis/x/",
            "/deis/x?recursive=true",
            "/deis/x#y",
            "/deis/%2e%2e/coreos.com",
            "/deis/a\nb",
        ] {
            assert!(matches!(key_path(bad), Err(Error::BadKey { .. })), "{bad}");
        }
    }

    #[test]
    fn endpoints_are_shown_without_credentials() {
        let u = Url::parse("http://root:s3cret@10.0.0.1:4001/").unwrap();
        assert_eq!(shown(&u), "http://10.0.0.1:4001/");
        let e = Client::from_list("ftp://root:s3cret@10.0.0.1:4001").unwrap_err();
        assert!(!e.to_string().contains("s3cret"), "{e}");
    }

    #[test]
    fn leaves_are_sorted_and_exclude_dirs() {
        let tree: Node = serde_json::from_str(
            r#"{"key":"/deis","dir":true,"nodes":[
                {"key":"/deis/b","value":"2"},
                {"key":"/deis/a","dir":true,"nodes":[{"key":"/deis/a/x","value":"1"}]}]}"#,
        )
        .unwrap();
        let keys: Vec<_> = tree.leaves().iter().map(|n| n.key.as_str()).collect();
        assert_eq!(keys, ["/deis/a/x", "/deis/b"]);
        assert_eq!(tree.child("b").and_then(|n| n.value.as_deref()), Some("2"));
    }
}
