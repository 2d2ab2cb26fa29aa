//! What a run holds while it works: the target cluster's lock (etcd, [`crate::lock`]) and its
//! lease in the repository ([`crate::lease`]).
//!
//! Owns: [`Hold`], with one [`Hold::check`] before every step that deletes or commits, and one
//! [`Hold::release`] at the end.
//! Invariants: a check fails as soon as either is lost; a release never fails the run (the work
//! is done, or its own error stands): what could not be released lapses by itself.

use crate::error::Result;
use crate::lease::Lease;
use crate::lock::Lock;

/// A run's cluster lock and repository lease, either of which a run may go without (a verify
/// takes no cluster lock; a read-only repository takes no lease).
#[derive(Debug, Default)]
pub struct Hold {
    lock: Option<Lock>,
    lease: Option<Lease>,
}

impl Hold {
    pub fn new(lock: Option<Lock>, lease: Option<Lease>) -> Hold {
        Hold { lock, lease }
    }

    /// The repository lease's file, when the run holds one (its run entry names it).
    pub fn lease_file(&self) -> Option<&str> {
        self.lease.as_ref().map(Lease::file)
    }

    /// An error once the cluster lock or the repository lease is lost, naming the step that must
    /// not run without them.
    pub fn check(&self, before: &str) -> Result<()> {
        if let Some(l) = &self.lock {
            l.check(before)?;
        }
        if let Some(l) = &self.lease {
            l.check(before)?;
        }
        Ok(())
    }

    /// Releases both; what could not be released, as warnings for the operator.
    pub async fn release(self) -> Vec<String> {
        let mut warnings = Vec::new();
        if let Some(l) = self.lease
            && let Err(e) = l.release().await
        {
            warnings.push(format!(
                "could not remove this run's repository lease ({}); it lapses by itself within \
                     {} s",
                e.message(),
                crate::lease::TTL.as_secs()
            ));
        }
        if let Some(l) = self.lock
            && let Err(e) = l.release().await
        {
            warnings.push(format!(
                "could not release the cluster lock ({}); it expires by itself within {} s",
                e.message(),
                crate::lock::TTL.as_secs()
            ));
        }
        warnings
    }
}
