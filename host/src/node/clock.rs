//! The core's clock: what `batch.now-ms` carries and what timers fire by.
//!
//! It reads the wall clock but never goes back and never stands still: it
//! advances with the monotonic clock (`Instant`) and jumps forward when the
//! wall clock is ahead of it. A wall clock stepped back (an operator's
//! `date -s`, NTP correcting a clock that ran fast) is not followed, so
//! timers and timeouts keep firing by elapsed time instead of stalling
//! until the wall clock catches up; a step forward is followed, so
//! policies, which read the same value as their `now-ms`, see the corrected
//! time (a step forward fires the timers it passes, as a long pause would).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub(super) struct Clock {
    /// The reading at `started`: `now = base + elapsed since started`.
    base_ms: u64,
    started: Instant,
    wall: Box<dyn Fn() -> u64 + Send>,
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
    pub(super) fn with_wall(wall: impl Fn() -> u64 + Send + 'static, started: Instant) -> Clock {
        Clock {
            base_ms: wall(),
            started,
            wall: Box::new(wall),
        }
    }

    pub(super) fn now_ms(&mut self) -> u64 {
        self.at(Instant::now())
    }

    /// The clock's reading at `instant` (not before an earlier reading).
    fn at(&mut self, instant: Instant) -> u64 {
        let elapsed = instant.saturating_duration_since(self.started);
        let elapsed = elapsed.as_millis().min(u64::MAX as u128) as u64;
        let wall = (self.wall)();
        if wall > self.base_ms.saturating_add(elapsed) {
            // The wall clock is ahead: follow it from here on.
            self.base_ms = wall - elapsed;
        }
        self.base_ms.saturating_add(elapsed)
    }

    /// When a timer due at `at_ms` fires, on tokio's (monotonic) clock.
    pub(super) fn deadline(&mut self, at_ms: u64) -> tokio::time::Instant {
        let now = tokio::time::Instant::now();
        now + Duration::from_millis(at_ms.saturating_sub(self.at(now.into_std())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    fn clock_at(wall_ms: u64) -> (Clock, Arc<AtomicU64>, Instant) {
        let wall = Arc::new(AtomicU64::new(wall_ms));
        let t0 = Instant::now();
        let source = wall.clone();
        let clock = Clock::with_wall(move || source.load(Ordering::SeqCst), t0);
        (clock, wall, t0)
    }

    /// A wall clock stepped back ten minutes does not hold the timers
    /// back: the clock goes on with elapsed time. The core's clock used to
    /// be `max(last reading, wall)`, which stood still until the wall clock
    /// caught up, so no retry or timeout fired for ten minutes.
    #[test]
    fn a_wall_clock_stepped_back_does_not_stall_timers() {
        let (mut clock, wall, t0) = clock_at(1_700_000_000_000);
        // A timer armed 50 ms out; the wall clock is then set back.
        let due = clock.at(t0) + 50;
        wall.fetch_sub(600_000, Ordering::SeqCst);
        let later = t0 + Duration::from_millis(60);
        assert!(clock.at(later) >= due, "the timer is due 60 ms later");
        assert_eq!(clock.at(later), 1_700_000_000_060);
    }

    /// A step forward is followed (policies see the corrected time), and
    /// the clock never goes back.
    #[test]
    fn a_wall_clock_stepped_forward_is_followed() {
        let (mut clock, wall, t0) = clock_at(5_000);
        assert_eq!(clock.at(t0), 5_000);
        assert_eq!(clock.at(t0 + Duration::from_millis(1_234)), 6_234);
        wall.store(100_000, Ordering::SeqCst);
        assert_eq!(clock.at(t0 + Duration::from_millis(1_300)), 100_000);
        // From there it advances with elapsed time, even if the wall
        // clock goes back again.
        wall.store(0, Ordering::SeqCst);
        assert_eq!(clock.at(t0 + Duration::from_millis(1_400)), 100_100);
        // An instant before the start reads no earlier than the start.
        let before = t0.checked_sub(Duration::from_millis(5)).unwrap_or(t0);
        assert!(clock.at(before) >= 5_000);
    }
}
