//! A circuit breaker for a remote backend, and rate-limited failure logging.
//!
//! Closed: every operation goes through. After `threshold` consecutive connectivity failures
//! (refused, dropped, timed out) the breaker opens: operations fail at once, costing
//! nanoseconds instead of a timeout each. After `cooldown`, one operation is let through as a
//! probe (half-open); its success closes the breaker, its failure opens it for another
//! cooldown. Server replies that are errors (`WRONGTYPE`, ...) are not connectivity failures
//! and do not count.

use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const CLOSED: u8 = 0;
const OPEN: u8 = 1;
const HALF_OPEN: u8 = 2;

pub(crate) struct Breaker {
    state: AtomicU8,
    failures: AtomicU32,
    /// When the breaker may next let a probe through, in ms since `epoch`.
    retry_at_ms: AtomicU64,
    threshold: u32,
    cooldown: Duration,
    epoch: Instant,
    /// `cache_breaker_open` (feature `metrics`): 1 while open or half-open, else 0.
    #[cfg(feature = "metrics")]
    gauge: std::sync::OnceLock<metrics::Gauge>,
    /// Set by [`Breaker::retire`]: the gauge no longer follows the state.
    #[cfg(feature = "metrics")]
    retired: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Breaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Breaker")
            .field("state", &self.state)
            .field("failures", &self.failures)
            .field("threshold", &self.threshold)
            .field("cooldown", &self.cooldown)
            .finish_non_exhaustive()
    }
}

