//! The live counters: [`Counter`], striped across cache lines, and [`SiteStats`], one
//! function's counters on one cache, which [`SiteStats::snapshot`] turns into a
//! [`FunctionStats`].

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use super::FunctionStats;

/// The `cache` label's value: the namespace, `default` without one.
pub(crate) fn cache_label(namespace: &str) -> &str {
    if namespace.is_empty() {
        "default"
    } else {
        namespace
    }
}

const STRIPES: usize = 8;

#[derive(Default, Debug)]
#[repr(align(64))]
struct Padded(AtomicU64);

/// A counter striped across cache lines: threads increment their own stripe, so counting a
/// hit on every call does not bounce one cache line between cores.
///
/// With the `metrics` feature it also feeds a `metrics` counter (a no-op handle unless
/// [`SiteStats::new`] attached one), so [`Cache::stats`](crate::Cache::stats) and the
/// exported metrics are incremented at the same points and always agree.
#[derive(Default, Debug)]
pub(crate) struct Counter {
    stripes: [Padded; STRIPES],
    #[cfg(feature = "metrics")]
    pub(super) metric: super::metrics::Metric,
}

thread_local! {
    static STRIPE: usize = {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        (NEXT.fetch_add(1, Relaxed) as usize) % STRIPES
    };
}

impl Counter {
    /// Adds `n` to the counter and to its metric.
    #[inline]
    pub(crate) fn add(&self, n: u64) {
        self.tally(n);
        #[cfg(feature = "metrics")]
        self.metric.0.increment(n);
    }

    /// Adds `n` to the counter only (its metric is fed elsewhere: see [`SiteStats::l1_hit`],
    /// [`SiteStats::bypass`]).
    #[inline]
    fn tally(&self, n: u64) {
        let i = STRIPE.try_with(|s| *s).unwrap_or(0);
        self.stripes[i].0.fetch_add(n, Relaxed);
    }

    pub(crate) fn get(&self) -> u64 {
        self.stripes.iter().map(|p| p.0.load(Relaxed)).sum()
    }
}

/// Why a call bypassed the cache (the `reason` label of `cache_bypass_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Bypass {
    /// `condition` was false.
    Condition,
    /// The key, or a tag, could not be rendered (an argument's `Display` or `Serialize`
    /// failed).
    Key,
}

/// The live counters of one function (one call site) on one cache.
#[derive(Default, Debug)]
pub(crate) struct SiteStats {
    /// The function's stats label (the `function` field of its spans and metrics).
    pub(crate) label: Box<str>,
    /// The cache's namespace, `default` without one (the `cache` field and label).
    pub(crate) cache: Box<str>,
    pub(crate) hits: Counter,
    pub(crate) l1_hits: Counter,
    pub(crate) coalesced: Counter,
    pub(crate) misses: Counter,
    pub(crate) bypassed: Counter,
    pub(crate) loads: Counter,
    pub(crate) load_errors: Counter,
    pub(crate) not_stored: Counter,
    pub(crate) load_ns: Counter,
    pub(crate) load_ns_max: AtomicU64,
    pub(crate) backend_errors: Counter,
    pub(crate) decode_errors: Counter,
    pub(crate) stale_fills: Counter,
    pub(crate) lock_acquired: Counter,
    pub(crate) lock_waits: Counter,
    pub(crate) lock_wait_ns: Counter,
    pub(crate) lock_wait_ns_max: AtomicU64,
    pub(crate) takeovers: Counter,
    pub(crate) wait_timeouts: Counter,
    pub(crate) puts: Counter,
    pub(crate) evictions: Counter,
    pub(crate) tag_invalidations: Counter,
    pub(crate) stale_served: Counter,
    pub(crate) refreshes: Counter,
    pub(crate) refresh_errors: Counter,
    pub(crate) wb_accepted: Counter,
    pub(crate) wb_write_through: Counter,
    pub(crate) wb_applied: Counter,
    pub(crate) wb_retried: Counter,
    pub(crate) wb_dead_lettered: Counter,
    /// The metrics no single [`Counter`] feeds: histograms, fail-open events by kind.
    #[cfg(feature = "metrics")]
    pub(super) metrics: super::metrics::SiteMetrics,
}

