//! ETags and multipart part sizes.
//!
//! Owns: whether an ETag is a plain MD5 ([`etag_is_md5`]), an ETag without its quotes, the S3
//! minimum part size and the part size a multipart object was most likely uploaded with
//! ([`original_part_size`]).
//! Invariants:
//! - Only a plain-MD5 ETag (32 hex digits: a single PUT, no SSE) is compared with the MD5 of the
//!   bytes; a multipart ETag is `<md5 of the parts' MD5s>-<parts>`.
//! - An inferred part size gives exactly the ETag's number of parts and is never below
//!   [`MIN_PART_SIZE`] (but for a single part, which is the whole object).

use super::MIB;

/// S3 never takes a multipart part below 5 MiB (except the last).
pub const MIN_PART_SIZE: u64 = 5 * 1024 * 1024;

pub(super) fn unquote(etag: &str) -> String {
    etag.trim().trim_matches('"').to_owned()
}

/// True when an ETag is a plain MD5 (single-part upload, no SSE): 32 hex digits.
pub fn etag_is_md5(etag: &str) -> bool {
    etag.len() == 32 && etag.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Part sizes S3 clients commonly use, most common first: boto3 and the AWS CLI (8 MiB), the S3
/// minimum (5 MiB, old boto and WAL-E), s3cmd (15 MiB), and round sizes.
const USUAL_PART_SIZES_MIB: [u64; 12] = [8, 5, 15, 16, 10, 25, 32, 50, 64, 100, 128, 256];

/// The part size an object of `size` bytes with the multipart ETag `etag` (`<md5>-<parts>`) was
/// most likely uploaded with: the first usual size that gives that many parts, else the smallest
/// whole number of MiB that does. `None` for a plain-MD5 (single PUT) or unreadable ETag.
pub fn original_part_size(size: u64, etag: &str) -> Option<u64> {
    let (md5, parts) = etag.rsplit_once('-')?;
    let parts: u64 = parts.parse().ok()?;
    if !etag_is_md5(md5) || parts == 0 || parts > 10_000 || size == 0 {
        return None;
    }
    if parts == 1 {
        return Some(size);
    }
    let gives = |p: u64| p >= MIN_PART_SIZE && size.div_ceil(p) == parts;
    USUAL_PART_SIZES_MIB
        .iter()
        .map(|m| m * MIB)
        .find(|&p| gives(p))
        .or_else(|| Some(size.div_ceil(parts).div_ceil(MIB) * MIB).filter(|&p| gives(p)))
        .or_else(|| Some(size.div_ceil(parts)).filter(|&p| gives(p)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn original_part_sizes_are_inferred_from_multipart_etags() {
        let md5 = "0123456789abcdef0123456789abcdef";
        let mib = 1024 * 1024;
        // (object size, parts in the ETag, part size expected)
        let cases = [
            // boto3's 8 MiB parts: 12.5 MiB in 2 parts, 40 MiB in 5.
            (12 * mib + mib / 2, 2, 8 * mib),
            (40 * mib, 5, 8 * mib),
            // 5 MiB parts where 8 MiB would give fewer: 12 MiB in 3 parts.
            (12 * mib, 3, 5 * mib),
            // s3cmd's 15 MiB: 40 MiB in 3 parts (8 MiB gives 5, 5 MiB gives 8).
            (40 * mib, 3, 15 * mib),
            // No usual size fits: the smallest whole MiB that gives the count.
            (1000 * mib, 7, 143 * mib),
        ];
        for (size, parts, want) in cases {
            let etag = format!("{md5}-{parts}");
            assert_eq!(original_part_size(size, &etag), Some(want), "{size} {etag}");
        }
        // One part is the whole object.
        assert_eq!(original_part_size(3, &format!("{md5}-1")), Some(3));
        // Single PUTs and nonsense have none.
        assert_eq!(original_part_size(40 * mib, md5), None);
        assert_eq!(original_part_size(40 * mib, &format!("{md5}-x")), None);
        assert_eq!(original_part_size(40 * mib, "abc-2"), None);
        assert_eq!(original_part_size(4 * mib, &format!("{md5}-3")), None);
    }

    #[test]
    fn md5_etags_are_recognised() {
        assert!(etag_is_md5("d41d8cd98f00b204e9800998ecf8427e"));
        assert!(!etag_is_md5("d41d8cd98f00b204e9800998ecf8427e-3"));
        assert_eq!(unquote("\"abc\""), "abc");
    }
}
