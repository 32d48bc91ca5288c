//! Storage backends: a small trait, two implementations, and the enum the cache dispatches on.
//!
//! The engine (`engine.rs`) holds all the caching behaviour; a backend only moves envelopes
//! (opaque bytes) under keys, with a TTL on every write.

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

/// The operations every backend provides.
pub(crate) trait Backend: Send + Sync {
    /// What is stored under `key`, if anything.
    fn get(&self, key: &str) -> impl Future<Output = BackendResult<Option<Stored>>> + Send;
    /// Stores `value` under `key` for `ttl` (always > 0), replacing whatever was there.
    fn set(
        &self,
        key: &str,
        value: Stored,
        ttl: Duration,
    ) -> impl Future<Output = BackendResult<()>> + Send;
    /// Deletes `keys`.
    fn delete(&self, keys: &[&str]) -> impl Future<Output = BackendResult<()>> + Send;
    /// Whether concurrent reads of one key should share one backend read. True for remote
    /// backends, where a read costs a round trip; false for memory, where it costs less than
    /// the coordination.
    fn coalesce_reads(&self) -> bool;
    /// Whether the backend keeps decoded values ([`Stored::typed`]).
    fn keeps_typed(&self) -> bool;
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
}

impl Backend for AnyBackend {
    async fn get(&self, key: &str) -> BackendResult<Option<Stored>> {
        match self {
            AnyBackend::Memory(b) => b.get(key).await,
            AnyBackend::Redis(b) => b.get(key).await,
        }
    }

    async fn set(&self, key: &str, value: Stored, ttl: Duration) -> BackendResult<()> {
        match self {
            AnyBackend::Memory(b) => b.set(key, value, ttl).await,
            AnyBackend::Redis(b) => b.set(key, value, ttl).await,
        }
    }

    async fn delete(&self, keys: &[&str]) -> BackendResult<()> {
        match self {
            AnyBackend::Memory(b) => b.delete(keys).await,
            AnyBackend::Redis(b) => b.delete(keys).await,
        }
    }

    fn coalesce_reads(&self) -> bool {
        match self {
            AnyBackend::Memory(b) => b.coalesce_reads(),
            AnyBackend::Redis(b) => b.coalesce_reads(),
        }
    }

    fn keeps_typed(&self) -> bool {
        match self {
            AnyBackend::Memory(b) => b.keeps_typed(),
            AnyBackend::Redis(b) => b.keeps_typed(),
        }
    }
}
