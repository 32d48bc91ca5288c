//! Storage backends: a small trait, two implementations, and the enum the store dispatches on.
//!
//! A backend moves envelopes (opaque bytes) under keys, with a TTL on every write, and owns
//! the atomic steps that need the storage's help:
//!
//! * **generations**: every key has a generation, replaced by each write and invalidation. A
//!   read for a fill returns it; a fill is stored only if it is unchanged, so a load that
//!   started before an invalidation can never put back the value the invalidation removed
//!   (the cache-aside stale-set race);
//! * **leases** ([`Backend::lease`]): "the value, or the right to load it, or wait until
//!   whoever holds that right has filled it" as one operation. On Redis one caller across all
//!   processes holds a key's lease and loads; the others wait for the fill, woken by a
//!   notification ("Scaling Memcache at Facebook", NSDI 2013, 3.2.1). How a backend waits
//!   (pub/sub, re-checks) is its own business: callers see only the answer.
//!
//! Nothing here is generic over the cached type: the backends are compiled once.

mod memory;
mod redis;

use std::any::Any;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

pub(crate) use self::memory::MemoryBackend;
pub(crate) use self::redis::{RedisBackend, RedisOptions, fleet, sentinel, wb};
use crate::envelope::Header;
use crate::error::{Error, ErrorKind};
use crate::key::KeyBuf;

/// How long a pending load's marker lives (Redis): a load that takes longer is not stored
/// (its marker is gone, so its fill is rejected), unless a `lock` lease asks for longer.
pub(crate) const PENDING_TTL: Duration = Duration::from_secs(120);

/// Why a backend operation failed.
#[derive(Debug, Clone)]
pub(crate) enum BackendError {
    /// Not reachable (refused, dropped, breaker open).
    Unavailable(String),
    /// No answer within the operation timeout.
    Timeout,
    /// The backend answered with an error about the data (`WRONGTYPE`, ...). The backend is
    /// healthy; the key holds something we cannot use.
    Data(String),
}

impl std::fmt::Display for BackendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BackendError::Unavailable(m) => write!(f, "unavailable: {m}"),
            BackendError::Timeout => f.write_str("timed out"),
            BackendError::Data(m) => write!(f, "error reply: {m}"),
        }
    }
}

impl From<BackendError> for Error {
    fn from(e: BackendError) -> Error {
        match e {
            BackendError::Unavailable(m) => Error::new(ErrorKind::Unavailable, m),
            BackendError::Timeout => Error::new(ErrorKind::Timeout, ""),
            BackendError::Data(m) => Error::new(ErrorKind::Backend, m),
        }
    }
}

pub(crate) type BackendResult<T> = Result<T, BackendError>;

/// A decoded value kept next to its envelope by in-process backends, so that a hit clones it
/// instead of decoding JSON.
pub(crate) type TypedValue = Arc<dyn Any + Send + Sync>;

/// What is stored under a value key: the envelope, and (in-process backends only) the
/// decoded value.
#[derive(Clone)]
pub(crate) struct Stored {
    pub(crate) bytes: Bytes,
    pub(crate) typed: Option<TypedValue>,
}

impl Stored {
    pub(crate) fn bytes(bytes: Bytes) -> Stored {
        Stored { bytes, typed: None }
    }
}

impl std::fmt::Debug for Stored {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stored")
            .field("bytes", &self.bytes.len())
            .field("typed", &self.typed.is_some())
            .finish()
    }
}

/// A key's generation as read before a load; opaque, compared for equality by `fill`.
/// Empty: the key has never been written or invalidated (or its generation expired).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Gen(pub(crate) Bytes);

/// A read made before a load: the value, or the key's generation to fill against.
#[derive(Debug)]
pub(crate) enum Read {
    Hit(Stored),
    Miss(Gen),
}

/// The answer to [`Backend::lease`].
#[derive(Debug)]
pub(crate) enum Leased {
    /// The value is there (possibly filled by the holder this call waited for).
    Hit(Stored),
    /// The caller holds the lease: load, then `fill` with this generation and its token.
    Acquired(Gen),
    /// The caller waited for another holder as long as it may (twice the lease) without a
    /// fill: load without the lease, then fill against this generation.
    WaitedOut(Gen),
}

/// [`Leased`], and what it took to get it.
#[derive(Debug)]
pub(crate) struct LeaseReply {
    pub(crate) answer: Leased,
    /// How long the caller waited for another holder (`None`: it did not wait).
    pub(crate) waited: Option<Duration>,
}

