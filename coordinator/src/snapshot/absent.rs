//! The policy for hosts that do not take part in a snapshot: an agent that did not answer (its
//! host is down, or cut off from the coordinator), or a host the previous snapshot had that no
//! longer registers in etcd (stopped, or down for longer than the registration's TTL). Operators
//! read it in the README, "A host down".
//!
//! Invariants:
//! - What a host holds is known from the previous complete snapshot only: the database dump it
//!   took, the host-local store directories it archived, and the shared filesystem it saw
//!   (archived by it, or recorded in `also-on`). Nothing is assumed about a host no earlier
//!   snapshot had.
//! - The previous snapshot's hosts are expected only when it shares a host with the cluster now
//!   (registered or answering): one with none of them is of another set of hosts (a cluster
//!   restored onto new machines, or another cluster sharing the repository), whose hosts this one
//!   never had.
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

use super::{Cluster, DATABASE_PART, STORE_PREFIX};
use crate::agents::Unanswered;
use crate::error::{Error, ErrorKind, Result};
use crate::repository::Manifest;

/// Manifest label listing the hosts whose agents took part (comma-separated, sorted).
pub const HOSTS_LABEL: &str = "cluster.hosts";
/// Manifest label listing the hosts that did not take part and were covered for (so the next
/// snapshot still expects them until they come back or are forgotten).
pub const ABSENT_LABEL: &str = "cluster.hosts-absent";

/// A host expected in the snapshot that is not taking part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Absent {
    pub host: String,
    /// Why, in one line (the agent's silence, or its registration gone).
    pub reason: String,
}

/// The hosts that will not take part in a snapshot of `cluster`.
pub fn absent_hosts(cluster: &Cluster, previous: Option<&Manifest>) -> Vec<Absent> {
    let answering: Vec<&str> = cluster
        .agents
        .iter()
        .map(|d| d.agent.host_id.as_str())
        .collect();
    absent_among(&answering, &cluster.unanswered, previous)
}

/// Agents that did not answer, and hosts of `previous` neither answering nor registered (when
/// `previous` shares a host with them at all).
fn absent_among(
    answering: &[&str],
    unanswered: &[Unanswered],
    previous: Option<&Manifest>,
) -> Vec<Absent> {
    let mut absent: Vec<Absent> = unanswered
        .iter()
        .map(|u| Absent {
            host: u.host.clone(),
            reason: u.reason.clone(),
        })
        .collect();
    let known: BTreeSet<&str> = answering
        .iter()
        .copied()
        .chain(unanswered.iter().map(|u| u.host.as_str()))
        .collect();
    let before = previous.map(previous_hosts).unwrap_or_default();
    if !before.iter().any(|h| known.contains(h.as_str())) {
        return absent;
    }
    for host in before {
        if !known.contains(host.as_str()) {
            absent.push(Absent {
                reason: format!(
                    "no agent registered for it, stopped or down for longer than a \
                     registration lasts; snapshot {} expected it",
                    previous.map(|m| m.id.to_string()).unwrap_or_default()
                ),
                host,
            });
        }
    }
    absent
}

/// The hosts `m` took part from, and those it expected but went on without.
fn previous_hosts(m: &Manifest) -> Vec<String> {
    [HOSTS_LABEL, ABSENT_LABEL]
        .iter()
        .filter_map(|l| m.labels.get(*l))
        .flat_map(|h| h.split(','))
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// What the policy decided: warnings for the manifest, and the absent hosts still expected.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Decision {
    pub warnings: Vec<String>,
    pub still_expected: Vec<String>,
}

/// What the cluster answering now provides: the host running the database (when the snapshot
/// takes one) and the shared store paths planned, with the host archiving each.
#[derive(Debug, Clone, Copy)]
pub struct Answering<'a> {
    pub database: Option<&'a str>,
    pub database_wanted: bool,
    pub shared_stores: &'a [(&'a str, &'a str)],
}

