//! Write throttling: how writes give flushes and compactions time to catch up before they must
//! stop. A database under pressure (L0 past its slowdown trigger, or every immutable memtable
//! slot taken and the active memtable half full) paces its writes at a rate in bytes per second,
//! so that the delay is spread over many writes in slices of at most [`SLICE`], instead of one
//! write waiting for a whole flush or merge. The rate starts at `Options::delayed_write_rate`,
//! falls by a fifth each time the pressure grows and rises by a quarter each time it eases, as
//! RocksDB's delayed-write controller does.
//!
//! Invariants: a write is delayed only under pressure, by at most `SLICE` plus its own share at
//! the current rate; the rate stays within [`MIN_RATE`, the configured rate].

use std::time::{Duration, Instant};

/// The longest sleep of one write: the credit of earlier writes is paid in slices this long.
pub(crate) const SLICE: Duration = Duration::from_millis(1);

/// The lowest pace, in bytes per second: writes slow down, they never stop here (stops are the
/// memtable and L0 stop triggers').
pub(crate) const MIN_RATE: f64 = 16.0 * 1024.0;

/// What slows or stops a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cause {
    /// Immutable memtables waiting for their flush.
    Memtables,
    /// L0 tables waiting for their compaction.
    L0,
}

/// The pacing state, under the database's throttle lock.
#[derive(Debug)]
pub(crate) struct Pace {
    max_rate: f64,
    rate: f64,
    /// When the writes paced so far will have been paid for.
    next: Option<Instant>,
    /// The pressure at the last adjustment of the rate, with its cause.
    last: Option<(Cause, usize)>,
}

impl Pace {
    /// A pace that starts at `max_rate` bytes per second under pressure.
    pub(crate) fn new(max_rate: u64) -> Pace {
        let max_rate = (max_rate as f64).max(MIN_RATE);
        Pace { max_rate, rate: max_rate, next: None, last: None }
    }

    /// No pressure: the next episode starts from the configured rate again.
    pub(crate) fn relax(&mut self) {
        self.rate = self.max_rate;
        self.next = None;
        self.last = None;
    }

    /// How long a write of `bytes` made at `now` waits under `pressure` (how far past its
    /// threshold the cause is: 1 at the threshold, more beyond it).
    pub(crate) fn delay(
        &mut self,
        bytes: u64,
        cause: Cause,
        pressure: usize,
        now: Instant,
    ) -> Duration {
        match self.last {
            Some((c, p)) if c == cause && pressure > p => {
                self.rate = (self.rate * 0.8).max(MIN_RATE)
            }
            Some((c, p)) if c == cause && pressure < p => {
                self.rate = (self.rate * 1.25).min(self.max_rate)
            }
            _ => {}
        }
        self.last = Some((cause, pressure));
        let start = self.next.map_or(now, |n| n.max(now));
        let next = start + Duration::from_secs_f64(bytes as f64 / self.rate);
        self.next = Some(next);
        let owed = next.saturating_duration_since(now);
        if owed >= SLICE {
            owed.min(SLICE + Duration::from_secs_f64(bytes as f64 / self.rate))
        } else {
            Duration::ZERO
        }
    }

    #[cfg(test)]
    pub(crate) fn rate(&self) -> f64 {
        self.rate
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `n` writes of `bytes` back to back under constant pressure, each sleeping what it is
    /// told (simulated time), and returns the time they took and the longest single delay.
    fn run(
        pace: &mut Pace,
        n: usize,
        bytes: u64,
        pressure: usize,
        mut now: Instant,
    ) -> (Duration, Duration) {
        let start = now;
        let mut longest = Duration::ZERO;
        for _ in 0..n {
            let d = pace.delay(bytes, Cause::L0, pressure, now);
            longest = longest.max(d);
            now += d + Duration::from_micros(1);
        }
        (now - start, longest)
    }

    #[test]
    fn writes_under_pressure_are_paced_at_the_rate_in_short_slices() {
        let mut pace = Pace::new(1 << 20);
        let (took, longest) = run(&mut pace, 10_000, 100, 1, Instant::now());
        // 1 MB at 1 MiB/s: about a second, paid in slices of at most a millisecond and a bit.
        assert!(
            took >= Duration::from_millis(900) && took <= Duration::from_millis(1100),
            "{took:?}"
        );
        assert!(longest <= SLICE + Duration::from_micros(100), "{longest:?}");
    }

    #[test]
    fn the_rate_falls_while_pressure_grows_and_recovers_as_it_eases() {
        let mut pace = Pace::new(1 << 20);
        let now = Instant::now();
        pace.delay(100, Cause::L0, 1, now);
        for p in 2..=5 {
            pace.delay(100, Cause::L0, p, now);
        }
        let low = pace.rate();
        assert!((low - f64::from(1u32 << 20) * 0.8f64.powi(4)).abs() < 1.0, "{low}");
        for p in (1..5).rev() {
            pace.delay(100, Cause::L0, p, now);
        }
        assert!(pace.rate() > low);
        pace.relax();
        assert_eq!(pace.rate(), f64::from(1u32 << 20));
    }

    #[test]
    fn the_rate_never_falls_below_the_floor() {
        let mut pace = Pace::new(1 << 20);
        let now = Instant::now();
        for p in 1..200 {
            pace.delay(100, Cause::Memtables, p, now);
        }
        assert_eq!(pace.rate(), MIN_RATE);
    }

    #[test]
    fn without_a_backlog_a_write_is_not_delayed() {
        let mut pace = Pace::new(1 << 30);
        // 100 bytes at 1 GiB/s owe 93 ns: nothing to sleep.
        assert_eq!(pace.delay(100, Cause::L0, 1, Instant::now()), Duration::ZERO);
    }
}