impl SiteStats {
    /// The counters of `function` (its stats label) on the cache named `cache` (its
    /// namespace), with their `metrics` handles registered now (feature `metrics`) with the
    /// recorder installed at this time, if any.
    pub(crate) fn new(function: &str, cache: &str) -> Self {
        #[allow(unused_mut)]
        let mut stats = SiteStats {
            label: function.into(),
            cache: cache_label(cache).into(),
            ..SiteStats::default()
        };
        #[cfg(feature = "metrics")]
        super::metrics::attach(&mut stats);
        stats
    }

    #[inline]
    pub(crate) fn inc(counter: &Counter) {
        counter.add(1);
    }

    /// A hit answered from the in-process tier: counted in `hits` and `l1_hits`, and once
    /// in the metrics (`cache_hits_total{level="l1"}`; every other hit is `level="l2"`).
    #[inline]
    pub(crate) fn l1_hit(&self) {
        self.hits.tally(1);
        self.l1_hits.add(1);
    }

    /// A call that ran without the cache, for `reason`.
    #[inline]
    pub(crate) fn bypass(&self, reason: Bypass) {
        match reason {
            Bypass::Condition => self.bypassed.add(1),
            Bypass::Key => {
                self.bypassed.tally(1);
                #[cfg(feature = "metrics")]
                self.metrics.bypass_key.increment(1);
            }
        }
    }

    /// A cache operation that failed, so the call went on without the cache (fail open).
    pub(crate) fn backend_failure(&self, e: &crate::backend::BackendError) {
        self.backend_errors.add(1);
        #[cfg(feature = "metrics")]
        self.metrics.fail_open(e);
        #[cfg(not(feature = "metrics"))]
        let _ = e;
    }

    pub(crate) fn record_wait(&self, waited: Duration) {
        let ns = u64::try_from(waited.as_nanos()).unwrap_or(u64::MAX);
        self.lock_wait_ns.add(ns);
        self.lock_wait_ns_max.fetch_max(ns, Relaxed);
        #[cfg(feature = "metrics")]
        self.metrics.lock_wait_seconds.record(waited.as_secs_f64());
    }

    pub(crate) fn record_load(&self, took: Duration) {
        let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.loads.add(1);
        self.load_ns.add(ns);
        self.load_ns_max.fetch_max(ns, Relaxed);
        #[cfg(feature = "metrics")]
        self.metrics.load_seconds.record(took.as_secs_f64());
    }

    pub(super) fn snapshot(&self, name: &str) -> FunctionStats {
        FunctionStats {
            name: name.to_owned(),
            hits: self.hits.get(),
            l1_hits: self.l1_hits.get(),
            coalesced: self.coalesced.get(),
            misses: self.misses.get(),
            bypassed: self.bypassed.get(),
            loads: self.loads.get(),
            load_errors: self.load_errors.get(),
            not_stored: self.not_stored.get(),
            load_time_total: Duration::from_nanos(self.load_ns.get()),
            load_time_max: Duration::from_nanos(self.load_ns_max.load(Relaxed)),
            backend_errors: self.backend_errors.get(),
            decode_errors: self.decode_errors.get(),
            stale_fills: self.stale_fills.get(),
            lock_acquired: self.lock_acquired.get(),
            lock_waits: self.lock_waits.get(),
            lock_wait_total: Duration::from_nanos(self.lock_wait_ns.get()),
            lock_wait_max: Duration::from_nanos(self.lock_wait_ns_max.load(Relaxed)),
            takeovers: self.takeovers.get(),
            wait_timeouts: self.wait_timeouts.get(),
            puts: self.puts.get(),
            evictions: self.evictions.get(),
            tag_invalidations: self.tag_invalidations.get(),
            stale_served: self.stale_served.get(),
            refreshes: self.refreshes.get(),
            refresh_errors: self.refresh_errors.get(),
            accepted: self.wb_accepted.get(),
            write_through: self.wb_write_through.get(),
            applied: self.wb_applied.get(),
            retried: self.wb_retried.get(),
            dead_lettered: self.wb_dead_lettered.get(),
        }
    }
}
