//! A monotonic millisecond clock shared by the live state, so health and
//! affinity code takes "now" as a plain number and stays testable.

use std::time::Instant;

#[derive(Debug, Clone, Copy)]
pub struct Clock {
    epoch: Instant,
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock {
    pub fn new() -> Self {
        Clock {
            epoch: Instant::now(),
        }
    }

    /// Milliseconds since this clock started; never 0, so 0 can mean "unset".
    #[inline]
    pub fn now_ms(&self) -> u64 {
        self.ms_at(Instant::now())
    }

    /// `now_ms` for an instant already read (one clock read serves both).
    #[inline]
    pub fn ms_at(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_millis() as u64 + 1
    }
}
