//! Annotation-driven caching for async Rust.
//!
//! Put `#[cached]` on an existing `async fn` and its results are cached, in Redis or in
//! process memory, with a TTL on every key, concurrent misses coalesced, and a cache that
//! can never fail the call:
//!
//! ```
//! use cache_runtime::cached;
//! # #[derive(serde::Serialize, serde::Deserialize)] pub struct User { id: u64 }
//! # #[derive(Debug)] pub struct DbError;
//!
//! #[cached(key = "user:{id}", ttl = "1h")]
//! async fn get_user(id: u64) -> Result<User, DbError> {
//!     // SELECT ... (runs on a miss; an `Err` is returned and never cached)
//! #   Ok(User { id })
//! }
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! # assert_eq!(get_user(7).await.unwrap().id, 7);
//! # }
//! ```
//!
//! * [`cached`] — the attribute, and the list of its options.
//! * [`cache_put`] — write-through: store a function's result (or a `value`) under a key
//!   after it succeeds.
//! * [`cache_evict`] — invalidate keys and tags after a function succeeds.
//! * [`write_behind`](macro@write_behind) — durable write-behind: write the cache and queue
//!   the call in Redis, return at once; a [`Worker`](write_behind::Worker) (the
//!   [`write_behind`](mod@write_behind) module) runs the body later, at least once, in order
//!   per key.
//! * [`Cache`] — the handle: build one with [`Cache::builder`] (Redis or memory, namespace,
//!   default TTL, timeouts), install it with [`set_default`], or name it per function with
//!   `cache = <expr>`. Without either, [`default_cache`] uses Redis if `REDIS_URL` is set and
//!   memory otherwise.
//! * [`Cache::get`], [`Cache::set`], [`Cache::invalidate`] — the manual API, on the same keys
//!   and value format as the attribute.
//! * [`Cache::stats`] — per-function hits, misses, loads, load times and errors, printable as
//!   a table that flags hit rates under 80%.
//! * [`Cache::fleet_stats`] — the same summed over every instance of a fleet (each publishes
//!   its snapshot to Redis: [`CacheBuilder::publish_stats`]), with a [`Hint`] of the likely
//!   cause of each low hit rate. [`Cache::inspect`] shows what is stored under a key.
//! * Metrics (feature `metrics`, on by default): the same counters through the
//!   [`metrics`](https://docs.rs/metrics/0.24) facade (`cache_hits_total{function, cache,
//!   level}`, `cache_misses_total`, `cache_load_seconds`, `cache_fail_open_total{kind}`,
//!   `cache_breaker_open`, ...; the README's "Metrics" lists them all). The library installs
//!   no recorder; install yours before the first cached call, since each function registers
//!   its handles on its first call on a cache.
//! * Tracing: each `#[cached]` call opens a `debug` span, `cache_call`, with the fields
//!   `function`, `cache`, `outcome` (`hit`, `miss`, `coalesced`, `lock_wait`, `bypass`,
//!   `fail_open`, `stale`), `level` on a hit, and `key` only with
//!   [`CacheBuilder::trace_keys`]. The library installs no subscriber.
//!
//! Cargo features: `macros` (on by default) re-exports the attributes; `metrics` (on by
//! default) reports to the `metrics` facade; `tls` (off) lets the
//! Redis URL be `rediss://` (rustls with the ring provider) and adds
//! `CacheBuilder::redis_tls_root_ca` and `CacheBuilder::redis_tls_client_cert`. ACL users and
//! database numbers (`redis://user:password@host/2`) need no feature; see
//! [`CacheBuilder::redis`].
//!
//! # What is cached
//!
//! | return type | stored | never stored |
//! |---|---|---|
//! | `Result<T, E>` | `Ok(T)` | `Err` |
//! | `Option<T>` | `Some(T)` | `None`, unless `cache_none` |
//! | `Result<Option<T>, E>` | `Ok(Some(T))` | `Err`; `Ok(None)` unless `cache_none` |
//! | anything else | the value | |
//!
//! Values are stored as JSON (`T: Serialize + DeserializeOwned`) inside a small envelope
//! (format version, creation time, compute time). A value that fails to decode — another
//! program's data, an old layout of `T` — is a miss, and the fill overwrites it.
//!
//! # Failure
//!
//! The cache fails open. Redis down at start-up, going down mid-flight, slow, or holding
//! garbage: every call still returns what the function returns. Redis operations time out
//! (250 ms by default), a circuit breaker skips Redis after repeated failures and probes it
//! again once a second, and each kind of failure is logged at `warn` through `tracing`,
//! at most once per 10 s, and counted in [`Cache::stats`].
//!
//! The runtime needs Tokio (with the `time` driver enabled, as `#[tokio::main]` does).
#![forbid(unsafe_code)]

