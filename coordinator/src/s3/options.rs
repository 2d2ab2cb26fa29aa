//! The client's options and the byte sizes they take.
//!
//! Owns: [`GatewayOptions`] (the `[gateway]` section of the configuration and its `--gateway-*`
//! flags; the S3 repository reuses it with its own endpoint and keys), [`Signature`] and
//! [`parse_size`].
//! Invariants:
//! - One struct serves the CLI (`clap`), the config file (`serde`, kebab-case, unknown fields
//!   refused) and the library. No field has a clap default: an unset option is `None` (or empty),
//!   so the command line merges over the file ([`merge::Merge`]), and the accessors apply the
//!   defaults the help text names.
//! - A size is whole bytes, given as a number or with a unit (`64MiB`, `10M`, `512k`; parsed by
//!   `bytesize`); one that does not fit in a `u64` is refused, not wrapped or saturated.

use serde::{Deserialize, Deserializer, Serialize};

use super::MIB;
use crate::secret::SecretString;

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
/// kebab-case) and the library; the accessors apply the defaults.
#[derive(Debug, Clone, Default, Deserialize, clap::Args, merge::Merge)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
#[merge(strategy = merge::option::overwrite_none)]
pub struct GatewayOptions {
    /// Gateway endpoints (`host:port` or `http://host:port`), comma-separated. Default: every gateway
    /// published in etcd under /deis/store/gateway/hosts.
    #[arg(long = "gateway", value_delimiter = ',', env = "DEIS_BACKUP_GATEWAY")]
    #[merge(strategy = merge::vec::overwrite_empty)]
    pub endpoints: Vec<String>,
    /// Gateway access key. Default: /deis/store/gateway/accessKey in etcd.
    #[arg(
        long = "gateway-access-key",
        env = "DEIS_BACKUP_GATEWAY_ACCESS_KEY",
        hide_env_values = true
    )]
    pub access_key: Option<SecretString>,
    /// File holding the gateway secret key (mode 600). Default: $DEIS_BACKUP_GATEWAY_SECRET_KEY,
    /// else /deis/store/gateway/secretKey in etcd. Never a flag value: argv is public.
    #[arg(
        long = "gateway-secret-key-file",
        env = "DEIS_BACKUP_GATEWAY_SECRET_KEY_FILE"
    )]
    pub secret_key_file: Option<std::path::PathBuf>,
    /// The secret key itself: from the config file's `secret-key`, or the environment.
    #[arg(skip)]
    pub secret_key: Option<SecretString>,
    /// AWS signature version: auto tries V4 and falls back to V2 (Ceph Hammer) once [default:
    /// auto].
    #[arg(long = "gateway-signature", value_enum)]
    pub signature: Option<Signature>,
    /// Region used in V4 signatures (radosgw accepts us-east-1) [default: us-east-1].
    #[arg(long = "gateway-region")]
    pub region: Option<String>,
    /// Most requests in flight at once (the adaptive limit starts here, halves on overload and
    /// climbs back when the gateway is calm) [default: 32].
    #[arg(long = "gateway-concurrency")]
    pub concurrency: Option<usize>,
    /// Retries of a failed request before giving up [default: 8].
    #[arg(long = "gateway-retries")]
    pub retries: Option<u32>,
    /// Bandwidth cap over all transfers, bytes per second (suffixes KiB, MiB, GiB, k, M, G).
    #[arg(long = "bandwidth-limit", value_parser = parse_size)]
    #[serde(deserialize_with = "de_opt_size")]
    pub bandwidth_limit: Option<u64>,
    /// Objects larger than this are uploaded in parts [default: 64MiB].
    #[arg(long = "multipart-threshold", value_parser = parse_size)]
    #[serde(deserialize_with = "de_opt_size")]
    pub multipart_threshold: Option<u64>,
    /// Size of a multipart part (at least 5 MiB) [default: 16MiB].
    #[arg(long = "part-size", value_parser = parse_size)]
    #[serde(deserialize_with = "de_opt_size")]
    pub part_size: Option<u64>,
    /// Seconds to wait for a TCP connection [default: 5].
    #[arg(long = "gateway-connect-timeout")]
    pub connect_timeout_secs: Option<u64>,
    /// Seconds a request may wait for the next bytes [default: 60].
    #[arg(long = "gateway-read-timeout")]
    pub read_timeout_secs: Option<u64>,
}