impl Breaker {
    pub(crate) fn new(threshold: u32, cooldown: Duration) -> Self {
        Breaker {
            state: AtomicU8::new(CLOSED),
            failures: AtomicU32::new(0),
            retry_at_ms: AtomicU64::new(0),
            threshold: threshold.max(1),
            cooldown,
            epoch: Instant::now(),
            #[cfg(feature = "metrics")]
            gauge: std::sync::OnceLock::new(),
            #[cfg(feature = "metrics")]
            retired: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Reports this breaker's state as the `cache_breaker_open` gauge of the cache named
    /// `namespace`, with `node` for a cluster master's breaker (feature `metrics`; the gauge
    /// is registered now, with the recorder in use).
    pub(crate) fn report_as(&self, namespace: &str, node: Option<&str>) {
        #[cfg(feature = "metrics")]
        {
            let gauge = crate::stats::metrics::breaker_gauge(namespace, node);
            gauge.set(f64::from(u8::from(self.is_open())));
            let _ = self.gauge.set(gauge);
        }
        #[cfg(not(feature = "metrics"))]
        let _ = (namespace, node);
    }

    /// The breaker's master left the cluster's slot table: its gauge is set to 0 (nothing is
    /// sent through this breaker any more, so an open one would never be probed and would
    /// report "open" for ever), and later state changes (an operation still in flight) no
    /// longer report. A master that returns gets a new breaker, which reports again.
    pub(crate) fn retire(&self) {
        #[cfg(feature = "metrics")]
        {
            self.retired.store(true, Ordering::Release);
            if let Some(gauge) = self.gauge.get() {
                gauge.set(0.0);
            }
        }
    }

    #[inline]
    fn report(&self, open: bool) {
        #[cfg(feature = "metrics")]
        if let Some(gauge) = self.gauge.get() {
            if !self.retired.load(Ordering::Acquire) {
                gauge.set(f64::from(u8::from(open)));
            }
        }
        #[cfg(not(feature = "metrics"))]
        let _ = open;
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Whether an operation may be attempted now: `None` if not, `Some(true)` if it is the
    /// probe of a half-open breaker (whose result must be recorded, or the probe abandoned).
    #[inline]
    pub(crate) fn acquire(&self) -> Option<bool> {
        match self.state.load(Ordering::Acquire) {
            CLOSED => Some(false),
            OPEN => {
                if self.now_ms() < self.retry_at_ms.load(Ordering::Acquire) {
                    return None;
                }
                // One caller wins the probe.
                self.state
                    .compare_exchange(OPEN, HALF_OPEN, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                    .then_some(true)
            }
            _ => None,
        }
    }

    /// The probe was dropped before it finished: let the next operation probe instead.
    pub(crate) fn abandon_probe(&self) {
        self.retry_at_ms.store(0, Ordering::Release);
        let _ = self
            .state
            .compare_exchange(HALF_OPEN, OPEN, Ordering::AcqRel, Ordering::Acquire);
    }

    /// Records a successful operation. Returns true if this closed an open breaker.
    #[inline]
    pub(crate) fn success(&self) -> bool {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
        if self.state.load(Ordering::Acquire) != CLOSED {
            let closed = self.state.swap(CLOSED, Ordering::AcqRel) != CLOSED;
            if closed {
                self.report(false);
            }
            return closed;
        }
        false
    }

    /// Records a connectivity failure. Returns true if this opened the breaker.
    pub(crate) fn failure(&self) -> bool {
        let failures = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
        let state = self.state.load(Ordering::Acquire);
        if state == HALF_OPEN || (state == CLOSED && failures >= self.threshold) {
            let cooldown = u64::try_from(self.cooldown.as_millis()).unwrap_or(u64::MAX);
            self.retry_at_ms
                .store(self.now_ms().saturating_add(cooldown), Ordering::Release);
            let opened = self.state.swap(OPEN, Ordering::AcqRel) == CLOSED;
            if opened {
                self.report(true);
            }
            return opened;
        }
        false
    }

    /// Whether the breaker is open or half-open (not every operation goes through).
    pub(crate) fn is_open(&self) -> bool {
        self.state.load(Ordering::Acquire) != CLOSED
    }
}

/// Logs at most one warning per `every` for one kind of failure, with the count suppressed
/// in between.
#[derive(Debug)]
pub(crate) struct RateLimited {
    last_ms: AtomicU64,
    suppressed: AtomicU64,
    every_ms: u64,
    epoch: Instant,
}

impl RateLimited {
    pub(crate) fn new(every: Duration) -> Self {
        RateLimited {
            last_ms: AtomicU64::new(u64::MAX),
            suppressed: AtomicU64::new(0),
            every_ms: u64::try_from(every.as_millis()).unwrap_or(u64::MAX),
            epoch: Instant::now(),
        }
    }

    /// Returns `Some(suppressed since the last log)` if the caller should log now.
    pub(crate) fn check(&self) -> Option<u64> {
        let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        let last = self.last_ms.load(Ordering::Relaxed);
        if last != u64::MAX && now.saturating_sub(last) < self.every_ms {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        if self
            .last_ms
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(self.suppressed.swap(0, Ordering::Relaxed))
    }
}

/// The kinds of failure logged separately.
#[derive(Debug, Clone, Copy)]
pub(crate) enum FailureKind {
    Unavailable,
    Timeout,
    Server,
    Decode,
    Encode,
    Key,
}

const KINDS: usize = 6;

/// One rate limiter per failure kind.
#[derive(Debug)]
pub(crate) struct FailureLog {
    limiters: [RateLimited; KINDS],
}

impl FailureLog {
    pub(crate) fn new(every: Duration) -> Self {
        FailureLog {
            limiters: std::array::from_fn(|_| RateLimited::new(every)),
        }
    }

    pub(crate) fn warn(&self, kind: FailureKind, what: &dyn std::fmt::Display) {
        if let Some(suppressed) = self.limiters[kind as usize].check() {
            if suppressed > 0 {
                tracing::warn!(
                    target: "cache_runtime",
                    "{what} ({suppressed} similar failures not logged since the last one)"
                );
            } else {
                tracing::warn!(target: "cache_runtime", "{what}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_threshold_and_probes_after_cooldown() {
        let b = Breaker::new(2, Duration::from_millis(30));
        assert_eq!(b.acquire(), Some(false));
        assert!(!b.failure());
        assert_eq!(b.acquire(), Some(false));
        assert!(b.failure(), "second consecutive failure opens");
        assert_eq!(b.acquire(), None);
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(b.acquire(), Some(true), "one probe after the cooldown");
        assert_eq!(b.acquire(), None, "only one probe at a time");
        assert!(!b.failure(), "a failed probe reopens (already not closed)");
        assert_eq!(b.acquire(), None);
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(b.acquire(), Some(true));
        assert!(b.success(), "a successful probe closes");
        assert_eq!(b.acquire(), Some(false));
        assert!(!b.is_open());
    }

    #[test]
    fn abandoned_probe_lets_the_next_call_probe() {
        let b = Breaker::new(1, Duration::from_secs(3600));
        b.failure();
        assert_eq!(b.acquire(), None);
        b.retry_at_ms.store(0, Ordering::Release);
        assert_eq!(b.acquire(), Some(true));
        b.abandon_probe();
        assert_eq!(b.acquire(), Some(true), "the probe slot is free again");
    }

    #[test]
    fn success_resets_the_count() {
        let b = Breaker::new(2, Duration::from_secs(60));
        b.failure();
        b.success();
        b.failure();
        assert_eq!(b.acquire(), Some(false), "failures must be consecutive");
    }

    #[test]
    fn rate_limited_counts_suppressed() {
        let r = RateLimited::new(Duration::from_secs(3600));
        assert_eq!(r.check(), Some(0));
        assert_eq!(r.check(), None);
        assert_eq!(r.check(), None);
        let r2 = RateLimited::new(Duration::ZERO);
        assert_eq!(r2.check(), Some(0));
        assert_eq!(r2.check(), Some(0));
    }
}
