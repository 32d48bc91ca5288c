//! The one internal store API: what the manual API ([`Cache::get`](crate::Cache::get), `set`,
//! `invalidate`) and the engine use to reach the backend.
//!
//! It owns the rules that hold whoever calls:
//!
//! * a write or invalidation detaches the key's in-process flight, before and after the
//!   backend operation, so a lookup that starts after it never joins a load that started
//!   before it, and the detached load's fill is not stored;
//! * a lease is released if its holder goes away without filling (a panic, a cancelled
//!   future, a lost answer): [`LeaseGuard`] gives it back in the background when dropped;
//! * every operation is non-generic: the store, like the backends, is compiled once.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::backend::{
    AnyBackend, Backend, BackendError, BackendResult, Gen, Leased, OnWait, Read, Stored, Token,
};
use crate::breaker::FailureLog;
use crate::envelope::Header;
use crate::flight::{Flights, Role};
use crate::key::KeyBuf;
use crate::local::{Local, LocalEntry};
use crate::tags::{TagEpochs, TagSet};

/// A random token (lease tokens, generations): 128 bits from the std hasher's random keys and
/// a process-wide counter.
pub(crate) fn new_token() -> String {
    use std::hash::{BuildHasher, RandomState};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let a = RandomState::new().hash_one((n, std::process::id()));
    let b = RandomState::new().hash_one((std::time::Instant::now(), n));
    format!("{a:016x}{b:016x}")
}

pub(crate) struct Store {
    backend: Arc<AnyBackend>,
    /// Bumped, per tag, before and after every tag invalidation through this store: a tagged
    /// load whose tags moved since it read their versions may be stale for callers that
    /// joined it.
    tag_epochs: Arc<TagEpochs>,
    flights: Flights,
    namespace: String,
    /// Whether the namespace contains a `%` (see `KeyWriter`): known once, not per key.
    namespace_percent: bool,
    default_ttl: Duration,
    log: Arc<FailureLog>,
    /// The in-process tier, made when a `local` function first uses it (shared backends
    /// only).
    local: OnceLock<Arc<Local>>,
    local_config: LocalConfig,
    /// Write-behind: the queues' partitions and retention.
    wb: WbConfig,
    /// `refresh`: the keys this process started refreshing, the entries it refreshes, and
    /// until when it does not try again.
    refreshing: Refreshing,
    /// `stale`: keys whose load failed moments ago (and were answered with their stale copy),
    /// with until when calls skip the load and get the copy at once.
    failing: std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>,
}

/// `refresh`: one background refresh per entry per process. A key is entered with the header
/// of the entry being refreshed when its refresh starts, for one refresh lease, and left when
/// the refresh stored its value; until then (and for a lease after a refresh that failed, or
/// that another process ran), hits on that entry do not start another. A new entry of the key
/// (written, or loaded again after an eviction) may be refreshed at once: a refresh of the old
/// one can no longer store. Consulted only by hits that are due for a refresh.
pub(crate) struct Refreshing {
    keys: Mutex<RefreshingKeys>,
}

struct RefreshingKeys {
    until: HashMap<String, (Instant, Header)>,
    /// Past this size, entries whose time is over are dropped first.
    prune_at: usize,
}

const REFRESHING_PRUNE_AT: usize = 1024;

impl Refreshing {
    fn new() -> Self {
        Refreshing {
            keys: Mutex::new(RefreshingKeys {
                until: HashMap::new(),
                prune_at: REFRESHING_PRUNE_AT,
            }),
        }
    }

    /// Whether a refresh of `key`, read as the entry of `header`, may start now: then it is
    /// entered for `lease`.
    pub(crate) fn try_begin(&self, key: &str, header: &Header, lease: Duration) -> bool {
        let now = Instant::now();
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        if keys
            .until
            .get(key)
            .is_some_and(|(until, entry)| *until > now && entry == header)
        {
            return false;
        }
        if keys.until.len() >= keys.prune_at {
            keys.until.retain(|_, (until, _)| *until > now);
            // Amortized: the next prune waits until the map has doubled.
            keys.prune_at = (keys.until.len() * 2).max(REFRESHING_PRUNE_AT);
        }
        keys.until.insert(key.to_owned(), (now + lease, *header));
        true
    }

