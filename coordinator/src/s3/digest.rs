//! Hashes of local files for transfers, each in one read of the file.
//!
//! Owns: the MD5 a download is checked against and the SHA-256 it is stored by
//! ([`digest_file`]), the `Content-MD5` of an upload fed on into its running SHA-256
//! ([`md5_feeding`]), and the per-part MD5s of a multipart upload with the whole file's SHA-256
//! ([`part_digests`]).
//! Invariants:
//! - Every hash of a local file here is computed by [`fold_range`], on a blocking thread.
//! - A file shorter than the length recorded is an integrity error, never a short hash.
//! - [`part_digests`] reads the parts in order (a SHA-256 runs in order) and yields each part's
//!   MD5 as soon as it is read, then the whole file's SHA-256 last.

use std::path::Path;

use md5::{Digest as _, Md5};
use sha2::Sha256;

use crate::error::{Error, Result};

/// Feeds `len` bytes of `path` from `offset` to `fold` (on a blocking thread) and returns its
/// state; the one reader behind every hash of a local file here.
async fn fold_range<S: Send + 'static>(
    path: &Path,
    offset: u64,
    len: u64,
    mut state: S,
    fold: fn(&mut S, &[u8]),
) -> Result<S> {
    use std::io::{Read as _, Seek as _};
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || {
        let what = format!("read {}", path.display());
        let mut f = std::fs::File::open(&path).map_err(|e| Error::io(&what, e))?;
        f.seek(std::io::SeekFrom::Start(offset))
            .map_err(|e| Error::io(&what, e))?;
        let mut buf = vec![0u8; 1024 * 1024];
        let mut left = len;
        while left > 0 {
            let want = usize::try_from(left.min(buf.len() as u64)).unwrap_or(buf.len());
            let n = f.read(&mut buf[..want]).map_err(|e| Error::io(&what, e))?;
            if n == 0 {
                return Err(Error::integrity(format!("{what}: shorter than recorded")));
            }
            fold(&mut state, &buf[..n]);
            left -= n as u64;
        }
        Ok(state)
    })
    .await
    .map_err(|e| Error::repository(format!("hashing task failed: {e}")))?
}

/// SHA-256 of the first `len` bytes of `path` and, with `md5`, their MD5, in one read.
pub(super) async fn digest_file(
    path: &Path,
    len: u64,
    md5: bool,
) -> Result<(Option<[u8; 16]>, [u8; 32])> {
    let (m, h) = fold_range(
        path,
        0,
        len,
        (md5.then(Md5::new), Sha256::new()),
        |(m, h), b| {
            if let Some(m) = m {
                m.update(b);
            }
            h.update(b);
        },
    )
    .await?;
    Ok((m.map(|m| m.finalize().into()), h.finalize().into()))
}

/// MD5 of `len` bytes of `path` from `offset`, the same bytes fed on into `sha256` (the running
/// hash of the bytes before them), in one read.
pub(super) async fn md5_feeding(
    path: &Path,
    offset: u64,
    len: u64,
    sha256: Sha256,
) -> Result<([u8; 16], Sha256)> {
    let (m, h) = fold_range(path, offset, len, (Md5::new(), sha256), |(m, h), b| {
        m.update(b);
        h.update(b);
    })
    .await?;
    Ok((m.finalize().into(), h))
}

/// What one in-order read of a file yields for its multipart upload (see [`part_digests`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PartDigest {
    /// Part `number` (from 1): `len` bytes from `offset`, with their MD5.
    Part {
        number: i32,
        offset: u64,
        len: u64,
        md5: [u8; 16],
    },
    /// After the last part: the SHA-256 of the whole file.
    Whole { sha256: [u8; 32] },
}

