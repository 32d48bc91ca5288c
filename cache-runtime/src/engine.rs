//! The get-or-load engine: the one entry point the `#[cached]` expansion calls.
//!
//! ```text
//! condition false ──────────────────────────────────────────────► run the function (bypass)
//! memory backend: read ── hit ──────────────────────────────────► decoded value
//! join the key's flight ── follower ── leader's value ──────────► decoded value (coalesced hit)
//!                     │               ├ leader's result not shared ► run the function
//!                     │               └ leader gone ──────────────► join again
//!                     └─ leader ── read ── hit ────────────────► publish, decoded value
//!                                       └ miss / error / garbage ► run the function,
//!                                         store it unless Err / None / `unless`, publish
//! ```
//!
//! Backend failures and undecodable values are counted, logged (rate-limited) and treated as
//! misses; they never reach the caller.

use std::future::Future;
use std::time::{Duration, Instant};

use crate::backend::{Backend, BackendError, Stored};
use crate::breaker::FailureKind;
use crate::cache::{Cache, Inner};
use crate::envelope;
use crate::flight::{LeaderGuard, Outcome, Role};
use crate::key::CallKey;
use crate::mode::{Classified, Mode, Typed};
use crate::stats::{Site, SiteStats};

/// One call of a cached function, as the attribute's expansion describes it.
#[doc(hidden)]
pub struct Call<'a> {
    /// The cache to use.
    pub cache: &'a Cache,
    /// The function's static description.
    pub site: &'static Site,
    /// `type_name::<Self>()` for methods, for the default label.
    pub self_type: Option<&'static str>,
    /// The rendered key, or why there is none (the call then bypasses the cache).
    pub key: CallKey,
}

/// Counts a load that panicked.
struct LoadGuard<'a> {
    stats: &'a SiteStats,
    armed: bool,
}

impl Drop for LoadGuard<'_> {
    fn drop(&mut self) {
        if self.armed && std::thread::panicking() {
            SiteStats::inc(&self.stats.load_errors);
        }
    }
}

/// Runs `fut`, timing it.
async fn load<R, F: Future<Output = R>>(stats: &SiteStats, fut: F) -> (R, Duration) {
    let mut guard = LoadGuard { stats, armed: true };
    let start = Instant::now();
    let result = fut.await;
    let took = start.elapsed();
    guard.armed = false;
    stats.record_load(took);
    (result, took)
}

/// Runs the function without storing its result (bypass, or released by a leader).
async fn run_uncached<R, M: Mode<R>, F: Future<Output = R>>(
    stats: &SiteStats,
    mode: &M,
    fut: F,
) -> R {
    let (result, _) = load(stats, fut).await;
    if matches!(mode.classify(&result), Classified::Error) {
        SiteStats::inc(&stats.load_errors);
    }
    result
}

/// Decodes a stored value: the kept decoded value when there is one of the right type,
/// otherwise the envelope's JSON.
fn restore<R, M: Mode<R>>(
    stored: &Stored,
    mode: &M,
    typed: Option<Typed<M::Value>>,
) -> Result<R, envelope::DecodeError> {
    if let (Some(any), Some(typed)) = (&stored.typed, typed) {
        if let Some(v) = (typed.unwrap)(&**any) {
            return Ok(mode.restore(v));
        }
    }
    envelope::decode::<M::Value>(&stored.bytes).map(|v| mode.restore(v))
}

/// The cached call: see the module docs.
#[doc(hidden)]
pub async fn cached<R, M, U, F>(
    call: Call<'_>,
    mode: M,
    typed: Option<Typed<M::Value>>,
    unless: U,
    fut: F,
) -> R
where
    M: Mode<R>,
    U: FnOnce(&R) -> bool,
    F: Future<Output = R>,
{
    let inner: &Inner = &call.cache.inner;
    let stats = call.site.stats(&inner.stats, call.self_type);
    let key = match call.key {
        CallKey::Key(key) => key,
        CallKey::Condition => {
            SiteStats::inc(&stats.bypassed);
            return run_uncached(&stats, &mode, fut).await;
        }
        CallKey::Unrenderable => {
            SiteStats::inc(&stats.bypassed);
            inner.log.warn(
                FailureKind::Key,
                &format_args!(
                    "the cache key of `{}` could not be rendered (an argument's Display or Serialize failed); the call runs uncached",
                    call.site.label(call.self_type)
                ),
            );
            return run_uncached(&stats, &mode, fut).await;
        }
    };

    // Backends that do not coalesce reads are read before joining a flight; the leader reads
    // again only after a clean miss (a racing leader may have filled the key meanwhile).
    let mut reread = true;
    if !inner.backend.coalesce_reads() {
        match read(inner, call.site, &stats, &key, &mode, typed).await {
            Read::Hit(_, value) => {
                SiteStats::inc(&stats.hits);
                return value;
            }
            Read::Miss => {}
            Read::Unusable => reread = false,
        }
    }

    let mut key = key;
    loop {
        match inner.flights.join(key) {
            Role::Leader(guard) => {
                let how = Lead {
                    read_first: reread,
                    typed,
                };
                return lead(inner, call.site, &stats, guard, &mode, how, unless, fut).await;
            }
            Role::Follower(follower) => match follower.wait().await {
                Outcome::Value(stored) => match restore(&stored, &mode, typed) {
                    Ok(v) => {
                        SiteStats::inc(&stats.hits);
                        SiteStats::inc(&stats.coalesced);
                        return v;
                    }
                    Err(e) => {
                        // Another function shares this key with a different type.
                        decode_failure(inner, call.site, &stats, &e);
                        SiteStats::inc(&stats.misses);
                        return run_uncached(&stats, &mode, fut).await;
                    }
                },
                Outcome::Released => {
                    SiteStats::inc(&stats.misses);
                    return run_uncached(&stats, &mode, fut).await;
                }
                Outcome::Abandoned => key = follower.into_key(),
            },
        }
    }
}

