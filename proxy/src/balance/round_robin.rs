//! `round_robin`: strict rotation. With every server eligible it visits them
//! in order; an ineligible one is skipped to the next in line.

use super::{Load, Select};
use std::sync::atomic::{AtomicUsize, Ordering};

#[derive(Debug, Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

impl Select for RoundRobin {
    fn select<L: Load>(
        &self,
        servers: &[L],
        accept: &mut dyn FnMut(usize) -> bool,
    ) -> Option<usize> {
        let n = servers.len();
        if n == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        (0..n).map(|k| (start + k) % n).find(|&i| accept(i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::testing::Fake;

    #[test]
    fn rotates_exactly() {
        let rr = RoundRobin::default();
        let servers = vec![Fake::new(0, 0); 3];
        let picks: Vec<_> = (0..6)
            .map(|_| rr.select(&servers, &mut |_| true).unwrap())
            .collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn skips_ineligible_and_gives_none_when_all_are() {
        let rr = RoundRobin::default();
        let servers = vec![Fake::new(0, 0); 3];
        for _ in 0..5 {
            assert_ne!(rr.select(&servers, &mut |i| i != 1), Some(1));
        }
        assert_eq!(rr.select(&servers, &mut |_| false), None);
        assert_eq!(rr.select(&Vec::<Fake>::new(), &mut |_| true), None);
    }
}
