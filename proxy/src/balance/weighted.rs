//! `weighted`: smooth weighted round robin, as nginx does it: every pick adds
//! each eligible server's effective weight to its running score, takes the
//! highest score and subtracts the total from it. Weights 3:1 give A A B A,
//! never A A A B. The effective weight is the configured weight scaled by the
//! server's remaining connection capacity, so a filling server gets less.

use super::{Load, Select};
use std::sync::Mutex;

#[derive(Debug, Default)]
pub struct Weighted {
    scores: Mutex<Vec<i64>>,
}

impl Select for Weighted {
    fn select<L: Load>(
        &self,
        servers: &[L],
        accept: &mut dyn FnMut(usize) -> bool,
    ) -> Option<usize> {
        let n = servers.len();
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
