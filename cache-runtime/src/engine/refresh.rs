//! Early refresh (`refresh`): a hit on an entry that is due for a refresh starts one
//! background reload and returns the current value at once. Callers never wait for a
//! refresh.
//!
//! ```text
//! hit (L1: Call::local_refreshing; L2: Fetch::find_refreshing, by the call that read it)
//!   due?  `refresh = "80%"`: age ≥ 80% of the TTL
//!         `refresh`: XFetch, now − compute·β·ln(rand()) ≥ created + ttl, β = 1
//!   a Tokio runtime to spawn on (none: no refresh)
//!   this process is not refreshing that entry (Store::refreshing: one per entry, for one
//!     lease; a new entry of the key may be refreshed at once)
//!   └ the expansion's refresher: the body on owned copies of its arguments, 'static
//! spawned:
//!   refresh lease: Redis `REFRESH_LEASE` (one process across all, and only while the key
//!     holds the entry that was read); memory: the key's generation ── not had: done
//!   tag versions, read before the body like a load's
//!   the body (a panic is caught) ── classified, `unless`, encoded like a load's result
//!   refresh fill: Redis `REFRESH_FILL` (only while the lease stands and the key holds the
//!     entry: no write, invalidation, expiry or other fill since); memory: the generation is
//!     unchanged. The normal TTL (and `stale`'s copy, as a fill writes it); the tags' lives extended
//!   stored: the key leaves Store::refreshing; `local`: this process's copy is dropped
//! ```
//!
//! A refresh that fails (an error, a panic, a backend failure) stores nothing and is counted;
//! the key is not tried again by this process for one lease. Non-generic but for
//! [`refresh`], which wraps the body and classifies and encodes its result (per return type,
//! like `Fetch::find`).

use std::cell::Cell;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use futures_util::FutureExt as _;
use futures_util::future::BoxFuture;

use crate::backend::{BackendError, Stored};
use crate::breaker::FailureKind;
use crate::cache::Cache;
use crate::envelope::{self, EncodeError, Header};
use crate::mode::{Classified, Mode, Typed};
use crate::stats::{RefreshPolicy, Site, SiteStats};
use crate::store::Store;
use crate::tags::TagSet;

/// The lease of a refresh without `lock`: at most this, at most the TTL.
const MAX_LEASE: Duration = Duration::from_secs(10);

/// What the expansion passes to a hit: makes the refresh's future. Called only when a refresh
/// starts, so that a hit pays nothing for it.
#[doc(hidden)]
pub type Refresher<'a> = dyn Fn() -> Refresh + Sync + 'a;

/// A refresh ready to run: the function's body on owned arguments, and the cache. Not public
/// API: made by [`refresh`] in the expansion's refresher.
#[doc(hidden)]
pub struct Refresh {
    cache: Cache,
    body: BoxFuture<'static, Box<dyn Encode>>,
}

/// Wraps the body of a refresh (an `async move` block over owned copies of the arguments that
/// yields the function's result and whether `unless` rejected it) for [`Refresh`]. Generic
/// over the return type only.
#[doc(hidden)]
pub fn refresh<R, M, F>(cache: &Cache, mode: &M, typed: Option<Typed<M::Value>>, body: F) -> Refresh
where
    R: Send + 'static,
    M: Mode<R> + Copy + Send + 'static,
    M::Value: 'static,
    F: Future<Output = (R, bool)> + Send + 'static,
{
    let mode = *mode;
    Refresh {
        cache: cache.clone(),
        body: Box::pin(async move {
            let (result, rejected) = body.await;
            Box::new(Reloaded {
                result,
                rejected,
                mode,
                typed,
            }) as Box<dyn Encode>
        }),
    }
}

/// `unless` in a refresh: evaluated, as after a load, only for a result that would be stored.
#[doc(hidden)]
#[inline]
pub fn refresh_rejected<R, M: Mode<R>>(
    mode: &M,
    result: &R,
    unless: impl FnOnce(&R) -> bool,
) -> bool {
    matches!(
        mode.classify(result),
        Classified::Store(_) | Classified::StoreNone(_)
    ) && unless(result)
}

