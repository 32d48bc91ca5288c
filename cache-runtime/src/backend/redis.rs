//! The Redis backend: one multiplexed connection (`ConnectionManager`), per-operation
//! timeouts, a circuit breaker, Lua scripts for the atomic steps, and a pub/sub subscription
//! that wakes lease waiters.
//!
//! Keys of one value key `K` (`K` includes the cache's namespace; all in `K`'s Redis Cluster
//! hash slot, so one script may touch them all):
//!
//! ```text
//! K                  the envelope
//! __cr:gen:{K}       K's generation: a random token replaced by every write and invalidation
//! __cr:lease:{K}     the lease token of the caller loading K (lock)
//! __cr:wait:{K}      set while callers wait for K's fill: only then does a fill publish
//! ```
//!
//! (`{K}` is written `K` when `K` already carries a hash tag, and `{T}K`, with `T` a short tag
//! of `K`'s slot, when `K` has no hash tag but contains a `}`; see `key::aux_key`.) They are
//! derived from `K` alone, so caches that split the same key differently between namespace and
//! key agree on them.
//! Fills are published on the channel `__cr:fills`. Every key has a TTL.
//!
//! The connection is made lazily, on the first operation, so building a cache never fails or
//! waits because Redis is down. While Redis is unreachable every operation fails fast (the
//! breaker) and the engine runs the function instead; a probe every `breaker_cooldown`
//! notices when Redis is back.

use std::future::Future;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use std::sync::LazyLock;

use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ErrorKind as RedisKind, RedisError, Script, Value};

use super::bus::Bus;
use super::{Backend, BackendError, BackendResult, GENERATION_TTL, Gen, LeaseReply, Read, Stored};
use crate::breaker::{Breaker, FailureKind, FailureLog};
use crate::key::aux_key;

/// KEYS: value, generation, lease, waiters. ARGV: token, lease ms.
/// Returns {1, value} (hit), {2, generation} (lease acquired), {3, generation, lease pttl} (busy).
static LEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local v = redis.call('GET', KEYS[1])
if v then return {1, v} end
local g = redis.call('GET', KEYS[2]) or ''
if redis.call('SET', KEYS[3], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {2, g}
end
redis.call('SET', KEYS[4], '1', 'PX', ARGV[2])
return {3, g, redis.call('PTTL', KEYS[3])}
",
    )
});

/// KEYS: value, generation, lease, waiters. ARGV: generation seen, envelope, ttl ms, token ('' if none),
/// channel. Stores only if the generation is unchanged; releases the lease if it is the
/// caller's; wakes waiters. Returns 1 if stored.
static FILL: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local stored = 0
if (redis.call('GET', KEYS[2]) or '') == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  stored = 1
end
if ARGV[4] ~= '' and redis.call('GET', KEYS[3]) == ARGV[4] then
  redis.call('DEL', KEYS[3])
end
if redis.call('DEL', KEYS[4]) == 1 then
  redis.call('PUBLISH', ARGV[5], KEYS[1])
end
return stored
",
    )
});

/// KEYS: lease, waiters. ARGV: token, channel, value key.
static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
end
if redis.call('DEL', KEYS[2]) == 1 then
  redis.call('PUBLISH', ARGV[2], ARGV[3])
end
return 1
",
    )
});

/// KEYS: value, generation, waiters. ARGV: envelope, ttl ms, new generation, generation ttl
/// ms, channel. Generations are random tokens, never counters: a counter whose key expired
/// would restart and could repeat the value a slow loader read.
static WRITE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[4])
if redis.call('DEL', KEYS[3]) == 1 then
  redis.call('PUBLISH', ARGV[5], KEYS[1])
end
return 1
",
    )
});

/// KEYS: value, generation, lease, waiters. ARGV: new generation, generation ttl ms, channel.
static INVALIDATE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
redis.call('DEL', KEYS[1], KEYS[3])
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
if redis.call('DEL', KEYS[4]) == 1 then
  redis.call('PUBLISH', ARGV[3], KEYS[1])
end
return 1
",
    )
});

/// The channel fills are published on (shared by every cache on the server; a waiter
/// filters by key).
const CHANNEL: &str = "__cr:fills";

/// A generation token: 128 random bits, never repeated.
fn new_generation() -> String {
    crate::engine::new_token()
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

fn bytes_of(v: Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.into_bytes()),
        Value::Int(i) => Some(i.to_string().into_bytes()),
        _ => None,
    }
}

fn unexpected(what: &str) -> RedisError {
    RedisError::from((
        RedisKind::UnexpectedReturnType,
        "unexpected reply",
        what.to_owned(),
    ))
}

/// The keys one script touches for `key`.
struct Keys {
    generation: String,
    lease: String,
    waiters: String,
}

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
    bus: Bus,
}

