//! The get-or-load engine: the one entry point the `#[cached]` expansion calls.
//!
//! ```text
//! no key (`condition` false, an argument that does not render) ─────► run the function (bypass)
//! memory backend: read ── hit ──────────────────────────────────────► decoded value
//! join the key's flight (this process)
//!   ├ follower ── the leader's value ───────────────────────────────► decoded value (coalesced)
//!   │           ├ retry (the leader failed, panicked, was cancelled,
//!   │           │  or its fill was stale) ── join again: one of the followers leads
//!   │           └ the leader outlived the wait (the lease, or 30 s) ─► detach it, join again
//!   └ leader
//!       without `lock`: read (value, or generation) ── hit ─────────► decoded value, shared
//!       with `lock`: Store::lease: the value, or the lease, or a wait for the holder's fill
//!       then: run the function ── verdict (stored? shared? an error?) ── fill if the
//!             generation is unchanged (releases the lease, wakes waiters) ── share with the
//!             followers, or tell them to retry
//! ```
//!
//! The code is split so that each annotated function compiles little. The expansion calls
//! [`Fetch::new`], awaits [`Fetch::find`] (a hit returns here), awaits the body, then calls
//! [`Finish::verdict`] and awaits [`Fetch::complete`]: `find` and `verdict` are generic over
//! the return type only (decode, classify, encode), so functions returning the same type share
//! them; everything else is non-generic and compiled once. Backend failures and undecodable values
//! are counted, logged (rate-limited) and treated as misses; they never reach the caller.

mod fetch;
mod refresh;
mod trace;
mod write;

use std::time::Duration;

use crate::backend::Stored;
use crate::cache::Cache;
use crate::envelope::{self, EncodeError};
use crate::key::CallKey;
use crate::mode::{Classified, Mode, Typed};
use crate::stats::Site;
use crate::tags::{TagSet, Tags};

pub use self::fetch::{Fetch, Verdict};
use self::fetch::{Kind, Step};
pub use self::refresh::{
    Owned, Refresh, RefreshArg, RefreshRef, RefreshSelf, Refresher, own_arg, own_ref, own_self,
    refresh, refresh_rejected, view,
};

/// `stale`: runs a function's body, catching a panic (so that a value kept past its TTL can be
/// returned instead).
#[doc(hidden)]
pub fn catch_unwind<F: std::future::Future>(
    body: F,
) -> futures_util::future::CatchUnwind<std::panic::AssertUnwindSafe<F>> {
    use futures_util::FutureExt as _;
    std::panic::AssertUnwindSafe(body).catch_unwind()
}
pub use self::write::{Evict, EvictCall, Put};

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

/// Decodes a stored value: the kept decoded value when there is one of the right type,
/// otherwise the envelope's JSON.
fn decode_value<V: serde::de::DeserializeOwned>(
    stored: &Stored,
    typed: Option<Typed<V>>,
) -> Result<V, envelope::DecodeError> {
    if let (Some(any), Some(typed)) = (&stored.typed, typed) {
        if let Some(v) = (typed.unwrap)(&**any) {
            return Ok(v);
        }
    }
    envelope::decode::<V>(&stored.bytes)
}

/// What a call that found nothing needs to finish: the encoding of its result, chosen where
/// the return type's bounds were checked (in [`Fetch::find`]), so that the expansion's second
/// step carries no trait bound of its own (and a type error is reported once).
#[doc(hidden)]
pub struct Finish<R, M, V> {
    verdict: Verdict_<R, M, V>,
}

