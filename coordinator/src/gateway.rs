//! The Deis store-gateway (Ceph radosgw): where it is and which keys it takes, as Deis publishes
//! them in etcd, and the bucket names Deis gives it; from these it builds an [`s3::Client`](crate::s3::Client).
//!
//! Owns: the resolution of [`GatewayOptions`] into an [`s3::Target`](crate::s3::Target) (options first, then etcd),
//! [`Client::connect`] (resolve, build, probe) and [`DeisBuckets`]. Everything else about talking
//! to the gateway is the neutral [`crate::s3`] client's; its names that were known here are
//! re-exported (`Gateway` is [`s3::Client`](crate::s3::Client)).
//! Invariants:
//! - Every gateway published under `/deis/store/gateway/hosts/*` is used, each at its own
//!   `host:port`; only when none is, the single `/deis/store/gateway/{host,port}`.
//! - An endpoint never carries user info: keys travel separately (files, environment, etcd), never
//!   in a URL that errors and logs print.
//! - The secret key comes from a file (mode 600), the config file or the environment, else from
//!   etcd; never from a flag value (argv is public).

pub use crate::s3::{Client as Gateway, GatewayOptions, ObjectMeta, Signature};
pub use crate::secret::SecretString;

use crate::error::{Error, ErrorKind, Result};
use crate::s3::{Client, Target};

const GATEWAY_KEY: &str = "/deis/store/gateway";

impl GatewayOptions {
    /// Fills what the options leave open from etcd, as Deis publishes it.
    pub async fn resolve(&self, etcd: Option<&deis_backup_etcd::Client>) -> Result<Target> {
        let need_etcd = || {
            etcd.ok_or_else(|| {
                Error::config(
                    "no gateway endpoint or keys given and no etcd to read them from: \
                     pass --etcd, or --gateway with --gateway-access-key and \
                     --gateway-secret-key-file",
                )
            })
        };
        let endpoints = if self.endpoints.is_empty() {
            discover_endpoints(need_etcd()?).await?
        } else {
            self.endpoints
                .iter()
                .map(|e| endpoint_url(e))
                .collect::<Result<Vec<_>>>()?
        };
        let access_key = match &self.access_key {
            Some(k) => k.clone(),
            None => read_key(need_etcd()?, "accessKey").await?,
        };
        let secret_key = match crate::secret::resolve(
            self.secret_key_file.as_deref(),
            self.secret_key.as_ref(),
            "DEIS_BACKUP_GATEWAY_SECRET_KEY",
            "gateway secret key",
        )? {
            Some(k) => k,
            None => read_key(need_etcd()?, "secretKey").await?,
        };
        Ok(Target {
            endpoints,
            access_key,
            secret_key,
        })
    }
}

async fn read_key(etcd: &deis_backup_etcd::Client, name: &str) -> Result<SecretString> {
    let key = format!("{GATEWAY_KEY}/{name}");
    etcd.get(&key)
        .await?
        .map(SecretString::from)
        .ok_or_else(|| {
            Error::config(format!(
                "etcd has no {key}: the store-gateway has not published its keys"
            ))
        })
}

/// Every gateway under `/deis/store/gateway/hosts/*`, else the single `/deis/store/gateway/{host,port}`.
async fn discover_endpoints(etcd: &deis_backup_etcd::Client) -> Result<Vec<String>> {
    let mut out = Vec::new();
    if let Some(hosts) = etcd.get_node(&format!("{GATEWAY_KEY}/hosts"), true).await? {
        for h in hosts.nodes.iter().filter(|n| n.dir) {
            let host = h.child("host").and_then(|n| n.value.clone());
            let port = h.child("port").and_then(|n| n.value.clone());
            if let (Some(host), Some(port)) = (host, port) {
                out.push(endpoint_url(&format!("{host}:{port}"))?);
            }
        }
    }
    if out.is_empty() {
        let host = etcd.get(&format!("{GATEWAY_KEY}/host")).await?;
        let port = etcd.get(&format!("{GATEWAY_KEY}/port")).await?;
        if let (Some(host), Some(port)) = (host, port) {
            out.push(endpoint_url(&format!("{host}:{port}"))?);
        }
    }
    out.sort();
    out.dedup();
    if out.is_empty() {
        return Err(Error::new(
            ErrorKind::GatewayUnreachable,
            "etcd lists no store-gateway (/deis/store/gateway/hosts and /deis/store/gateway/host are empty)",
            "start the store-gateway (`deisctl start store-gateway`) or pass --gateway host:port",
        ));
    }
    Ok(out)
}

fn endpoint_url(e: &str) -> Result<String> {
    let e = e.trim().trim_end_matches('/');
    let url = if e.contains("://") {
        e.to_owned()
    } else {
        format!("http://{e}")
    };
    // Keys travel separately (files, environment, etcd); user info in an endpoint would be a
    // secret in a URL that errors and logs print.
    let authority = url.split("://").nth(1).and_then(|r| r.split('/').next());
    if authority.is_some_and(|a| a.contains('@')) {
        return Err(Error::config(
            "a gateway endpoint holds user info (user:password@): give keys with \
             --gateway-access-key and --gateway-secret-key-file instead",
        ));
    }
    let ok = url
        .parse::<http::Uri>()
        .is_ok_and(|u| u.host().is_some() && matches!(u.scheme_str(), Some("http" | "https")));
    if ok {
        Ok(url)
    } else {
        Err(Error::config(format!(
            "'{e}' is not a gateway endpoint: use host:port or http://host:port"
        )))
    }
}

/// The bucket names Deis uses, from etcd (`/deis/{database,registry}/bucketName`, defaults
/// `db_wal` and `registry`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeisBuckets {
    pub database: String,
    pub registry: String,
}

impl DeisBuckets {
    pub async fn discover(etcd: &deis_backup_etcd::Client) -> Result<Self> {
        let database = etcd
            .get("/deis/database/bucketName")
            .await?
            .unwrap_or_else(|| "db_wal".to_owned());
        let registry = etcd
            .get("/deis/registry/bucketName")
            .await?
            .unwrap_or_else(|| "registry".to_owned());
        Ok(Self { database, registry })
    }

    pub fn all(&self) -> Vec<String> {
        vec![self.database.clone(), self.registry.clone()]
    }
}

impl Client {
    /// Resolves the gateways (options, then etcd), builds the clients and checks that the first
    /// answering gateway accepts the keys, settling the signature when it is `auto`.
    pub async fn connect(
        options: &GatewayOptions,
        etcd: Option<&deis_backup_etcd::Client>,
    ) -> Result<Self> {
        let target = options.resolve(etcd).await?;
        let mut gw = Self::new(&target, options)?;
        gw.probe().await?;
        Ok(gw)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_normalise() {
        assert_eq!(
            endpoint_url("127.0.0.1:8888").unwrap(),
            "http://127.0.0.1:8888"
        );
        assert_eq!(endpoint_url("https://gw:443/").unwrap(), "https://gw:443");
        assert!(endpoint_url("ftp://x").is_err());
        let e = endpoint_url("http://AKID:s3cret@gw:8888").unwrap_err();
        assert!(!e.to_string().contains("s3cret"), "{e}");
    }
}
