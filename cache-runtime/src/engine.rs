//! The get-or-load engine: the one entry point the `#[cached]` expansion calls.
//!
//! ```text
//! condition false ─────────────────────────────────────────────► run the function (bypass)
//! memory backend: read ── hit ─────────────────────────────────► decoded value
//! join the key's flight (this process)
//!   ├ follower ── leader's value ──────────────────────────────► decoded value (coalesced)
//!   │           ├ leader's result not shared ──────────────────► run the function
//!   │           ├ leader gone ─────────────────────────────────► join again
//!   │           └ `lock` and the leader exceeded the lease ────► take over (as a leader)
//!   └ leader
//!       without `lock`: read (value, generation) ── hit ───────► publish, decoded value
//!                       └ miss ── run ── fill if the generation is unchanged ─► publish
//!       with `lock` (shared backend): lease ── hit ────────────► publish, decoded value
//!                       ├ acquired ── run ── fill (releases the lease, wakes waiters)
//!                       └ busy ── wait for the fill's notification (or a jittered
//!                                 re-check) ── lease again ... at most twice the lease,
//!                                 then run without the lease
//! ```
//!
//! Backend failures and undecodable values are counted, logged (rate-limited) and treated as
//! misses; they never reach the caller.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::backend::{Backend, BackendError, Gen, LeaseReply, Read, Stored};
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

/// What a read found.
enum Found<R> {
    Hit(Stored, R),
    /// Nothing usable: load, then fill against `generation` (`None`: unknown, because the backend
    /// failed; do not fill). `clean`: nothing was stored (rather than something unusable).
    Miss {
        generation: Option<Gen>,
        clean: bool,
    },
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
    let ctx = Ctx {
        cache: call.cache,
        inner,
        site: call.site,
        stats: &stats,
    };

    // Backends that do not coalesce reads are read before joining a flight; the leader reads
    // again only after a clean miss (a racing leader may have filled the key meanwhile).
    let mut known: Option<Option<Gen>> = None;
    if !inner.backend.coalesce_reads() {
        match ctx.read(&key, &mode, typed).await {
            Found::Hit(_, value) => {
                SiteStats::inc(&stats.hits);
                return value;
            }
            // After a clean miss the leader reads again (a racing leader may have filled the
            // key meanwhile); after garbage it goes straight to the load.
            Found::Miss { generation, clean } => {
                if !clean {
                    known = Some(generation);
                }
            }
        }
    }

    let mut key = key;
    loop {
        match inner.flights.join(key) {
            Role::Leader(guard) => {
                return ctx.lead(guard, &mode, typed, known, unless, fut).await;
            }
            Role::Follower(follower) => {
                // A leader that exceeds the lease (`lock`) or FOLLOWER_MAX_WAIT is taken over:
                // its flight is detached and the callers join again, so that one of them loads.
                let max_wait = call.site.lock.unwrap_or(FOLLOWER_MAX_WAIT);
                let outcome = tokio::time::timeout(max_wait, follower.wait()).await.ok();
                match outcome {
                    Some(Outcome::Value(stored)) => match restore(&stored, &mode, typed) {
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
                    Some(Outcome::Released) => {
                        SiteStats::inc(&stats.misses);
                        return run_uncached(&stats, &mode, fut).await;
                    }
                    Some(Outcome::Abandoned) => key = follower.into_key(),
                    None => {
                        if inner.flights.detach(follower.flight()) {
                            SiteStats::inc(&stats.takeovers);
                        }
                        key = follower.into_key();
                    }
                }
            }
        }
    }
}

/// How long a caller waits for another call's load in this process (without `lock`; with
/// it, the lease) before taking over.
const FOLLOWER_MAX_WAIT: Duration = Duration::from_secs(30);

/// What every step of one call needs.
struct Ctx<'a> {
    cache: &'a Cache,
    inner: &'a Inner,
    site: &'static Site,
    stats: &'a SiteStats,
}

/// Releases a lease that was not filled or released (the load panicked or was cancelled), in
/// a background task: a drop cannot wait.
struct LeaseGuard {
    cache: Option<Cache>,
    key: String,
    token: String,
}

