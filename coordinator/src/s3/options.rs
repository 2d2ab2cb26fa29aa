//! The client's options and the byte sizes they take.
//!
//! Owns: [`GatewayOptions`] (the `[gateway]` section of the configuration and its `--gateway-*`
//! flags; the S3 repository reuses it with its own endpoint and keys), [`Signature`] and
//! [`parse_size`].
//! Invariants:
//! - One struct serves the CLI (`clap`), the config file (`serde`, kebab-case, unknown fields
//!   refused) and the library; its `Default` repeats the `clap` defaults.
//! - A size is whole bytes, given as a number or with a unit (`64MiB`, `10M`, `512k`); one that
//!   does not fit in a `u64` is refused, not wrapped.

use serde::{Deserialize, Deserializer, Serialize};

use super::MIB;
use crate::secret::Secret;

/// Which AWS signature the gateway client uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Signature {
    /// V4 first; V2 from the first authentication failure on (Hammer).
    #[default]
    Auto,
    /// AWS Signature V2 only (Ceph Hammer radosgw, Deis v1).
    V2,
    /// AWS Signature V4 only (Ceph Jewel and later, AWS).
    V4,
}

/// How to reach and drive the store-gateway. Serves the CLI (`clap`), the config file (`serde`,
/// kebab-case) and the library.
#[derive(Debug, Clone, Deserialize, clap::Args)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct GatewayOptions {
    /// Gateway endpoints (`host:port` or `http://host:port`), comma-separated. Default: every gateway
    /// published in etcd under /deis/store/gateway/hosts.
    #[arg(long = "gateway", value_delimiter = ',', env = "DEIS_BACKUP_GATEWAY")]
    pub endpoints: Vec<String>,
    /// Gateway access key. Default: /deis/store/gateway/accessKey in etcd.
    #[arg(
        long = "gateway-access-key",
        env = "DEIS_BACKUP_GATEWAY_ACCESS_KEY",
        hide_env_values = true
    )]
    pub access_key: Option<Secret>,
    /// File holding the gateway secret key (mode 600). Default: $DEIS_BACKUP_GATEWAY_SECRET_KEY,
    /// else /deis/store/gateway/secretKey in etcd. Never a flag value: argv is public.
    #[arg(
        long = "gateway-secret-key-file",
        env = "DEIS_BACKUP_GATEWAY_SECRET_KEY_FILE"
    )]
    pub secret_key_file: Option<std::path::PathBuf>,
    /// The secret key itself: from the config file's `secret-key`, or the environment.
    #[arg(skip)]
    pub secret_key: Option<Secret>,
    /// AWS signature version: auto tries V4 and falls back to V2 (Ceph Hammer) once.
    #[arg(long = "gateway-signature", value_enum, default_value_t = Signature::Auto)]
    pub signature: Signature,
    /// Region used in V4 signatures (radosgw accepts us-east-1).
    #[arg(long = "gateway-region", default_value = "us-east-1")]
    pub region: String,
    /// Most requests in flight at once (the adaptive limit starts here, halves on overload and
    /// climbs back when the gateway is calm).
    #[arg(long = "gateway-concurrency", default_value_t = 32)]
    pub concurrency: usize,
    /// Retries of a failed request before giving up.
    #[arg(long = "gateway-retries", default_value_t = 8)]
    pub retries: u32,
    /// Bandwidth cap over all transfers, bytes per second (suffixes KiB, MiB, GiB, k, M, G).
    #[arg(long = "bandwidth-limit", value_parser = parse_size)]
    #[serde(deserialize_with = "de_opt_size")]
    pub bandwidth_limit: Option<u64>,
    /// Objects larger than this are uploaded in parts.
    #[arg(long = "multipart-threshold", value_parser = parse_size, default_value = "64MiB")]
    #[serde(deserialize_with = "de_size")]
    pub multipart_threshold: u64,
    /// Size of a multipart part (at least 5 MiB).
    #[arg(long = "part-size", value_parser = parse_size, default_value = "16MiB")]
    #[serde(deserialize_with = "de_size")]
    pub part_size: u64,
    /// Seconds to wait for a TCP connection.
    #[arg(long = "gateway-connect-timeout", default_value_t = 5)]
    pub connect_timeout_secs: u64,
    /// Seconds a request may wait for the next bytes.
    #[arg(long = "gateway-read-timeout", default_value_t = 60)]
    pub read_timeout_secs: u64,
}

impl Default for GatewayOptions {
    fn default() -> Self {
        Self {
            endpoints: Vec::new(),
            access_key: None,
            secret_key_file: None,
            secret_key: None,
            signature: Signature::Auto,
            region: "us-east-1".to_owned(),
            concurrency: 32,
            retries: 8,
            bandwidth_limit: None,
            multipart_threshold: 64 * MIB,
            part_size: 16 * MIB,
            connect_timeout_secs: 5,
            read_timeout_secs: 60,
        }
    }
}

/// Parses a byte size: `1048576`, `64MiB`, `10M`, `512k`.
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size (e.g. 64MiB)"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "k" | "K" | "kB" | "KB" => 1_000,
        "KiB" => 1 << 10,
        "M" | "MB" => 1_000_000,
        "MiB" => 1 << 20,
        "G" | "GB" => 1_000_000_000,
        "GiB" => 1 << 30,
        u => {
            return Err(format!(
                "unknown size unit '{u}' in '{s}' (use KiB, MiB, GiB)"
            ));
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("'{s}' is too large"))
}

#[derive(Deserialize)]
#[serde(untagged)]
enum SizeValue {
    Num(u64),
    Text(String),
}

fn de_size<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<u64, D::Error> {
    match SizeValue::deserialize(d)? {
        SizeValue::Num(n) => Ok(n),
        SizeValue::Text(s) => parse_size(&s).map_err(serde::de::Error::custom),
    }
}

fn de_opt_size<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<u64>, D::Error> {
    de_size(d).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("10M"), Ok(10_000_000));
        assert_eq!(parse_size("512"), Ok(512));
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("MiB").is_err());
    }

    #[test]
    fn secrets_do_not_print() {
        let o = GatewayOptions {
            access_key: Some(Secret::new("AKIDSECRETVALUE")),
            secret_key: Some(Secret::new("verysecret")),
            ..GatewayOptions::default()
        };
        let dbg = format!("{o:?}");
        assert!(
            !dbg.contains("AKIDSECRETVALUE") && !dbg.contains("verysecret"),
            "{dbg}"
        );
    }

    #[test]
    fn options_from_toml_style_json() {
        let o: GatewayOptions = serde_json::from_str(
            r#"{"endpoints":["10.0.0.1:8888"],"signature":"v2","part-size":"8MiB","bandwidth-limit":1000}"#,
        )
        .unwrap();
        assert_eq!(o.signature, Signature::V2);
        assert_eq!(o.part_size, 8 << 20);
        assert_eq!(o.bandwidth_limit, Some(1000));
        assert_eq!(o.concurrency, 32);
        assert!(serde_json::from_str::<GatewayOptions>(r#"{"no-such":1}"#).is_err());
    }
}