/// Arguments a refresh can take its own copy of (an argument passed by value).
#[doc(hidden)]
#[diagnostic::on_unimplemented(
    message = "`refresh` reloads in the background with its own copy of each argument the body uses, and `{Self}` cannot be copied there",
    label = "`{Self}` is not `Clone + Send + Sync + 'static`",
    note = "make the type `Clone + Send + Sync + 'static` (e.g. share it in an `Arc`), or remove `refresh`"
)]
pub trait RefreshArg: Sized {
    /// The copy.
    fn own(&self) -> Self;
}

impl<T: Clone + Send + Sync + 'static> RefreshArg for T {
    #[inline]
    fn own(&self) -> Self {
        self.clone()
    }
}

/// Arguments passed by reference that a refresh can take its own copy of (`&str` as a
/// `String`, `&[T]` as a `Vec<T>`, `&T` as a `T`).
#[doc(hidden)]
#[diagnostic::on_unimplemented(
    message = "`refresh` reloads in the background with its own copy of each argument the body uses, and `&{Self}` cannot be copied there",
    label = "`{Self}` is not `ToOwned + Sync + 'static` with a `Send + 'static` owned form",
    note = "make the type `Clone + Send + Sync + 'static` (e.g. share it in an `Arc`), or remove `refresh`"
)]
pub trait RefreshRef {
    /// The owned copy (`ToOwned::Owned`).
    type Owned: Send + 'static;
    /// Makes the copy.
    fn own(&self) -> Self::Owned;
    /// Borrows the copy as the argument's type.
    fn view(owned: &Self::Owned) -> &Self;
}

impl<T: ?Sized + ToOwned + Sync + 'static> RefreshRef for T
where
    T::Owned: Send + 'static,
{
    type Owned = T::Owned;
    #[inline]
    fn own(&self) -> T::Owned {
        self.to_owned()
    }
    #[inline]
    fn view(owned: &T::Owned) -> &T {
        std::borrow::Borrow::borrow(owned)
    }
}

/// `self` of a method with `refresh`: the refresh takes its own copy.
#[doc(hidden)]
#[diagnostic::on_unimplemented(
    message = "`refresh` reloads in the background with its own copy of `self`, and `{Self}` is not `Clone + Send + Sync + 'static`",
    label = "`Self` must be `Clone + Send + Sync + 'static` for `refresh`",
    note = "derive `Clone` (keep shared state behind an `Arc`, so that a copy is cheap), or remove `refresh`"
)]
pub trait RefreshSelf: Sized {
    /// The copy.
    fn own(&self) -> Self;
}

impl<T: Clone + Send + Sync + 'static> RefreshSelf for T {
    #[inline]
    fn own(&self) -> Self {
        self.clone()
    }
}

/// A refresh's copy of an argument passed by value.
#[doc(hidden)]
#[inline]
pub fn own_arg<T: RefreshArg>(arg: &T) -> T {
    arg.own()
}

/// A refresh's copy of an argument passed by reference, borrowed as the argument's type with
/// [`view`].
#[doc(hidden)]
#[inline]
pub fn own_ref<T: ?Sized + RefreshRef>(arg: &T) -> Owned<T::Owned, T> {
    (arg.own(), std::marker::PhantomData)
}

/// The copy made by [`own_ref`], as the argument's type.
#[doc(hidden)]
#[inline]
pub fn view<T: ?Sized + RefreshRef>(owned: &Owned<T::Owned, T>) -> &T {
    T::view(&owned.0)
}

/// A refresh's copy of `self` (or of what `self` refers to).
#[doc(hidden)]
#[inline]
pub fn own_self<T: RefreshSelf>(this: &T) -> T {
    this.own()
}

/// An owned copy `O` of an argument passed as a `&T` (see [`own_ref`]). A pair, so that an
/// argument that cannot be copied is reported once, at [`own_ref`].
#[doc(hidden)]
pub type Owned<O, T> = (O, std::marker::PhantomData<fn(&T)>);