impl LeaseGuard {
    fn disarm(mut self) -> String {
        self.cache = None;
        std::mem::take(&mut self.token)
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        let Some(cache) = self.cache.take() else {
            return;
        };
        let (key, token) = (
            std::mem::take(&mut self.key),
            std::mem::take(&mut self.token),
        );
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                let _ = cache.inner.backend.release(&key, &token).await;
            });
        }
    }
}

/// A token unique across processes and time: 128 random bits.
pub(crate) fn new_token() -> String {
    use std::hash::{BuildHasher, RandomState};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let a = RandomState::new().hash_one((std::process::id(), n, Instant::now()));
    let b = RandomState::new().hash_one((n, a));
    format!("{a:016x}{b:016x}")
}

/// `d` scaled by a pseudo-random factor in [0.75, 1.25).
fn jitter(d: Duration) -> Duration {
    use std::hash::{BuildHasher, RandomState};
    let r = RandomState::new().hash_one(Instant::now()) % 1000;
    d.mul_f64(0.75 + r as f64 / 2000.0)
}

impl Ctx<'_> {
    /// Reads and decodes `key`. Failures and undecodable values are misses.
    async fn read<R, M: Mode<R>>(
        &self,
        key: &str,
        mode: &M,
        typed: Option<Typed<M::Value>>,
    ) -> Found<R> {
        match self.inner.backend.read(key).await {
            Ok(Read {
                value: Some(stored),
                ..
            }) => match restore(&stored, mode, typed) {
                Ok(v) => Found::Hit(stored, v),
                Err(e) => {
                    decode_failure(self.inner, self.site, self.stats, &e);
                    // A read with a value does not carry the generation: ask for it.
                    Found::Miss {
                        generation: self.inner.backend.generation(key).await.ok(),
                        clean: false,
                    }
                }
            },
            Ok(Read {
                value: None,
                generation,
            }) => Found::Miss {
                generation: Some(generation),
                clean: true,
            },
            Err(BackendError::Data(msg)) => {
                // The key holds another Redis type, say: a miss, and the fill overwrites it.
                decode_failure(self.inner, self.site, self.stats, &msg);
                Found::Miss {
                    generation: self.inner.backend.generation(key).await.ok(),
                    clean: false,
                }
            }
            Err(e) => {
                backend_failure(self.inner, self.stats, &e);
                Found::Miss {
                    generation: None,
                    clean: false,
                }
            }
        }
    }

    /// Leads a load of the key of `guard`, the flight this call leads in this process: see
    /// the module docs. `known`: the generation of a read made just before.
    async fn lead<R, M, U, F>(
        &self,
        guard: LeaderGuard<'_>,
        mode: &M,
        typed: Option<Typed<M::Value>>,
        known: Option<Option<Gen>>,
        unless: U,
        fut: F,
    ) -> R
    where
        M: Mode<R>,
        U: FnOnce(&R) -> bool,
        F: Future<Output = R>,
    {
        let key = guard.flight().key();
        let lock = self
            .site
            .lock
            .filter(|_| self.inner.backend.shares_leases());

        let (generation, lease) = match lock {
            Some(lease_len) => match self.acquire(key, lease_len, mode, typed).await {
                Acquire::Hit(stored, value) => {
                    SiteStats::inc(&self.stats.hits);
                    guard.publish(Outcome::Value(stored));
                    return value;
                }
                Acquire::Load { generation, lease } => (generation, lease),
            },
            None => {
                let found = match known {
                    Some(generation) => Found::Miss {
                        generation,
                        clean: false,
                    },
                    None => self.read(key, mode, typed).await,
                };
                match found {
                    Found::Hit(stored, value) => {
                        SiteStats::inc(&self.stats.hits);
                        guard.publish(Outcome::Value(stored));
                        return value;
                    }
                    Found::Miss { generation, .. } => (generation, None),
                }
            }
        };
        SiteStats::inc(&self.stats.misses);

        let (result, took) = load(self.stats, fut).await;
        let ttl = self.site.ttl.unwrap_or(self.inner.default_ttl);
        let (value, ttl) = match mode.classify(&result) {
            Classified::Store(v) => (Some(v), ttl),
            Classified::StoreNone(v) if self.site.cache_none => {
                (Some(v), self.site.none_ttl.unwrap_or(ttl))
            }
            Classified::StoreNone(_) => (None, ttl),
            Classified::Error => {
                SiteStats::inc(&self.stats.load_errors);
                (None, ttl)
            }
        };
        let value = match value {
            Some(v) if !unless(&result) => v,
            _ => {
                SiteStats::inc(&self.stats.not_stored);
                guard.publish(Outcome::Released);
                self.release(key, lease).await;
                return result;
            }
        };
        let bytes = match envelope::encode(value, took) {
            Ok(bytes) => bytes,
            Err(e) => {
                SiteStats::inc(&self.stats.not_stored);
                self.inner.log.warn(
                    FailureKind::Encode,
                    &format_args!(
                        "result of `{}` could not be encoded, not cached: {e}",
                        self.site.label(None)
                    ),
                );
                guard.publish(Outcome::Released);
                self.release(key, lease).await;
                return result;
            }
        };
        let stored = Stored {
            bytes,
            typed: match typed {
                Some(typed) if self.inner.backend.keeps_typed() => Some((typed.wrap)(value)),
                _ => None,
            },
        };
        // The followers hear the outcome only after the fill's verdict: a fill rejected as
        // stale means a write or invalidation happened during the load (possibly in another
        // process), and a caller that joined after it must not get this value.
        let stale_here = guard.flight().is_stale();
        let outcome = match generation {
            Some(generation) if !stale_here => {
                let token = lease.as_ref().map(|l| l.token.as_str());
                match self
                    .inner
                    .backend
                    .fill(key, stored.clone(), ttl, &generation, token)
                    .await
                {
                    Ok(true) => {
                        lease.map(LeaseGuard::disarm);
                        Outcome::Value(stored)
                    }
                    // Written or invalidated while the function ran: storing would have put
                    // back a value older than the write. Followers read again.
                    Ok(false) => {
                        lease.map(LeaseGuard::disarm);
                        SiteStats::inc(&self.stats.stale_fills);
                        Outcome::Abandoned
                    }
                    // The lease (if any) is released in the background when its guard drops.
                    Err(e) => {
                        backend_failure(self.inner, self.stats, &e);
                        drop(lease);
                        Outcome::Value(stored)
                    }
                }
            }
            Some(_) => {
                SiteStats::inc(&self.stats.stale_fills);
                self.release(key, lease).await;
                Outcome::Abandoned
            }
            // The read failed: without the generation a fill could be stale; skip it.
            None => {
                self.release(key, lease).await;
                Outcome::Value(stored)
            }
        };
        guard.publish(outcome);
        drop(guard);
        result
    }

    /// Gives a lease back at once (the load's result is not stored), waking the waiters.
    async fn release(&self, key: &str, lease: Option<LeaseGuard>) {
        if let Some(lease) = lease {
            let token = lease.disarm();
            if let Err(e) = self.inner.backend.release(key, &token).await {
                backend_failure(self.inner, self.stats, &e);
            }
        }
    }

    /// `lock`: gets the value, or the lease, waiting for another holder's fill if needed.
    async fn acquire<R, M: Mode<R>>(
        &self,
        key: &str,
        lease_len: Duration,
        mode: &M,
        typed: Option<Typed<M::Value>>,
    ) -> Acquire<R> {
        let backend = &self.inner.backend;
        let token = new_token();
        let started = Instant::now();
        let max_wait = lease_len * 2;
        let mut waiting = Waiting {
            ctx: self,
            started,
            waited: false,
        };

        // Ask once; only a busy answer leads to subscribing and waiting.
        let first = backend.lease(key, &token, lease_len).await;
        if let Ok(done) = waiting.settle(first, key, mode, typed, &token).await {
            return done;
        }
        let Some(bus) = backend.bus() else {
            // Not a shared backend: nothing to wait for.
            return Acquire::Load {
                generation: backend.generation(key).await.ok(),
                lease: None,
            };
        };
        bus.ready(self.inner.op_timeout).await;
        let registration = bus.register(key);
        let mut recheck = Duration::from_millis(100);
        loop {
            // Registered before asking again, so that a fill between the answer and the wait
            // still wakes us.
            let notified = registration.notify().notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (generation, remaining) = match waiting
                .settle(
                    backend.lease(key, &token, lease_len).await,
                    key,
                    mode,
                    typed,
                    &token,
                )
                .await
            {
                Ok(done) => return done,
                Err(busy) => busy,
            };
            let elapsed = started.elapsed();
            if elapsed >= max_wait {
                waiting.finish();
                SiteStats::inc(&self.stats.wait_timeouts);
                return Acquire::Load {
                    generation: Some(generation),
                    lease: None,
                };
            }
            // Notifications are expected: re-check rarely. Without a subscription, re-check
            // often.
            let base = if bus.is_subscribed() {
                recheck
            } else {
                Duration::from_millis(50)
            };
            let sleep_for = jitter(base)
                .min(remaining + Duration::from_millis(5))
                .min(max_wait - elapsed);
            let _ = tokio::time::timeout(sleep_for, notified).await;
            recheck = (recheck * 2).min(Duration::from_secs(1));
        }
    }
}

