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

/// Milliseconds of a monotonic clock that advances once per kernel tick
/// (1–10 ms): `CLOCK_MONOTONIC_COARSE` is read from the vDSO's data page
/// without the time-stamp counter, a fraction of an `Instant::now()`. For
/// marks taken on every relayed read, where only timeouts compare them.
#[cfg(target_os = "linux")]
#[inline]
#[allow(unsafe_code)] // a foreign call; see SAFETY below
pub fn coarse_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write; the clock id is a constant
    // every Linux since 2.6.32 knows, so the call cannot fail.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

/// Elsewhere: the precise clock, from a process-wide epoch.
#[cfg(not(target_os = "linux"))]
pub fn coarse_ms() -> u64 {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// For a timer that has fired, set for a deadline in coarse ms that may
/// have moved later since it was armed (a lazily moved timer): whether the
/// deadline has passed; if not, `sleep` is re-armed for what is left.
pub fn passed_or_rearm(sleep: std::pin::Pin<&mut tokio::time::Sleep>, deadline: u64) -> bool {
    let now = coarse_ms();
    if now >= deadline {
        return true;
    }
    sleep.reset(instant_at(now, deadline));
    false
}

/// The timer instant of `deadline` (coarse ms), `now` being the coarse time.
/// At most [`LONGEST`] ahead.
pub fn instant_at(now: u64, deadline: u64) -> tokio::time::Instant {
    let wait = std::time::Duration::from_millis(deadline.saturating_sub(now));
    tokio::time::Instant::now() + wait.min(LONGEST)
}

/// The longest a timer is set for, and the longest duration the config
/// takes (a year): beyond it a deadline's arithmetic (coarse ms plus the
/// timeout, a timer's instant) could overflow, and no timeout means that
/// much.
pub const LONGEST: std::time::Duration = std::time::Duration::from_secs(365 * 86_400);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_coarse_clock_follows_the_precise_one_within_a_tick() {
        let (c0, t0) = (coarse_ms(), Instant::now());
        std::thread::sleep(std::time::Duration::from_millis(120));
        let (c1, dt) = (coarse_ms(), t0.elapsed().as_millis() as u64);
        let coarse = c1 - c0;
        // at most one tick (10 ms at HZ=100) lost at each end
        assert!(
            coarse + 20 >= dt && coarse <= dt + 20,
            "coarse {coarse} ms, precise {dt} ms"
        );
    }
}
