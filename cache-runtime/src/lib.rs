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
//! * [`Cache`] — the handle: build one with [`Cache::builder`] (Redis or memory, namespace,
//!   default TTL, timeouts), install it with [`set_default`], or name it per function with
//!   `cache = <expr>`. Without either, [`default_cache`] uses Redis if `REDIS_URL` is set and
//!   memory otherwise.
//! * [`Cache::get`], [`Cache::set`], [`Cache::invalidate`] — the manual API, on the same keys
//!   and value format as the attribute.
//! * [`Cache::stats`] — per-function hits, misses, loads, load times and errors, printable as
//!   a table that flags hit rates under 80%.
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
mod key;
mod mode;
mod stats;
mod store;

pub use crate::cache::{Cache, CacheBuilder, default_cache, set_default};
pub use crate::error::{Error, ErrorKind, Result};
pub use crate::key::escape_key_part;
pub use crate::stats::{FunctionStats, LOW_HIT_RATE, Stats};

/// Caches an `async fn`'s results: cache-aside with a TTL, on the default cache or the one
/// named by `cache = ...`.
///
/// ```
/// use cache_runtime::{Cache, cached};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
/// pub struct User { id: u64, name: String }
///
/// pub struct Repo { cache: Cache, tenant: String }
///
/// impl Repo {
///     #[cached(cache = self.cache, key = "user:{self.tenant}:{id}", ttl = "15m")]
///     pub async fn user(&self, id: u64) -> Result<Option<User>, std::io::Error> {
///         // SELECT ... — runs only on a miss
///         Ok(Some(User { id, name: format!("user {id}") }))
///     }
/// }
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let repo = Repo { cache: Cache::memory(), tenant: "acme".into() };
/// let first = repo.user(1).await.unwrap();   // miss: the body runs
/// let second = repo.user(1).await.unwrap();  // hit
/// assert_eq!(first, second);
/// assert_eq!(repo.cache.get::<User>("user:acme:1").await.unwrap(), first);
/// # }
/// ```
///
/// # Options
///
/// | option | meaning |
/// |---|---|
/// | `key = "user:{id}"` | key template; `{param}`, `{param.field.sub}`, `{self.field}`, `{{`/`}}` for literal braces. Default: the function's path (`crate::module::function`, or `<type of Self>::method`), its type parameters, and the arguments as JSON |
/// | `ttl = 3600` / `ttl = "15m"` | seconds, or a duration string (`ms`, `s`, `m`, `h`, `d`, combinable as `"1h30m"`); > 0. Default: the cache's default TTL |
/// | `cache = expr` | the cache to use: any expression that derefs to [`Cache`] (`self.cache`, a static `LazyLock<Cache>`, an `Arc<Cache>`). Default: [`default_cache()`] |
/// | `condition = expr` | evaluated over the arguments before the call; `false` bypasses the cache |
/// | `unless = expr` | evaluated after a load, with `result: &R` in scope; `true` skips storing |
/// | `cache_none` / `cache_none = 60` | also store `None` results, optionally with their own TTL (seconds or a duration string) |
/// | `version = 2` | appended to the key as `:v2`; bump it when the cached type changes |
/// | `name = "..."` | the label in [`Cache::stats`]. Default: the function's path |
/// | `lock` / `lock = 30` / `lock = "30s"` | stampede protection across processes: one load per key at a time; the value is the lease (default 10 s) |
///
/// Unknown and duplicate options are compile errors, as are a zero or unparsable `ttl`, a
/// placeholder that names no parameter (the error lists the parameters), unbalanced braces,
/// two placeholders with no separator, `{self.x}` without a `self` receiver, a placeholder
/// whose type is not `Display`, a return type that is not `Serialize + DeserializeOwned`,
/// and `cache_none` on a function that cannot return `None`.
///
/// # Keys
///
/// Placeholder values are formatted with `Display` and escaped: `%`, `:`, `{`, `}`, space
/// and control characters are percent-encoded, and so is a non-`:` separator that stands
/// between two placeholders, so that a value can never produce another key's text. Literal
/// braces (`{{user:{id}}}`) may form a Redis Cluster hash tag. The cache's namespace is
/// prepended: `<namespace>:<key>`. The default key needs every parameter to be `Serialize`;
/// with other parameters (a connection pool, say) write a `key`.
///
/// A key longer than 256 bytes (namespace and version included) is stored under a bounded
/// form: a readable prefix and a SHA-256 digest of the whole key, keeping a hash tag of up to
/// 64 bytes (see [`Cache::full_key`]), so a huge argument never makes a huge Redis key.
///
/// The default key of a method contains `std::any::type_name::<Self>()`, and that of a
/// generic function the `type_name` of its type parameters. That text is not guaranteed to
/// stay the same across compiler versions (nor to be unique), so a toolchain upgrade may
/// change such keys: the entries written before it are then missed once and loaded again.
/// Write `key = "..."` for keys that must stay the same.
///
/// # Return types
///
/// `Result<T, E>` caches `Ok` only; `Option<T>` caches `Some` only unless `cache_none`;
/// `Result<Option<T>, E>` both rules; any other type is cached as it is. The rule follows the
/// type, so aliases such as `anyhow::Result<T>` count as `Result`.
///
/// # Concurrency and failure
///
/// Concurrent calls with the same key in one process share one read and one load. If the
/// load returns something that is not stored (`Err`, `None`, `unless`) or panics, the waiting
/// calls run the function themselves; if its caller drops the future, one of them takes
/// over. The cache never fails the call: when Redis is down, slow, or holds a value that
/// does not decode, the function runs and its result is returned (see [`Cache`]).
///
/// A load's result is stored only if the key was not written or invalidated (by any process)
/// since the load's read: a slow reader cannot put back a value an update just invalidated.
///
/// # `lock`: one load across processes
///
/// With `lock`, a miss on Redis asks for the key's lease in the same round trip as the read.
/// One caller across all processes gets it and runs the function; the others wait, and are
/// woken by a pub/sub notification when the fill lands (with a jittered re-check in case the
/// notification is lost). A holder whose function fails, panics or is cancelled releases the
/// lease at once; a holder that dies loses it when the lease expires, and a waiter takes over;
/// a caller that has waited twice the lease runs the function itself. The lease must exceed
/// the function's normal run time:
///
/// ```
/// # use cache_runtime::cached;
/// # #[derive(serde::Serialize, serde::Deserialize)] pub struct Report;
/// #[cached(key = "report:{day}", ttl = "1h", lock = "2m")]
/// async fn daily_report(day: u32) -> Result<Report, std::io::Error> {
///     // a minute of aggregation queries
/// #   Ok(Report)
/// }
/// ```
///
/// On the memory backend, `lock` is the same in one process: one load per key, and a caller
/// that waited a whole lease for a stuck load takes over.
///
/// # Shapes
///
/// Free functions, `&self` methods, generic functions, reference arguments, methods in
/// `#[async_trait]` impls (put `#[cached]` on the method, inside the `#[async_trait]` impl),
/// and crates with `#![deny(warnings)]`. The signature, visibility, attributes and docs are
/// kept; callers do not change.
///
/// The attribute applies to `async fn`s only. The function's future is `Send` when the body's
/// future and the return type are.
#[cfg(feature = "macros")]
pub use cache_macros::cached;

/// Not public API: the items the attribute macros' expansions refer to.
#[doc(hidden)]
pub mod __private {
    pub use crate::cache::Cache;
    pub use crate::engine::{Call, cached};
    pub use crate::key::{CallKey, KeyWriter};
    /// For the integration tests: auxiliary key names and hash slots, checked against a real
    /// cluster node.
    pub use crate::key::{aux_key, key_slot};
    pub use crate::mode::{
        Mode, Tag, Typed, ViaOption, ViaPlain, ViaResult, ViaResultOption, ViaTyped, ViaUntyped,
        require_cache_none,
    };
    pub use crate::stats::Site;

    /// Starts a key in `cache`'s namespace.
    #[inline]
    pub fn key_writer(cache: &Cache) -> KeyWriter {
        KeyWriter::new(cache.namespace())
    }

    /// The default cache.
    #[inline]
    pub fn default_cache() -> &'static Cache {
        crate::cache::default_cache()
    }
}