/// Reads `size` bytes of `path` once, part by part in order: each part's MD5 as soon as it is
/// read (so its upload can start), then the whole file's SHA-256. The parts are read one after
/// the other (a SHA-256 runs in order); a consumer that polls ahead uploads earlier parts while
/// later ones are read. `part_size` must not be 0.
pub(super) fn part_digests(
    path: &Path,
    size: u64,
    part_size: u64,
) -> impl futures::Stream<Item = Result<PartDigest>> + Send + '_ {
    let count = size.div_ceil(part_size);
    futures::stream::try_unfold((0u64, Some(Sha256::new())), move |(i, sha256)| async move {
        let Some(sha256) = sha256 else {
            return Ok(None);
        };
        if i == count {
            let whole = PartDigest::Whole {
                sha256: sha256.finalize().into(),
            };
            return Ok(Some((whole, (i, None))));
        }
        let offset = i * part_size;
        let len = part_size.min(size - offset);
        let number = i32::try_from(i + 1).map_err(|_| Error::config("too many parts"))?;
        let (md5, sha256) = md5_feeding(path, offset, len, sha256).await?;
        let part = PartDigest::Part {
            number,
            offset,
            len,
            md5,
        };
        Ok(Some((part, (i + 1, Some(sha256)))))
    })
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::error::ErrorKind;

    /// A file of `len` pseudo-random bytes.
    pub(in crate::s3) fn random_file(len: usize) -> (tempfile::NamedTempFile, Vec<u8>) {
        let mut data = vec![0u8; len];
        fastrand::Rng::with_seed(7).fill(&mut data);
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), &data).unwrap();
        (f, data)
    }

    #[tokio::test]
    async fn one_read_gives_the_md5_and_feeds_the_sha256() {
        let (f, data) = random_file(3 * 1024 * 1024 + 5);
        let (md5, sha) = md5_feeding(f.path(), 0, data.len() as u64, Sha256::new())
            .await
            .unwrap();
        assert_eq!(md5, <[u8; 16]>::from(Md5::digest(&data)));
        assert_eq!(sha.finalize(), Sha256::digest(&data));
        // From an offset, continuing a running SHA-256: the halves make the whole.
        let half = data.len() / 2;
        let (_, first) = md5_feeding(f.path(), 0, half as u64, Sha256::new())
            .await
            .unwrap();
        let (md5, both) = md5_feeding(f.path(), half as u64, (data.len() - half) as u64, first)
            .await
            .unwrap();
        assert_eq!(md5, <[u8; 16]>::from(Md5::digest(&data[half..])));
        assert_eq!(both.finalize(), Sha256::digest(&data));
        // A file shorter than recorded is an error, not a short hash.
        let err = md5_feeding(f.path(), 0, data.len() as u64 + 1, Sha256::new())
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Integrity, "{err}");
    }

    #[tokio::test]
    async fn part_digests_are_each_parts_md5_then_the_whole_sha256() {
        let (f, data) = random_file(2 * 1024 * 1024 + 100);
        let part = 1024 * 1024;
        let got: Vec<PartDigest> =
            futures::TryStreamExt::try_collect(part_digests(f.path(), data.len() as u64, part))
                .await
                .unwrap();
        let mut want: Vec<PartDigest> = data
            .chunks(usize::try_from(part).unwrap())
            .enumerate()
            .map(|(i, c)| PartDigest::Part {
                number: i32::try_from(i + 1).unwrap(),
                offset: i as u64 * part,
                len: c.len() as u64,
                md5: Md5::digest(c).into(),
            })
            .collect();
        want.push(PartDigest::Whole {
            sha256: Sha256::digest(&data).into(),
        });
        assert_eq!(got.len(), 4, "3 parts, then the whole");
        assert_eq!(got, want);
        // One part that is the whole file.
        let one: Vec<PartDigest> = futures::TryStreamExt::try_collect(part_digests(
            f.path(),
            data.len() as u64,
            data.len() as u64,
        ))
        .await
        .unwrap();
        assert_eq!(one.len(), 2);
        assert_eq!(one[1], want[3]);
    }
}
