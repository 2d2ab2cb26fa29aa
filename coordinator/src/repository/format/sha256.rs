//! The SHA-256 digest as a value: what names a blob, checks a listing and a stream.
//!
//! Owns: [`Sha256`], the 32 bytes, and its one text form.
//! Invariants:
//! - The text form is 64 lower-case hex digits, on disk and on screen; nothing else parses, so a
//!   digest read from a manifest or listing is well formed or the read fails (never an empty or
//!   partial digest standing in for a bad one).
//! - Equality is on the bytes.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::Digest as _;

/// A SHA-256 digest.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Sha256([u8; 32]);

/// Why a text is not a [`Sha256`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a SHA-256 (64 lower-case hex digits)")]
pub struct NotSha256;

impl Sha256 {
    /// The digest of `data`.
    pub fn of(data: &[u8]) -> Self {
        Self(sha2::Sha256::digest(data).into())
    }

    /// The digest a running hasher has reached.
    pub fn finish(hasher: sha2::Sha256) -> Self {
        Self(hasher.finalize().into())
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The 64 lower-case hex digits.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl From<[u8; 32]> for Sha256 {
    fn from(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }
}

impl TryFrom<&[u8]> for Sha256 {
    type Error = NotSha256;
    /// From raw bytes, as the agents send a digest: exactly 32 of them.
    fn try_from(bytes: &[u8]) -> Result<Self, NotSha256> {
        bytes.try_into().map(Self).map_err(|_| NotSha256)
    }
}

impl FromStr for Sha256 {
    type Err = NotSha256;
    fn from_str(s: &str) -> Result<Self, NotSha256> {
        if s.len() != 64 || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(NotSha256);
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|_| NotSha256)?;
        Ok(Self(out))
    }
}

impl TryFrom<String> for Sha256 {
    type Error = NotSha256;
    fn try_from(s: String) -> Result<Self, NotSha256> {
        s.parse()
    }
}

impl From<Sha256> for String {
    fn from(d: Sha256) -> Self {
        d.to_hex()
    }
}

impl fmt::Display for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sha256({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_lower_case_hex_of_the_right_length_parses() {
        let d = Sha256::of(b"abc");
        let hex = d.to_string();
        assert_eq!(
            hex,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(hex.parse::<Sha256>(), Ok(d));
        for bad in [
            hex.to_uppercase(),
            hex[..63].to_owned(),
            format!("{hex}0"),
            "é".repeat(32),
            "../../x".into(),
            String::new(),
        ] {
            assert_eq!(bad.parse::<Sha256>(), Err(NotSha256), "{bad:?}");
        }
        assert_eq!(Sha256::try_from(&[0u8; 31][..]), Err(NotSha256));
    }

    #[test]
    fn json_is_the_hex_string() {
        let d = Sha256::of(b"");
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(json, format!("\"{d}\""));
        assert_eq!(serde_json::from_str::<Sha256>(&json).unwrap(), d);
        assert!(serde_json::from_str::<Sha256>("\"ab\"").is_err());
    }
}
