//! Plain `cargo test` (no `e2e` feature) runs every crate's own tests, the fast layer, and leaves
//! the end-to-end tests out: they need the local cluster. This target says so in the test output,
//! and fails when run on purpose (`--include-ignored`) without the feature.

#[cfg(not(feature = "e2e"))]
#[test]
#[ignore = "the end-to-end tests are left out: they need the local cluster (tests/cluster/up); \
            run scripts/test, or cargo build --workspace --bins && \
            cargo test --features deis-backup-proto/e2e"]
fn end_to_end_tests_need_the_e2e_feature() {
    panic!(
        "built without the e2e feature: run scripts/test, or \
         cargo test --features deis-backup-proto/e2e"
    );
}
