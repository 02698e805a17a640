//! Wall-clock time in milliseconds, the unit of the grant book and the daemon's
//! decisions: the kernel times elements in milliseconds, and a book kept in whole
//! seconds said "ended" up to a second before the port closed (and "extended" for
//! a hole the kernel had already closed). A type of its own, so that no count of
//! seconds is ever passed where milliseconds are meant.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How the kernel times set elements: in ticks of `1/CONFIG_HZ` s. It turns the
/// milliseconds it is asked for into whole ticks rounding down, and starts counting
/// inside the current tick, so an element asked for `n` ticks lasts between `n - 1`
/// and `n` of them: asked for the bare TTL it closed up to a tick early (3.5 ms was
/// measured at HZ=250). knockgate measures the tick at start and asks for the TTL
/// rounded up to whole ticks plus one: never early, at most a tick late for a TTL of
/// whole ticks (any whole number of milliseconds at HZ=1000, 250 or 100).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelTimer {
    /// Ticks per second (`CONFIG_HZ`).
    hz: u32,
}

impl KernelTimer {
    /// The coarsest tick Linux builds with (HZ=24, on some ARM and MIPS boards): what
    /// is assumed when the tick cannot be measured, which is late by up to ~80 ms
    /// but never early.
    pub const COARSEST: Self = Self { hz: 24 };

    /// A timer of `hz` ticks per second (clamped to what Linux builds: 24–1000).
    #[must_use]
    pub fn with_hz(hz: u32) -> Self {
        Self {
            hz: hz.clamp(24, 1000),
        }
    }

    /// The running kernel's tick: the resolution of the coarse clocks is one jiffy
    /// (`TICK_NSEC`), which the vDSO answers without a system call or a file.
    #[must_use]
    pub fn measure() -> Self {
        use nix::time::{ClockId, clock_getres};
        let Ok(res) = clock_getres(ClockId::CLOCK_MONOTONIC_COARSE) else {
            return Self::COARSEST;
        };
        let nanos = u64::try_from(res.tv_sec())
            .unwrap_or(0)
            .saturating_mul(1_000_000_000)
            .saturating_add(u64::try_from(res.tv_nsec()).unwrap_or(0));
        // Linux builds HZ from 24 to 1000: anything else is not a tick we know.
        if !(1_000_000..=41_666_667).contains(&nanos) {
            return Self::COARSEST;
        }
        // Rounded down: in doubt, a longer tick (a later close, never an earlier one).
        let hz = 1_000_000_000 / nanos;
        Self::with_hz(u32::try_from(hz).unwrap_or(24))
    }

    /// Ticks per second.
    #[must_use]
    pub fn hz(self) -> u32 {
        self.hz
    }

    /// The timeout to ask the kernel for so that an element lasts at least `ttl`:
    /// `ceil(ttl in ticks) + 1` ticks, in milliseconds rounded up so the kernel's
    /// rounding down gives back exactly that many ticks.
    #[must_use]
    pub fn timeout(self, ttl: Duration) -> Duration {
        self.timeout_behind(ttl, Duration::ZERO)
    }

    /// [`KernelTimer::timeout`] when the kernel's tick count trails real time by
    /// `lag` ([`tick_lag`]): the kernel counts an element's ticks from the jiffy it
    /// holds, and a jiffy is counted only when its tick is processed — on a VM often
    /// more than a tick late (7.5 ms at HZ=250 was seen here). Asked for the TTL plus
    /// one tick only, such an element closed up to 0.8 ms before its TTL. Counting the
    /// lag in keeps it never early; the close is still under two ticks after the TTL.
    #[must_use]
    pub fn timeout_behind(self, ttl: Duration, lag: Duration) -> Duration {
        let hz = u128::from(self.hz);
        let lag = lag.min(self.most_lag());
        let ticks = (ttl.saturating_add(lag).as_nanos() * hz).div_ceil(1_000_000_000) + 1;
        let ms = (ticks * 1000).div_ceil(hz);
        Duration::from_millis(u64::try_from(ms).unwrap_or(u64::MAX))
    }

    /// One tick, in whole milliseconds rounded up.
    #[must_use]
    pub fn tick(self) -> Duration {
        Duration::from_millis(u64::from(1000_u32.div_ceil(self.hz)))
    }

