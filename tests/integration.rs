//! End-to-end tests of deis-backup against the local Deis-like cluster (`tests/cluster/up`): real
//! etcd (v2 API), real Ceph radosgw, a real `deis-database` container and a live store directory.
//!
//! One test binary; each concern is a module under `tests/integration/`, sharing `support`.

// An end-to-end test reads as one scenario, start to finish; the 80-line limit is for product code.
#![allow(clippy::too_many_lines)]

mod integration {
    pub mod support;

    mod agent;
    mod agent_bounds;
    mod drill;
    mod encryption;
    mod faults;
    mod gateway;
    mod hosts;
    mod integrity;
    mod mirror;
    mod repository;
    mod smoke;
    mod snapshot;
    mod wal_e;
}