/// Called by [`Backend::lease`] when the caller starts waiting for another holder.
pub(crate) type OnWait<'a> = dyn Fn() + Send + Sync + 'a;

/// A lease token, made on first use: a `lock` hit, which never asks for the lease, does not
/// pay for one. Its buffer is a reused [`KeyBuf`]: a token that is not kept (a hit)
/// allocates nothing.
#[derive(Default)]
pub(crate) struct Token(std::sync::OnceLock<KeyBuf>);

impl Token {
    /// The token, made now by `make` if it was not yet.
    pub(crate) fn get_or(&self, make: impl FnOnce() -> KeyBuf) -> &str {
        self.0.get_or_init(make).as_str()
    }

    /// The token if it was ever used (otherwise no lease can have been granted with it).
    pub(crate) fn into_issued(self) -> Option<String> {
        self.0.into_inner().map(KeyBuf::into_string)
    }
}

/// The operations every backend provides. All keys are full keys (namespace included).
pub(crate) trait Backend: Send + Sync {
    /// The value under `key` (a manual `get`, or a hit on the request path): one round trip.
    fn read(&self, key: &str) -> impl Future<Output = BackendResult<Option<Stored>>> + Send;

    /// The value under `key`, or what a load's fill is checked against if there is none. A
    /// shared backend may leave `token` in the key as a pending load's marker (then
    /// `Read::Miss` carries it, and `release` removes it).
    fn read_for_fill(
        &self,
        key: &str,
        token: &Token,
    ) -> impl Future<Output = BackendResult<Read>> + Send;

    /// What to fill against after a read found a value the caller cannot use (undecodable,
    /// of another Redis type, or invalidated by a tag). A shared backend replaces the value
    /// with `token` as a pending load's marker, unless another caller's marker is already
    /// there (then it returns that one, and the caller's fill is checked against it).
    fn replace(&self, key: &str, token: &Token) -> impl Future<Output = BackendResult<Gen>> + Send;

    /// `stale`: the copy of `key`'s last filled value that outlives it (see
    /// [`Backend::fill`]'s `keep`), if no write or invalidation of the key dropped it since.
    fn read_stale(&self, key: &str) -> impl Future<Output = BackendResult<Option<Stored>>> + Send;

    /// The value, or the lease `token` for `lease`, waiting as long as twice the lease for
    /// another holder's fill if needed; `on_wait` is called when a wait begins.
    fn lease(
        &self,
        key: &str,
        token: &Token,
        lease: Duration,
        on_wait: &OnWait<'_>,
    ) -> impl Future<Output = BackendResult<LeaseReply>> + Send;

    /// `refresh`: the right to reload `key` ahead of its expiry, for the entry whose envelope
    /// starts with `header` (the one the caller read), for `lease`; what
    /// [`Backend::refresh_fill`] is checked against. `None` if another process holds it, or
    /// the key no longer holds that entry (it was refreshed, written or invalidated since).
    /// The caller's process lets one refresh of a key run at a time; an in-process backend
    /// has nothing more to share, and returns the key's generation, as for a load.
    fn refresh_lease(
        &self,
        key: &str,
        _token: &str,
        _header: &Header,
        _lease: Duration,
    ) -> impl Future<Output = BackendResult<Option<Gen>>> + Send {
        async move {
            let token = Token::default();
            self.replace(key, &token).await.map(Some)
        }
    }

    /// `refresh`: stores a refresh's result under `key` for `ttl` if `lease` (from
    /// [`Backend::refresh_lease`]) still stands: no write or invalidation of the key since,
    /// and on a shared backend, the key still holds the entry of `header` (no expiry or other
    /// fill either). With `keep` (`stale`), also replaces the key's stale copy, as
    /// [`Backend::fill`] does. Gives the lease back. Publishes nothing. Returns whether it was
    /// stored.
    fn refresh_fill(
        &self,
        key: &str,
        value: Stored,
        ttl: Duration,
        lease: &Gen,
        _header: &Header,
        keep: Option<Duration>,
    ) -> impl Future<Output = BackendResult<bool>> + Send {
        self.fill(key, value, ttl, lease, None, keep)
    }

    /// Gives back the lease `token` without filling (the load failed), waking the waiters.
    fn release(&self, key: &str, token: &str) -> impl Future<Output = BackendResult<()>> + Send;

