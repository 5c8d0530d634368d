//! `least_matches`: the eligible server with the fewest active matches.

use super::{least, Load, Select};

#[derive(Debug, Default)]
pub struct LeastMatches;

impl Select for LeastMatches {
    fn select<L: Load>(
        &self,
        servers: &[L],
        accept: &mut dyn FnMut(usize) -> bool,
    ) -> Option<usize> {
        least::pick(servers, |s| s.matches(), accept)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::testing::Fake;

    #[test]
    fn picks_fewest_matches_ignoring_connections() {
        let s = vec![Fake::new(0, 4), Fake::new(90, 2)];
        assert_eq!(LeastMatches.select(&s, &mut |_| true), Some(1));
    }
}
