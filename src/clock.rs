//! Wall-clock time in milliseconds, the unit of the grant book and the daemon's
//! decisions: the kernel times elements in milliseconds, and a book kept in whole
//! seconds said "ended" up to a second before the port closed (and "extended" for
//! a hole the kernel had already closed). A type of its own, so that no count of
//! seconds is ever passed where milliseconds are meant.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// What every element timeout knockgate asks of the kernel adds to the time it
/// promises, so that no hole ever closes early: the kernel counts a timeout in timer
/// ticks (up to 10 ms, at CONFIG_HZ=100), rounding the length down and starting
/// within the current tick, so an element can end up to two ticks before the
/// milliseconds asked (3.5 ms early was measured at HZ=250). Two of the longest tick.
pub const KERNEL_TIMER_SLACK: Duration = Duration::from_millis(20);

/// Unix time in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct UnixMs(pub u64);

impl UnixMs {
    /// Never (an element without a timeout).
    pub const NEVER: Self = Self(u64::MAX);

    /// The system clock now.
    #[must_use]
    pub fn now() -> Self {
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Self(u64::try_from(since.as_millis()).unwrap_or(u64::MAX))
    }

    /// Whole Unix seconds `secs`.
    #[must_use]
    pub fn from_secs(secs: u64) -> Self {
        Self(secs.saturating_mul(1000))
    }

    /// Unix seconds, rounded down (when something began).
    #[must_use]
    pub fn secs(self) -> u64 {
        self.0 / 1000
    }

    /// Unix seconds, rounded up (when something ends: never shown as earlier).
    #[must_use]
    pub fn secs_ceil(self) -> u64 {
        self.0.div_ceil(1000)
    }

    /// `d` later (saturating: "never" stays never).
    #[must_use]
    pub fn plus(self, d: Duration) -> Self {
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        Self(self.0.saturating_add(ms))
    }

    /// How long from `self` until `later` (zero if it has passed).
    #[must_use]
    pub fn until(self, later: Self) -> Duration {
        Duration::from_millis(later.0.saturating_sub(self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_round_down_for_starts_and_up_for_ends() {
        let t = UnixMs(1_790_000_000_001);
        assert_eq!((t.secs(), t.secs_ceil()), (1_790_000_000, 1_790_000_001));
        let whole = UnixMs::from_secs(1_790_000_000);
        assert_eq!(
            (whole.secs(), whole.secs_ceil()),
            (1_790_000_000, 1_790_000_000)
        );
        assert_eq!(UnixMs::NEVER.plus(Duration::from_secs(1)), UnixMs::NEVER);
        assert_eq!(t.until(UnixMs(t.0 + 250)), Duration::from_millis(250));
        assert_eq!(UnixMs(t.0 + 250).until(t), Duration::ZERO);
    }
}
