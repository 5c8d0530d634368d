//! Passive ejection: a server that fails to accept connections, or answers a
//! burst of 5xx, is taken out for an ejection time that doubles on each
//! repeat (up to a maximum). When it returns it gets a growing share of new
//! traffic over the slow-start window instead of all of it at once.

use crate::config::Passive;

/// Ejection length for the `n`th consecutive ejection (1-based).
pub fn ejection_ms(policy: &Passive, n: u32) -> u64 {
    let base = policy.ejection.as_millis() as u64;
    let max = policy.max_ejection.as_millis() as u64;
    base.saturating_mul(1u64 << n.saturating_sub(1).min(20))
        .min(max)
}

/// Share of new traffic (per-mille) a server re-admitted at `since` takes at `now`.
pub fn slow_start_permille(policy: &Passive, since: u64, now: u64) -> u32 {
    let window = policy.slow_start.as_millis() as u64;
    if since == 0 || window == 0 || now >= since + window {
        return 1000;
    }
    (((now - since) * 1000) / window).max(50) as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn policy() -> Passive {
        Passive {
            connect_failures: 1,
            consecutive_5xx: 5,
            ejection: Duration::from_millis(1000),
            max_ejection: Duration::from_millis(5000),
            slow_start: Duration::from_millis(10_000),
        }
    }

    #[test]
    fn ejection_doubles_up_to_max() {
        let p = policy();
        let got: Vec<_> = (1..=5).map(|n| ejection_ms(&p, n)).collect();
        assert_eq!(got, [1000, 2000, 4000, 5000, 5000]);
        assert_eq!(ejection_ms(&p, 200), 5000);
    }

    #[test]
    fn slow_start_ramps() {
        let p = policy();
        assert_eq!(slow_start_permille(&p, 0, 123), 1000);
        assert_eq!(slow_start_permille(&p, 100, 100), 50);
        assert_eq!(slow_start_permille(&p, 100, 5100), 500);
        assert_eq!(slow_start_permille(&p, 100, 10_100), 1000);
    }
}