    /// Stores `value` under `key` for `ttl` (always > 0) if the key's generation is still
    /// `generation`; releases the lease `token` if the caller holds it; wakes the key's waiters.
    /// With `keep` (`stale`), also stores the value as the key's stale copy for `keep`, in the
    /// same step (replacing an older copy). Returns whether the value was stored.
    fn fill(
        &self,
        key: &str,
        value: Stored,
        ttl: Duration,
        generation: &Gen,
        token: Option<&str>,
        keep: Option<Duration>,
    ) -> impl Future<Output = BackendResult<bool>> + Send;

    /// Stores `value` under `key` unconditionally (a write), replacing the generation so that
    /// loads that started before it do not overwrite it.
    fn write(
        &self,
        key: &str,
        value: Stored,
        ttl: Duration,
    ) -> impl Future<Output = BackendResult<()>> + Send;

    /// Removes `keys` and replaces their generations (voiding the leases and pending loads
    /// of them: their fills are rejected, which wakes their waiters).
    fn invalidate(&self, keys: &[&str]) -> impl Future<Output = BackendResult<()>> + Send;

    /// The current version of each tag (full names), creating a version for a tag that has
    /// none, with at least `ttl` to live. One round trip, whatever the number of tags.
    fn tag_versions(
        &self,
        tags: &[&str],
        ttl: Duration,
    ) -> impl Future<Output = BackendResult<Vec<Bytes>>> + Send;

    /// [`Backend::read_for_fill`] and [`Backend::tag_versions`]: a backend that can do both in
    /// one request (Redis: one pipeline) overrides this.
    fn read_for_fill_tagged(
        &self,
        key: &str,
        token: &Token,
        tags: &[&str],
        ttl: Duration,
    ) -> impl Future<Output = (BackendResult<Read>, BackendResult<Vec<Bytes>>)> + Send {
        async move {
            (
                self.read_for_fill(key, token).await,
                self.tag_versions(tags, ttl).await,
            )
        }
    }

    /// The current version of each tag (`None`: it has none), without creating any; with
    /// `extend`, each existing tag is made to live at least that long.
    fn current_tags(
        &self,
        tags: &[&str],
        extend: Option<Duration>,
    ) -> impl Future<Output = BackendResult<Vec<Option<Bytes>>>> + Send;

    /// Gives each tag that has a version a new one (its entries are then never served).
    /// O(1) per tag, whatever the number of entries.
    fn invalidate_tags(&self, tags: &[&str]) -> impl Future<Output = BackendResult<()>> + Send;

    /// Whether concurrent reads of one key should share one backend read. True for remote
    /// backends, where a read costs a round trip; false for memory, where it costs less than
    /// the coordination.
    fn coalesce_reads(&self) -> bool;

    /// Whether other processes use the same entries (so a lease may make its caller wait).
    fn shared(&self) -> bool;

    /// Whether the backend keeps decoded values ([`Stored::typed`]).
    fn keeps_typed(&self) -> bool;
}

/// Where a shared backend delivers the writes and invalidations other processes made, and
/// the health of that stream: what keeps the in-process tier (`local`) coherent.
///
/// A backend calls these from its subscriber task; they must not block.
pub(crate) trait Invalidations: Send + Sync + 'static {
    /// These keys (full keys) were written or invalidated (in another process).
    fn keys(&self, keys: &mut dyn Iterator<Item = &str>);

    /// These tags (full names) were invalidated (in another process).
    fn tags(&self, tags: &mut dyn Iterator<Item = &str>);

    /// Messages may have been missed (the subscription dropped, the server restarted, a
    /// heartbeat went unanswered, the breaker opened): nothing derived from earlier state may
    /// be served until [`Invalidations::delivered`] is called again.
    fn lost(&self);

    /// Every invalidation published before `sent` (a heartbeat sent at that instant, whose
    /// answer came back after everything published before it was delivered) has been passed
    /// to [`Invalidations::keys`] / [`Invalidations::tags`].
    fn delivered(&self, sent: std::time::Instant);
}

/// The configured backend.
// One per cache, behind an `Arc`: the size difference between variants does not matter.
#[allow(clippy::large_enum_variant)]
pub(crate) enum AnyBackend {
    Memory(MemoryBackend),
    Redis(RedisBackend),
}