    /// The refresh of `key`'s entry of `header` stored its value: the next due hit may
    /// refresh again (unless a refresh of a newer entry of the key runs).
    pub(crate) fn end(&self, key: &str, header: &Header) {
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        if keys
            .until
            .get(key)
            .is_some_and(|(_, entry)| entry == header)
        {
            keys.until.remove(key);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.keys
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .until
            .len()
    }
}

/// `stale`: how long after a failed load (answered with the stale copy) the key's calls in
/// this process get the copy without running the load again.
pub(crate) const STALE_BACKOFF: Duration = Duration::from_secs(1);

/// At most this many keys are remembered as failing (beyond, expired ones are dropped, then all).
const FAILING_KEYS: usize = 10_000;

/// The in-process tier's settings (see [`CacheBuilder::local`](crate::CacheBuilder::local)).
#[derive(Debug, Clone, Copy)]
pub(crate) struct LocalConfig {
    pub(crate) capacity: u64,
    pub(crate) staleness: Duration,
}

impl Default for LocalConfig {
    fn default() -> Self {
        LocalConfig {
            capacity: crate::local::DEFAULT_CAPACITY,
            staleness: crate::local::DEFAULT_STALENESS,
        }
    }
}

/// Write-behind settings (see
/// [`CacheBuilder::write_behind_partitions`](crate::CacheBuilder::write_behind_partitions)).
#[derive(Debug, Clone, Copy)]
pub(crate) struct WbConfig {
    pub(crate) partitions: u16,
    pub(crate) retention: Duration,
}

impl Default for WbConfig {
    fn default() -> Self {
        WbConfig {
            partitions: 16,
            retention: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

/// One write-behind write to queue (see [`Store::wb_enqueue`]).
pub(crate) struct WbWrite<'a> {
    pub(crate) key: &'a str,
    /// `None`: the key is invalidated instead (the value could not be encoded, or its tags
    /// not rendered or read); the entry is queued all the same.
    pub(crate) value: Option<&'a Stored>,
    pub(crate) ttl: Duration,
    pub(crate) tags: Option<&'a TagSet>,
    pub(crate) queue: &'a str,
    pub(crate) function: &'a str,
    pub(crate) id: &'a str,
    pub(crate) args: &'a [u8],
}

/// The answer to [`Store::lease`].
pub(crate) enum Lease {
    /// The value is there.
    Hit(Stored),
    /// This caller holds the lease: load, then fill against the generation.
    Acquired(Gen, LeaseGuard),
    /// Waited as long as allowed for another holder: load without the lease.
    WaitedOut(Gen),
}

impl Store {
    pub(crate) fn new(
        backend: AnyBackend,
        namespace: String,
        default_ttl: Duration,
        log: Arc<FailureLog>,
        local_config: LocalConfig,
        wb: WbConfig,
    ) -> Self {
        Store {
            backend: Arc::new(backend),
            tag_epochs: Arc::new(TagEpochs::new()),
            flights: Flights::new(),
            namespace_percent: namespace.contains('%'),
            namespace,
            default_ttl,
            log,
            local: OnceLock::new(),
            local_config,
            wb,
            refreshing: Refreshing::new(),
            failing: std::sync::Mutex::new(std::collections::HashMap::new()),
        }
    }

    /// `stale`: `key`'s load failed and its stale copy was served: for `STALE_BACKOFF`, calls
    /// of it in this process get the copy without running the load again.
    pub(crate) fn mark_failing(&self, key: &str) {
        let now = std::time::Instant::now();
        let mut failing = self.failing.lock().unwrap_or_else(|e| e.into_inner());
        if failing.len() >= FAILING_KEYS {
            failing.retain(|_, until| *until > now);
            if failing.len() >= FAILING_KEYS {
                failing.clear();
            }
        }
        failing.insert(key.to_owned(), now + STALE_BACKOFF);
    }

    /// `stale`: whether `key`'s load failed less than `STALE_BACKOFF` ago.
    pub(crate) fn failing(&self, key: &str) -> bool {
        let failing = self.failing.lock().unwrap_or_else(|e| e.into_inner());
        !failing.is_empty()
            && failing
                .get(key)
                .is_some_and(|until| *until > std::time::Instant::now())
    }

    /// `refresh`: the keys this process is refreshing.
    pub(crate) fn refreshing(&self) -> &Refreshing {
        &self.refreshing
    }

    /// `refresh`: the right to refresh `key`, read as the entry of `header`, for `lease`
    /// (see [`Backend::refresh_lease`]): what to fill against, or `None` if another process
    /// refreshes it or the entry changed.
    pub(crate) async fn refresh_lease(
        &self,
        key: &str,
        header: &Header,
        lease: Duration,
    ) -> BackendResult<Option<Gen>> {
        self.backend
            .refresh_lease(key, &new_token(), header, lease)
            .await
    }

    /// `refresh`: stores a refresh's result if its lease still stands (see
    /// [`Backend::refresh_fill`]). Returns whether it was stored.
    pub(crate) async fn refresh_fill(
        &self,
        key: &str,
        value: Stored,
        ttl: Duration,
        lease: &Gen,
        header: &Header,
        keep: Option<Duration>,
    ) -> BackendResult<bool> {
        self.backend
            .refresh_fill(key, value, ttl, lease, header, keep)
            .await
    }

    /// The in-process tier, if a `local` function made it.
    #[inline]
    pub(crate) fn local(&self) -> Option<&Local> {
        self.local.get().map(|l| &**l)
    }

    /// The in-process tier for a `local` function: made on first use, with the subscription
    /// to other processes' invalidations. `None` on an in-process backend, which needs none.
    /// While the tier is not usable (the subscription is not confirmed yet), asks the
    /// backend to (re)start it.
    #[inline]
    pub(crate) fn local_tier(&self) -> Option<&Local> {
        if let Some(local) = self.local.get() {
            if !local.usable() {
                self.watch(local);
            }
            return Some(local);
        }
        if !self.backend.shared() {
            return None;
        }
        let local = self.local.get_or_init(|| {
            Arc::new(Local::new(
                self.local_config.capacity,
                self.local_config.staleness,
                self.tag_epochs.clone(),
            ))
        });
        self.watch(local);
        Some(local)
    }

    /// `local`: the in-process tier's live copy of `key`, if it has one. Like
    /// [`Store::local_tier`] (the tier is made on first use, and its subscription restarted
    /// while it is not usable), with one clock read on a hit.
    #[inline]
    pub(crate) fn local_get(&self, key: &str, tags: &[String]) -> Option<Arc<LocalEntry>> {
        let Some(local) = self.local.get() else {
            // First use: make the tier (it is not usable before its first heartbeat).
            self.local_tier();
            return None;
        };
        let found = local.get(key, tags);
        if found.is_none() && !local.usable() {
            self.watch(local);
        }
        found
    }

    #[cold]
    fn watch(&self, local: &Arc<Local>) {
        let sink: Arc<dyn crate::backend::Invalidations> = local.clone();
        // The heartbeat runs twice per staleness bound: one lost answer does not make the
        // tier unusable.
        self.backend.watch(&sink, local.staleness() / 2);
    }

    /// Removes the in-process copies of `keys` (see [`Local::remove`]).
    fn forget(&self, keys: &[&str]) {
        if let Some(local) = self.local() {
            for key in keys {
                local.remove(key);
            }
        }
    }

    /// Hides the in-process copies recorded under `tags` (see [`Local::bump_tags`]).
    fn forget_tags(&self, tags: &[&str]) {
        if let Some(local) = self.local() {
            local.bump_tags(tags);
        }
    }

    pub(crate) fn backend_name(&self) -> &'static str {
        self.backend.name()
    }

    pub(crate) fn namespace(&self) -> &str {
        &self.namespace
    }

    /// Starts a key in this store's namespace.
    pub(crate) fn key_writer(&self) -> crate::key::KeyWriter {
        crate::key::KeyWriter::in_namespace(&self.namespace, self.namespace_percent)
    }

    pub(crate) fn default_ttl(&self) -> Duration {
        self.default_ttl
    }

    pub(crate) fn log(&self) -> &FailureLog {
        &self.log
    }

    /// Whether other processes use the same entries (see [`Backend::shared`]).
    pub(crate) fn is_shared(&self) -> bool {
        self.backend.shared()
    }

    /// Whether concurrent lookups of one key should share one read (see
    /// [`Backend::coalesce_reads`]).
    pub(crate) fn coalesce_reads(&self) -> bool {
        self.backend.coalesce_reads()
    }

    /// Whether stored values may carry their decoded form (see [`Stored::typed`]).
    pub(crate) fn keeps_typed(&self) -> bool {
        self.backend.keeps_typed()
    }

    /// Joins the in-process flight of `key`, or starts one.
    pub(crate) fn join(&self, key: KeyBuf) -> Role<'_> {
        self.flights.join(key)
    }