mod backend;
mod breaker;
mod cache;
mod engine;
mod envelope;
mod error;
mod flight;
mod inspect;
mod key;
mod local;
mod mode;
mod stats;
mod store;
mod tags;
pub mod write_behind;

pub use crate::cache::{Cache, CacheBuilder, default_cache, set_default};
pub use crate::error::{Error, ErrorKind, Result};
pub use crate::inspect::{Entry, EntryState};
pub use crate::key::escape_key_part;
pub use crate::stats::fleet::{FleetFunction, FleetStats, Hint};
pub use crate::stats::{FunctionStats, LOW_HIT_RATE, Stats};

// Documented on the proc-macro items (cache-macros/src/docs/*.md), whose docs rustdoc
// inlines here and IDEs show on hover.
#[cfg(feature = "macros")]
pub use cache_macros::{cache_evict, cache_put, cached, write_behind};

/// The examples of `#[cached]`'s documentation, which lives in cache-macros (whose own
/// doctests cannot use this crate), run as this crate's doctests.
#[cfg(all(doctest, feature = "macros"))]
#[doc = include_str!("../../cache-macros/src/docs/cached.md")]
pub struct CachedDocTests;

/// The examples of `#[cache_put]`'s documentation, run as this crate's doctests.
#[cfg(all(doctest, feature = "macros"))]
#[doc = include_str!("../../cache-macros/src/docs/cache_put.md")]
pub struct CachePutDocTests;

/// The examples of `#[cache_evict]`'s documentation, run as this crate's doctests.
#[cfg(all(doctest, feature = "macros"))]
#[doc = include_str!("../../cache-macros/src/docs/cache_evict.md")]
pub struct CacheEvictDocTests;

/// The examples of `#[write_behind]`'s documentation, run as this crate's doctests.
#[cfg(all(doctest, feature = "macros"))]
#[doc = include_str!("../../cache-macros/src/docs/write_behind.md")]
pub struct WriteBehindDocTests;

/// Not public API: the items the attribute macros' expansions refer to.
#[doc(hidden)]
pub mod __private {
    /// `wb_outcome!(result)`: a `#[write_behind]` body's result as [`Applied`].
    pub use crate::__cache_wb_outcome as wb_outcome;
    pub use crate::cache::Cache;
    pub use crate::engine::{
        Call, Evict, EvictCall, Fetch, Finish, Owned, Put, Refresh, RefreshArg, RefreshRef,
        RefreshSelf, Refresher, Verdict, catch_unwind, own_arg, own_ref, own_self, refresh,
        refresh_rejected, view,
    };
    pub use crate::key::{CallKey, KeyBuf, KeyWriter};
    /// For the integration tests: auxiliary key names and hash slots, checked against a real
    /// cluster node.
    pub use crate::key::{aux_key, key_slot};
    pub use crate::mode::{
        Mode, SuccessOption, SuccessPlain, SuccessResult, Tag, Typed, ViaOption, ViaPlain,
        ViaResult, ViaResultOption, ViaTyped, ViaUntyped, WbArg, require_cache_none, require_local,
        require_wb_arg,
    };
    pub use crate::stats::Site;
    /// For the integration tests: publish a cache's fleet stats snapshot now.
    pub use crate::stats::fleet::publish_now;
    pub use crate::tags::Tags;
    pub use crate::write_behind::{
        Applied, ApplyFn, Applying, ArgsError, Inline, ViaDebug, ViaDisplay, ViaName, WbFunction,
        WbHandler, WbOutcome, WbResult, WriteBehind, wb_decode,
    };
    pub use inventory;

    /// Starts a key in `cache`'s namespace.
    #[inline]
    pub fn key_writer(cache: &Cache) -> KeyWriter {
        cache.store().key_writer()
    }

    /// The default cache.
    #[inline]
    pub fn default_cache() -> &'static Cache {
        crate::cache::default_cache()
    }
}