/// How the leader proceeds.
struct Lead<V> {
    /// Read the backend before loading.
    read_first: bool,
    typed: Option<Typed<V>>,
}

#[allow(clippy::too_many_arguments)]
async fn lead<R, M, U, F>(
    inner: &Inner,
    site: &'static Site,
    stats: &SiteStats,
    guard: LeaderGuard<'_>,
    mode: &M,
    how: Lead<M::Value>,
    unless: U,
    fut: F,
) -> R
where
    M: Mode<R>,
    U: FnOnce(&R) -> bool,
    F: Future<Output = R>,
{
    let key = guard.flight().key();
    if how.read_first {
        if let Read::Hit(stored, value) = read(inner, site, stats, key, mode, how.typed).await {
            SiteStats::inc(&stats.hits);
            guard.publish(Outcome::Value(stored));
            return value;
        }
    }
    SiteStats::inc(&stats.misses);

    let (result, took) = load(stats, fut).await;
    let ttl = site.ttl.unwrap_or(inner.default_ttl);
    let (value, ttl) = match mode.classify(&result) {
        Classified::Store(v) => (Some(v), ttl),
        Classified::StoreNone(v) if site.cache_none => (Some(v), site.none_ttl.unwrap_or(ttl)),
        Classified::StoreNone(_) => (None, ttl),
        Classified::Error => {
            SiteStats::inc(&stats.load_errors);
            (None, ttl)
        }
    };
    let value = match value {
        Some(v) if !unless(&result) => v,
        _ => {
            SiteStats::inc(&stats.not_stored);
            guard.publish(Outcome::Released);
            return result;
        }
    };
    let bytes = match envelope::encode(value, took) {
        Ok(bytes) => bytes,
        Err(e) => {
            SiteStats::inc(&stats.not_stored);
            inner.log.warn(
                FailureKind::Encode,
                &format_args!(
                    "result of `{}` could not be encoded, not cached: {e}",
                    site.label(None)
                ),
            );
            guard.publish(Outcome::Released);
            return result;
        }
    };
    let stored = Stored {
        bytes,
        typed: match how.typed {
            Some(typed) if inner.backend.keeps_typed() => Some((typed.wrap)(value)),
            _ => None,
        },
    };
    guard.publish(Outcome::Value(stored.clone()));
    if guard.flight().is_stale() {
        // Invalidated or overwritten while the function ran: storing would put back a value
        // older than the write.
        SiteStats::inc(&stats.stale_fills);
    } else if let Err(e) = inner.backend.set(key, stored, ttl).await {
        backend_failure(inner, stats, &e);
    }
    drop(guard);
    result
}

enum Read<R> {
    Hit(Stored, R),
    /// Nothing stored.
    Miss,
    /// Something unusable stored, or the backend failed: counted and logged already.
    Unusable,
}

/// Reads and decodes `key`. Failures and undecodable values are misses.
async fn read<R, M: Mode<R>>(
    inner: &Inner,
    site: &'static Site,
    stats: &SiteStats,
    key: &str,
    mode: &M,
    typed: Option<Typed<M::Value>>,
) -> Read<R> {
    match inner.backend.get(key).await {
        Ok(Some(stored)) => match restore(&stored, mode, typed) {
            Ok(v) => Read::Hit(stored, v),
            Err(e) => {
                decode_failure(inner, site, stats, &e);
                Read::Unusable
            }
        },
        Ok(None) => Read::Miss,
        Err(BackendError::Data(msg)) => {
            // The key holds another Redis type, say: a miss, and the fill overwrites it.
            decode_failure(inner, site, stats, &msg);
            Read::Unusable
        }
        Err(e) => {
            backend_failure(inner, stats, &e);
            Read::Unusable
        }
    }
}

fn decode_failure(inner: &Inner, site: &Site, stats: &SiteStats, e: &dyn std::fmt::Display) {
    SiteStats::inc(&stats.decode_errors);
    inner.log.warn(
        FailureKind::Decode,
        &format_args!(
            "cached value of `{}` is unusable ({e}); treated as a miss and overwritten",
            site.label(None)
        ),
    );
}

fn backend_failure(inner: &Inner, stats: &SiteStats, e: &BackendError) {
    SiteStats::inc(&stats.backend_errors);
    // The backend logs connectivity failures itself (it knows about the breaker).
    if let BackendError::Data(msg) = e {
        inner.log.warn(
            FailureKind::Server,
            &format_args!("cache write failed ({msg}); the result is returned uncached"),
        );
    }
}