impl AnyBackend {
    /// Starts delivering other processes' invalidations to `sink` (shared backends), with a
    /// heartbeat every `heartbeat`; idempotent. An in-process backend has nothing to deliver.
    // Remove the allow when the L1 tier (Store) calls it.
    #[allow(
        dead_code,
        reason = "called by the L1 tier in Store, which lands separately"
    )]
    pub(crate) fn watch(&self, sink: &Arc<dyn Invalidations>, heartbeat: Duration) {
        match self {
            AnyBackend::Memory(_) => {}
            AnyBackend::Redis(b) => b.watch(sink, heartbeat),
        }
    }

    pub(crate) fn name(&self) -> &'static str {
        match self {
            AnyBackend::Memory(_) => "memory",
            AnyBackend::Redis(b) => b.name(),
        }
    }
}

macro_rules! dispatch {
    ($self:ident, $b:ident => $e:expr) => {
        match $self {
            AnyBackend::Memory($b) => $e,
            AnyBackend::Redis($b) => $e,
        }
    };
}

impl Backend for AnyBackend {
    fn read(&self, key: &str) -> impl Future<Output = BackendResult<Option<Stored>>> + Send {
        // Not an `async fn`: a hit's future is one layer thinner.
        use futures_util::future::Either;
        match self {
            AnyBackend::Memory(b) => Either::Left(b.read(key)),
            AnyBackend::Redis(b) => Either::Right(b.read(key)),
        }
    }

    async fn read_for_fill(&self, key: &str, token: &Token) -> BackendResult<Read> {
        dispatch!(self, b => b.read_for_fill(key, token).await)
    }

    async fn replace(&self, key: &str, token: &Token) -> BackendResult<Gen> {
        dispatch!(self, b => b.replace(key, token).await)
    }

    async fn read_stale(&self, key: &str) -> BackendResult<Option<Stored>> {
        dispatch!(self, b => b.read_stale(key).await)
    }

    async fn lease(
        &self,
        key: &str,
        token: &Token,
        lease: Duration,
        on_wait: &OnWait<'_>,
    ) -> BackendResult<LeaseReply> {
        dispatch!(self, b => b.lease(key, token, lease, on_wait).await)
    }

    async fn refresh_lease(
        &self,
        key: &str,
        token: &str,
        header: &Header,
        lease: Duration,
    ) -> BackendResult<Option<Gen>> {
        dispatch!(self, b => b.refresh_lease(key, token, header, lease).await)
    }

    async fn refresh_fill(
        &self,
        key: &str,
        value: Stored,
        ttl: Duration,
        lease: &Gen,
        header: &Header,
        keep: Option<Duration>,
    ) -> BackendResult<bool> {
        dispatch!(self, b => b.refresh_fill(key, value, ttl, lease, header, keep).await)
    }

    async fn release(&self, key: &str, token: &str) -> BackendResult<()> {
        dispatch!(self, b => b.release(key, token).await)
    }

    async fn fill(
        &self,
        key: &str,
        value: Stored,
        ttl: Duration,
        generation: &Gen,
        token: Option<&str>,
        keep: Option<Duration>,
    ) -> BackendResult<bool> {
        dispatch!(self, b => b.fill(key, value, ttl, generation, token, keep).await)
    }

    async fn write(&self, key: &str, value: Stored, ttl: Duration) -> BackendResult<()> {
        dispatch!(self, b => b.write(key, value, ttl).await)
    }

    async fn invalidate(&self, keys: &[&str]) -> BackendResult<()> {
        dispatch!(self, b => b.invalidate(keys).await)
    }

    async fn tag_versions(&self, tags: &[&str], ttl: Duration) -> BackendResult<Vec<Bytes>> {
        dispatch!(self, b => b.tag_versions(tags, ttl).await)
    }

    async fn read_for_fill_tagged(
        &self,
        key: &str,
        token: &Token,
        tags: &[&str],
        ttl: Duration,
    ) -> (BackendResult<Read>, BackendResult<Vec<Bytes>>) {
        dispatch!(self, b => b.read_for_fill_tagged(key, token, tags, ttl).await)
    }

    async fn current_tags(
        &self,
        tags: &[&str],
        extend: Option<Duration>,
    ) -> BackendResult<Vec<Option<Bytes>>> {
        dispatch!(self, b => b.current_tags(tags, extend).await)
    }

    async fn invalidate_tags(&self, tags: &[&str]) -> BackendResult<()> {
        dispatch!(self, b => b.invalidate_tags(tags).await)
    }

    fn coalesce_reads(&self) -> bool {
        dispatch!(self, b => b.coalesce_reads())
    }

    fn shared(&self) -> bool {
        dispatch!(self, b => b.shared())
    }

    fn keeps_typed(&self) -> bool {
        dispatch!(self, b => b.keeps_typed())
    }
}
