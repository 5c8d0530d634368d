//! Giving freed heap back to the system.
//!
//! Every connection passes through short-lived state (hyper's read and
//! write buffers, the request's future, the 101 exchange) that is freed when
//! its tunnel starts. The long-lived tunnels allocated in between keep
//! glibc's heap from shrinking at its top, so those holes stay resident.
//! When connections stop opening or closing for a moment, `malloc_trim`
//! hands the free pages inside the heap back (`MADV_DONTNEED`), as HAProxy
//! does when it releases its pools. Under constant churn it still runs at
//! most every 10 s.

use crate::app::Counters;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const TICK: Duration = Duration::from_millis(250);
const AT_LEAST_EVERY: Duration = Duration::from_secs(10);

pub async fn trimmer(counters: Arc<Counters>, stop: CancellationToken) {
    if !supported() {
        return;
    }
    let activity = || {
        (
            counters.connections_total.load(Relaxed),
            counters.websockets_active.load(Relaxed),
        )
    };
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = activity();
    let mut dirty = false;
    let mut last_trim = Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        let now = activity();
        let changed = now != last;
        last = now;
        dirty |= changed;
        // quiet for a tick after a change, or busy for a long time
        if dirty && (!changed || last_trim.elapsed() >= AT_LEAST_EVERY) {
            dirty = false;
            last_trim = Instant::now();
            let started = Instant::now();
            // it walks the heap: off the event loop
            let released = tokio::task::spawn_blocking(trim).await.unwrap_or(false);
            tracing::debug!(
                released,
                ms = started.elapsed().as_secs_f64() * 1e3,
                "heap trimmed"
            );
        }
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn supported() -> bool {
    true
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)] // a foreign call; see SAFETY below
fn trim() -> bool {
    unsafe extern "C" {
        fn malloc_trim(pad: usize) -> std::os::raw::c_int;
    }
    // SAFETY: glibc's malloc_trim only releases memory the allocator holds
    // free; it takes the arena locks itself and may be called from any thread.
    unsafe { malloc_trim(0) != 0 }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn supported() -> bool {
    false
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() -> bool {
    false
}
