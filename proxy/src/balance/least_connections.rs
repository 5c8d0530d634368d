//! `least_connections`: the eligible server with the fewest live connections.

use super::{least, Load, Select};

#[derive(Debug, Default)]
pub struct LeastConnections;

impl Select for LeastConnections {
    fn select<L: Load>(
        &self,
        servers: &[L],
        accept: &mut dyn FnMut(usize) -> bool,
    ) -> Option<usize> {
        least::pick(servers, |s| s.connections(), accept)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::testing::Fake;

    #[test]
    fn picks_fewest_connections_ignoring_matches() {
        let s = vec![Fake::new(3, 0), Fake::new(1, 50)];
        assert_eq!(LeastConnections.select(&s, &mut |_| true), Some(1));
    }
}