    /// The most an element outlives the TTL it was asked for, in whole milliseconds:
    /// the TTL rounded up to a tick, one tick more, and the lag counted in (at most
    /// [`KernelTimer::most_lag`]; the jiffies may have caught up by the add). The book
    /// reads a kernel's remaining time back through it, and says "ended" only after it.
    #[must_use]
    pub fn overshoot(self) -> Duration {
        Duration::from_millis(u64::from(2000_u32.div_ceil(self.hz))) + self.most_lag()
    }

    /// The most lag [`KernelTimer::timeout_behind`] counts in: two ticks or 10 ms,
    /// whichever is longer (7.5 ms was the most seen on a VM at HZ=250). A longer one
    /// counts as that much: a timer stalled that long is a machine in trouble, and
    /// the close it would delay is also how long the book waits to say "ended".
    #[must_use]
    pub fn most_lag(self) -> Duration {
        Duration::from_millis(u64::from(2000_u32.div_ceil(self.hz)).max(10))
    }

    /// When the book may say a grant ended: the kernel has surely closed it by its
    /// TTL plus the overshoot plus the time the netlink batch took to land (10 ms
    /// allowed), so "grant ended" never comes before the port closes.
    #[must_use]
    pub fn settle(self) -> Duration {
        self.overshoot() + Duration::from_millis(10)
    }
}

/// The kernel timer knockgate works with, measured once per process (unit tests:
/// HZ=250, so that golden ruleset texts do not depend on the machine).
#[must_use]
pub fn kernel_timer() -> KernelTimer {
    #[cfg(test)]
    {
        KernelTimer::with_hz(250)
    }
    #[cfg(not(test))]
    {
        static TIMER: std::sync::OnceLock<KernelTimer> = std::sync::OnceLock::new();
        *TIMER.get_or_init(KernelTimer::measure)
    }
}

/// How far the kernel's tick count trails real time now: `CLOCK_MONOTONIC` less
/// `CLOCK_MONOTONIC_COARSE` (the coarse clock moves with the jiffies, when a tick is
/// processed), both from the vDSO. At most a second (a clock that cannot be read, or
/// an absurd gap, counts as none rather than as a day). Unit tests: none, so that
/// timeouts they check do not depend on the machine.
#[must_use]
pub fn tick_lag() -> Duration {
    #[cfg(test)]
    {
        Duration::ZERO
    }
    #[cfg(not(test))]
    {
        measured_tick_lag()
    }
}

/// [`tick_lag`], measured.
#[must_use]
pub fn measured_tick_lag() -> Duration {
    use nix::time::{ClockId, clock_gettime};
    let read = |id| clock_gettime(id).ok().map(Duration::from);
    match (
        read(ClockId::CLOCK_MONOTONIC_COARSE),
        read(ClockId::CLOCK_MONOTONIC),
    ) {
        (Some(coarse), Some(fine)) => Some(fine.saturating_sub(coarse))
            .filter(|lag| *lag <= Duration::from_secs(1))
            .unwrap_or_default(),
        _ => Duration::ZERO,
    }
}

/// `CLOCK_MONOTONIC` for the daemon's closes of grants: a wall clock set forward or
/// back (`date -s`, an NTP step) moves no close, and it counts like the kernel's
/// jiffies (neither runs while the machine sleeps). Unit tests set it by hand.
#[derive(Debug, Clone, Default)]
pub enum MonoClock {
    /// The system's.
    #[default]
    System,
    /// A test's, in µs.
    #[cfg(test)]
    Manual(std::rc::Rc<std::cell::Cell<u64>>),
}

