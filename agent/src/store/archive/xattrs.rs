//! Extended attributes and POSIX ACLs of store entries, kept as GNU tar's `--xattrs --acls` keeps
//! them. Shared by the archive (reading, pax records) and the restore (checking, setting).
//!
//! Invariants:
//! - Kept: `user.*`, `security.capability`, `system.posix_acl_access` and
//!   `system.posix_acl_default` ([`kept`]). Never `trusted.*`, `security.selinux` or any other
//!   name, in either direction.
//! - Read only through a handle already opened on the listed inode (`flistxattr`/`fgetxattr`),
//!   never by path. Symlinks, hard-link entries, fifos and device nodes carry none.
//! - At most [`MAX_BYTES`] of names and values, and of the pax records holding them, per entry
//!   (the restore guard's 64 KiB cap on one pax header, less room for a path and a link target). An entry with more keeps none and gets a
//!   warning from the archive; the restore refuses an entry whose records go past it.
//! - In the tar, every attribute is a pax record `SCHILY.xattr.<name>=<value bytes>`, in name
//!   order. An ACL is also written as the text record GNU tar `--acls` restores from
//!   (`SCHILY.acl.access`, `SCHILY.acl.default`: entries with numeric ids, separated by commas).
//! - No record holds a newline: the `tar` crate, which the restore reads with, splits pax records
//!   at newlines (and the restore's guard refuses any that does). An attribute whose name or
//!   value holds one is left out with a warning; an ACL's binary value with one (an id such as 10)
//!   is left out silently, its text record standing for it, which the restore turns back into
//!   the value when no `SCHILY.xattr.` record gives it.
//! - An entry without kept attributes gets no record at all: its tar bytes are what they were
//!   before attributes were archived.

use std::io;
use std::os::fd::AsFd;

use rustix::io::Errno;

/// Most bytes of names and values kept for one entry.
pub const MAX_BYTES: usize = 48 << 10;
/// The pax key prefix of an attribute record.
pub const PAX_PREFIX: &[u8] = b"SCHILY.xattr.";
pub const ACL_ACCESS: &[u8] = b"system.posix_acl_access";
pub const ACL_DEFAULT: &[u8] = b"system.posix_acl_default";
/// The pax keys of the ACLs' text, beside their attribute names.
pub const ACL_TEXT: [(&[u8], &[u8]); 2] = [
    (b"SCHILY.acl.access", ACL_ACCESS),
    (b"SCHILY.acl.default", ACL_DEFAULT),
];

/// Whether the attribute `name` is archived and restored.
pub fn kept(name: &[u8]) -> bool {
    name.starts_with(b"user.") && name.len() > 5
        || name == b"security.capability"
        || name == ACL_ACCESS
        || name == ACL_DEFAULT
}

/// An entry's kept attributes, sorted by name.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Xattrs(pub Vec<(Vec<u8>, Vec<u8>)>);

impl Xattrs {
    /// The pax records for these attributes: `SCHILY.xattr.<name>` (but for those holding a
    /// newline), then the ACLs' text.
    pub fn pax(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut out: Vec<(Vec<u8>, Vec<u8>)> = self
            .0
            .iter()
            .filter(|(n, v)| !newline(n, v))
            .map(|(n, v)| ([PAX_PREFIX, n].concat(), v.clone()))
            .collect();
        for (key, name) in ACL_TEXT {
            if let Some((_, v)) = self.0.iter().find(|(n, _)| n == name)
                && let Some(text) = acl_text(v)
            {
                out.push((key.to_vec(), text));
            }
        }
        out
    }
}

/// Whether an attribute holds a newline: the `tar` crate (the restore's reader) splits pax records
/// at newlines, so such a record is never written (an ACL is still written as text).
fn newline(name: &[u8], value: &[u8]) -> bool {
    name.contains(&b'\n') || value.contains(&b'\n')
}

