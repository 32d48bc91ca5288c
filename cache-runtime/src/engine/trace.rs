//! `tracing`: a `debug`-level span per cached call, `cache_call`, with the fields
//! `function` (the stats label), `cache` (the namespace, `default` without one), `outcome`
//! (recorded once known: see [`Outcome`]), `level` (`l1` or `l2`, on a hit) and `key` (only
//! with [`CacheBuilder::trace_keys`](crate::CacheBuilder::trace_keys): keys can carry personal
//! data). A background refresh has a span of its own, `cache_refresh` (see [`Trace::refresh`]).
//!
//! With no subscriber, or one that does not want `debug` spans of `cache_runtime`, the span is
//! disabled: its fields are not evaluated, nothing is allocated, and every later step is one
//! branch on [`Span::is_disabled`].

use std::sync::atomic::{AtomicU8, Ordering::Relaxed};

use tracing::Span;
use tracing::field::Empty;

use crate::stats::SiteStats;

/// What a call came to, as its span's `outcome` field says.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
pub(crate) enum Outcome {
    /// Not known yet.
    Unknown = 0,
    /// The cache was read and had nothing usable: the function ran. Stays `miss` if storing
    /// the result then fails (the read worked; the failure is counted in the metrics).
    Miss,
    /// Reading the cache failed (Redis unreachable, the breaker open, a timeout, an error
    /// reply, an undecodable value): the call ran uncached. Not replaced by `miss` when the
    /// function then runs.
    FailOpen,
    /// Answered from the cache (`level`: `l1`, the in-process tier; `l2`, the backend).
    Hit,
    /// Answered by a concurrent call's load in this process.
    Coalesced,
    /// `lock`: answered by another process's load, after waiting for it.
    LockWait,
    /// No key (`condition` false, or the key or a tag could not be rendered): the function
    /// ran without the cache.
    Bypass,
    /// `stale`: the load failed and a value kept past its TTL was returned.
    Stale,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Unknown => "unknown",
            Outcome::Miss => "miss",
            Outcome::FailOpen => "fail_open",
            Outcome::Hit => "hit",
            Outcome::Coalesced => "coalesced",
            Outcome::LockWait => "lock_wait",
            Outcome::Bypass => "bypass",
            Outcome::Stale => "stale",
        }
    }
}

/// One call's span and the outcome recorded on it so far.
pub(crate) struct Trace {
    span: Span,
    outcome: AtomicU8,
    /// Whether the span records the call's key, once the call is known to have one.
    trace_keys: bool,
}

/// The call's span: disabled (and its fields not evaluated) unless a subscriber wants it.
#[inline]
fn span(stats: &SiteStats, key: Option<&str>, trace_keys: bool) -> Span {
    let span = tracing::debug_span!(
        target: "cache_runtime",
        "cache_call",
        function = %stats.label,
        cache = %stats.cache,
        outcome = Empty,
        level = Empty,
        key = Empty,
    );
    if trace_keys && !span.is_disabled() {
        if let Some(key) = key {
            span.record("key", key);
        }
    }
    span
}

impl Trace {
    /// The span of a call of the function `stats` counts. Its key is recorded later (see
    /// [`Trace::key`]): a tag that fails to render makes the call keyless.
    #[inline]
    pub(crate) fn start(stats: &SiteStats, trace_keys: bool) -> Trace {
        Trace {
            span: span(stats, None, false),
            outcome: AtomicU8::new(Outcome::Unknown as u8),
            trace_keys,
        }
    }

    /// The call's key, known to be used (only with `trace_keys`, and a span a subscriber
    /// wants).
    #[inline]
    pub(crate) fn key(&self, key: &str) {
        if self.trace_keys && !self.span.is_disabled() {
            self.span.record("key", key);
        }
    }

    /// A hit answered by the in-process tier: a span of its own, closed when the caller
    /// drops it (such a call makes no [`Fetch`](super::Fetch)).
    #[inline]
    pub(crate) fn l1_hit(stats: &SiteStats, key: &str, trace_keys: bool) -> Span {
        let span = span(stats, Some(key), trace_keys);
        if !span.is_disabled() {
            span.record("outcome", Outcome::Hit.as_str());
            span.record("level", "l1");
        }
        span
    }

    /// The span of a background refresh of `key` started by the call of `from`: a `debug`
    /// span `cache_refresh` (`function`, `cache`, and `key` with `trace_keys`) that follows
    /// from the call's.
    pub(crate) fn refresh(stats: &SiteStats, key: &str, trace_keys: bool, from: &Span) -> Span {
        let span = tracing::debug_span!(
            target: "cache_runtime",
            parent: None,
            "cache_refresh",
            function = %stats.label,
            cache = %stats.cache,
            key = Empty,
        );
        if !span.is_disabled() {
            if trace_keys {
                span.record("key", key);
            }
            span.follows_from(from);
        }
        span
    }

    pub(crate) fn span(&self) -> &Span {
        &self.span
    }

    /// Records `outcome`, unless the span is disabled. `miss` does not replace `fail_open`
    /// (the function runs after a failed read), nor `fail_open` a `miss` (storing the result
    /// failed after a read that worked), and a `hit` does not replace `lock_wait` (the hit is
    /// what the wait brought).
    #[inline]
    pub(crate) fn set(&self, outcome: Outcome) {
        if self.span.is_disabled() {
            return;
        }
        let current = self.outcome.load(Relaxed);
        let kept = match outcome {
            Outcome::Miss => current == Outcome::FailOpen as u8,
            Outcome::Hit => current == Outcome::LockWait as u8,
            Outcome::FailOpen => current == Outcome::Miss as u8,
            _ => false,
        };
        if kept || current == outcome as u8 {
            return;
        }
        self.outcome.store(outcome as u8, Relaxed);
        self.span.record("outcome", outcome.as_str());
        if outcome == Outcome::Hit {
            self.span.record("level", "l2");
        }
    }
}
