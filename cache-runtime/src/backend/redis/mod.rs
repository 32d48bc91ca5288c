//! The Redis backend: a multiplexed connection per Tokio runtime (`conn`), per-operation
//! timeouts and a circuit breaker, Lua scripts for the atomic steps (`scripts`), and a
//! pub/sub subscription (`bus`) that wakes lease waiters (`lease`).
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

mod bus;
mod conn;
mod lease;
mod scripts;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use redis::ErrorKind as RedisKind;

use self::bus::Bus;
use self::conn::Connections;
use self::scripts::{FILL, INVALIDATE, RELEASE, WRITE};
use super::{Backend, BackendResult, GENERATION_TTL, Gen, LeaseReply, OnWait, Read, Stored, Token};
use crate::breaker::FailureLog;
use crate::key::aux_key;

/// The channel fills are published on (shared by every cache on the server; a waiter
/// filters by key).
const CHANNEL: &str = "__cr:fills";

const GEN_PREFIX: &str = "__cr:gen:";
const LEASE_PREFIX: &str = "__cr:lease:";
const WAIT_PREFIX: &str = "__cr:wait:";

/// A generation token: 128 random bits, never repeated.
fn new_generation() -> String {
    crate::store::new_token()
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
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
    conns: Connections,
    bus: Bus,
}

impl RedisBackend {
    /// Parses `url`; fails only on an invalid URL.
    pub(crate) fn new(
        url: &str,
        options: RedisOptions,
        log: Arc<FailureLog>,
    ) -> Result<Self, redis::RedisError> {
        let client = redis::Client::open(url)?;
        Ok(RedisBackend {
            bus: Bus::new(
                client.clone(),
                CHANNEL,
                options.connect_timeout,
                log.clone(),
            ),
            conns: Connections::new(client, options, log),
        })
    }

    fn keys(&self, key: &str) -> Keys {
        Keys {
            generation: aux_key(GEN_PREFIX, key),
            lease: aux_key(LEASE_PREFIX, key),
            waiters: aux_key(WAIT_PREFIX, key),
        }
    }

    /// A plain `GET`: what a hit costs.
    async fn get(&self, key: &str) -> BackendResult<Option<Stored>> {
        let value = self
            .conns
            .run("GET", |mut conn| async move {
                let v: Option<Vec<u8>> = redis::cmd("GET").arg(key).query_async(&mut conn).await?;
                Ok(v)
            })
            .await?;
        Ok(value.map(|v| Stored::bytes(Bytes::from(v))))
    }
}

impl Backend for RedisBackend {
    async fn read(&self, key: &str) -> BackendResult<Option<Stored>> {
        self.get(key).await
    }

    async fn read_for_fill(&self, key: &str) -> BackendResult<Read> {
        // A plain GET: a hit costs what a hand-written cache-aside read costs. Only a miss
        // reads the generation too (before the load starts, which is what the fill needs).
        match self.get(key).await? {
            Some(stored) => Ok(Read::Hit(stored)),
            None => Ok(Read::Miss(self.generation(key).await?)),
        }
    }

    async fn generation(&self, key: &str) -> BackendResult<Gen> {
        let gen_key = aux_key(GEN_PREFIX, key);
        self.conns
            .run("GET", |mut conn| async move {
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
        self.conns
            .run("fill", |mut conn| async move {
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

    async fn lease(
        &self,
        key: &str,
        token: &Token,
        lease: Duration,
        on_wait: &OnWait<'_>,
    ) -> BackendResult<LeaseReply> {
        self.lease_or_wait(key, token, lease, on_wait).await
    }

    async fn release(&self, key: &str, token: &str) -> BackendResult<()> {
        let k = self.keys(key);
        self.conns
            .run("release", |mut conn| async move {
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
        self.conns
            .run("write", |mut conn| async move {
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
        self.conns
            .run("invalidate", |mut conn| async move {
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

    fn shared(&self) -> bool {
        true
    }

    fn keeps_typed(&self) -> bool {
        false
    }
}