impl Xattrs {
    /// The attributes not written (they hold a newline; ACLs, written as text, left out).
    pub fn unwritable(&self) -> impl Iterator<Item = &[u8]> {
        self.0
            .iter()
            .filter(|(n, v)| newline(n, v) && n != ACL_ACCESS && n != ACL_DEFAULT)
            .map(|(n, _)| n.as_slice())
    }
}

/// Bytes of pax records `"<len> <key>=<value>\n"` for `records`.
pub fn records_len(records: &[(Vec<u8>, Vec<u8>)]) -> usize {
    records
        .iter()
        .map(|(k, v)| {
            let rest = k.len() + v.len() + 3;
            let mut len = rest + 1;
            while rest + len.to_string().len() != len {
                len = rest + len.to_string().len();
            }
            len
        })
        .sum()
}

/// Why an entry's attributes were not kept.
#[derive(Debug, PartialEq, Eq)]
pub struct TooBig(pub usize);

/// The kept attributes of the inode open on `fd`; none where the filesystem has none
/// (`EOPNOTSUPP`).
pub fn read(fd: impl AsFd) -> io::Result<Result<Xattrs, TooBig>> {
    let fd = fd.as_fd();
    let mut names = Vec::new();
    // The list may grow between the query and the read: ERANGE, try again (bounded).
    for _ in 0..8 {
        let n = match rustix::fs::flistxattr_query(fd) {
            Ok(n) => n,
            Err(Errno::OPNOTSUPP | Errno::NOSYS) => return Ok(Ok(Xattrs::default())),
            Err(e) => return Err(e.into()),
        };
        if n == 0 {
            return Ok(Ok(Xattrs::default()));
        }
        names.resize(n, 0);
        match rustix::fs::flistxattr(fd, &mut names[..]) {
            Ok(n) => {
                names.truncate(n);
                break;
            }
            Err(Errno::RANGE) => names.clear(),
            Err(e) => return Err(e.into()),
        }
    }
    let mut out = Vec::new();
    let mut total = 0usize;
    let mut value = Vec::new();
    for name in names.split(|b| *b == 0).filter(|n| kept(n)) {
        let got = loop {
            let n = match rustix::fs::fgetxattr_query(fd, name) {
                Ok(n) => n,
                // Removed since it was listed.
                Err(Errno::NODATA) => break None,
                Err(e) => return Err(e.into()),
            };
            total += name.len() + n;
            if total > MAX_BYTES {
                return Ok(Err(TooBig(total)));
            }
            total -= name.len() + n;
            value.resize(n, 0);
            match rustix::fs::fgetxattr(fd, name, &mut value[..]) {
                Ok(n) => break Some(value[..n].to_vec()),
                Err(Errno::RANGE) => {}
                Err(Errno::NODATA) => break None,
                Err(e) => return Err(e.into()),
            }
        };
        if let Some(v) = got {
            total += name.len() + v.len();
            out.push((name.to_vec(), v));
        }
    }
    out.sort();
    let x = Xattrs(out);
    let records = records_len(&x.pax());
    if records > MAX_BYTES {
        return Ok(Err(TooBig(records)));
    }
    Ok(Ok(x))
}

/// The text of a POSIX ACL as GNU tar restores it (`user::rw-,user:1000:r--,…`: numeric ids, the
/// entries separated by commas, which `acl_from_text` reads as it reads GNU tar's own newlines),
/// from its `system.posix_acl_*` value; None for a value that is not one.
pub fn acl_text(v: &[u8]) -> Option<Vec<u8>> {
    let (head, body) = v.split_at_checked(4)?;
    if head != 2u32.to_le_bytes() || body.len() % 8 != 0 {
        return None;
    }
    let mut out = Vec::new();
    for e in body.chunks_exact(8) {
        let tag = u16::from_le_bytes([e[0], e[1]]);
        let perm = u16::from_le_bytes([e[2], e[3]]);
        let id = u32::from_le_bytes([e[4], e[5], e[6], e[7]]);
        let (kind, qualified) = match tag {
            0x01 => ("user", false),
            0x02 => ("user", true),
            0x04 => ("group", false),
            0x08 => ("group", true),
            0x10 => ("mask", false),
            0x20 => ("other", false),
            _ => return None,
        };
        let id = if qualified {
            id.to_string()
        } else {
            String::new()
        };
        let rwx: String = [(4, 'r'), (2, 'w'), (1, 'x')]
            .iter()
            .map(|(bit, c)| if perm & bit != 0 { *c } else { '-' })
            .collect();
        if !out.is_empty() {
            out.push(b',');
        }
        out.extend_from_slice(format!("{kind}:{id}:{rwx}").as_bytes());
    }
    Some(out)
}

