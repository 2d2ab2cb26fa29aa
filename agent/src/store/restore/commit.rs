//! The commit of a checked staging tree into the target, and its undoing when it fails.
//!
//! Invariants:
//! - Only renames between handles on one filesystem (each one atomic): with `overwrite`, first
//!   every entry of the target (staging directories left out) into `<staging>/previous/` as
//!   `old-<i>` in name order, then every entry of `<staging>/tree/` into the target, in name
//!   order. A move never replaces what is at its destination: `RENAME_NOREPLACE` where the
//!   filesystem has it, else (network filesystems such as NFS refuse the flag with `EINVAL`) a
//!   check that the name is free just before.
//! - When a move fails, every move done so far is undone, latest first: the new entries go back
//!   into `tree/`, then the previous entries back to their names in the target. All undone: the
//!   error is `RestoreUndone` (the target exactly as before: the same inodes under the same names)
//!   or, when nothing had moved yet, the plain error; the caller removes the staging directory.
//! - A move back that fails does not stop the others; the error is then `RestoreIncomplete`,
//!   naming each failed move and where every entry still out of place is, and the staging
//!   directory is kept (the stale clean-up never removes one whose `previous/` holds anything).
//! - Only after every move succeeded may the previous entries go, with the staging directory.
//! - Tests inject a failure at chosen moves of this phase, counted from 1 forward and back alike
//!   (`fail_moves`).

use std::ffi::{OsStr, OsString};
use std::os::fd::OwnedFd;
use std::path::PathBuf;

use deis_backup_proto::v1::{RestoreStoreReply, Warning, warning::Kind};
use rustix::fs::{AtFlags, RenameFlags};
use rustix::io::Errno;

use super::{Dirs, existing};
use crate::error::{Error, Result};
use crate::store::restore::staging::fs_error;

#[cfg(test)]
thread_local! {
    /// Moves done on this thread so far, and the ones (counted from 1) that are to fail.
    static MOVES: std::cell::RefCell<(u32, Vec<u32>)> = const { std::cell::RefCell::new((0, Vec::new())) };
}

/// Makes the moves numbered `at` (from 1, forward and back alike) of the next commits on this
/// thread fail with `EIO`, and restarts the count.
#[cfg(test)]
pub(super) fn fail_moves(at: &[u32]) {
    MOVES.with(|m| *m.borrow_mut() = (0, at.to_vec()));
}

#[cfg(test)]
fn injected() -> rustix::io::Result<()> {
    MOVES.with(|m| {
        let mut m = m.borrow_mut();
        m.0 += 1;
        if m.1.contains(&m.0) {
            Err(Errno::IO)
        } else {
            Ok(())
        }
    })
}

/// Renames `from` in `from_dir` to `to` in `to_dir`, never replacing anything there.
fn move_entry(
    from_dir: &OwnedFd,
    from: &OsStr,
    to_dir: &OwnedFd,
    to: &OsStr,
) -> rustix::io::Result<()> {
    #[cfg(test)]
    injected()?;
    match rustix::fs::renameat_with(from_dir, from, to_dir, to, RenameFlags::NOREPLACE) {
        Err(Errno::INVAL | Errno::NOSYS) => {}
        r => return r,
    }
    match rustix::fs::statat(to_dir, to, AtFlags::SYMLINK_NOFOLLOW) {
        Err(Errno::NOENT) => rustix::fs::renameat(from_dir, from, to_dir, to),
        Ok(_) => Err(Errno::EXIST),
        Err(e) => Err(e),
    }
}

/// The moves done so far.
#[derive(Default)]
struct Done {
    /// Previous entries of the target: (name in the target, name in `previous/`).
    aside: Vec<(OsString, OsString)>,
    /// New entries moved into the target.
    placed: Vec<OsString>,
}

/// Moves the staged tree into the target (see the module invariants).
pub(super) fn commit(
    dirs: &Dirs<'_>,
    mut reply: RestoreStoreReply,
    overwrite: bool,
) -> Result<RestoreStoreReply> {
    let mut old = existing(dirs.target, dirs.target_path, true)?;
    old.sort();
    if !old.is_empty() && !overwrite {
        return Err(Error::NotEmpty {
            path: dirs.target_path.to_path_buf(),
        });
    }
    let mut done = Done::default();
    match forward(dirs, &old, &mut done, &mut reply) {
        Ok(()) => Ok(reply),
        Err(e) => Err(undo(dirs, &done, e)),
    }
}

fn forward(
    dirs: &Dirs<'_>,
    old: &[OsString],
    done: &mut Done,
    reply: &mut RestoreStoreReply,
) -> Result<()> {
    for (i, name) in old.iter().enumerate() {
        let aside = OsString::from(format!("old-{i}"));
        move_entry(dirs.target, name, &dirs.previous, &aside).map_err(|e| {
            fs_error("moving aside (overwrite)", dirs.target_path.join(name))(e.into())
        })?;
        done.aside.push((name.clone(), aside));
        reply.warnings.push(Warning {
            kind: Kind::Other.into(),
            path: name.to_string_lossy().into_owned(),
            message: "replaced (overwrite)".into(),
        });
    }
    let mut names = existing(&dirs.tree, &dirs.tree_path(), false)?;
    names.sort();
    for name in names {
        move_entry(&dirs.tree, &name, dirs.target, &name)
            .map_err(|e| fs_error("moving into place", dirs.target_path.join(&name))(e.into()))?;
        done.placed.push(name);
    }
    Ok(())
}

fn shown(names: &[&OsStr]) -> String {
    names
        .iter()
        .map(|n| n.to_string_lossy())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Undoes `done`, latest first, and returns the error to report for `cause`.
fn undo(dirs: &Dirs<'_>, done: &Done, cause: Error) -> Error {
    if done.aside.is_empty() && done.placed.is_empty() {
        return cause;
    }
    let target = dirs.target_path;
    let (tree, previous) = (dirs.tree_path(), dirs.previous_path());
    let mut failed = Vec::new();
    let mut still_placed = Vec::new();
    for name in done.placed.iter().rev() {
        if let Err(e) = move_entry(dirs.target, name, &dirs.tree, name) {
            let (from, to) = (target.join(name), tree.join(name));
            failed.push(format!("{} back to {}: {e}", from.display(), to.display()));
            still_placed.push(name.as_os_str());
        }
    }
    let mut still_aside = Vec::new();
    for (name, aside) in done.aside.iter().rev() {
        if let Err(e) = move_entry(&dirs.previous, aside, dirs.target, name) {
            let (from, to) = (previous.join(aside), target.join(name));
            failed.push(format!("{} back to {}: {e}", from.display(), to.display()));
            still_aside.push((name.as_os_str(), aside.as_os_str()));
        }
    }
    if failed.is_empty() {
        return Error::RestoreUndone {
            target: target.to_path_buf(),
            source: Box::new(cause),
        };
    }
    still_placed.reverse();
    still_aside.reverse();
    let aside: Vec<String> = still_aside
        .iter()
        .map(|(name, aside)| {
            format!(
                "{} (as {})",
                name.to_string_lossy(),
                PathBuf::from(&previous).join(aside).display()
            )
        })
        .collect();
    let state = format!(
        "the target's previous entries not back in place: [{}]; new entries left in the target: \
         [{}]; every other entry is back where it was; the staging directory {} is kept",
        aside.join(", "),
        shown(&still_placed),
        dirs.staging_path().display()
    );
    Error::RestoreIncomplete {
        target: target.to_path_buf(),
        undo: failed.join("; "),
        state,
        source: Box::new(cause),
    }
}
