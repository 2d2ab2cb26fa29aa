//! `verify --read-data-subset`: which blobs a verify reads again, so that a large (remote)
//! repository is read a slice at a time.
//!
//! Owns: [`Subset`], its two spellings and the rule that puts a blob in it.
//! Invariants:
//! - A blob's place is the first 8 bytes of its SHA-256 read as a number: uniform, and the same
//!   on every run and host.
//! - `K/M` is slice K of M: the slices 1/M … M/M hold every blob exactly once.
//! - `N%` is a window of N% of the places, starting where the day (UTC days since 1970) puts it:
//!   `(day × N) mod 100%`. Runs on consecutive days read consecutive windows, so daily runs cover
//!   every blob within ⌈100/N⌉ days; weekly runs cover every blob too (the starts are multiples of
//!   gcd(N, 100%), never wider apart than the window).

use std::fmt;
use std::str::FromStr;

use super::Sha256;

/// Parts per million of the places (a window's width and start).
const WHOLE: u64 = 1_000_000;

/// The blobs one verify reads again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subset {
    /// Slice `k` (1-based) of `m`.
    Slice { k: u64, m: u64 },
    /// `width` of [`WHOLE`], starting at `start`.
    Window { width: u64, start: u64 },
}

impl Subset {
    /// The window `width` wide (parts per million) that `N%` names on UTC day `day`.
    fn window(width: u64, day: u64) -> Self {
        Self::Window {
            width,
            start: day.wrapping_mul(width) % WHOLE,
        }
    }

    /// `N%` for another day than today (tests, and a run that must repeat another day's slice).
    #[must_use]
    pub fn on_day(self, day: u64) -> Self {
        match self {
            Self::Window { width, .. } => Self::window(width, day),
            slice @ Self::Slice { .. } => slice,
        }
    }

    /// Whether `blob` is in the subset.
    pub fn contains(&self, blob: &Sha256) -> bool {
        let place = u64::from_be_bytes(blob.as_bytes()[..8].try_into().expect("8 bytes"));
        match *self {
            Self::Slice { k, m } => place % m == k - 1,
            Self::Window { width, start } => {
                let at = u64::try_from((u128::from(place) * u128::from(WHOLE)) >> 64)
                    .expect("below WHOLE");
                (at + WHOLE - start) % WHOLE < width
            }
        }
    }
}

/// UTC days since 1970-01-01.
fn today() -> u64 {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    secs / 86_400
}

/// Why a text is not a [`Subset`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "'{0}' is not a subset: give K/M (slice K of M, 1 <= K <= M, e.g. 2/7) or N% (0 < N <= 100, \
     e.g. 15%)"
)]
pub struct NotSubset(String);

impl FromStr for Subset {
    type Err = NotSubset;
    fn from_str(s: &str) -> Result<Self, NotSubset> {
        let bad = || NotSubset(s.to_owned());
        if let Some(percent) = s.strip_suffix('%') {
            let n: f64 = percent.trim().parse().map_err(|_| bad())?;
            if !(n > 0.0 && n <= 100.0) {
                return Err(bad());
            }
            // At least one part per million, whole when 100%.
            #[expect(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                reason = "n is in (0, 100], so the product is in (0, WHOLE]"
            )]
            let width = ((n * 10_000.0).round() as u64).clamp(1, WHOLE);
            return Ok(Self::window(width, today()));
        }
        let (k, m) = s.split_once('/').ok_or_else(bad)?;
        let k: u64 = k.trim().parse().map_err(|_| bad())?;
        let m: u64 = m.trim().parse().map_err(|_| bad())?;
        if k == 0 || m == 0 || k > m {
            return Err(bad());
        }
        Ok(Self::Slice { k, m })
    }
}

impl fmt::Display for Subset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Slice { k, m } => write!(f, "{k}/{m}"),
            #[expect(
                clippy::cast_precision_loss,
                reason = "parts per million, far below 2^52"
            )]
            Self::Window { width, start } => write!(
                f,
                "{}% from {}%",
                width as f64 / 10_000.0,
                start as f64 / 10_000.0
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blobs(n: u32) -> Vec<Sha256> {
        (0..n).map(|i| Sha256::of(&i.to_le_bytes())).collect()
    }

    #[test]
    fn the_slices_of_m_hold_every_blob_exactly_once() {
        let all = blobs(3000);
        for m in [1usize, 3, 7] {
            let mut seen = vec![0u32; all.len()];
            for k in 1..=m {
                let s: Subset = format!("{k}/{m}").parse().unwrap();
                let mut n = 0usize;
                for (i, b) in all.iter().enumerate() {
                    if s.contains(b) {
                        seen[i] += 1;
                        n += 1;
                    }
                }
                // Uniform enough: each slice within 20% of its share.
                let share = all.len() / m;
                assert!(
                    n.abs_diff(share) * 5 <= share,
                    "{k}/{m}: {n} of {}",
                    all.len()
                );
            }
            assert!(seen.iter().all(|&c| c == 1), "{m}: {seen:?}");
        }
    }

    #[test]
    fn daily_windows_cover_every_blob_and_weekly_ones_too() {
        let all = blobs(2000);
        let s: Subset = "15%".parse().unwrap();
        for (step, runs) in [(1, 7), (7, 20)] {
            let mut seen = vec![false; all.len()];
            for run in 0..runs {
                let on = s.on_day(20_000 + run * step);
                for (i, b) in all.iter().enumerate() {
                    seen[i] |= on.contains(b);
                }
            }
            assert!(seen.iter().all(|&x| x), "every {step} days, {runs} runs");
        }
        let one = s.on_day(20_000);
        let n = all.iter().filter(|b| one.contains(b)).count();
        assert!(n.abs_diff(300) <= 60, "{n}");
        assert!(
            all.iter()
                .all(|b| "100%".parse::<Subset>().unwrap().contains(b))
        );
    }

    #[test]
    fn bad_spellings_are_one_clear_error() {
        for bad in [
            "0/3", "4/3", "1/0", "x/3", "3", "0%", "101%", "-5%", "abc%", "",
        ] {
            let e = bad.parse::<Subset>().unwrap_err().to_string();
            assert!(e.contains("K/M") && e.contains(&format!("'{bad}'")), "{e}");
        }
        assert_eq!("2/7".parse::<Subset>().unwrap().to_string(), "2/7");
        assert!(
            "2.5%"
                .parse::<Subset>()
                .unwrap()
                .to_string()
                .starts_with("2.5% from ")
        );
    }
}
