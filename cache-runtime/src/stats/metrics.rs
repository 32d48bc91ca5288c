//! The `metrics` feature: the handles each [`SiteStats`] feeds, registered once per (function,
//! cache) pair when its counters are created, so a call costs an increment of a handle it
//! already holds (without a recorder, a no-op handle: one branch).
//!
//! Names and labels (README "Metrics"): every metric has the labels `function` (the stats
//! label: the `name` option, else the function's path) and `cache` (the cache's namespace,
//! `default` when it has none); `cache_hits_total` adds `level`, `cache_fail_open_total`
//! adds `kind`. No label carries a key.

use metrics::{Label, Level, Metadata};

use super::SiteStats;
use super::counters::cache_label;
use crate::backend::BackendError;

/// Calls answered from the cache (`level`: `l1`, the in-process tier; `l2`, the backend, or
/// a load of this process another call waited for).
pub(crate) const HITS: &str = "cache_hits_total";
/// Calls that ran the function because nothing usable was cached.
pub(crate) const MISSES: &str = "cache_misses_total";
/// Times the function ran for a caller.
pub(crate) const LOADS: &str = "cache_loads_total";
/// Loads that returned `Err` or panicked.
pub(crate) const LOAD_ERRORS: &str = "cache_load_errors_total";
/// Calls that waited for a concurrent call's load in the same process.
pub(crate) const COALESCED: &str = "cache_coalesced_total";
/// `lock`: waits for another process's load.
pub(crate) const LOCK_WAITS: &str = "cache_lock_waits_total";
/// Loads taken over from a holder that did not fill.
pub(crate) const LOCK_TAKEOVERS: &str = "cache_lock_takeovers_total";
/// Fills not stored because the key was written or invalidated during the load.
pub(crate) const STALE_FILLS: &str = "cache_stale_fills_rejected_total";
/// `#[cache_put]` (and write-behind) entries written.
pub(crate) const PUTS: &str = "cache_puts_total";
/// `#[cache_evict]` calls that invalidated their keys.
pub(crate) const EVICTIONS: &str = "cache_evictions_total";
/// Cache operations that failed, the call going on without the cache (`kind`:
/// `unavailable`, `timeout`, `server` for an error reply, `decode` for an unusable value).
pub(crate) const FAIL_OPEN: &str = "cache_fail_open_total";
/// Seconds spent in loads.
pub(crate) const LOAD_SECONDS: &str = "cache_load_seconds";
/// `lock`: seconds spent waiting for another process's load.
pub(crate) const LOCK_WAIT_SECONDS: &str = "cache_lock_wait_seconds";
/// 1 while the cache's circuit breaker is open or half-open, else 0 (labels: `cache`; on a
/// cluster also one series per master with `node`, its address, for the master's breaker).
pub(crate) const BREAKER_OPEN: &str = "cache_breaker_open";
/// Calls that ran without the cache (`reason`: `condition` false, or `key`: the key or a tag
/// could not be rendered).
pub(crate) const BYPASS: &str = "cache_bypass_total";
/// Write-behind calls queued (the call returned before the body ran).
pub(crate) const WB_ENQUEUED: &str = "cache_write_behind_enqueued_total";
/// Write-behind calls whose body ran inline (memory backend, Redis failed, no key, arguments
/// that do not round-trip).
pub(crate) const WB_INLINE: &str = "cache_write_behind_inline_total";
/// Queued write-behind entries applied by a worker (every entry of a coalesced run counts:
/// enqueued = applied + dead-lettered + pending).
pub(crate) const WB_APPLIED: &str = "cache_write_behind_applied_total";
/// Failed attempts at queued write-behind entries (one per attempt at a run).
pub(crate) const WB_RETRIED: &str = "cache_write_behind_retries_total";
/// Queued write-behind entries moved to the dead letters (every entry of a run counts).
pub(crate) const WB_DEAD: &str = "cache_write_behind_dead_lettered_total";

/// A `metrics` counter handle, a no-op one by default.
pub(crate) struct Metric(pub(crate) metrics::Counter);

impl Default for Metric {
    fn default() -> Self {
        Metric(metrics::Counter::noop())
    }
}

impl std::fmt::Debug for Metric {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metric")
    }
}

