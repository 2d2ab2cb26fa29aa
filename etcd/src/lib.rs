//! A small client for the etcd **v2** HTTP API (`/v2/keys`), which is what Deis v1 components read
//! and write (clients on port 4001 or 2379).
//!
//! Invariants:
//! - Endpoints are tried in order; a connection failure moves to the next one, an answer from etcd
//!   (even an error) is final.
//! - Values never appear in errors or logs: they may be secrets (gateway keys, database password).
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
                    .ok_or_else(|| Error::BadEndpoint(e.to_owned()))
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
        let ttl = ttl.map(|t| t.as_secs().max(1).to_string());
        let mut form = vec![("value", value)];
        if let Some(t) = &ttl {
            form.push(("ttl", t));
        }
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
        let ttl = ttl.map(|t| t.as_secs().max(1).to_string());
        let mut form = vec![("value", value)];
        if let Some(t) = &ttl {
            form.push(("ttl", t));
        }
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
        let ttl = ttl.map(|t| t.as_secs().max(1).to_string());
        let mut form = vec![("value", value)];
        if let Some(t) = &ttl {
            form.push(("ttl", t));
        }
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
        let path = format!("v2/keys/{}", key.trim_start_matches('/'));
        let mut last = None;
        for base in &self.endpoints {
            let url = base
                .join(&path)
                .map_err(|_| Error::BadEndpoint(base.to_string()))?;
            let mut req = self.http.request(method.clone(), url).query(query);
            if !form.is_empty() {
                req = req.form(form);
            }
            match req.send().await {
                Ok(resp) => return decode(op, key, resp).await,
                Err(e) if e.is_connect() || e.is_timeout() => {
                    tracing::debug!(endpoint = %base, "etcd endpoint unreachable, trying the next");
                    last = Some(e);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(Error::Unreachable {
            endpoints: self
                .endpoints
                .iter()
                .map(Url::as_str)
                .collect::<Vec<_>>()
                .join(","),
            source: last.expect("at least one endpoint"),
        })
    }
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
