//! Property tests of `key_path` (a short smoke of what `fuzz/` runs at length): no key with an
//! empty, `.` or `..` segment, nor a `?`, `#` or `%`, ever becomes a request path; a path given
//! percent-decodes back to the key and joins onto an endpoint unchanged.

use proptest::prelude::*;

use super::*;

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

fn key() -> impl Strategy<Value = String> {
    let seg = prop_oneof![
        4 => "[a-zA-Z0-9._~-]{1,6}",
        2 => prop::sample::select(&["", ".", "..", "...", "%2e%2e", "%2E", "a?b", "#", "a%b", "a b+c", "é/", "\\..", ";", "@:"][..])
            .prop_map(str::to_owned),
        2 => ".{0,6}",
    ];
    prop_oneof![
        8 => prop::collection::vec(seg, 0..5).prop_map(|s| format!("/{}", s.join("/"))),
        1 => ".{0,20}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn key_paths_are_safe_and_decode_back(k in key()) {
        match key_path(&k) {
            Ok(p) => {
                prop_assert!(!unsafe_key(&k), "{k:?} gave {p:?}");
                let decoded = percent_encoding::percent_decode_str(&p).decode_utf8().unwrap();
                prop_assert_eq!(format!("/{decoded}"), k.clone());
                prop_assert!(!p.split('/').any(|s| s == ".." || s == "."), "{p:?}");
                let base = Url::parse("http://127.0.0.1:4001/").unwrap();
                let u = base.join(&format!("v2/keys/{p}")).unwrap();
                prop_assert_eq!(u.path(), format!("/v2/keys/{p}"));
                prop_assert!(u.query().is_none() && u.fragment().is_none(), "{u}");
            }
            Err(e) => prop_assert!(matches!(e, Error::BadKey { .. }), "{e}"),
        }
    }
}
