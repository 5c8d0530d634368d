//! The shared core of the "least" strategies. Small pools are scanned in full
//! from a random offset (so ties spread instead of herding onto the first
//! server); large pools use the power of two random choices, which is O(1)
//! and stays well spread when the counts are a little stale.

use super::Load;

/// Pools up to this size get an exact scan.
const FULL_SCAN: usize = 64;
/// Random draws spent looking for two eligible servers before falling back to a scan.
const DRAWS: usize = 8;

pub(super) fn pick<L: Load>(
    servers: &[L],
    key: impl Fn(&L) -> u64,
    accept: &mut dyn FnMut(usize) -> bool,
) -> Option<usize> {
    let n = servers.len();
    if n == 0 {
        return None;
    }
    if n > FULL_SCAN {
        let mut first: Option<usize> = None;
        for _ in 0..DRAWS {
            let i = fastrand::usize(..n);
            if first == Some(i) || !accept(i) {
                continue;
            }
            match first {
                None => first = Some(i),
                Some(f) => {
                    return Some(if key(&servers[i]) < key(&servers[f]) {
                        i
                    } else {
                        f
                    });
                }
            }
        }
        if first.is_some() {
            return first;
        }
    }
    let start = fastrand::usize(..n);
    let mut best: Option<(usize, u64)> = None;
    for k in 0..n {
        let i = (start + k) % n;
        let v = key(&servers[i]);
        if matches!(best, Some((_, b)) if v >= b) {
            continue;
        }
        if accept(i) {
            best = Some((i, v));
        }
    }
    best.map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::testing::Fake;

    #[test]
    fn exact_on_small_pools() {
        let s = vec![Fake::new(5, 0), Fake::new(2, 0), Fake::new(9, 0)];
        for _ in 0..50 {
            assert_eq!(pick(&s, |f| f.connections, &mut |_| true), Some(1));
            assert_eq!(pick(&s, |f| f.connections, &mut |i| i != 1), Some(0));
        }
        assert_eq!(pick(&s, |f| f.connections, &mut |_| false), None);
    }

    #[test]
    fn ties_spread() {
        let s = vec![Fake::new(0, 0); 4];
        let mut hits = [0u32; 4];
        for _ in 0..4000 {
            hits[pick(&s, |f| f.connections, &mut |_| true).unwrap()] += 1;
        }
        assert!(hits.iter().all(|&h| h > 800), "{hits:?}");
    }

    #[test]
    fn large_pools_prefer_less_loaded() {
        let s: Vec<Fake> = (0..1000).map(|i| Fake::new(i, 0)).collect();
        let mut total = 0u64;
        for _ in 0..2000 {
            total += pick(&s, |f| f.connections, &mut |_| true).unwrap() as u64;
        }
        // two choices: expected minimum of two uniform draws is n/3
        let mean = total / 2000;
        assert!(mean < 420, "mean pick {mean}");
        // only one eligible server: found by the fallback scan
        assert_eq!(pick(&s, |f| f.connections, &mut |i| i == 777), Some(777));
    }
}