    pub(crate) fn flights(&self) -> &Flights {
        &self.flights
    }

    /// The value under `key`.
    pub(crate) fn read<'a>(
        &'a self,
        key: &'a str,
    ) -> impl Future<Output = BackendResult<Option<Stored>>> + Send + 'a {
        // Not an `async fn`: a hit's future is one layer thinner.
        self.backend.read(key)
    }

    /// The value under `key`, or what to fill against; with the guard of the pending-load
    /// marker this call left in the key, if it did (released if the load is not stored).
    pub(crate) async fn read_for_fill(
        &self,
        key: &str,
    ) -> BackendResult<(Read, Option<LeaseGuard>)> {
        let token = Token::default();
        let read = self.backend.read_for_fill(key, &token).await?;
        Ok(self.with_guard(key, read, token))
    }

    /// [`Store::read_for_fill`] and [`Store::tag_versions`] in one request where the backend
    /// can (one pipeline on Redis).
    pub(crate) async fn read_for_fill_tagged(
        &self,
        key: &str,
        tags: &[&str],
        ttl: Duration,
    ) -> (
        BackendResult<(Read, Option<LeaseGuard>)>,
        BackendResult<Vec<bytes::Bytes>>,
    ) {
        let token = Token::default();
        let (read, versions) = self
            .backend
            .read_for_fill_tagged(key, &token, tags, ttl)
            .await;
        (read.map(|read| self.with_guard(key, read, token)), versions)
    }

    /// What to fill against after a read found a value the caller cannot use (see
    /// [`Backend::replace`]); with the guard of the marker this call left, if it did.
    pub(crate) async fn replace(&self, key: &str) -> BackendResult<(Gen, Option<LeaseGuard>)> {
        let token = Token::default();
        let generation = self.backend.replace(key, &token).await?;
        let guard = self.guard_if_mine(key, &generation, token);
        Ok((generation, guard))
    }

    /// `stale`: the copy of `key`'s last filled value (see [`Backend::read_stale`]).
    pub(crate) async fn read_stale(&self, key: &str) -> BackendResult<Option<Stored>> {
        self.backend.read_stale(key).await
    }

    /// A read, with the guard of the marker `token` if the read is a miss that left it.
    fn with_guard(&self, key: &str, read: Read, token: Token) -> (Read, Option<LeaseGuard>) {
        let guard = match &read {
            Read::Miss(generation) => self.guard_if_mine(key, generation, token),
            Read::Hit(_) => None,
        };
        (read, guard)
    }

    /// A guard for the marker `token` if `generation` is it (this call left it in the key).
    fn guard_if_mine(&self, key: &str, generation: &Gen, token: Token) -> Option<LeaseGuard> {
        match token.into_issued() {
            Some(marker) if generation.0 == marker.as_bytes() => Some(LeaseGuard::new(
                Some(self.backend.clone()),
                key.to_owned(),
                marker,
            )),
            _ => None,
        }
    }

    /// The value, or the lease of `key` for `lease`, or a wait for its holder (`on_wait` is
    /// called when one begins); with how long it waited. If the call is dropped while it
    /// asks or waits, or fails (the lease may have been granted with its answer lost), a
    /// lease it may hold is released in the background.
    pub(crate) async fn lease(
        &self,
        key: &str,
        lease: Duration,
        on_wait: &OnWait<'_>,
    ) -> BackendResult<(Lease, Option<Duration>)> {
        let mut pending = PendingLease {
            backend: &self.backend,
            key,
            token: Token::default(),
            armed: true,
        };
        let reply = self
            .backend
            .lease(key, &pending.token, lease, on_wait)
            .await?;
        pending.armed = false;
        let token = std::mem::take(&mut pending.token).into_issued();
        let answer = match (reply.answer, token) {
            (Leased::Hit(stored), _) => Lease::Hit(stored),
            (Leased::Acquired(generation), Some(token)) => Lease::Acquired(
                generation,
                LeaseGuard::new(Some(self.backend.clone()), key.to_owned(), token),
            ),
            // Granted without a token (memory: nobody else waits on it): nothing to give back.
            (Leased::Acquired(generation), None) => Lease::Acquired(
                generation,
                LeaseGuard::new(None, key.to_owned(), String::new()),
            ),
            (Leased::WaitedOut(generation), _) => Lease::WaitedOut(generation),
        };
        Ok((answer, reply.waited))
    }

    /// Stores a load's result if `key`'s generation is still `generation`, releasing `lease`
    /// (with `keep`, also as the key's stale copy, see [`Backend::fill`]). Returns whether it
    /// was stored.
    pub(crate) async fn fill(
        &self,
        key: &str,
        value: Stored,
        ttl: Duration,
        generation: &Gen,
        lease: Option<LeaseGuard>,
        keep: Option<Duration>,
    ) -> BackendResult<bool> {
        let token = lease.as_ref().map(|l| l.0.token.as_str());
        let filled = self
            .backend
            .fill(key, value, ttl, generation, token, keep)
            .await;
        if filled.is_ok() {
            // The fill script released it. On an error, the guard releases it in the
            // background as it drops.
            if let Some(lease) = lease {
                lease.disarm();
            }
        }
        filled
    }

    /// Gives `lease` back at once (the load's result is not stored), waking the waiters. If
    /// this fails, or is dropped before it finishes, the guard releases it in the background.
    pub(crate) async fn release(&self, lease: LeaseGuard) -> BackendResult<()> {
        if lease.0.token.is_empty() {
            lease.disarm();
            return Ok(());
        }
        self.backend.release(&lease.0.key, &lease.0.token).await?;
        lease.disarm();
        Ok(())
    }

    /// Stores `value` under `key`: a write. Loads of `key` running now, in any process, do
    /// not store their results over it. A tagged value's tags are made to live as long as it.
    pub(crate) async fn write(
        &self,
        key: &str,
        value: Stored,
        ttl: Duration,
        tags: Option<&TagSet>,
    ) -> BackendResult<()> {
        // Detach in-flight lookups before the write (their fills are then not stored) and
        // after it (a lookup that started in between may have read the old value).
        self.flights.invalidate(key);
        self.forget(&[key]);
        let written = match tags.filter(|t| !t.is_empty()) {
            None => self.backend.write(key, value, ttl).await,
            Some(tags) => {
                let names = tags.names();
                let (written, touched) = tokio::join!(
                    self.backend.write(key, value, ttl),
                    self.backend.current_tags(&names, Some(ttl))
                );
                written.and(touched.map(drop))
            }
        };
        self.flights.invalidate(key);
        self.forget(&[key]);
        written
    }

    /// Write-behind: stores `write`'s value as [`Store::write`] does and appends the write to
    /// its queue's partition, in one step (Redis only: an in-process backend has no queue).
    pub(crate) async fn wb_enqueue(&self, write: &WbWrite<'_>) -> BackendResult<()> {
        let AnyBackend::Redis(redis) = &*self.backend else {
            return Err(BackendError::Unavailable(
                "write-behind needs the redis backend".to_owned(),
            ));
        };
        let key = write.key;
        // As `write`: detach in-flight lookups and forget local copies, before and after.
        self.flights.invalidate(key);
        self.forget(&[key]);
        let queued = match write.tags.filter(|t| !t.is_empty()) {
            None => redis.wb_enqueue(self, write).await,
            Some(tags) => {
                let names = tags.names();
                let (queued, touched) = tokio::join!(
                    redis.wb_enqueue(self, write),
                    self.backend.current_tags(&names, Some(write.ttl))
                );
                // The write is accepted once queued; the tags' lives are best effort (as for a
                // put whose tag extension fails, the entry then outlives its tags and misses).
                drop(touched);
                queued
            }
        };
        self.flights.invalidate(key);
        self.forget(&[key]);
        queued
    }

    /// Write-behind: forgets `key`'s last queued write (see `RedisBackend::wb_forget_last`)
    /// before a write the call makes itself (an inline run). Nothing to forget without Redis.
    pub(crate) async fn wb_forget_last(&self, key: &str) -> BackendResult<()> {
        match self.redis() {
            Some(redis) => redis.wb_forget_last(key).await,
            None => Ok(()),
        }
    }

    /// Write-behind: after an inline run whose cache write failed (Redis unreachable), removes
    /// `key` and its last queued write record once Redis answers again: a Redis that kept its
    /// data (AOF) would otherwise serve the older value, and the worker would re-assert an
    /// older queued write over the database's newer row. Retried for up to 10 minutes from
    /// this process (a process that exits first leaves the key to its TTL: documented).
    pub(crate) fn wb_invalidate_when_back(&self, key: &str) {
        if self.redis().is_none() {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let backend = self.backend.clone();
        let (key, wbl) = (key.to_owned(), crate::backend::RedisBackend::wbl_key(key));
        let log = self.log.clone();
        handle.spawn(async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
            let mut wait = Duration::from_millis(200);
            loop {
                if backend.invalidate(&[key.as_str(), wbl.as_str()]).await.is_ok() {
                    return;
                }
                if tokio::time::Instant::now() + wait > deadline {
                    log.warn(
                        crate::breaker::FailureKind::Server,
                        &format_args!(
                            "a write-behind call that ran inline could not invalidate its key for 10 minutes; it expires with its TTL"
                        ),
                    );
                    return;
                }
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
        });
    }

    /// Write-behind settings.
    pub(crate) fn wb_config(&self) -> WbConfig {
        self.wb
    }

    /// The Redis backend, if the cache has one (the write-behind worker's way to Redis).
    pub(crate) fn redis(&self) -> Option<&crate::backend::RedisBackend> {
        match &*self.backend {
            AnyBackend::Redis(r) => Some(r),
            AnyBackend::Memory(_) => None,
        }
    }

    /// Forgets the in-process state of `key` after another write of it (the write-behind
    /// worker's re-assert): detached flights, no local copy.
    pub(crate) fn written_elsewhere(&self, key: &str) {
        self.flights.invalidate(key);
        self.forget(&[key]);
    }

    /// The current versions of `tags`, created where missing (see [`Backend::tag_versions`]).
    pub(crate) async fn tag_versions(
        &self,
        tags: &[&str],
        ttl: Duration,
    ) -> BackendResult<Vec<bytes::Bytes>> {
        self.backend.tag_versions(tags, ttl).await
    }

    /// The current versions of `tags`, without creating any (see
    /// [`Backend::current_tags`]).
    pub(crate) async fn current_tags(
        &self,
        tags: &[&str],
        extend: Option<Duration>,
    ) -> BackendResult<Vec<Option<bytes::Bytes>>> {
        self.backend.current_tags(tags, extend).await
    }

    /// Invalidates every entry recorded under any of `tags`, in every process. A load that
    /// read a tag's version before this is never served after it (its followers retry).
    pub(crate) async fn invalidate_tags(&self, tags: &[&str]) -> BackendResult<()> {
        if tags.is_empty() {
            return Ok(());
        }
        self.tag_epochs.bump(tags);
        self.forget_tags(tags);
        let done = self.backend.invalidate_tags(tags).await;
        self.tag_epochs.bump(tags);
        self.forget_tags(tags);
        done
    }

    /// The epoch of `tags` in this store (see [`TagEpochs`]).
    pub(crate) fn tag_epoch<S: AsRef<str>>(&self, tags: &[S]) -> u64 {
        self.tag_epochs.of(tags)
    }

    /// Invalidates `keys` and `tags` in the background (a put or evict whose call was dropped
    /// after its function may have written the database): in-process flights at once.
    pub(crate) fn invalidate_in_background(&self, keys: Vec<String>, tags: Vec<String>) {
        for key in &keys {
            self.flights.invalidate(key);
            self.forget(&[key]);
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            // No runtime to do it from (the call was dropped as its runtime shut down).
            self.log.warn(
                crate::breaker::FailureKind::Server,
                &format_args!(
                    "a cancelled put or evict could not invalidate its keys (no runtime); they expire with their TTL"
                ),
            );
            return;
        };
        let backend = self.backend.clone();
        let epochs = self.tag_epochs.clone();
        let local = self.local.get().cloned();
        let log = self.log.clone();
        handle.spawn(async move {
            let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
            let tags: Vec<&str> = tags.iter().map(String::as_str).collect();
            let mut failed = None;
            if !keys.is_empty() {
                failed = backend.invalidate(&keys).await.err();
                if let Some(local) = &local {
                    keys.iter().for_each(|k| local.remove(k));
                }
            }
            if !tags.is_empty() {
                epochs.bump(&tags);
                if let Some(local) = &local {
                    local.bump_tags(&tags);
                }
                failed = backend.invalidate_tags(&tags).await.err().or(failed);
                epochs.bump(&tags);
                if let Some(local) = &local {
                    local.bump_tags(&tags);
                }
            }
            if let Some(e) = failed {
                log.warn(
                    crate::breaker::FailureKind::Server,
                    &format_args!(
                        "a cancelled put or evict could not invalidate its keys ({e}); they expire with their TTL"
                    ),
                );
            }
        });
    }

    /// Removes `keys`. Loads of them running now, in any process, do not store their results.
    pub(crate) async fn invalidate(&self, keys: &[&str]) -> BackendResult<()> {
        for key in keys {
            self.flights.invalidate(key);
        }
        self.forget(keys);
        let done = self.backend.invalidate(keys).await;
        for key in keys {
            self.flights.invalidate(key);
        }
        self.forget(keys);
        done
    }
}

