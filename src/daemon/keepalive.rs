//! Tells the service manager that a long start is still starting. A start that must
//! read a million grants back from the kernel takes it minutes (each dump message of
//! a set walks the set from its first element: `benches/knock/million.rs`), and
//! systemd kills a start that passes `TimeoutStartSec` (90 s by default) — then
//! starts it again, to be killed again, while no knock is heard.

use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::Duration;

/// How often a long start says so, and how much longer it asks for each time.
pub const EVERY: Duration = Duration::from_secs(20);
const EXTEND_BY: Duration = Duration::from_secs(60);
/// At most this many times (30 minutes: a million grants read back take one or
/// two): a start that hangs is still killed and started again by systemd.
const MOST_EXTENSIONS: usize = 90;

/// While alive, calls `extend` every [`EVERY`] from a thread of its own (the start
/// blocks the daemon's thread); dropped, the thread ends at once.
pub struct StartKeepalive {
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl StartKeepalive {
    /// Keeps systemd's start timeout extended ([`EXTEND_BY`] at a time). Outside
    /// systemd the notifications go nowhere.
    #[must_use]
    pub fn for_systemd() -> Self {
        let usec = u32::try_from(EXTEND_BY.as_micros()).unwrap_or(u32::MAX);
        Self::spawn(EVERY, MOST_EXTENSIONS, move || {
            let _ = sd_notify::notify(&[sd_notify::NotifyState::ExtendTimeoutUsec(usec)]);
        })
    }

    /// Calls `extend` every `every`, at most `most` times, until dropped. If no thread
    /// can be made, the start goes on without (it is the timeout it risks, not the
    /// start).
    pub fn spawn(every: Duration, most: usize, extend: impl Fn() + Send + 'static) -> Self {
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("start-keepalive".into())
            .spawn(move || {
                for _ in 0..most {
                    if stopped.recv_timeout(every) != Err(RecvTimeoutError::Timeout) {
                        return;
                    }
                    extend();
                }
                // Past the most: wait to be dropped, saying nothing more.
                let _ = stopped.recv();
            })
            .ok();
        Self {
            stop: Some(stop),
            thread,
        }
    }
}

impl Drop for StartKeepalive {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A keepalive every `every`, at most `most` times, and its count of calls once
    /// it has made `at_least` of them (waited for within a bound, no timing asserted:
    /// a loaded machine only makes this slower).
    fn counted(
        every: Duration,
        most: usize,
        at_least: usize,
    ) -> (StartKeepalive, Arc<AtomicUsize>) {
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&calls);
        let keepalive = StartKeepalive::spawn(every, most, move || {
            counter.fetch_add(1, Ordering::SeqCst);
        });
        for _ in 0..2_000 {
            if calls.load(Ordering::SeqCst) >= at_least {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(calls.load(Ordering::SeqCst) >= at_least);
        (keepalive, calls)
    }

    #[test]
    fn a_long_start_says_so_until_it_ends_and_not_after() {
        let (keepalive, calls) = counted(Duration::from_millis(5), 1_000, 2);
        drop(keepalive);
        let after = calls.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            calls.load(Ordering::SeqCst),
            after,
            "the thread ended with it"
        );
    }

    #[test]
    fn a_start_that_hangs_is_extended_only_so_many_times() {
        let (keepalive, calls) = counted(Duration::from_millis(1), 3, 3);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        drop(keepalive);
    }
}