const GEN_PREFIX: &str = "__cr:gen:";
const LEASE_PREFIX: &str = "__cr:lease:";
const WAIT_PREFIX: &str = "__cr:wait:";

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
            bus: Bus::new(
                client.clone(),
                CHANNEL,
                options.connect_timeout,
                log.clone(),
            ),
            client,
            conn: OnceLock::new(),
            init: Mutex::new(()),
            breaker: Breaker::new(options.breaker_threshold, options.breaker_cooldown),
            options,
            log,
        })
    }

    fn keys(&self, key: &str) -> Keys {
        Keys {
            generation: aux_key(GEN_PREFIX, key),
            lease: aux_key(LEASE_PREFIX, key),
            waiters: aux_key(WAIT_PREFIX, key),
        }
    }

    /// The subscription that wakes lease waiters.
    pub(crate) fn bus(&self) -> &Bus {
        &self.bus
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
    async fn read(&self, key: &str) -> BackendResult<Read> {
        // A plain GET: a hit costs what a hand-written cache-aside read costs. Only a miss
        // reads the generation too (before the load starts, which is what the fill needs).
        let value = self
            .run("GET", |mut conn| async move {
                let v: Option<Vec<u8>> = redis::cmd("GET").arg(key).query_async(&mut conn).await?;
                Ok(v)
            })
            .await?;
        match value {
            Some(v) => Ok(Read {
                value: Some(Stored::bytes(Bytes::from(v))),
                generation: Gen::default(),
            }),
            None => Ok(Read {
                value: None,
                generation: self.generation(key).await?,
            }),
        }
    }

    async fn generation(&self, key: &str) -> BackendResult<Gen> {
        let gen_key = aux_key(GEN_PREFIX, key);
        self.run("GET", |mut conn| async move {
            let generation: Option<Vec<u8>> = redis::cmd("GET")
                .arg(&gen_key)
                .query_async(&mut conn)
                .await?;
            Ok(Gen(generation.map(Bytes::from).unwrap_or_default()))
        })
        .await
    }

    async fn fill(
        &self,
        key: &str,
        value: Stored,
        ttl: Duration,
        generation: &Gen,
        token: Option<&str>,
    ) -> BackendResult<bool> {
        let k = self.keys(key);
        self.run("fill", |mut conn| async move {
            let stored: i64 = FILL
                .key(key)
                .key(&k.generation)
                .key(&k.lease)
                .key(&k.waiters)
                .arg(&generation.0[..])
                .arg(&value.bytes[..])
                .arg(millis(ttl))
                .arg(token.unwrap_or(""))
                .arg(CHANNEL)
                .invoke_async(&mut conn)
                .await?;
            Ok(stored == 1)
        })
        .await
    }

    async fn lease(&self, key: &str, token: &str, lease: Duration) -> BackendResult<LeaseReply> {
        let k = self.keys(key);
        self.run("lease", |mut conn| async move {
            let reply: Value = LEASE
                .key(key)
                .key(&k.generation)
                .key(&k.lease)
                .key(&k.waiters)
                .arg(token)
                .arg(millis(lease))
                .invoke_async(&mut conn)
                .await?;
            let Value::Array(mut items) = reply else {
                return Err(unexpected("lease script"));
            };
            items.reverse();
            let kind = match items.pop() {
                Some(Value::Int(k)) => k,
                _ => return Err(unexpected("lease script kind")),
            };
            let second = items.pop().and_then(bytes_of).unwrap_or_default();
            match kind {
                1 => Ok(LeaseReply::Hit(Stored::bytes(Bytes::from(second)))),
                2 => Ok(LeaseReply::Acquired(Gen(Bytes::from(second)))),
                3 => {
                    let pttl = match items.pop() {
                        Some(Value::Int(ms)) if ms > 0 => ms as u64,
                        _ => 0,
                    };
                    Ok(LeaseReply::Busy {
                        generation: Gen(Bytes::from(second)),
                        remaining: Duration::from_millis(pttl),
                    })
                }
                _ => Err(unexpected("lease script kind")),
            }
        })
        .await
    }

    async fn release(&self, key: &str, token: &str) -> BackendResult<()> {
        let k = self.keys(key);
        self.run("release", |mut conn| async move {
            let _: i64 = RELEASE
                .key(&k.lease)
                .key(&k.waiters)
                .arg(token)
                .arg(CHANNEL)
                .arg(key)
                .invoke_async(&mut conn)
                .await?;
            Ok(())
        })
        .await
    }

    async fn write(&self, key: &str, value: Stored, ttl: Duration) -> BackendResult<()> {
        let k = self.keys(key);
        self.run("write", |mut conn| async move {
            let _: i64 = WRITE
                .key(key)
                .key(&k.generation)
                .key(&k.waiters)
                .arg(&value.bytes[..])
                .arg(millis(ttl))
                .arg(new_generation())
                .arg(millis(GENERATION_TTL))
                .arg(CHANNEL)
                .invoke_async(&mut conn)
                .await?;
            Ok(())
        })
        .await
    }

    async fn invalidate(&self, keys: &[&str]) -> BackendResult<()> {
        if keys.is_empty() {
            return Ok(());
        }
        let all: Vec<(&str, Keys)> = keys.iter().map(|k| (*k, self.keys(k))).collect();
        self.run("invalidate", |mut conn| async move {
            // One script per key (each touches one hash slot), pipelined: one round trip.
            let mut pipe = redis::pipe();
            for (key, k) in &all {
                pipe.cmd("EVALSHA")
                    .arg(INVALIDATE.get_hash())
                    .arg(4)
                    .arg(*key)
                    .arg(&k.generation)
                    .arg(&k.lease)
                    .arg(&k.waiters)
                    .arg(new_generation())
                    .arg(millis(GENERATION_TTL))
                    .arg(CHANNEL)
                    .ignore();
            }
            match pipe.exec_async(&mut conn).await {
                Err(e) if e.kind() == RedisKind::Server(redis::ServerErrorKind::NoScript) => {
                    INVALIDATE.prepare_invoke().load_async(&mut conn).await?;
                    pipe.exec_async(&mut conn).await
                }
                other => other,
            }
        })
        .await
    }

    fn coalesce_reads(&self) -> bool {
        true
    }

    fn keeps_typed(&self) -> bool {
        false
    }

    fn shares_leases(&self) -> bool {
        true
    }
}