/// A refresh's result, classified and encoded by the return type's mode.
pub(crate) trait Encode: Send {
    fn encode(&self, compute: Duration, tags: Option<&TagSet>, keep_typed: bool) -> Outcome;
}

/// What a refresh's result means for the cache.
pub(crate) enum Outcome {
    Store(Stored),
    /// A `None`: stored only with `cache_none`.
    StoreNone(Stored),
    /// `unless` said no.
    Rejected,
    Error,
    Unencodable(EncodeError),
    Refused(&'static str),
}

struct Reloaded<R, M: Mode<R>> {
    result: R,
    rejected: bool,
    mode: M,
    typed: Option<Typed<M::Value>>,
}

impl<R: Send, M: Mode<R> + Send> Encode for Reloaded<R, M> {
    fn encode(&self, compute: Duration, tags: Option<&TagSet>, keep_typed: bool) -> Outcome {
        let (value, none) = match self.mode.classify(&self.result) {
            Classified::Store(v) => (v, false),
            Classified::StoreNone(v) => (v, true),
            Classified::Error => return Outcome::Error,
            Classified::Refused => return Outcome::Refused(std::any::type_name::<R>()),
        };
        if self.rejected {
            return Outcome::Rejected;
        }
        let typed = self.typed.filter(|_| keep_typed);
        match super::encode_stored(value, compute, tags, typed) {
            Ok(stored) if none => Outcome::StoreNone(stored),
            Ok(stored) => Outcome::Store(stored),
            Err(e) => Outcome::Unencodable(e),
        }
    }
}

/// Whether the entry of `header` is due for a refresh at `now_ms` under `policy`.
pub(crate) fn due(policy: RefreshPolicy, ttl: Duration, header: &Header, now_ms: u64) -> bool {
    let created = envelope::header_created_at_ms(header);
    let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
    match policy {
        RefreshPolicy::Percent(p) => {
            let threshold =
                u64::try_from(u128::from(ttl_ms) * u128::from(p) / 100).unwrap_or(u64::MAX);
            now_ms.saturating_sub(created) >= threshold
        }
        RefreshPolicy::XFetch => {
            let expiry = created.saturating_add(ttl_ms);
            if now_ms >= expiry {
                return true;
            }
            let gap_ms = (expiry - now_ms) as f64;
            let compute_ms = f64::from(envelope::header_compute_us(header)) / 1000.0;
            // −ln(u) for u in (0, 1] from 53 random bits is at most 53·ln 2 < 37: far from
            // expiry (the common case), no random number is drawn.
            if compute_ms * 37.0 < gap_ms {
                return false;
            }
            -unit_random().ln() * compute_ms >= gap_ms
        }
    }
}

/// A uniform random number in (0, 1] (xorshift64 per thread, seeded from the std hasher's
/// random keys).
fn unit_random() -> f64 {
    thread_local! {
        static STATE: Cell<u64> = Cell::new({
            use std::hash::{BuildHasher, RandomState};
            RandomState::new().hash_one(std::thread::current().id()) | 1
        });
    }
    let x = STATE.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        x
    });
    ((x >> 11) + 1) as f64 / (1u64 << 53) as f64
}

/// How long a refresh holds its lease (and this process leaves the key alone after one
/// started): the `lock` lease, else the TTL, at most 10 s.
fn lease_len(site: &Site, ttl: Duration) -> Duration {
    site.lock.unwrap_or(ttl.min(MAX_LEASE))
}

