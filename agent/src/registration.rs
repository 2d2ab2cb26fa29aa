//! Registration of this agent in etcd (v2): `/deis/backup/agents/<host id>` holds the JSON record
//! of `deis_backup_proto::registration`, with a TTL, refreshed while the agent runs.
//!
//! Invariants:
//! - The record is written every `REFRESH_SECS` with a `TTL_SECS` TTL, so a dead agent disappears
//!   within the TTL and a live one stays listed.
//! - etcd being away does not stop the agent: a failed refresh is logged and retried on the next
//!   tick; serving never waits for etcd.
//! - On clean shutdown the key is removed, but only while it still holds our record (another agent
//!   may have taken the host id since).

use std::time::Duration;

use deis_backup_etcd::Client;
use deis_backup_proto::registration::{REFRESH_SECS, Registration, TTL_SECS, key};
use tokio::sync::watch;

/// Keeps the registration fresh until `stop` turns true, then removes it.
pub async fn run(
    etcd: Client,
    host_id: String,
    record: Registration,
    mut stop: watch::Receiver<bool>,
) {
    let key = key(&host_id);
    let value = serde_json::to_string(&record).expect("a registration serializes");
    let mut tick = tokio::time::interval(Duration::from_secs(REFRESH_SECS));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut registered = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                match etcd.set(&key, &value, Some(Duration::from_secs(TTL_SECS))).await {
                    Ok(_) => {
                        if !registered {
                            tracing::info!(%key, address = %record.address, "registered in etcd");
                        }
                        registered = true;
                    }
                    Err(e) => {
                        tracing::warn!(%key, error = %e, "cannot refresh the registration; serving on, retrying in {REFRESH_SECS}s");
                        registered = false;
                    }
                }
            }
            r = stop.changed() => {
                if r.is_err() || *stop.borrow() {
                    break;
                }
            }
        }
    }
    match etcd.delete(&key, Some(&value)).await {
        Ok(_) => tracing::info!(%key, "registration removed"),
        Err(e) => {
            tracing::warn!(%key, error = %e, "cannot remove the registration; it expires within {TTL_SECS}s");
        }
    }
}
