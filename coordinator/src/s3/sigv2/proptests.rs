//! Property tests of the V2 string to sign (a short smoke of what `fuzz/` runs at length): never a
//! panic, the same string every time, sub-resources sorted, and equal to a plain reference model
//! of the AWS guide for queries that need no decoding.

use std::fmt::Write as _;

use proptest::prelude::*;

use super::*;

/// The AWS guide's string to sign, written out plainly, for queries without `%`.
fn reference(method: &str, pq: &str, headers: &[(String, String)]) -> String {
    let (path, query) = match pq.find('?') {
        Some(i) => (&pq[..i], &pq[i + 1..]),
        None => (pq, ""),
    };
    let last = |want: &str| {
        headers
            .iter()
            .rev()
            .find(|(n, _)| n.eq_ignore_ascii_case(want))
            .map_or(String::new(), |(_, v)| v.trim().to_owned())
    };
    let mut amz: Vec<(String, Vec<String>)> = Vec::new();
    for (n, v) in headers {
        let n = n.to_ascii_lowercase();
        if n.starts_with("x-amz-") {
            match amz.iter_mut().find(|(k, _)| *k == n) {
                Some((_, vs)) => vs.push(v.trim().to_owned()),
                None => amz.push((n, vec![v.trim().to_owned()])),
            }
        }
    }
    amz.sort();
    let date = if amz.iter().any(|(n, _)| n == "x-amz-date") {
        String::new()
    } else {
        last("date")
    };
    let mut s = format!(
        "{method}\n{}\n{}\n{date}\n",
        last("content-md5"),
        last("content-type")
    );
    for (n, vs) in &amz {
        s.push_str(n);
        s.push(':');
        s.push_str(&vs.join(","));
        s.push('\n');
    }
    let mut subs: Vec<(&str, Option<&str>)> = query
        .split('&')
        .filter_map(|p| {
            let (k, v) = match p.find('=') {
                Some(i) => (&p[..i], Some(&p[i + 1..])),
                None => (p, None),
            };
            SUB_RESOURCES.contains(&k).then_some((k, v))
        })
        .collect();
    subs.sort_unstable();
    s.push_str(if path.is_empty() { "/" } else { path });
    for (i, (k, v)) in subs.iter().enumerate() {
        s.push_str(if i == 0 { "?" } else { "&" });
        s.push_str(k);
        if let Some(v) = v {
            s.push('=');
            s.push_str(v);
        }
    }
    s
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(SUB_RESOURCES).prop_map(str::to_owned),
        Just("x-id".to_owned()),
        Just("prefix".to_owned()),
        Just("ACL".to_owned()),
        "[a-zA-Z-]{0,8}",
    ]
}

fn header() -> impl Strategy<Value = (String, String)> {
    (
        prop_oneof![
            Just("Date".to_owned()),
            Just("content-md5".to_owned()),
            Just("Content-Type".to_owned()),
            Just("x-amz-date".to_owned()),
            Just("X-Amz-Meta-A".to_owned()),
            Just("x-amz-meta-a".to_owned()),
            "x-amz-[a-z]{1,4}",
            "[A-Za-z-]{1,10}",
        ],
        "[ a-zA-Z0-9,:=]{0,10}",
    )
}

/// A path and a query of sub-resources and other parameters, no `%`.
fn plain_request() -> impl Strategy<Value = String> {
    (
        "(/[a-z0-9._ ~-]{0,6}){0,3}",
        prop::collection::vec((key(), proptest::option::of("[a-zA-Z0-9=~._-]{0,6}")), 0..6),
        any::<bool>(),
    )
        .prop_map(|(path, params, question)| {
            let q: Vec<String> = params
                .into_iter()
                .map(|(k, v)| v.map_or(k.clone(), |v| format!("{k}={v}")))
                .collect();
            if q.is_empty() && !question {
                path
            } else {
                format!("{path}?{}", q.join("&"))
            }
        })
}

/// The sub-resource names of a canonical resource whose values hold no `&`.
fn resource_keys(resource: &str) -> Vec<String> {
    resource
        .split_once('?')
        .map(|(_, q)| {
            q.split('&')
                .map(|p| p.split('=').next().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn any_input_signs_without_panic_and_deterministically(
        method in ".{0,8}",
        pq in ".{0,40}",
        headers in prop::collection::vec((".{0,10}", ".{0,10}"), 0..5),
    ) {
        let h = || headers.iter().map(|(n, v)| (n.as_str(), v.as_str()));
        let a = string_to_sign(&method, &pq, h());
        prop_assert_eq!(&a, &string_to_sign(&method, &pq, h()));
        let upper: Vec<(String, String)> =
            headers.iter().map(|(n, v)| (n.to_ascii_uppercase(), v.clone())).collect();
        prop_assert_eq!(&a, &string_to_sign(&method, &pq, upper.iter().map(|(n, v)| (n.as_str(), v.as_str()))));
        let prefix = format!("{method}\n");
        prop_assert!(a.starts_with(&prefix));
        let _ = signature("k", &a);
    }

    #[test]
    fn plain_requests_match_the_reference_model(
        method in prop::sample::select(&["GET", "PUT", "HEAD", "DELETE", "POST"][..]),
        pq in plain_request(),
        headers in prop::collection::vec(header(), 0..6),
    ) {
        let sts = string_to_sign(method, &pq, headers.iter().map(|(n, v)| (n.as_str(), v.as_str())));
        prop_assert_eq!(&sts, &reference(method, &pq, &headers));
        let keys = resource_keys(sts.rsplit('\n').next().unwrap());
        prop_assert!(keys.windows(2).all(|w| w[0] <= w[1]), "{sts}");
        prop_assert!(keys.iter().all(|k| SUB_RESOURCES.contains(&k.as_str())), "{sts}");
    }

    #[test]
    fn encoded_sub_resource_names_are_decoded_and_sorted(
        params in prop::collection::vec((key(), any::<bool>(), "[a-z0-9]{0,4}"), 0..6),
    ) {
        // Each name percent-encoded whole or not at all; values plain.
        let q: Vec<String> = params
            .iter()
            .map(|(k, enc, v)| {
                let k = if *enc {
                    k.bytes().fold(String::new(), |mut e, b| {
                        write!(e, "%{b:02X}").unwrap();
                        e
                    })
                } else {
                    k.clone()
                };
                format!("{k}={v}")
            })
            .collect();
        let r = canonical_resource(&format!("/b/k?{}", q.join("&")));
        let keys = resource_keys(&r);
        prop_assert!(keys.windows(2).all(|w| w[0] <= w[1]), "{r}");
        let mut want: Vec<&str> = params
            .iter()
            .map(|(k, _, _)| k.as_str())
            .filter(|k| SUB_RESOURCES.contains(k))
            .collect();
        want.sort_unstable();
        prop_assert_eq!(keys, want);
    }
}
