//! The Redis backend: one multiplexed connection (`ConnectionManager`), per-operation
//! timeouts and a circuit breaker.
//!
//! The connection is made lazily, on the first operation, so building a cache never fails or
//! waits because Redis is down. While Redis is unreachable every operation fails fast (the
//! breaker) and the engine runs the function instead; a probe every `breaker_cooldown`
//! notices when Redis is back.

use std::future::Future;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ErrorKind as RedisKind, RedisError};

use super::{Backend, BackendError, BackendResult, Stored};
use crate::breaker::{Breaker, FailureKind, FailureLog};

/// Connection and failure-handling settings.
#[derive(Debug, Clone)]
pub(crate) struct RedisOptions {
    pub(crate) operation_timeout: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) breaker_threshold: u32,
    pub(crate) breaker_cooldown: Duration,
}

impl Default for RedisOptions {
    fn default() -> Self {
        RedisOptions {
            operation_timeout: Duration::from_millis(250),
            connect_timeout: Duration::from_secs(1),
            breaker_threshold: 3,
            breaker_cooldown: Duration::from_secs(1),
        }
    }
}

pub(crate) struct RedisBackend {
    client: redis::Client,
    conn: OnceLock<ConnectionManager>,
    init: Mutex<()>,
    breaker: Breaker,
    options: RedisOptions,
    log: Arc<FailureLog>,
}

/// Whether a Redis error means "the server answered, but not with what we wanted" (the key
/// holds another type, a script error, ...) rather than "we could not talk to the server".
fn is_reply_error(e: &RedisError) -> bool {
    matches!(
        e.kind(),
        RedisKind::Server(_) | RedisKind::Extension | RedisKind::UnexpectedReturnType
    )
}

/// Clears a half-open breaker's probe if the operation is dropped before it finished.
struct ProbeGuard<'a> {
    breaker: &'a Breaker,
    armed: bool,
}

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.breaker.abandon_probe();
        }
    }
}

impl RedisBackend {
    /// Parses `url`; fails only on an invalid URL.
    pub(crate) fn new(
        url: &str,
        options: RedisOptions,
        log: Arc<FailureLog>,
    ) -> Result<Self, RedisError> {
        let client = redis::Client::open(url)?;
        Ok(RedisBackend {
            client,
            conn: OnceLock::new(),
            init: Mutex::new(()),
            breaker: Breaker::new(options.breaker_threshold, options.breaker_cooldown),
            options,
            log,
        })
    }

    /// The shared connection, created (not connected) on first use. Must be called inside a
    /// Tokio runtime.
    fn connection(&self) -> Result<ConnectionManager, BackendError> {
        if let Some(c) = self.conn.get() {
            return Ok(c.clone());
        }
        let _guard = self.init.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = self.conn.get() {
            return Ok(c.clone());
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.options.connect_timeout))
            // No response timeout in redis-rs: `run` bounds the whole operation (including a
            // wait for a reconnection) with one timer, instead of two timers per command.
            .set_response_timeout(None)
            // One attempt per reconnection; the breaker paces the attempts.
            .set_number_of_retries(0);
        let manager = ConnectionManager::new_lazy_with_config(self.client.clone(), config)
            .map_err(|e| BackendError::Unavailable(e.to_string()))?;
        let _ = self.conn.set(manager.clone());
        Ok(manager)
    }

    /// Runs one operation through the breaker and the timeout, classifying its failure.
    async fn run<T, F, Fut>(&self, op: &'static str, f: F) -> BackendResult<T>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let probe = match self.breaker.acquire() {
            Some(probe) => probe,
            None => {
                return Err(BackendError::Unavailable(
                    "circuit breaker open after repeated failures".to_owned(),
                ));
            }
        };
        let mut guard = ProbeGuard {
            breaker: &self.breaker,
            armed: probe,
        };
        let conn = self.connection()?;
        let result = tokio::time::timeout(self.options.operation_timeout, f(conn)).await;
        guard.armed = false;
        match result {
            Ok(Ok(v)) => {
                if self.breaker.success() {
                    tracing::info!(target: "cache_runtime", "redis is reachable again; caching resumed");
                }
                Ok(v)
            }
            Ok(Err(e)) if is_reply_error(&e) => {
                self.breaker.success();
                Err(BackendError::Data(e.to_string()))
            }
            Ok(Err(e)) => {
                let err = if e.is_timeout() {
                    BackendError::Timeout
                } else {
                    BackendError::Unavailable(e.to_string())
                };
                self.connectivity_failure(op, &err);
                Err(err)
            }
            Err(_elapsed) => {
                let err = BackendError::Timeout;
                self.connectivity_failure(op, &err);
                Err(err)
            }
        }
    }

    fn connectivity_failure(&self, op: &'static str, err: &BackendError) {
        let opened = self.breaker.failure();
        let kind = match err {
            BackendError::Timeout => FailureKind::Timeout,
            _ => FailureKind::Unavailable,
        };
        if opened {
            tracing::warn!(
                target: "cache_runtime",
                "redis {op} failed ({err}); circuit breaker open, calls bypass the cache and retry redis every {:?}",
                self.options.breaker_cooldown
            );
        } else {
            self.log.warn(
                kind,
                &format_args!("redis {op} failed ({err}); the call runs uncached"),
            );
        }
    }
}

impl Backend for RedisBackend {
    async fn get(&self, key: &str) -> BackendResult<Option<Stored>> {
        self.run("GET", |mut conn| async move {
            let v: Option<Vec<u8>> = redis::cmd("GET").arg(key).query_async(&mut conn).await?;
            Ok(v.map(|v| Stored::bytes(Bytes::from(v))))
        })
        .await
    }

    async fn set(&self, key: &str, value: Stored, ttl: Duration) -> BackendResult<()> {
        let value = value.bytes;
        let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        self.run("SET", |mut conn| async move {
            redis::cmd("SET")
                .arg(key)
                .arg(&value[..])
                .arg("PX")
                .arg(ms)
                .exec_async(&mut conn)
                .await
        })
        .await
    }

    async fn delete(&self, keys: &[&str]) -> BackendResult<()> {
        if keys.is_empty() {
            return Ok(());
        }
        self.run("DEL", |mut conn| async move {
            redis::cmd("DEL").arg(keys).exec_async(&mut conn).await
        })
        .await
    }

    fn coalesce_reads(&self) -> bool {
        true
    }

    fn keeps_typed(&self) -> bool {
        false
    }
}
