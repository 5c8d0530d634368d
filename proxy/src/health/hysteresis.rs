//! Rise/fall counting for active health checks: a healthy server turns
//! unhealthy after `fall` consecutive failures and back after `rise`
//! consecutive passes. Pure, no I/O.

#[derive(Debug, Clone)]
pub struct Hysteresis {
    healthy: bool,
    rise: u32,
    fall: u32,
    streak: u32,
}

impl Hysteresis {
    /// Starts healthy, like nginx and HAProxy: a server is used until checks say otherwise.
    pub fn new(rise: u32, fall: u32) -> Self {
        Hysteresis {
            healthy: true,
            rise: rise.max(1),
            fall: fall.max(1),
            streak: 0,
        }
    }

    pub fn healthy(&self) -> bool {
        self.healthy
    }

    /// Records one check; returns the new state when it changed.
    pub fn observe(&mut self, ok: bool) -> Option<bool> {
        if ok == self.healthy {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let needed = if self.healthy { self.fall } else { self.rise };
        if self.streak >= needed {
            self.healthy = ok;
            self.streak = 0;
            Some(ok)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn falls_after_fall_failures_and_rises_after_rise_passes() {
        let mut h = Hysteresis::new(2, 3);
        assert_eq!(h.observe(false), None);
        assert_eq!(h.observe(false), None);
        assert_eq!(h.observe(false), Some(false));
        assert!(!h.healthy());
        assert_eq!(h.observe(true), None);
        assert_eq!(h.observe(false), None);
        assert_eq!(h.observe(true), None);
        assert_eq!(h.observe(true), Some(true));
    }

    #[test]
    fn a_pass_resets_the_failure_streak() {
        let mut h = Hysteresis::new(1, 2);
        for _ in 0..10 {
            assert_eq!(h.observe(false), None);
            assert_eq!(h.observe(true), None);
        }
        assert!(h.healthy());
    }
}
