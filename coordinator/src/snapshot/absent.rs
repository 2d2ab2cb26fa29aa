//! The policy for hosts that do not take part in a snapshot: an agent that did not answer (its
//! host is down, or cut off from the coordinator), or a host the previous snapshot had that no
//! longer registers in etcd (stopped, or down for longer than the registration's TTL). Operators
//! read it in docs/OPERATIONS.md, "A host down".
//!
//! Invariants:
//! - What a host holds is known from the previous complete snapshot only: the database dump it
//!   took, the host-local store directories it archived, and the shared filesystem it saw
//!   (archived by it, or recorded in `also-on`). Nothing is assumed about a host no earlier
//!   snapshot had.
//! - A snapshot goes on without a host only when everything that host held comes from another one:
//!   the database from the answering agent whose host runs it now, a shared filesystem from an
//!   answering agent that sees the same filesystem at the same path. The manifest then carries a
//!   warning naming the host and who covered for it.
//! - Otherwise the snapshot fails before anything is written, naming the host and what it held: a
//!   host-local directory (no other host has it), the database when no answering agent runs it,
//!   or anything at all when no earlier snapshot says what the host holds.
//! - A host named with `--forget-host` has left the cluster for good: its absence is a warning,
//!   whatever it held.

use std::collections::BTreeSet;

use super::{AgentRef, Cluster, DATABASE_PART, STORE_PREFIX, StoreTask};
use crate::error::{Error, ErrorKind, Result};
use crate::repository::Manifest;

/// Manifest label listing the hosts whose agents took part (comma-separated, sorted).
pub const HOSTS_LABEL: &str = "cluster.hosts";

/// A host expected in the snapshot that is not taking part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Absent {
    pub host: String,
    /// Why, in one line (the agent's silence, or its registration gone).
    pub reason: String,
}

/// The hosts that will not take part: agents that did not answer, and hosts of `previous` that
/// are neither answering nor registered.
pub fn absent_hosts(cluster: &Cluster, previous: Option<&Manifest>) -> Vec<Absent> {
    let mut absent: Vec<Absent> = cluster
        .unanswered
        .iter()
        .map(|u| Absent {
            host: u.host.clone(),
            reason: u.reason.clone(),
        })
        .collect();
    let known: BTreeSet<&str> = cluster
        .agents
        .iter()
        .map(|d| d.agent.host_id.as_str())
        .chain(cluster.unanswered.iter().map(|u| u.host.as_str()))
        .collect();
    for host in previous.map(previous_hosts).unwrap_or_default() {
        if !known.contains(host.as_str()) {
            absent.push(Absent {
                reason: format!(
                    "{host} took part in snapshot {} but no agent of it is registered now \
                     (stopped, or down for longer than its registration lasts)",
                    previous.map(|m| m.id.to_string()).unwrap_or_default()
                ),
                host,
            });
        }
    }
    absent
}

fn previous_hosts(m: &Manifest) -> Vec<String> {
    m.labels
        .get(HOSTS_LABEL)
        .map(|h| {
            h.split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// Applies the policy: the warnings to record when the snapshot can go on without the absent
/// hosts, or the error naming the first host it cannot do without. `database` is the answering
/// agent that runs the database (when the snapshot takes one), `stores` the archives planned.
pub fn check(
    absent: &[Absent],
    previous: Option<&Manifest>,
    database: Option<&AgentRef>,
    database_wanted: bool,
    stores: &[StoreTask],
    forget: &[String],
) -> Result<Vec<String>> {
    let mut warnings = Vec::new();
    for a in absent {
        if forget.contains(&a.host) {
            warnings.push(format!(
                "host {} did not take part ({}); it was forgotten (--forget-host): anything \
                 only it held is not in this snapshot",
                a.host, a.reason
            ));
            continue;
        }
        let fail = |held: String| {
            Error::new(
                ErrorKind::AgentUnreachable,
                format!(
                    "host {} is not taking part ({}), and it held {held}, which no other agent \
                     provides; nothing was written",
                    a.host, a.reason
                ),
                format!(
                    "bring the host or its agent back; if it left the cluster for good, snapshot \
                     with --forget-host {}",
                    a.host
                ),
            )
        };
        let Some(prev) = previous.filter(|m| previous_hosts(m).contains(&a.host)) else {
            return Err(fail(
                "what no earlier snapshot records (it never took part in one)".to_owned(),
            ));
        };
        let mut covered = Vec::new();
        if let Some(info) = prev.part_info.get(DATABASE_PART)
            && info.host.as_deref() == Some(a.host.as_str())
            && database_wanted
        {
            match database {
                Some(db) => covered.push(format!("the database dump is taken on {}", db.host)),
                None => return Err(fail("the database (it dumped it last time)".to_owned())),
            }
        }
        for (name, info) in &prev.part_info {
            if !name.starts_with(STORE_PREFIX) {
                continue;
            }
            let path = info.path.as_deref().unwrap_or("?");
            let there = info.host.as_deref() == Some(a.host.as_str());
            if info.shared == Some(true) {
                if !there && !info.also_on.contains(&a.host) {
                    continue;
                }
                match stores.iter().find(|t| t.shared && t.path == path) {
                    Some(t) => covered.push(format!(
                        "its store {path} is the shared filesystem, archived through {}",
                        t.agent.host
                    )),
                    None => {
                        return Err(fail(format!(
                            "the shared store {path}, which no answering agent sees"
                        )));
                    }
                }
            } else if there {
                return Err(fail(format!("the host-local store directory {path}")));
            }
        }
        warnings.push(format!(
            "host {} did not take part ({}); {}",
            a.host,
            a.reason,
            if covered.is_empty() {
                "the last snapshot took nothing from it".to_owned()
            } else {
                covered.join("; ")
            }
        ));
    }
    Ok(warnings)
}
