//! `weighted`: smooth weighted round robin, as nginx does it: every pick adds
//! each eligible server's effective weight to its running score, takes the
//! highest score and subtracts the total from it. Weights 3:1 give A A B A,
//! never A A A B. The effective weight is the configured weight scaled by the
//! server's remaining connection capacity, so a filling server gets less.
//!
//! That walks every server on each pick. Above [`SCAN_LIMIT`] servers, where
//! the order of picks matters little and the walk costs microseconds, a pick
//! is a weighted random draw in constant time instead: an alias table of
//! the configured weights (Vose's method, built once per runtime) proposes a
//! server, which is taken with a probability equal to its remaining capacity,
//! so servers are chosen in proportion to weight x capacity, as above.

use super::{Load, Select};
use std::sync::{Mutex, OnceLock};

/// Largest pool picked by the exact smooth rotation.
pub const SCAN_LIMIT: usize = 64;
/// Draws before falling back to the full walk (a pool nearly all full or
/// ineligible).
const DRAWS: usize = 16;

#[derive(Debug, Default)]
pub struct Weighted {
    scores: Mutex<Vec<i64>>,
    alias: OnceLock<Alias>,
}

/// Vose's alias table over fixed weights: one uniform column and one coin
/// per draw.
#[derive(Debug)]
struct Alias {
    /// Chance (in 1/2^32) of keeping the column rather than its alias.
    keep: Vec<u32>,
    alias: Vec<u32>,
}

impl Alias {
    fn new(weights: &[u32]) -> Alias {
        let n = weights.len();
        let total: f64 = weights.iter().map(|&w| f64::from(w.max(1))).sum();
        let mut scaled: Vec<f64> = weights
            .iter()
            .map(|&w| f64::from(w.max(1)) * n as f64 / total)
            .collect();
        let mut keep = vec![u32::MAX; n];
        let mut alias: Vec<u32> = (0..n as u32).collect();
        let (mut small, mut large): (Vec<usize>, Vec<usize>) =
            (0..n).partition(|&i| scaled[i] < 1.0);
        while let (Some(s), Some(&l)) = (small.pop(), large.last()) {
            keep[s] = (scaled[s] * f64::from(u32::MAX)) as u32;
            alias[s] = l as u32;
            scaled[l] -= 1.0 - scaled[s];
            if scaled[l] < 1.0 {
                large.pop();
                small.push(l);
            }
        }
        Alias { keep, alias }
    }

    fn draw(&self) -> usize {
        let i = fastrand::usize(..self.keep.len());
        if fastrand::u32(..) < self.keep[i] {
            i
        } else {
            self.alias[i] as usize
        }
    }
}

impl Select for Weighted {
    fn select<L: Load>(
        &self,
        servers: &[L],
        accept: &mut dyn FnMut(usize) -> bool,
    ) -> Option<usize> {
        let n = servers.len();
        if n > SCAN_LIMIT {
            let alias = self
                .alias
                .get_or_init(|| Alias::new(&servers.iter().map(Load::weight).collect::<Vec<_>>()));
            for _ in 0..DRAWS {
                let i = alias.draw();
                if accept(i) && fastrand::u32(..1000) < servers[i].capacity_permille().max(1) {
                    return Some(i);
                }
            }
        }
        let mut scores = self.scores.lock().unwrap_or_else(|p| p.into_inner());
        if scores.len() != n {
            scores.clear();
            scores.resize(n, 0);
        }
        let mut total = 0i64;
        let mut best: Option<usize> = None;
        for i in 0..n {
            if !accept(i) {
                continue;
            }
            let s = &servers[i];
            let ew = i64::from(s.weight()) * i64::from(s.capacity_permille().max(1));
            scores[i] += ew;
            total += ew;
            if best.is_none_or(|b| scores[i] > scores[b]) {
                best = Some(i);
            }
        }
        let b = best?;
        scores[b] -= total;
        Some(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::testing::Fake;

    fn w(weight: u32) -> Fake {
        Fake {
            weight,
            ..Fake::new(0, 0)
        }
    }

    #[test]
    fn smooth_sequence() {
        let s = vec![w(3), w(1)];
        let wrr = Weighted::default();
        let picks: Vec<_> = (0..8)
            .map(|_| wrr.select(&s, &mut |_| true).unwrap())
            .collect();
        assert_eq!(picks, [0, 0, 1, 0, 0, 0, 1, 0]);
    }

    #[test]
    fn exact_ratio_and_skips_ineligible() {
        let s = vec![w(5), w(1), w(2)];
        let wrr = Weighted::default();
        let mut hits = [0; 3];
        for _ in 0..800 {
            hits[wrr.select(&s, &mut |_| true).unwrap()] += 1;
        }
        assert_eq!(hits, [500, 100, 200]);
        for _ in 0..10 {
            assert_eq!(wrr.select(&s, &mut |i| i == 2), Some(2));
        }
        assert_eq!(wrr.select(&s, &mut |_| false), None);
    }

    #[test]
    fn large_pools_draw_in_proportion_to_weight_and_capacity() {
        // 100 servers: weight 3 for the first 50, 1 for the rest; every
        // fourth server a quarter full of capacity
        let s: Vec<Fake> = (0..100)
            .map(|i| Fake {
                weight: if i < 50 { 3 } else { 1 },
                capacity_permille: if i % 4 == 0 { 250 } else { 1000 },
                ..Fake::new(0, 0)
            })
            .collect();
        let wrr = Weighted::default();
        let mut hits = [0u32; 100];
        for _ in 0..200_000 {
            hits[wrr.select(&s, &mut |i| i != 7).unwrap()] += 1;
        }
        assert_eq!(hits[7], 0, "ineligible never chosen");
        let share = |f: &dyn Fn(usize) -> bool| -> u32 {
            (0..100).filter(|&i| f(i)).map(|i| hits[i]).sum()
        };
        let heavy = share(&|i| i < 50 && i % 4 != 0 && i != 7) as f64;
        let light = share(&|i| i >= 50 && i % 4 != 0) as f64;
        // 36 heavy servers at weight 3 vs 37 light ones at weight 1
        let ratio = (heavy / 36.0) / (light / 37.0);
        assert!((2.7..3.3).contains(&ratio), "weight ratio {ratio}");
        let quarter = share(&|i| i >= 50 && i % 4 == 0) as f64 / 13.0;
        let full = light / 37.0;
        let cap = quarter / full;
        assert!((0.2..0.3).contains(&cap), "capacity ratio {cap}");
    }

    #[test]
    fn remaining_capacity_scales_weight() {
        let s = vec![
            Fake {
                weight: 1,
                capacity_permille: 250,
                ..Fake::new(0, 0)
            },
            Fake {
                weight: 1,
                capacity_permille: 1000,
                ..Fake::new(0, 0)
            },
        ];
        let wrr = Weighted::default();
        let mut hits = [0; 2];
        for _ in 0..500 {
            hits[wrr.select(&s, &mut |_| true).unwrap()] += 1;
        }
        assert_eq!(hits, [100, 400]);
    }
}
