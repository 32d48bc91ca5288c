//! Storage backends: a small trait, two implementations, and the enum the cache dispatches on.
//!
//! The engine (`engine.rs`) holds all the caching behaviour; a backend moves envelopes (opaque
//! bytes) under keys, with a TTL on every write, and provides the few atomic steps the engine
//! needs:
//!
//! * **generations**: every key has a generation, bumped by each write and invalidation. A
//!   read returns it; a fill is stored only if it is unchanged, so a load that started before
//!   an invalidation can never put back the value the invalidation removed (the cache-aside
//!   stale-set race);
//! * **leases** (remote backends): one caller across all processes holds a key's lease and
//!   loads; the others wait for the fill, woken by a notification ("Scaling Memcache at
//!   Facebook", NSDI 2013, 3.2.1).

pub(crate) mod bus;
mod memory;
mod redis;

use std::any::Any;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

pub(crate) use self::memory::MemoryBackend;
pub(crate) use self::redis::{RedisBackend, RedisOptions};
use crate::error::{Error, ErrorKind};

/// How long a key's generation outlives its last bump. A load that takes longer than this
/// could, in one corner case, store a value an invalidation removed (see `fill`).
pub(crate) const GENERATION_TTL: Duration = Duration::from_secs(24 * 3600);

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

/// A read: the stored value, or the key's generation when there is no value.
#[derive(Debug)]
pub(crate) struct Read {
    pub(crate) value: Option<Stored>,
    /// Read only when there is no value (`Gen::default()` otherwise): a hit does not pay for
    /// it.
    pub(crate) generation: Gen,
}

/// The answer to a lease request.
#[derive(Debug)]
pub(crate) enum LeaseReply {
    /// The value is there.
    Hit(Stored),
    /// The caller holds the lease: load, then `fill` with this generation and the token.
    Acquired(Gen),
    /// Another caller holds the lease (for at most `remaining`): wait for its fill.
    Busy {
        generation: Gen,
        remaining: Duration,
    },
}

/// The operations every backend provides.
pub(crate) trait Backend: Send + Sync {
    /// The value under `key`, or the key's generation if there is none.
    fn read(&self, key: &str) -> impl Future<Output = BackendResult<Read>> + Send;

    /// The key's generation (after a read found an unusable value).
    fn generation(&self, key: &str) -> impl Future<Output = BackendResult<Gen>> + Send;

    /// Stores `value` under `key` for `ttl` (always > 0) if the key's generation is still
    /// `generation`; releases the lease `token` if the caller holds it; wakes the key's waiters.
    /// Returns whether the value was stored.
    fn fill(
        &self,
        key: &str,
        value: Stored,
        ttl: Duration,
        generation: &Gen,
        token: Option<&str>,
    ) -> impl Future<Output = BackendResult<bool>> + Send;

    /// Answers with the value, or gives the caller the lease for `lease`, or says who waits.
    fn lease(
        &self,
        key: &str,
        token: &str,
        lease: Duration,
    ) -> impl Future<Output = BackendResult<LeaseReply>> + Send;

    /// Gives back the lease `token` without filling (the load failed), waking the waiters.
    fn release(&self, key: &str, token: &str) -> impl Future<Output = BackendResult<()>> + Send;

    /// Stores `value` under `key` unconditionally (a write), bumping the generation so that
    /// loads that started before it do not overwrite it.
    fn write(
        &self,
        key: &str,
        value: Stored,
        ttl: Duration,
    ) -> impl Future<Output = BackendResult<()>> + Send;

    /// Removes `keys`, bumps their generations, voids their leases, wakes their waiters.
    fn invalidate(&self, keys: &[&str]) -> impl Future<Output = BackendResult<()>> + Send;

    /// Whether concurrent reads of one key should share one backend read. True for remote
    /// backends, where a read costs a round trip; false for memory, where it costs less than
    /// the coordination.
    fn coalesce_reads(&self) -> bool;

    /// Whether the backend keeps decoded values ([`Stored::typed`]).
    fn keeps_typed(&self) -> bool;

    /// Whether leases coordinate several processes. In-process backends need none: the
    /// process's own coalescing is the whole story.
    fn shares_leases(&self) -> bool;
}

/// The configured backend.
// One per cache, behind an `Arc`: the size difference between variants does not matter.
#[allow(clippy::large_enum_variant)]
pub(crate) enum AnyBackend {
    Memory(MemoryBackend),
    Redis(RedisBackend),
}

impl AnyBackend {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            AnyBackend::Memory(_) => "memory",
            AnyBackend::Redis(_) => "redis",
        }
    }

    /// The fill notifications, for backends shared between processes.
    pub(crate) fn bus(&self) -> Option<&bus::Bus> {
        match self {
            AnyBackend::Redis(r) => Some(r.bus()),
            AnyBackend::Memory(_) => None,
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
    async fn read(&self, key: &str) -> BackendResult<Read> {
        dispatch!(self, b => b.read(key).await)
    }

    async fn generation(&self, key: &str) -> BackendResult<Gen> {
        dispatch!(self, b => b.generation(key).await)
    }

    async fn fill(
        &self,
        key: &str,
        value: Stored,
        ttl: Duration,
        generation: &Gen,
        token: Option<&str>,
    ) -> BackendResult<bool> {
        dispatch!(self, b => b.fill(key, value, ttl, generation, token).await)
    }

    async fn lease(&self, key: &str, token: &str, lease: Duration) -> BackendResult<LeaseReply> {
        dispatch!(self, b => b.lease(key, token, lease).await)
    }

    async fn release(&self, key: &str, token: &str) -> BackendResult<()> {
        dispatch!(self, b => b.release(key, token).await)
    }

    async fn write(&self, key: &str, value: Stored, ttl: Duration) -> BackendResult<()> {
        dispatch!(self, b => b.write(key, value, ttl).await)
    }

    async fn invalidate(&self, keys: &[&str]) -> BackendResult<()> {
        dispatch!(self, b => b.invalidate(keys).await)
    }

    fn coalesce_reads(&self) -> bool {
        dispatch!(self, b => b.coalesce_reads())
    }

    fn keeps_typed(&self) -> bool {
        dispatch!(self, b => b.keeps_typed())
    }

    fn shares_leases(&self) -> bool {
        dispatch!(self, b => b.shares_leases())
    }
}