/// The `system.posix_acl_*` value of an ACL's text as [`acl_text`] writes it (also `u`, `g`, `m`,
/// `o` and newlines, as GNU tar writes it); None for text that is not one.
pub fn acl_value(text: &[u8]) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(text).ok()?;
    let mut out = 2u32.to_le_bytes().to_vec();
    for e in text
        .split([',', '\n'])
        .map(str::trim)
        .filter(|e| !e.is_empty())
    {
        let mut f = e.split(':');
        let (kind, id, perms) = (f.next()?, f.next()?, f.next()?);
        let (tag, id): (u16, u32) = match (kind, id) {
            ("user" | "u", "") => (0x01, u32::MAX),
            ("user" | "u", id) => (0x02, id.parse().ok()?),
            ("group" | "g", "") => (0x04, u32::MAX),
            ("group" | "g", id) => (0x08, id.parse().ok()?),
            ("mask" | "m", "") => (0x10, u32::MAX),
            ("other" | "o", "") => (0x20, u32::MAX),
            _ => return None,
        };
        let mut perm = 0u16;
        if perms.len() != 3 {
            return None;
        }
        for ((c, want), bit) in perms.chars().zip(['r', 'w', 'x']).zip([4, 2, 1]) {
            if c == want {
                perm |= bit;
            } else if c != '-' {
                return None;
            }
        }
        out.extend_from_slice(&tag.to_le_bytes());
        out.extend_from_slice(&perm.to_le_bytes());
        out.extend_from_slice(&id.to_le_bytes());
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_user_capability_and_acl_attributes_are_kept() {
        for name in [
            &b"user.color"[..],
            b"security.capability",
            b"system.posix_acl_access",
            b"system.posix_acl_default",
        ] {
            assert!(kept(name), "{}", String::from_utf8_lossy(name));
        }
        for name in [
            &b"trusted.overlay.opaque"[..],
            b"security.selinux",
            b"security.ima",
            b"system.nfs4_acl",
            b"user.",
            b"user",
        ] {
            assert!(!kept(name), "{}", String::from_utf8_lossy(name));
        }
    }

    #[test]
    fn acl_text_is_what_gnu_tar_writes() {
        // `setfacl -m u:1234:r` on a 0644 file, as GNU tar archived it.
        let v = b"\x02\x00\x00\x00\x01\x00\x06\x00\xff\xff\xff\xff\x02\x00\x04\x00\xd2\x04\x00\x00\
                  \x04\x00\x04\x00\xff\xff\xff\xff\x10\x00\x04\x00\xff\xff\xff\xff\x20\x00\x04\x00\
                  \xff\xff\xff\xff";
        let text = acl_text(v).unwrap();
        assert_eq!(
            text,
            b"user::rw-,user:1234:r--,group::r--,mask::r--,other::r--"
        );
        assert_eq!(acl_text(b"\x01\x00\x00\x00"), None);
        assert_eq!(acl_value(&text).unwrap(), v);
        let gnu = b"user::rw-\nuser:1234:r--\ngroup::r--\nmask::r--\nother::r--\n";
        assert_eq!(acl_value(gnu).unwrap(), v);
        assert_eq!(acl_value(b"user::rwz"), None);
        assert_eq!(acl_value(b"user:bob:rw-"), None);
    }
}
