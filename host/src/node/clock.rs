//! The core's clock: what `batch.now-ms` carries and what timers fire by.
//!
//! It is the wall time read once, when the core starts, advanced by the
//! monotonic clock. Timers and timeouts therefore follow elapsed time only:
//! a step of the wall clock (an operator's `date -s`, a VM resumed, NTP
//! stepping after a long outage) neither stalls them (a step back) nor fires
//! them all at once (a step forward). Policies read the same value as their
//! `now-ms`: the replica's wall time, except that a step made while the
//! daemon runs reaches them at its next start. The monotonic clock is
//! slewed by NTP like the wall clock, so without steps the two agree.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub(super) struct Clock {
    wall_at_start_ms: u64,
    started: Instant,
}

/// Milliseconds since the Unix epoch, by the system's wall clock.
fn system_wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Clock {
    pub(super) fn start() -> Clock {
        Clock::with_wall(system_wall_ms, Instant::now())
    }

    /// A clock started at `started`, with `wall` as the time source.
    pub(super) fn with_wall(wall: impl Fn() -> u64, started: Instant) -> Clock {
        Clock {
            wall_at_start_ms: wall(),
            started,
        }
    }

    pub(super) fn now_ms(&self) -> u64 {
        self.at(Instant::now())
    }

    /// The clock's reading at `instant`.
    fn at(&self, instant: Instant) -> u64 {
        let elapsed = instant.saturating_duration_since(self.started);
        self.wall_at_start_ms
            .saturating_add(elapsed.as_millis().min(u64::MAX as u128) as u64)
    }

    /// When a timer due at `at_ms` fires, on tokio's (monotonic) clock.
    pub(super) fn deadline(&self, at_ms: u64) -> tokio::time::Instant {
        let now = tokio::time::Instant::now();
        now + Duration::from_millis(at_ms.saturating_sub(self.at(now.into_std())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A wall clock stepped back ten minutes after the core started does not
    /// hold the timers back: the clock goes on with elapsed time. Before,
    /// the core's clock was `max(last reading, wall)` and stood still until
    /// the wall clock caught up, so no retry or timeout fired for ten
    /// minutes.
    #[test]
    fn a_wall_clock_stepped_back_does_not_stall_timers() {
        use std::sync::atomic::{AtomicU64, Ordering};
        use std::sync::Arc;
        let wall = Arc::new(AtomicU64::new(1_700_000_000_000));
        let t0 = Instant::now();
        let source = wall.clone();
        let clock = Clock::with_wall(move || source.load(Ordering::SeqCst), t0);
        // A timer armed 50 ms out; the wall clock is then set back.
        let due = clock.at(t0) + 50;
        wall.fetch_sub(600_000, Ordering::SeqCst);
        let later = t0 + Duration::from_millis(60);
        assert!(clock.at(later) >= due, "the timer is due 60 ms later");
        assert!(clock.at(later) > clock.at(t0), "the clock moves");
    }

    /// A step forward does not fire every timer at once either.
    #[test]
    fn readings_follow_elapsed_time_only() {
        let t0 = Instant::now();
        let clock = Clock::with_wall(|| 5_000, t0);
        assert_eq!(clock.at(t0), 5_000);
        assert_eq!(clock.at(t0 + Duration::from_millis(1_234)), 6_234);
        // An instant before the start reads as the start.
        assert_eq!(
            clock.at(t0.checked_sub(Duration::from_millis(5)).unwrap_or(t0)),
            5_000
        );
    }
}
