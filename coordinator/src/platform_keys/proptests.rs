//! Property tests of the export importer (a short smoke of what `fuzz/` runs at length): a
//! dry-run import never fails whatever the export holds, refuses exactly the excluded keys, and
//! never "writes" a key that is unsafe to address or outside the platform's tree.

use proptest::prelude::*;

use super::*;

/// True when `key` has an empty, `.` or `..` segment, or a `?`, `#` or `%`.
fn unsafe_key(key: &str) -> bool {
    let Some(rest) = key.strip_prefix('/') else {
        return true;
    };
    !rest.is_empty()
        && (rest
            .split('/')
            .any(|s| s.is_empty() || s == "." || s == "..")
            || key.contains(['?', '#', '%']))
}

fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(
            &["deis", "store", "gateway", "hosts", "services", "backup", "database", "initId",
              "registry", "masterLock", "platform", "domain", "router", "coreos.com"][..]
        )
        .prop_map(str::to_owned),
        2 => prop::sample::select(&["", ".", "..", "%2e%2e", "a?b", "a#b", "%", "a b", "é"][..])
            .prop_map(str::to_owned),
        1 => ".{0,6}",
    ]
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => prop::collection::vec(segment(), 0..5).prop_map(|s| format!("/{}", s.join("/"))),
        1 => ".{0,20}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn dry_run_import_never_fails_nor_writes_an_excluded_key(
        keys in prop::collection::vec((key(), ".{0,4}"), 0..8),
    ) {
        // Nothing listens there: a request would fail the import.
        let nowhere = Client::from_list("http://127.0.0.1:9").unwrap();
        let export = Export {
            format: FORMAT,
            root: ROOT.into(),
            keys: keys.iter().map(|(k, v)| Entry { key: k.clone(), value: v.clone() }).collect(),
            excluded: vec![],
        };
        let report = futures::executor::block_on(import(&nowhere, &export, true)).unwrap();
        let (mut w, mut r) = (report.written.iter(), report.refused.iter());
        for (k, _) in &keys {
            if is_excluded(k) {
                prop_assert_eq!(r.next(), Some(k));
            } else {
                prop_assert!(!unsafe_key(k), "{k:?} written");
                prop_assert!(k == "/deis" || k.starts_with("/deis/"), "{k:?} written");
                prop_assert!(deis_backup_etcd::key_path(k).is_ok());
                prop_assert_eq!(w.next(), Some(k));
            }
        }
        prop_assert!(w.next().is_none() && r.next().is_none());
    }

    #[test]
    fn unsafe_keys_are_always_excluded(k in key()) {
        if unsafe_key(&k) {
            prop_assert!(is_excluded(&k), "{k:?}");
        }
    }
}
