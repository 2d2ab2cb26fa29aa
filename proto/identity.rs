//! How the coordinator and the agents know each other over TLS: the names their certificates carry.
//!
//! Both sides trust one cluster CA (`deis-backup pki init`). An agent's certificate names its host
//! id as the DNS name [`agent_name`] and is for server authentication only; the coordinator's names
//! [`COORDINATOR_NAME`] and is for client authentication only. So a registration in etcd cannot
//! make the coordinator talk to anyone but the host it names, and an agent's key cannot call
//! another agent.
//!
//! Both sides also refuse a key or token file that group or others can read ([`check_private`]).
//!
//! Invariants: a host id that is not one DNS label (letters, digits, `-`; 1 to 63 characters) has
//! no certificate name, and is refused wherever TLS is on.

/// DNS name in the coordinator's client certificate.
pub const COORDINATOR_NAME: &str = "coordinator.deis-backup";

/// Domain under which every agent's name lives.
pub const AGENT_DOMAIN: &str = "agent.deis-backup";

/// Default directory of the CA, certificates and keys on a host.
pub const DEFAULT_PKI_DIR: &str = "/etc/deis-backup/pki";

/// The DNS name in the certificate of the agent with this host id, or `None` when the id is not a
/// valid DNS label.
pub fn agent_name(host_id: &str) -> Option<String> {
    valid_host_id(host_id).then(|| format!("{host_id}.{AGENT_DOMAIN}"))
}

/// Whether `host_id` can be named in a certificate: one DNS label of letters, digits and `-`, not
/// starting or ending with `-`. Machine ids (32 hex digits) are.
pub fn valid_host_id(host_id: &str) -> bool {
    (1..=63).contains(&host_id.len())
        && host_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !host_id.starts_with('-')
        && !host_id.ends_with('-')
}

/// Refuses a secret file (key, token) that group or others may read or write, or that a user
/// other than this process's or root owns. The error is one line naming the file and the fix.
pub fn check_private(path: &std::path::Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if md.mode() & 0o077 != 0 {
        return Err(format!(
            "{} has mode {:o}, open beyond its owner; run `chmod 600 {}`",
            path.display(),
            md.mode() & 0o7777,
            path.display()
        ));
    }
    let me = rustix::process::geteuid().as_raw();
    if md.uid() != me && md.uid() != 0 {
        return Err(format!(
            "{} belongs to uid {}, neither this user ({me}) nor root; chown it",
            path.display(),
            md.uid()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_dns_labels_name_an_agent() {
        assert_eq!(
            agent_name("0123456789abcdef0123456789abcdef").as_deref(),
            Some("0123456789abcdef0123456789abcdef.agent.deis-backup")
        );
        for bad in ["", "-a", "a-", "a.b", "a_b", "a/b", &"x".repeat(64)] {
            assert_eq!(agent_name(bad), None, "{bad:?}");
        }
    }
}
