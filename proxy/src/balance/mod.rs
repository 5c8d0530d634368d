//! Server selection. Strategies are pure: they read a snapshot of load
//! through [`Load`] and ask `accept` whether a candidate may take the request
//! (health, capacity and draining are checked there, not here).

mod least;
pub mod least_connections;
pub mod least_matches;
pub mod round_robin;
pub mod weighted;

use crate::config::StrategyKind;

/// What a strategy may know about a server.
pub trait Load {
    /// Live connections, as the balancer should count them.
    fn connections(&self) -> u64;
    /// Active matches.
    fn matches(&self) -> u64;
    /// Configured weight (1..=1000).
    fn weight(&self) -> u32;
    /// Remaining connection capacity in per-mille (0 = full, 1000 = empty).
    fn capacity_permille(&self) -> u32;
}

/// One selection strategy. `accept(i)` says whether `servers[i]` is eligible;
/// the strategy returns the index it chose among the eligible ones.
pub trait Select {
    fn select<L: Load>(
        &self,
        servers: &[L],
        accept: &mut dyn FnMut(usize) -> bool,
    ) -> Option<usize>;
}

/// The strategy of a pool, chosen by config (static dispatch on the hot path).
#[derive(Debug)]
pub enum Selector {
    RoundRobin(round_robin::RoundRobin),
    LeastConnections(least_connections::LeastConnections),
    LeastMatches(least_matches::LeastMatches),
    Weighted(weighted::Weighted),
}

impl Selector {
    pub fn new(kind: StrategyKind) -> Self {
        match kind {
            StrategyKind::RoundRobin => Self::RoundRobin(Default::default()),
            StrategyKind::LeastConnections => Self::LeastConnections(Default::default()),
            StrategyKind::LeastMatches => Self::LeastMatches(Default::default()),
            StrategyKind::Weighted => Self::Weighted(Default::default()),
        }
    }

    pub fn kind(&self) -> StrategyKind {
        match self {
            Self::RoundRobin(_) => StrategyKind::RoundRobin,
            Self::LeastConnections(_) => StrategyKind::LeastConnections,
            Self::LeastMatches(_) => StrategyKind::LeastMatches,
            Self::Weighted(_) => StrategyKind::Weighted,
        }
    }
}

impl Select for Selector {
    #[inline]
    fn select<L: Load>(
        &self,
        servers: &[L],
        accept: &mut dyn FnMut(usize) -> bool,
    ) -> Option<usize> {
        match self {
            Self::RoundRobin(s) => s.select(servers, accept),
            Self::LeastConnections(s) => s.select(servers, accept),
            Self::LeastMatches(s) => s.select(servers, accept),
            Self::Weighted(s) => s.select(servers, accept),
        }
    }
}

#[cfg(test)]
pub(crate) mod testing {
    use super::Load;

    /// A server with fixed figures, for strategy tests.
    #[derive(Debug, Clone, Default)]
    pub struct Fake {
        pub connections: u64,
        pub matches: u64,
        pub weight: u32,
        pub capacity_permille: u32,
    }

    impl Fake {
        pub fn new(connections: u64, matches: u64) -> Self {
            Fake {
                connections,
                matches,
                weight: 1,
                capacity_permille: 1000,
            }
        }
    }

    impl Load for Fake {
        fn connections(&self) -> u64 {
            self.connections
        }
        fn matches(&self) -> u64 {
            self.matches
        }
        fn weight(&self) -> u32 {
            self.weight
        }
        fn capacity_permille(&self) -> u32 {
            self.capacity_permille
        }
    }
}