type Verdict_<R, M, V> =
    fn(&mut Fetch<'_>, &M, Option<Typed<V>>, &R, Option<&mut dyn FnMut(&R) -> bool>) -> Verdict;

impl<R, M: Mode<R, Value = V>, V: serde::de::DeserializeOwned> Finish<R, M, V> {
    /// `stale`: after [`Fetch::complete`], the value kept past its TTL if the load failed and
    /// one may be served: the call returns it instead of the error.
    #[inline]
    pub fn stale(&self, fetch: &mut Fetch<'_>, mode: &M, typed: Option<Typed<V>>) -> Option<R> {
        let stored = fetch.take_stale()?;
        let value = decode_value(&stored, typed).ok()?;
        fetch.served_stale();
        Some(mode.restore(value))
    }

    /// `stale`: the function panicked (the expansion caught it). Counts the failed load, tells
    /// the waiting callers, and returns the value kept past its TTL if there is one (otherwise
    /// the expansion resumes the panic).
    pub async fn panicked(
        &self,
        fetch: &mut Fetch<'_>,
        mode: &M,
        typed: Option<Typed<V>>,
    ) -> Option<R> {
        fetch.end_load();
        fetch.complete(Verdict(Kind::Error)).await;
        self.stale(fetch, mode, typed)
    }
}

impl<R, M, V> Finish<R, M, V> {
    /// What the function's `result` means for the cache: classified, checked against
    /// `unless`, and encoded if it is to be stored or shared with waiting callers.
    #[inline]
    pub fn verdict(
        &self,
        fetch: &mut Fetch<'_>,
        mode: &M,
        typed: Option<Typed<V>>,
        result: &R,
        unless: Option<&mut dyn FnMut(&R) -> bool>,
    ) -> Verdict {
        (self.verdict)(fetch, mode, typed, result, unless)
    }
}

impl Call<'_> {
    /// `local`: the in-process tier's copy, if it has a live one. The expansion of a `local`
    /// function calls this before it makes its [`Fetch`], and returns what it gives (a hit
    /// costs a hash lookup and a clone; nothing else is built).
    #[inline]
    pub fn local<R, M: Mode<R>>(
        &self,
        tags: Option<&Tags>,
        mode: &M,
        typed: Option<Typed<M::Value>>,
    ) -> Option<R> {
        let (CallKey::Key(key), Some(typed)) = (&self.key, typed) else {
            return None;
        };
        if tags.is_some_and(|t| t.failed) {
            // The call bypasses the cache (`Fetch::tags` says why).
            return None;
        }
        let names = tags.map_or(&[][..], |t| &t.names[..]);
        let entry = self.cache.store().local_get(key.as_str(), names)?;
        let value = (typed.unwrap)(&*entry.value)?;
        let registry = self.cache.stats_registry();
        let stats = self.site.stats(registry, self.self_type);
        stats.l1_hit();
        let _span = trace::Trace::l1_hit(&stats, key.as_str(), registry.trace_keys());
        Some(mode.restore(value))
    }

    /// [`Call::local`] for a function with `refresh`: a hit on a copy that is due starts a
    /// background refresh made by `refresher` (called only then). A copy of `local` with that
    /// one step more, so that `local` stays as it is.
    #[inline]
    pub fn local_refreshing<R, M: Mode<R>>(
        &self,
        tags: Option<&Tags>,
        mode: &M,
        typed: Option<Typed<M::Value>>,
        refresher: &Refresher<'_>,
    ) -> Option<R> {
        let (CallKey::Key(key), Some(typed)) = (&self.key, typed) else {
            return None;
        };
        if tags.is_some_and(|t| t.failed) {
            // The call bypasses the cache (`Fetch::tags` says why).
            return None;
        }
        let store = self.cache.store();
        let names = tags.map_or(&[][..], |t| &t.names[..]);
        let entry = store.local_get(key.as_str(), names)?;
        let value = (typed.unwrap)(&*entry.value)?;
        let registry = self.cache.stats_registry();
        let stats = self.site.stats(registry, self.self_type);
        stats.l1_hit();
        let span = trace::Trace::l1_hit(&stats, key.as_str(), registry.trace_keys());
        if let (Some(policy), Some(header)) = (self.site.refresh, &entry.header) {
            let tags = tags.map_or(&[][..], |t| &t.names[..]);
            refresh::start_if_due(
                store,
                self.site,
                self.self_type,
                policy,
                key.as_str(),
                tags,
                header,
                refresher,
                &span,
            );
        }
        Some(mode.restore(value))
    }
}

