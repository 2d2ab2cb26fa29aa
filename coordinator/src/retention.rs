//! Which snapshots a `prune` keeps: `--keep-last`, `--keep-daily`, `--keep-weekly`,
//! `--keep-monthly`, as restic defines them.
//!
//! Invariants:
//! - Pure: decides from ids and times only; deleting is the caller's job.
//! - A snapshot is kept if any rule keeps it. `keep-daily N` keeps the newest snapshot of each of the
//!   N most recent days that have a snapshot (weeks are ISO weeks, all in UTC).
//! - A policy that keeps nothing is refused, so a typo never empties a repository.

use std::collections::BTreeSet;

use time::OffsetDateTime;

/// How many snapshots each rule keeps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Policy {
    pub last: usize,
    pub daily: usize,
    pub weekly: usize,
    pub monthly: usize,
}

impl Policy {
    pub fn is_empty(&self) -> bool {
        self.last == 0 && self.daily == 0 && self.weekly == 0 && self.monthly == 0
    }
}

/// A snapshot as retention sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub id: String,
    pub time: OffsetDateTime,
}

/// The decision for one snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub id: String,
    pub keep: bool,
    /// The rules that keep it (`last`, `daily`, ...); empty when it goes.
    pub reasons: Vec<&'static str>,
}

#[derive(Debug, thiserror::Error)]
#[error(
    "the prune policy keeps no snapshot; give at least one of --keep-last, --keep-daily, \
     --keep-weekly, --keep-monthly"
)]
pub struct EmptyPolicy;

/// Maps a time to the calendar period a rule counts in.
type Period = fn(OffsetDateTime) -> (i32, u32);

/// Applies `policy` to `snapshots`; the result is newest first.
pub fn apply(policy: Policy, snapshots: &[Candidate]) -> Result<Vec<Decision>, EmptyPolicy> {
    if policy.is_empty() {
        return Err(EmptyPolicy);
    }
    let mut sorted: Vec<&Candidate> = snapshots.iter().collect();
    sorted.sort_by(|a, b| b.time.cmp(&a.time).then_with(|| b.id.cmp(&a.id)));

    let rules: [(&'static str, usize, Period); 3] = [
        ("daily", policy.daily, |t| {
            (t.year(), u32::from(t.ordinal()))
        }),
        ("weekly", policy.weekly, |t| {
            let (y, w, _) = t.to_iso_week_date();
            (y, u32::from(w))
        }),
        ("monthly", policy.monthly, |t| {
            (t.year(), u32::from(u8::from(t.month())))
        }),
    ];
    let mut seen: Vec<BTreeSet<(i32, u32)>> = vec![BTreeSet::new(); rules.len()];

    Ok(sorted
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let t = s.time.to_offset(time::UtcOffset::UTC);
            let mut reasons = Vec::new();
            if i < policy.last {
                reasons.push("last");
            }
            for (r, (name, n, period)) in rules.iter().enumerate() {
                let p = period(t);
                if seen[r].len() < *n && seen[r].insert(p) {
                    reasons.push(*name);
                }
            }
            Decision {
                id: s.id.clone(),
                keep: !reasons.is_empty(),
                reasons,
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn snaps(times: &[OffsetDateTime]) -> Vec<Candidate> {
        times
            .iter()
            .enumerate()
            .map(|(i, t)| Candidate {
                id: format!("s{i}"),
                time: *t,
            })
            .collect()
    }

    fn kept(policy: Policy, s: &[Candidate]) -> Vec<String> {
        let mut k: Vec<String> = apply(policy, s)
            .unwrap()
            .into_iter()
            .filter(|d| d.keep)
            .map(|d| d.id)
            .collect();
        k.sort();
        k
    }

    #[test]
    fn keep_last_keeps_the_newest() {
        let s = snaps(&[
            datetime!(2026-01-01 10:00 UTC),
            datetime!(2026-01-03 10:00 UTC),
            datetime!(2026-01-02 10:00 UTC),
        ]);
        let p = Policy {
            last: 2,
            ..Policy::default()
        };
        assert_eq!(kept(p, &s), ["s1", "s2"]);
    }

    #[test]
    fn daily_keeps_the_newest_of_each_day() {
        let s = snaps(&[
            datetime!(2026-01-01 08:00 UTC),
            datetime!(2026-01-01 20:00 UTC),
            datetime!(2026-01-02 08:00 UTC),
            datetime!(2026-01-02 09:00 UTC),
            datetime!(2026-01-05 09:00 UTC),
        ]);
        let p = Policy {
            daily: 2,
            ..Policy::default()
        };
        assert_eq!(kept(p, &s), ["s3", "s4"]);
        let p = Policy {
            daily: 3,
            ..Policy::default()
        };
        assert_eq!(kept(p, &s), ["s1", "s3", "s4"]);
    }

    #[test]
    fn weekly_and_monthly_combine_with_last() {
        let s = snaps(&[
            datetime!(2026-01-05 08:00 UTC), // ISO week 2
            datetime!(2026-01-07 08:00 UTC), // week 2
            datetime!(2026-01-12 08:00 UTC), // week 3
            datetime!(2026-02-02 08:00 UTC), // week 6, February
            datetime!(2026-02-03 08:00 UTC), // week 6
        ]);
        let p = Policy {
            last: 1,
            weekly: 2,
            monthly: 2,
            ..Policy::default()
        };
        // last: s4; weekly: s4 (w6), s2 (w3); monthly: s4 (Feb), s2 (Jan).
        assert_eq!(kept(p, &s), ["s2", "s4"]);
        let d = apply(p, &s).unwrap();
        assert_eq!(d[0].reasons, ["last", "weekly", "monthly"]);
    }

    #[test]
    fn an_empty_policy_is_refused() {
        assert!(apply(Policy::default(), &[]).is_err());
    }
}