/// Applies the policy: what to record when the snapshot can go on without the absent hosts, or
/// the error naming the first host it cannot do without.
pub fn check(
    absent: &[Absent],
    previous: Option<&Manifest>,
    answering: Answering<'_>,
    forget: &[String],
) -> Result<Decision> {
    let mut decision = Decision::default();
    for a in absent {
        if forget.contains(&a.host) {
            decision.warnings.push(format!(
                "host {} did not take part ({}); it was forgotten (--forget-host): anything \
                 only it held is not in this snapshot",
                a.host, a.reason
            ));
            continue;
        }
        let covered = covered_for(&a.host, previous, answering).map_err(|held| {
            Error::new(
                ErrorKind::AgentUnreachable,
                format!(
                    "host {} is not taking part ({}), and {held}; nothing was written",
                    a.host, a.reason
                ),
                format!(
                    "bring the host or its agent back; if it left the cluster for good, snapshot \
                     with --forget-host {}",
                    a.host
                ),
            )
        })?;
        decision.still_expected.push(a.host.clone());
        decision.warnings.push(format!(
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
    Ok(decision)
}

/// Who covers for each thing `host` held in `previous`, or what it held that no one can provide.
fn covered_for(
    host: &str,
    previous: Option<&Manifest>,
    answering: Answering<'_>,
) -> std::result::Result<Vec<String>, String> {
    let Some(prev) = previous.filter(|m| previous_hosts(m).iter().any(|h| h == host)) else {
        return Err(
            "no earlier snapshot says what it holds (it never took part in one)".to_owned(),
        );
    };
    let mut covered = Vec::new();
    if let Some(info) = prev.part_info.get(DATABASE_PART)
        && info.host.as_deref() == Some(host)
        && answering.database_wanted
    {
        match answering.database {
            Some(db) => covered.push(format!("the database dump is taken on {db}")),
            None => {
                return Err(
                    "it held the database (it dumped it last time), which no answering agent runs"
                        .to_owned(),
                );
            }
        }
    }
    for (name, info) in &prev.part_info {
        if !name.starts_with(STORE_PREFIX) {
            continue;
        }
        let path = info.path.as_deref().unwrap_or("?");
        let there = info.host.as_deref() == Some(host);
        if info.shared == Some(true) {
            if !there && !info.also_on.iter().any(|h| h == host) {
                continue;
            }
            match answering.shared_stores.iter().find(|(p, _)| *p == path) {
                Some((_, by)) => covered.push(format!(
                    "its store {path} is the shared filesystem, archived through {by}"
                )),
                None => {
                    return Err(format!(
                        "it held the shared store {path}, which no answering agent sees"
                    ));
                }
            }
        } else if there {
            return Err(format!(
                "it held the host-local store directory {path}, which no other host has"
            ));
        }
    }
    Ok(covered)
}

#[cfg(test)]
mod tests {
    use super::*;

    const STORE: &str = "/var/lib/deis/store";

    /// A previous snapshot of hosts a (database, shared store, also seen by b) and c (a host-local
    /// store).
    fn previous() -> Manifest {
        serde_json::from_value(serde_json::json!({
            "format": "deis-backup/1",
            "id": "20261207T110000.000Z-abcd",
            "started": "2026-12-07T11:00:00Z",
            "completed": "2026-12-07T11:01:00Z",
            "labels": {HOSTS_LABEL: "a,b,c"},
            "part-info": {
                DATABASE_PART: {"source": "agent a", "duration-ms": 1, "host": "a"},
                "store/shared/var-lib-deis-store.tar.zst": {
                    "source": "agent a", "duration-ms": 1, "host": "a", "path": STORE,
                    "shared": true, "also-on": ["b"]
                },
                "store/c/srv-local.tar.zst": {
                    "source": "agent c", "duration-ms": 1, "host": "c", "path": "/srv/local",
                    "shared": false
                }
            }
        }))
        .unwrap()
    }

    fn decide(
        absent: &[Absent],
        previous: Option<&Manifest>,
        database: Option<&str>,
        database_wanted: bool,
        shared_stores: &[(&str, &str)],
        forget: &[String],
    ) -> Result<Decision> {
        let answering = Answering {
            database,
            database_wanted,
            shared_stores,
        };
        check(absent, previous, answering, forget)
    }

    fn gone(host: &str) -> Vec<Absent> {
        vec![Absent {
            host: host.to_owned(),
            reason: "did not answer".to_owned(),
        }]
    }

    #[test]
    fn a_host_that_only_saw_the_shared_store_is_covered_with_a_warning() {
        let d = decide(
            &gone("b"),
            Some(&previous()),
            Some("a"),
            true,
            &[(STORE, "a")],
            &[],
        )
        .unwrap();
        assert_eq!(d.still_expected, ["b"]);
        assert_eq!(d.warnings.len(), 1);
        assert!(
            d.warnings[0].contains("host b did not take part (did not answer)")
                && d.warnings[0].contains("archived through a"),
            "{d:?}"
        );
        // The archiving host itself is covered when another host sees the filesystem and the
        // database runs elsewhere now.
        let d = decide(
            &gone("a"),
            Some(&previous()),
            Some("b"),
            true,
            &[(STORE, "b")],
            &[],
        )
        .unwrap();
        assert!(
            d.warnings[0].contains("the database dump is taken on b"),
            "{d:?}"
        );
    }

    #[test]
    fn a_host_that_held_what_no_one_else_has_fails_the_snapshot_by_name() {
        let prev = previous();
        let e = decide(
            &gone("c"),
            Some(&prev),
            Some("a"),
            true,
            &[(STORE, "a")],
            &[],
        )
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::AgentUnreachable);
        assert!(
            e.message().contains("host c") && e.message().contains("/srv/local"),
            "{e}"
        );
        let e = decide(&gone("a"), Some(&prev), None, true, &[(STORE, "b")], &[]).unwrap_err();
        assert!(e.message().contains("held the database"), "{e}");
        // Without the database wanted, the database host only held the shared store.
        assert!(decide(&gone("a"), Some(&prev), None, false, &[(STORE, "b")], &[]).is_ok());
        let e = decide(&gone("a"), Some(&prev), None, false, &[], &[]).unwrap_err();
        assert!(e.message().contains("no answering agent sees"), "{e}");
        // A host no earlier snapshot had: nothing is known of it.
        for prev in [None, Some(&prev)] {
            let e = decide(&gone("new"), prev, Some("a"), true, &[(STORE, "a")], &[]).unwrap_err();
            assert!(e.message().contains("never took part"), "{e}");
        }
    }

    #[test]
    fn a_forgotten_host_is_a_warning_and_expected_no_more() {
        let d = decide(
            &gone("c"),
            Some(&previous()),
            Some("a"),
            true,
            &[(STORE, "a")],
            &["c".to_owned()],
        )
        .unwrap();
        assert!(d.still_expected.is_empty());
        assert!(d.warnings[0].contains("--forget-host"), "{d:?}");
    }

    #[test]
    fn the_previous_hosts_are_expected_only_when_one_of_them_is_still_here() {
        let silent = [Unanswered {
            host: "x".to_owned(),
            address: "10.0.0.9:4195".to_owned(),
            reason: "did not answer".to_owned(),
        }];
        let hosts = |v: Vec<Absent>| v.into_iter().map(|a| a.host).collect::<Vec<_>>();
        // a and b answer, x is silent: c (of the previous snapshot) is expected too.
        assert_eq!(
            hosts(absent_among(&["a", "b"], &silent, Some(&previous()))),
            ["x", "c"]
        );
        // New machines (a restored cluster, another cluster on the repository): none expected.
        assert_eq!(
            hosts(absent_among(&["n1", "n2"], &[], Some(&previous()))),
            Vec::<String>::new()
        );
        assert_eq!(hosts(absent_among(&["a"], &[], None)), Vec::<String>::new());
    }

    #[test]
    fn hosts_the_previous_snapshot_expected_are_read_from_both_labels() {
        let mut m = previous();
        m.labels.insert(ABSENT_LABEL.to_owned(), "d".to_owned());
        assert_eq!(previous_hosts(&m), ["a", "b", "c", "d"]);
    }
}
