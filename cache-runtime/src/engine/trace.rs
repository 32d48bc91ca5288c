//! `tracing`: a `debug`-level span per cached call, `cache_call`, with the fields
//! `function` (the stats label), `cache` (the namespace, `default` without one), `outcome`
//! (recorded once known: see [`Outcome`]), `level` (`l1` or `l2`, on a hit) and `key` (only
//! with [`CacheBuilder::trace_keys`](crate::CacheBuilder::trace_keys): keys can carry personal
//! data).
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
    /// The function ran because nothing usable was cached.
    Miss,
    /// A cache operation failed (Redis unreachable, the breaker open, a timeout, an error
    /// reply, an undecodable value): the call went on without the cache. Not replaced by
    /// `miss` when the function then runs.
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
    /// The span of a call of the function `stats` counts, for `key` (recorded only if
    /// `trace_keys`).
    #[inline]
    pub(crate) fn start(stats: &SiteStats, key: Option<&str>, trace_keys: bool) -> Trace {
        Trace {
            span: span(stats, key, trace_keys),
            outcome: AtomicU8::new(Outcome::Unknown as u8),
        }
    }

    /// A hit answered by the in-process tier: a span of its own, closed at once (such a
    /// call makes no [`Fetch`](super::Fetch)).
    #[inline]
    pub(crate) fn l1_hit(stats: &SiteStats, key: &str, trace_keys: bool) {
        let span = span(stats, Some(key), trace_keys);
        if !span.is_disabled() {
            span.record("outcome", Outcome::Hit.as_str());
            span.record("level", "l1");
        }
    }

    pub(crate) fn span(&self) -> &Span {
        &self.span
    }

    /// Records `outcome`, unless the span is disabled. `miss` does not replace `fail_open`
    /// (the function runs after a failed read), nor `lock_wait` a `hit` (the hit is what the
    /// wait brought).
    #[inline]
    pub(crate) fn set(&self, outcome: Outcome) {
        if self.span.is_disabled() {
            return;
        }
        let current = self.outcome.load(Relaxed);
        let kept = match outcome {
            Outcome::Miss => current == Outcome::FailOpen as u8,
            Outcome::Hit => current == Outcome::LockWait as u8,
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