impl Fetch<'_> {
    /// The cached value, if there is a usable one: the call returns it. Otherwise the call
    /// runs the function, then hands its result to [`Finish::verdict`] and the verdict to
    /// [`Fetch::complete`].
    ///
    /// Generic over the return type only, so every function returning the same type shares
    /// one copy.
    pub async fn find<R, M: Mode<R>>(
        &mut self,
        mode: &M,
        typed: Option<Typed<M::Value>>,
    ) -> Result<R, Finish<R, M, M::Value>> {
        while let Step::Found(stored) = self.traced_lookup().await {
            #[cfg(test)]
            tests::after_read().await;
            match decode_value(&stored, typed) {
                Ok(value) => {
                    if let (true, Some(typed)) = (self.wants_local(), typed) {
                        self.keep_found(&stored, (typed.wrap)(&value));
                    }
                    self.hit(stored);
                    return Ok(mode.restore(value));
                }
                // Rare: boxed, so that every call's future stays small.
                Err(e) => {
                    if !Box::pin(self.unusable(&e)).await {
                        break;
                    }
                }
            }
        }
        self.begin_load();
        Err(Finish {
            verdict: verdict::<R, M>,
        })
    }

    /// [`Fetch::find`] for a function with `refresh`: a hit on an entry that is due starts a
    /// background refresh made by `refresher` (called only then), and returns at once. A copy
    /// of `find` with that one step more, so that `find` (every other function's hit path)
    /// stays as it is.
    pub async fn find_refreshing<R, M: Mode<R>>(
        &mut self,
        mode: &M,
        typed: Option<Typed<M::Value>>,
        refresher: &Refresher<'_>,
    ) -> Result<R, Finish<R, M, M::Value>> {
        while let Step::Found(stored) = self.traced_lookup().await {
            #[cfg(test)]
            tests::after_read().await;
            match decode_value(&stored, typed) {
                Ok(value) => {
                    if let (true, Some(typed)) = (self.wants_local(), typed) {
                        self.keep_found(&stored, (typed.wrap)(&value));
                    }
                    self.refresh_if_due(&stored, refresher);
                    self.hit(stored);
                    return Ok(mode.restore(value));
                }
                Err(e) => {
                    if !self.unusable(&e).await {
                        break;
                    }
                }
            }
        }
        self.begin_load();
        Err(Finish {
            verdict: verdict::<R, M>,
        })
    }
}

/// See [`Finish::verdict`].
fn verdict<R, M: Mode<R>>(
    fetch: &mut Fetch<'_>,
    mode: &M,
    typed: Option<Typed<M::Value>>,
    result: &R,
    unless: Option<&mut dyn FnMut(&R) -> bool>,
) -> Verdict {
    fetch.end_load();
    let (value, none) = match mode.classify(result) {
        Classified::Store(v) => (v, false),
        Classified::StoreNone(v) => (v, true),
        Classified::Error => return Verdict(Kind::Error),
        Classified::Refused => return Verdict(Kind::Refused(std::any::type_name::<R>())),
    };
    if !fetch.wants_value() {
        return Verdict(Kind::Skip);
    }
    let rejected = unless.is_some_and(|unless| unless(result));
    let typed = typed.filter(|_| fetch.keeps_typed() || fetch.wants_local());
    match encode_stored(value, fetch.load_time(), fetch.tag_set(), typed) {
        Ok(stored) => Verdict::new(stored, none, rejected),
        Err(e) => Verdict(Kind::Unencodable(e)),
    }
}

