//! The command connection: one multiplexed `ConnectionManager` per Tokio runtime that uses
//! the cache, behind a circuit breaker and one timer per operation.
//!
//! A `ConnectionManager` belongs to the runtime it was created in: its driver task runs
//! there, and dies with it. A `Cache` in a `static`, or the default cache under several
//! `#[tokio::test]`s, is used from several runtimes, one after the other or at once. So each
//! runtime gets its own connection, made lazily on its first operation; a connection whose
//! runtime has shut down is dropped. The common case, one runtime, costs one atomic load and
//! a comparison per operation.

use std::future::Future;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ErrorKind as RedisKind, RedisError};
use tokio::runtime::{Handle, Id};
use tokio::task::JoinHandle;

use super::{RedisOptions, tls};
use crate::backend::{BackendError, BackendResult};
use crate::breaker::{Breaker, FailureKind, FailureLog};

/// The connection of one runtime.
struct Slot {
    runtime: Id,
    manager: ConnectionManager,
    /// A task that never ends on its own: finished means the runtime has shut down.
    alive: JoinHandle<()>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.alive.abort();
    }
}

pub(super) struct Connections {
    client: redis::Client,
    options: RedisOptions,
    /// The slot used last: checked first.
    current: ArcSwapOption<Slot>,
    /// Every live slot.
    slots: Mutex<Vec<Arc<Slot>>>,
    /// Shared with the bus: no heartbeat counts while it is open.
    breaker: Arc<Breaker>,
    /// Called when the breaker opens (see [`Connections::on_breaker_open`]).
    on_open: OnceLock<Box<dyn Fn() + Send + Sync>>,
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

impl Connections {
    pub(super) fn new(client: redis::Client, options: RedisOptions, log: Arc<FailureLog>) -> Self {
        Connections {
            breaker: Arc::new(Breaker::new(
                options.breaker_threshold,
                options.breaker_cooldown,
            )),
            on_open: OnceLock::new(),
            client,
            options,
            current: ArcSwapOption::empty(),
            slots: Mutex::new(Vec::new()),
            log,
        }
    }

    /// The circuit breaker every operation goes through.
    pub(super) fn breaker(&self) -> &Arc<Breaker> {
        &self.breaker
    }

    /// Calls `hook` whenever the breaker opens (Redis is unreachable: the invalidation stream
    /// can no longer be trusted). Set once; later calls are ignored. It runs on the failing
    /// operation's task and must not block.
    pub(super) fn on_breaker_open(&self, hook: Box<dyn Fn() + Send + Sync>) {
        let _ = self.on_open.set(hook);
    }

    /// The connection of the current runtime, created (not connected) on first use.
    fn connection(&self) -> BackendResult<ConnectionManager> {
        let handle = Handle::try_current().map_err(|_| {
            BackendError::Unavailable("not called inside a Tokio runtime".to_owned())
        })?;
        let runtime = handle.id();
        if let Some(slot) = &*self.current.load() {
            if slot.runtime == runtime {
                return Ok(slot.manager.clone());
            }
        }
        self.connection_slow(&handle, runtime)
    }

    #[cold]
    fn connection_slow(&self, handle: &Handle, runtime: Id) -> BackendResult<ConnectionManager> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        // Connections of runtimes that have shut down are dead: drop them.
        slots.retain(|s| !s.alive.is_finished());
        if let Some(slot) = slots.iter().find(|s| s.runtime == runtime) {
            self.current.store(Some(slot.clone()));
            return Ok(slot.manager.clone());
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
        let slot = Arc::new(Slot {
            runtime,
            manager: manager.clone(),
            alive: handle.spawn(std::future::pending()),
        });
        slots.push(slot.clone());
        self.current.store(Some(slot));
        Ok(manager)
    }