impl GatewayOptions {
    /// AWS signature version.
    pub fn signature(&self) -> Signature {
        self.signature.unwrap_or_default()
    }

    /// Region used in V4 signatures.
    pub fn region(&self) -> &str {
        self.region.as_deref().unwrap_or("us-east-1")
    }

    /// Most requests in flight at once.
    pub fn concurrency(&self) -> usize {
        self.concurrency.unwrap_or(32)
    }

    /// Retries of a failed request.
    pub fn retries(&self) -> u32 {
        self.retries.unwrap_or(8)
    }

    /// Objects larger than this are uploaded in parts.
    pub fn multipart_threshold(&self) -> u64 {
        self.multipart_threshold.unwrap_or(64 * MIB)
    }

    /// Size of a multipart part.
    pub fn part_size(&self) -> u64 {
        self.part_size.unwrap_or(16 * MIB)
    }

    /// Seconds to wait for a TCP connection.
    pub fn connect_timeout_secs(&self) -> u64 {
        self.connect_timeout_secs.unwrap_or(5)
    }

    /// Seconds a request may wait for the next bytes.
    pub fn read_timeout_secs(&self) -> u64 {
        self.read_timeout_secs.unwrap_or(60)
    }
}

/// Parses a byte size: `1048576`, `64MiB`, `10M`, `512k`, `2 GiB` (units of [`bytesize`], any
/// case; `k`/`M`/`G` are powers of 1000, `KiB`/`MiB`/`GiB` of 1024).
///
/// A thin wrapper: bytesize also takes fractions (`1.5MiB`) and saturates a size too large for a
/// `u64`; here a size is whole bytes and one too large is refused.
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let s = s.trim();
    if s.contains('.') {
        return Err(format!(
            "'{s}' is not a whole number of bytes or units (e.g. 1536KiB)"
        ));
    }
    let n = s
        .parse::<bytesize::ByteSize>()
        .map_err(|_| format!("'{s}' is not a size (bytes, or with a unit: 64MiB, 10M, 512k)"))?
        .as_u64();
    // Saturated: only a bare number can be `u64::MAX` itself.
    if n == u64::MAX && s.parse::<u64>().is_err() {
        return Err(format!("'{s}' is too large"));
    }
    Ok(n)
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
        // Every form accepted before the parser came from bytesize.
        for (text, bytes) in [
            ("640KiB", 640 << 10),
            ("2MiB", 2 << 20),
            ("8M", 8_000_000),
            ("8MB", 8_000_000),
            ("3GiB", 3 << 30),
            ("3G", 3_000_000_000),
            ("3GB", 3_000_000_000),
            ("512k", 512_000),
            ("512K", 512_000),
            ("512kB", 512_000),
            ("512KB", 512_000),
            ("7B", 7),
            ("0", 0),
            (" 16 MiB ", 16 << 20),
            ("18446744073709551615", u64::MAX),
        ] {
            assert_eq!(parse_size(text), Ok(bytes), "{text}");
        }
        // Now also any case and TiB.
        assert_eq!(parse_size("64mib"), Ok(64 << 20));
        assert_eq!(parse_size("1TiB"), Ok(1 << 40));
        // Whole bytes only, and nothing that does not fit.
        for text in [
            "1.5MiB",
            "-1",
            "",
            "18446744073709551616",
            "16EiB",
            "20000000000GiB",
            "99999999999999999999999M",
            "1 2",
        ] {
            let e = parse_size(text).unwrap_err();
            assert!(e.contains(&format!("'{}'", text.trim())), "{e}");
        }
    }

    #[test]
    fn secrets_do_not_print() {
        let o = GatewayOptions {
            access_key: Some(SecretString::from("AKIDSECRETVALUE")),
            secret_key: Some(SecretString::from("verysecret")),
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
        assert_eq!(o.signature(), Signature::V2);
        assert_eq!(o.part_size(), 8 << 20);
        assert_eq!(o.bandwidth_limit, Some(1000));
        assert_eq!(o.concurrency(), 32);
        assert!(serde_json::from_str::<GatewayOptions>(r#"{"no-such":1}"#).is_err());
    }
}