/// A result's value as stored: its envelope (recording its compute time and tags), and its
/// decoded form if `typed` (in-process backends and the in-process tier keep it).
fn encode_stored<V: serde::Serialize>(
    value: &V,
    compute: Duration,
    tags: Option<&TagSet>,
    typed: Option<Typed<V>>,
) -> Result<Stored, EncodeError> {
    Ok(Stored {
        bytes: envelope::encode(value, compute, tags)?,
        typed: typed.map(|typed| (typed.wrap)(value)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mode::{Tag, ViaResult as _, ViaTyped as _};
    use std::sync::Mutex;
    use std::time::Duration;

    type Hook = Box<dyn FnOnce() -> futures_util::future::BoxFuture<'static, ()> + Send>;

    /// Run once by the next lookup that found a value, right after the read returned.
    static AFTER_READ: Mutex<Option<Hook>> = Mutex::new(None);

    pub(super) async fn after_read() {
        let hook = AFTER_READ.lock().unwrap().take();
        if let Some(hook) = hook {
            hook().await;
        }
    }

    async fn call(cache: &Cache, site: &'static Site, key: &str) -> String {
        #[allow(clippy::needless_borrow)]
        let mode = (&&Tag::<Result<String, String>>::new()).__cache_mode();
        #[allow(clippy::needless_borrow)]
        let typed = (&&mode).__cache_typed();
        let call = Call {
            cache,
            site,
            self_type: None,
            key: CallKey::Key(cache.full_key(key).into()),
        };
        if let Some(hit) = call.local(None, &mode, typed) {
            return hit.unwrap();
        }
        let mut fetch = Fetch::new(call);
        let finish = match fetch.find(&mode, typed).await {
            Ok(hit) => return hit.unwrap(),
            Err(finish) => finish,
        };
        let result = Ok::<String, String>("loaded".to_owned());
        let verdict = finish.verdict(&mut fetch, &mode, typed, &result, None);
        fetch.complete(verdict).await;
        "loaded".to_owned()
    }

    /// A value read from Redis just before another process's write of the key reaches this
    /// one never lands in the in-process tier: the ticket was taken before the read.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_value_read_before_a_remote_write_is_not_kept() {
        static SITE: Site = Site::new("tests", "l1_race")
            .ttl_ms(60_000)
            .local_ms(u64::MAX);
        let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        let ns = format!("test:l1_race:{}", crate::store::new_token());
        let build = || {
            Cache::builder()
                .redis(url.clone())
                .namespace(ns.clone())
                .operation_timeout(Duration::from_secs(2))
                .build_sync()
                .unwrap()
        };
        let (a, b) = (build(), build());
        // The tier becomes usable once its subscription answered a heartbeat.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            call(&a, &SITE, "warm").await;
            if a.store().local().is_some_and(|l| l.usable()) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the tier never became usable"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let local_seq = {
            let a = a.clone();
            move || a.store().local().unwrap().seq_of(&a.full_key("k"))
        };
        let unset = local_seq();
        b.set("k", &"old", Duration::from_secs(60)).await.unwrap();
        // Wait for that write's own message: arriving late, during the call below, it would
        // pass for the later write's and let the hook return before that one arrived.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while local_seq() == unset {
            assert!(
                std::time::Instant::now() < deadline,
                "the first write's message never came"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let before = local_seq();
        let b2 = b.clone();
        *AFTER_READ.lock().unwrap() = Some(Box::new(move || {
            Box::pin(async move {
                // Another process writes the key, and its message reaches this one.
                b2.set("k", &"new", Duration::from_secs(60)).await.unwrap();
                let deadline = std::time::Instant::now() + Duration::from_secs(5);
                while local_seq() == before {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "the message never came"
                    );
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            })
        }));
        assert_eq!(call(&a, &SITE, "k").await, "old", "read before the write");
        assert!(
            a.store()
                .local()
                .unwrap()
                .get(&a.full_key("k"), &[] as &[&str])
                .is_none()
        );
        assert_eq!(call(&a, &SITE, "k").await, "new");
        // Now it is kept: the next call is an in-process hit.
        let l1 = || a.stats().functions()[0].l1_hits;
        let hits = l1();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while l1() == hits {
            assert_eq!(call(&a, &SITE, "k").await, "new");
            assert!(std::time::Instant::now() < deadline);
        }
    }

    fn assert_send<T: Send>(_: &T) {}

    /// What the expansion generates is `Send` when the body's future and the return type are:
    /// a cached function can be spawned.
    #[test]
    fn the_call_is_send() {
        static SITE: Site = Site::new("tests", "send");
        let fut = async {
            let cache = Cache::memory();
            #[allow(clippy::needless_borrow)]
            let mode = (&&Tag::<Result<u32, String>>::new()).__cache_mode();
            #[allow(clippy::needless_borrow)]
            let typed = (&&mode).__cache_typed();
            let mut fetch = Fetch::new(Call {
                cache: &cache,
                site: &SITE,
                self_type: None,
                key: CallKey::Key("k".into()),
            });
            let finish = match fetch.find(&mode, typed).await {
                Ok(hit) => return hit,
                Err(finish) => finish,
            };
            let result = async { Ok::<u32, String>(1) }.await;
            let verdict =
                finish.verdict(&mut fetch, &mode, typed, &result, Some(&mut |_: &_| false));
            fetch.complete(verdict).await;
            result
        };
        assert_send(&fut);
    }
}