/// A hit on `key` read the entry of `header`: if it is due, and this process is not
/// refreshing that entry already, starts a refresh on the current Tokio runtime (none: no
/// refresh), in a `cache_refresh` span that follows from `call`, the hit's span.
#[allow(clippy::too_many_arguments)]
pub(crate) fn start_if_due(
    store: &Store,
    site: &'static Site,
    self_type: Option<&'static str>,
    policy: RefreshPolicy,
    key: &str,
    tags: &[String],
    header: &Header,
    refresher: &Refresher<'_>,
    call: &tracing::Span,
) {
    let ttl = site.ttl.unwrap_or(store.default_ttl());
    if !due(policy, ttl, header, envelope::now_ms()) {
        return;
    }
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let lease = lease_len(site, ttl);
    if !store.refreshing().try_begin(key, header, lease) {
        return;
    }
    let Refresh { cache, body } = refresher();
    let registry = cache.stats_registry();
    let span = super::trace::Trace::refresh(
        &site.stats(registry, self_type),
        key,
        registry.trace_keys(),
        call,
    );
    let job = Job {
        site,
        self_type,
        key: key.to_owned(),
        tags: tags.to_vec(),
        header: *header,
        ttl,
        lease,
    };
    handle.spawn(tracing::Instrument::instrument(job.run(cache, body), span));
}

/// One background refresh.
struct Job {
    site: &'static Site,
    self_type: Option<&'static str>,
    key: String,
    tags: Vec<String>,
    /// The header of the entry the hit read.
    header: Header,
    ttl: Duration,
    lease: Duration,
}

impl Job {
    async fn run(self, cache: Cache, body: BoxFuture<'static, Box<dyn Encode>>) {
        let store = cache.store();
        let stats = self.site.stats(cache.stats_registry(), self.self_type);
        if self.reload(store, &stats, body).await {
            store.refreshing().end(&self.key, &self.header);
            if self.site.local.is_some() {
                if let Some(local) = store.local() {
                    // This process's copy is the old value: its next hit reads the new one.
                    local.remove(&self.key);
                }
            }
        }
    }

    /// Takes the lease, runs the body, stores its result; whether it was stored.
    async fn reload(
        &self,
        store: &Store,
        stats: &SiteStats,
        body: BoxFuture<'static, Box<dyn Encode>>,
    ) -> bool {
        let lease = match store
            .refresh_lease(&self.key, &self.header, self.lease)
            .await
        {
            Ok(Some(lease)) => lease,
            // Another process refreshes it, or the entry changed since it was read.
            Ok(None) => return false,
            Err(e) => {
                backend_failure(store, stats, &e);
                return false;
            }
        };
        SiteStats::inc(&stats.refreshes);
        let mut tags = None;
        if !self.tags.is_empty() {
            let mut set = TagSet {
                names: self.tags.clone(),
                versions: Vec::new(),
                epoch: 0,
            };
            match store.tag_versions(&set.names(), self.ttl).await {
                Ok(versions) => set.versions = versions,
                Err(e) => {
                    // Without the versions the value cannot be recorded under its tags.
                    backend_failure(store, stats, &e);
                    return false;
                }
            }
            tags = Some(set);
        }
        let started = Instant::now();
        let Ok(reloaded) = AssertUnwindSafe(body).catch_unwind().await else {
            SiteStats::inc(&stats.refresh_errors);
            return false;
        };
        let outcome = reloaded.encode(started.elapsed(), tags.as_ref(), store.keeps_typed());
        drop(reloaded);
        // `stale`: a copy outlives the entry by that much (a `None` gets none), as on a fill.
        let (stored, ttl, keep) = match outcome {
            Outcome::Store(stored) => (
                stored,
                self.ttl,
                self.site.stale.map(|stale| self.ttl.saturating_add(stale)),
            ),
            Outcome::StoreNone(stored) if self.site.cache_none => {
                (stored, self.site.none_ttl.unwrap_or(self.ttl), None)
            }
            Outcome::StoreNone(_) | Outcome::Rejected => {
                SiteStats::inc(&stats.not_stored);
                return false;
            }
            Outcome::Error => {
                SiteStats::inc(&stats.refresh_errors);
                return false;
            }
            Outcome::Unencodable(e) => {
                SiteStats::inc(&stats.not_stored);
                store.log().warn(
                    FailureKind::Encode,
                    &format_args!(
                        "result of `{}` could not be encoded, not cached: {e}",
                        self.site.label(self.self_type)
                    ),
                );
                return false;
            }
            Outcome::Refused(ty) => {
                SiteStats::inc(&stats.not_stored);
                store.log().warn(
                    FailureKind::Encode,
                    &format_args!(
                        "`{}` returns `{ty}` through a type parameter, so `#[cached]` cannot tell its errors or `None`s from values: nothing is cached",
                        self.site.label(self.self_type)
                    ),
                );
                return false;
            }
        };
        let fill = store.refresh_fill(&self.key, stored, ttl, &lease, &self.header, keep);
        let kept = keep.unwrap_or(ttl);
        let filled = match &tags {
            None => fill.await,
            Some(tags) => {
                // A tag lives as long as its longest-lived entry. If one moved during the
                // refresh, the entry records the old version and is never served.
                let names = tags.names();
                let (filled, extended) = tokio::join!(fill, store.current_tags(&names, Some(kept)));
                if let Err(e) = extended {
                    backend_failure(store, stats, &e);
                }
                filled
            }
        };
        match filled {
            Ok(true) => true,
            // Written, invalidated, expired or filled since the hit read it.
            Ok(false) => {
                SiteStats::inc(&stats.stale_fills);
                false
            }
            Err(e) => {
                backend_failure(store, stats, &e);
                false
            }
        }
    }
}