/// A lease being asked for: dropped while armed (the caller was cancelled while it asked or
/// waited, or the answer was lost), a token it sent is released in the background.
struct PendingLease<'a> {
    backend: &'a Arc<AnyBackend>,
    key: &'a str,
    token: Token,
    armed: bool,
}

impl Drop for PendingLease<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Some(token) = std::mem::take(&mut self.token).into_issued() {
            drop(LeaseGuard::new(
                Some(self.backend.clone()),
                self.key.to_owned(),
                token,
            ));
        }
    }
}

/// A held lease. Dropped without [`LeaseGuard::disarm`] (the holder panicked or was
/// cancelled, or its fill failed), it is released in the background so that waiters need not
/// wait for it to expire.
pub(crate) struct LeaseGuard(Box<Held>);

/// What a [`LeaseGuard`] holds: boxed, so that a call's state (which may hold a guard) stays
/// small.
struct Held {
    backend: Option<Arc<AnyBackend>>,
    key: String,
    token: String,
}

impl LeaseGuard {
    fn new(backend: Option<Arc<AnyBackend>>, key: String, token: String) -> Self {
        LeaseGuard(Box::new(Held {
            backend,
            key,
            token,
        }))
    }

    /// Stops the background release.
    fn disarm(mut self) {
        self.0.backend = None;
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        let Some(backend) = self.0.backend.take() else {
            return;
        };
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            // No runtime to release from: the lease expires on its own.
            return;
        };
        let key = std::mem::take(&mut self.0.key);
        let token = std::mem::take(&mut self.0.token);
        handle.spawn(async move {
            // A connectivity failure is logged by the backend; the lease then expires.
            if let Err(BackendError::Data(msg)) = backend.release(&key, &token).await {
                tracing::debug!(target: "cache_runtime", "releasing a lease failed: {msg}");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENTRY: Header = [1; crate::envelope::HEADER_LEN];

    #[test]
    fn one_refresh_per_entry_until_it_ends_or_its_lease_runs_out() {
        let r = Refreshing::new();
        let lease = Duration::from_millis(30);
        assert!(r.try_begin("a", &ENTRY, lease));
        assert!(!r.try_begin("a", &ENTRY, lease), "running");
        assert!(r.try_begin("b", &ENTRY, lease), "another key");
        r.end("a", &ENTRY);
        assert!(r.try_begin("a", &ENTRY, lease), "ended");
        let mut next = ENTRY;
        next[1] = 2;
        assert!(r.try_begin("a", &next, lease), "a new entry of the key");
        r.end("a", &ENTRY);
        assert!(
            !r.try_begin("a", &next, lease),
            "the old entry's end is not the new one's"
        );
        std::thread::sleep(lease + Duration::from_millis(10));
        assert!(r.try_begin("b", &ENTRY, lease), "the lease ran out");
    }

    #[test]
    fn keys_whose_lease_ran_out_are_pruned() {
        let r = Refreshing::new();
        for i in 0..REFRESHING_PRUNE_AT {
            assert!(r.try_begin(&format!("k{i}"), &ENTRY, Duration::ZERO));
        }
        assert!(r.try_begin("last", &ENTRY, Duration::from_secs(60)));
        assert_eq!(r.len(), 1);
    }
}