    /// Sends one command through the breaker and the timeout (see [`Connections::run`]). Its
    /// future is smaller than `run`'s: a lookup's state holds it.
    pub(super) async fn query<T: redis::FromRedisValue>(
        &self,
        op: &'static str,
        cmd: &redis::Cmd,
    ) -> BackendResult<T> {
        let (probe, mut conn) = self.begin()?;
        let mut guard = ProbeGuard {
            breaker: &self.breaker,
            armed: probe,
        };
        let result = tokio::time::timeout(self.options.operation_timeout, async {
            use redis::aio::ConnectionLike as _;
            let value = conn.req_packed_command(cmd).await?.extract_error()?;
            Ok(redis::from_redis_value(value)?)
        })
        .await;
        guard.armed = false;
        self.end(op, result)
    }

    /// Runs one operation through the breaker and the timeout, classifying its failure.
    pub(super) async fn run<T, F, Fut>(&self, op: &'static str, f: F) -> BackendResult<T>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let (probe, conn) = self.begin()?;
        let mut guard = ProbeGuard {
            breaker: &self.breaker,
            armed: probe,
        };
        let result = tokio::time::timeout(self.options.operation_timeout, f(conn)).await;
        guard.armed = false;
        self.end(op, result)
    }

    /// An operation starts: whether it is the half-open breaker's probe, and the connection.
    fn begin(&self) -> BackendResult<(bool, ConnectionManager)> {
        let Some(probe) = self.breaker.acquire() else {
            return Err(BackendError::Unavailable(
                "circuit breaker open after repeated failures".to_owned(),
            ));
        };
        match self.connection() {
            Ok(conn) => Ok((probe, conn)),
            Err(e) => {
                if probe {
                    self.breaker.abandon_probe();
                }
                Err(e)
            }
        }
    }

    /// An operation ended: its result, its failure classified (and counted by the breaker).
    fn end<T>(
        &self,
        op: &'static str,
        result: Result<redis::RedisResult<T>, tokio::time::error::Elapsed>,
    ) -> BackendResult<T> {
        match result {
            Ok(Ok(v)) => {
                if self.breaker.success() {
                    tracing::info!(target: "cache_runtime", "redis is reachable again; caching resumed");
                }
                Ok(v)
            }
            // Refused credentials (`NOAUTH` is a reply) count as unavailability; see `tls`.
            Ok(Err(e)) if is_reply_error(&e) && !tls::is_refusal(&e) => {
                self.breaker.success();
                Err(BackendError::Data(e.to_string()))
            }
            Ok(Err(e)) => {
                if tls::breaks_the_manager(&e) {
                    self.drop_connection();
                }
                let err = if e.is_timeout() {
                    BackendError::Timeout
                } else {
                    BackendError::Unavailable(tls::describe(&e, &self.client))
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

    /// Forgets the current runtime's connection: the next operation (the breaker's probe)
    /// makes a new one. For a `ConnectionManager` that will not reconnect by itself (see
    /// `tls::breaks_the_manager`).
    #[cold]
    fn drop_connection(&self) {
        let Ok(handle) = Handle::try_current() else {
            return;
        };
        let runtime = handle.id();
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.retain(|s| s.runtime != runtime);
        if self
            .current
            .load()
            .as_ref()
            .is_some_and(|s| s.runtime == runtime)
        {
            self.current.store(None);
        }
    }

    fn connectivity_failure(&self, op: &'static str, err: &BackendError) {
        let opened = self.breaker.failure();
        let kind = match err {
            BackendError::Timeout => FailureKind::Timeout,
            _ => FailureKind::Unavailable,
        };
        if opened {
            if let Some(hook) = self.on_open.get() {
                hook();
            }
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

    /// The client (for connections of their own: the write-behind worker's blocking reads).
    pub(super) fn client(&self) -> &redis::Client {
        &self.client
    }

    /// How long one operation may take.
    pub(super) fn operation_timeout(&self) -> Duration {
        self.options.operation_timeout
    }
}