fn backend_failure(store: &Store, stats: &SiteStats, e: &BackendError) {
    stats.backend_failure(e);
    if let BackendError::Data(msg) = e {
        store.log().warn(
            FailureKind::Server,
            &format_args!("cache operation failed during a background refresh ({msg})"),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(created_ms: u64, compute_us: u32) -> Header {
        let mut h = [0u8; envelope::HEADER_LEN];
        h[0] = 1;
        h[1..9].copy_from_slice(&created_ms.to_le_bytes());
        h[9..13].copy_from_slice(&compute_us.to_le_bytes());
        h
    }

    #[test]
    fn a_percentage_is_due_from_that_share_of_the_ttl() {
        let ttl = Duration::from_secs(10);
        let h = header(1_000_000, 0);
        let p = RefreshPolicy::Percent(80);
        assert!(!due(p, ttl, &h, 1_000_000));
        assert!(!due(p, ttl, &h, 1_007_999));
        assert!(due(p, ttl, &h, 1_008_000));
        assert!(due(p, ttl, &h, 1_020_000), "expired");
        // A clock behind the writer's: the entry's age is zero.
        assert!(!due(p, ttl, &h, 999_000));
    }

    #[test]
    fn xfetch_is_due_earlier_for_slower_values() {
        let ttl = Duration::from_secs(10);
        let expiry = 1_010_000;
        let share = |compute_us: u32, before_expiry_ms: u64| {
            let h = header(1_000_000, compute_us);
            (0..10_000)
                .filter(|_| due(RefreshPolicy::XFetch, ttl, &h, expiry - before_expiry_ms))
                .count() as f64
                / 10_000.0
        };
        // P(due) = exp(−gap / compute).
        let p = share(1_000_000, 1_000);
        assert!((0.33..0.41).contains(&p), "{p}");
        assert!(share(1_000_000, 100) > 0.85);
        assert_eq!(share(1_000, 5_000), 0.0, "far from expiry for a fast value");
        assert_eq!(
            share(0, 1),
            0.0,
            "a value that costs nothing is never early"
        );
        let h = header(1_000_000, 0);
        assert!(due(RefreshPolicy::XFetch, ttl, &h, expiry), "expired");
    }

    #[test]
    fn the_lease_is_the_lock_s_or_the_ttl_up_to_10_s() {
        static PLAIN: Site = Site::new("m", "f");
        static LOCKED: Site = Site::new("m", "g").lock_ms(3_000);
        assert_eq!(
            lease_len(&PLAIN, Duration::from_secs(2)),
            Duration::from_secs(2)
        );
        assert_eq!(
            lease_len(&PLAIN, Duration::from_secs(3600)),
            Duration::from_secs(10)
        );
        assert_eq!(
            lease_len(&LOCKED, Duration::from_secs(3600)),
            Duration::from_secs(3)
        );
    }
}