/// The waiting state of one `acquire`.
struct Waiting<'a> {
    ctx: &'a Ctx<'a>,
    started: Instant,
    waited: bool,
}

impl Waiting<'_> {
    fn finish(&self) {
        if self.waited {
            self.ctx.stats.record_wait(self.started.elapsed());
        }
    }

    /// Turns a lease answer into the outcome, or `Err((generation, remaining))` when busy.
    async fn settle<R, M: Mode<R>>(
        &mut self,
        reply: Result<LeaseReply, BackendError>,
        key: &str,
        mode: &M,
        typed: Option<Typed<M::Value>>,
        token: &str,
    ) -> Result<Acquire<R>, (Gen, Duration)> {
        let ctx = self.ctx;
        match reply {
            Ok(LeaseReply::Hit(stored)) => {
                self.finish();
                match restore(&stored, mode, typed) {
                    Ok(v) => Ok(Acquire::Hit(stored, v)),
                    Err(e) => {
                        // Garbage under the key: load and overwrite it (no lease: the value
                        // key exists, so nobody waits on a lease for it).
                        decode_failure(ctx.inner, ctx.site, ctx.stats, &e);
                        let generation = ctx.inner.backend.generation(key).await.ok();
                        Ok(Acquire::Load {
                            generation,
                            lease: None,
                        })
                    }
                }
            }
            Ok(LeaseReply::Acquired(generation)) => {
                self.finish();
                SiteStats::inc(&ctx.stats.lock_acquired);
                if self.waited {
                    SiteStats::inc(&ctx.stats.takeovers);
                }
                Ok(Acquire::Load {
                    generation: Some(generation),
                    lease: Some(LeaseGuard {
                        cache: Some(ctx.cache.clone()),
                        key: key.to_owned(),
                        token: token.to_owned(),
                    }),
                })
            }
            Ok(LeaseReply::Busy {
                generation,
                remaining,
            }) => {
                if !self.waited {
                    self.waited = true;
                    SiteStats::inc(&ctx.stats.lock_waits);
                }
                Err((generation, remaining))
            }
            Err(BackendError::Data(msg)) => {
                // The value key holds another Redis type: a miss, and the fill overwrites it.
                self.finish();
                decode_failure(ctx.inner, ctx.site, ctx.stats, &msg);
                let generation = ctx.inner.backend.generation(key).await.ok();
                Ok(Acquire::Load {
                    generation,
                    lease: None,
                })
            }
            Err(e) => {
                self.finish();
                backend_failure(ctx.inner, ctx.stats, &e);
                // The script may have run and granted the lease, only its answer was lost:
                // release it (in the background; the release checks the token).
                drop(LeaseGuard {
                    cache: Some(ctx.cache.clone()),
                    key: key.to_owned(),
                    token: token.to_owned(),
                });
                Ok(Acquire::Load {
                    generation: None,
                    lease: None,
                })
            }
        }
    }
}

enum Acquire<R> {
    Hit(Stored, R),
    Load {
        generation: Option<Gen>,
        lease: Option<LeaseGuard>,
    },
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