impl MonoClock {
    /// Microseconds since boot (not counting sleep), if the clock can be read (if
    /// not, grants are left to their kernel timeouts).
    #[must_use]
    pub fn now_us(&self) -> Option<u64> {
        match self {
            Self::System => nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
                .ok()
                .map(Duration::from)
                .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX)),
            #[cfg(test)]
            Self::Manual(at) => Some(at.get()),
        }
    }
}

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

    /// What the kernel makes of a timeout: `nsecs_to_jiffies64` rounds down, and the
    /// element ends after that many ticks less the part of the current tick gone.
    fn shortest_life_ns(timer: KernelTimer, asked: Duration) -> u128 {
        let hz = u128::from(timer.hz());
        let ticks = asked.as_nanos() * hz / 1_000_000_000;
        // Started at the very end of a tick: a whole tick fewer.
        (ticks - 1) * 1_000_000_000 / hz
    }

    fn longest_life_ns(timer: KernelTimer, asked: Duration) -> u128 {
        let hz = u128::from(timer.hz());
        asked.as_nanos() * hz / 1_000_000_000 * 1_000_000_000 / hz
    }

    /// The kernel's tick count trailing real time (a tick processed late, as on a
    /// VM): the jiffy an element starts from began `behind` before the add; the
    /// coarse clock moved when that jiffy was processed, `processed` after it began,
    /// so the lag knockgate measures is `behind - processed`.
    #[test]
    fn a_lagging_tick_count_is_counted_in_never_early_under_two_ticks_late() {
        for hz in [100u32, 250, 1000] {
            let timer = KernelTimer::with_hz(hz);
            let tick = 1_000_000_000 / u128::from(hz);
            for ms in [1u64, 999, 1000, 30_000] {
                let ttl = Duration::from_millis(ms);
                for behind in [0, tick / 3, tick, tick + tick / 2, 2 * tick, 3 * tick - 1] {
                    for processed in [0, tick / 100, tick / 2] {
                        let Some(measured) = behind.checked_sub(processed) else {
                            continue;
                        };
                        let lag = Duration::from_nanos(u64::try_from(measured).unwrap());
                        let asked = timer.timeout_behind(ttl, lag);
                        // The kernel rounds the milliseconds down to ticks and counts
                        // them from the start of the jiffy it holds.
                        let ticks = asked.as_nanos() * u128::from(hz) / 1_000_000_000;
                        let life = ticks * tick - behind;
                        assert!(
                            life >= ttl.as_nanos(),
                            "HZ={hz} ttl={ms} ms behind={behind} ns: ends {} ns early",
                            ttl.as_nanos() - life
                        );
                        assert!(
                            life < ttl.as_nanos() + 2 * tick,
                            "HZ={hz} ttl={ms} ms: late"
                        );
                    }
                }
            }
            // Without a lag, the same as before.
            let ttl = Duration::from_millis(1234);
            assert_eq!(
                timer.timeout_behind(ttl, Duration::ZERO),
                timer.timeout(ttl)
            );
        }
        // The old request (TTL + one tick) with a jiffy 1.5 ticks behind: early.
        let timer = KernelTimer::with_hz(250);
        let asked = timer.timeout(Duration::from_secs(1));
        let ticks = asked.as_nanos() * 250 / 1_000_000_000;
        assert!(ticks * 4_000_000 - 6_000_000 < 1_000_000_000);
    }

    #[test]
    fn the_measured_lag_is_a_duration_under_a_second() {
        assert!(measured_tick_lag() <= Duration::from_secs(1));
    }

    #[test]
    fn elements_never_end_early_and_at_most_a_tick_late_on_every_hz() {
        for hz in [24, 100, 250, 300, 1000] {
            let timer = KernelTimer::with_hz(hz);
            let tick_ns = 1_000_000_000 / u128::from(hz);
            for ms in [1, 3, 4, 10, 999, 1000, 1001, 2000, 30_000, 86_400_000] {
                let ttl = Duration::from_millis(ms);
                let asked = timer.timeout(ttl);
                assert!(
                    shortest_life_ns(timer, asked) >= ttl.as_nanos(),
                    "HZ={hz} ttl={ms} ms asked {asked:?}: early"
                );
                let late = longest_life_ns(timer, asked) - ttl.as_nanos();
                // A tick, plus the rest of the tick a TTL not of whole ticks ends in.
                let whole_ticks = (ttl.as_nanos() * u128::from(hz)) % 1_000_000_000 == 0;
                let bound = if whole_ticks { tick_ns } else { 2 * tick_ns };
                assert!(late <= bound, "HZ={hz} ttl={ms} ms: up to {late} ns late");
                assert!(
                    asked.checked_sub(ttl).unwrap() <= timer.overshoot(),
                    "HZ={hz} ttl={ms}"
                );
            }
        }
    }

    #[test]
    fn the_measured_tick_is_one_linux_builds() {
        let hz = KernelTimer::measure().hz();
        assert!((24..=1000).contains(&hz), "HZ={hz}");
        // Not the fallback: the machines this runs on measure their tick.
        assert_ne!(KernelTimer::measure(), KernelTimer::COARSEST);
    }

    #[test]
    fn the_monotonic_clock_moves_forward() {
        let clock = MonoClock::System;
        let (a, b) = (clock.now_us().unwrap(), clock.now_us().unwrap());
        assert!(a > 0 && b >= a, "{a} {b}");
    }
}