/// The metrics of a [`SiteStats`] that no single counter feeds.
pub(crate) struct SiteMetrics {
    pub(crate) load_seconds: metrics::Histogram,
    pub(crate) lock_wait_seconds: metrics::Histogram,
    /// `cache_bypass_total{reason="key"}` (the `bypassed` counter's own is `condition`).
    pub(crate) bypass_key: metrics::Counter,
    unavailable: metrics::Counter,
    timeout: metrics::Counter,
    server: metrics::Counter,
}

impl Default for SiteMetrics {
    fn default() -> Self {
        SiteMetrics {
            load_seconds: metrics::Histogram::noop(),
            lock_wait_seconds: metrics::Histogram::noop(),
            bypass_key: metrics::Counter::noop(),
            unavailable: metrics::Counter::noop(),
            timeout: metrics::Counter::noop(),
            server: metrics::Counter::noop(),
        }
    }
}

impl std::fmt::Debug for SiteMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SiteMetrics")
    }
}

impl SiteMetrics {
    pub(crate) fn fail_open(&self, e: &BackendError) {
        match e {
            BackendError::Unavailable(_) => &self.unavailable,
            BackendError::Timeout => &self.timeout,
            BackendError::Data(_) => &self.server,
        }
        .increment(1);
    }
}

static METADATA: Metadata<'static> = Metadata::new(module_path!(), Level::INFO, None);

/// Registers `stats`' handles with the recorder in use now (the thread's local recorder,
/// else the global one; without either, they stay no-ops), labelled with its function and
/// cache.
pub(super) fn attach(stats: &mut SiteStats) {
    let labels = [
        Label::new("function", stats.label.to_string()),
        Label::new("cache", stats.cache.to_string()),
    ];
    metrics::with_recorder(|r| {
        let key = |name: &'static str, extra: Option<(&'static str, &'static str)>| {
            let mut l = labels.to_vec();
            if let Some((k, v)) = extra {
                l.push(Label::new(k, v));
            }
            metrics::Key::from_parts(name, l)
        };
        let counter =
            |name, extra| super::metrics::Metric(r.register_counter(&key(name, extra), &METADATA));
        stats.hits.metric = counter(HITS, Some(("level", "l2")));
        stats.l1_hits.metric = counter(HITS, Some(("level", "l1")));
        stats.misses.metric = counter(MISSES, None);
        stats.loads.metric = counter(LOADS, None);
        stats.load_errors.metric = counter(LOAD_ERRORS, None);
        stats.coalesced.metric = counter(COALESCED, None);
        stats.lock_waits.metric = counter(LOCK_WAITS, None);
        stats.takeovers.metric = counter(LOCK_TAKEOVERS, None);
        stats.stale_fills.metric = counter(STALE_FILLS, None);
        stats.puts.metric = counter(PUTS, None);
        stats.evictions.metric = counter(EVICTIONS, None);
        stats.decode_errors.metric = counter(FAIL_OPEN, Some(("kind", "decode")));
        stats.bypassed.metric = counter(BYPASS, Some(("reason", "condition")));
        stats.wb_accepted.metric = counter(WB_ENQUEUED, None);
        stats.wb_write_through.metric = counter(WB_INLINE, None);
        stats.wb_applied.metric = counter(WB_APPLIED, None);
        stats.wb_retried.metric = counter(WB_RETRIED, None);
        stats.wb_dead_lettered.metric = counter(WB_DEAD, None);
        let fail_open = |kind| counter(FAIL_OPEN, Some(("kind", kind))).0;
        stats.metrics = SiteMetrics {
            load_seconds: r.register_histogram(&key(LOAD_SECONDS, None), &METADATA),
            lock_wait_seconds: r.register_histogram(&key(LOCK_WAIT_SECONDS, None), &METADATA),
            bypass_key: counter(BYPASS, Some(("reason", "key"))).0,
            unavailable: fail_open("unavailable"),
            timeout: fail_open("timeout"),
            server: fail_open("server"),
        };
    });
}

/// The breaker-state gauge of the cache named `namespace`; with `node`, of that master's
/// breaker (a cluster's).
pub(crate) fn breaker_gauge(namespace: &str, node: Option<&str>) -> metrics::Gauge {
    let mut labels = vec![Label::new("cache", cache_label(namespace).to_owned())];
    if let Some(node) = node {
        labels.push(Label::new("node", node.to_owned()));
    }
    let key = metrics::Key::from_parts(BREAKER_OPEN, labels);
    metrics::with_recorder(|r| r.register_gauge(&key, &METADATA))
}
