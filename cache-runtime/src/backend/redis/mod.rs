//! The Redis backend: a multiplexed connection per Tokio runtime (`conn`), per-operation
//! timeouts and a circuit breaker, Lua scripts for the atomic steps (`scripts`), and a
//! pub/sub subscription (`bus`) that wakes lease waiters (`lease`) and delivers other
//! processes' invalidations to the in-process tier (`inv`, [`RedisBackend::watch`]).
//!
//! Keys of one value key `K` (`K` includes the cache's namespace):
//!
//! ```text
//! K                  the envelope, or a pending load's marker ("\0crp:<token>")
//! __cr:wait:{K}      set while callers wait for K's fill: only then does a fill publish
//! __cr:stale:{K}     `stale`: K's value past its TTL, kept while it is reloaded (`REPLACE`),
//!                    for what is left of its life; deleted by writes and invalidations
//! __cr:refresh:{K}   `refresh`: the token of the one process refreshing K ahead of its
//!                    expiry (`REFRESH_LEASE`, `SET .. NX PX <lease>`); its fill
//!                    (`REFRESH_FILL`) stores only while it holds it and K still holds the
//!                    entry it started from. Deleted by writes and invalidations, which so
//!                    void a running refresh
//! __cr:tag:{T}       the current version of the tag T (see `tags`)
//! __cr:stale:{K}     `stale`: a copy of K's last filled value, written by the fill with a
//!                    TTL of K's plus the stale time, served if a load fails; dropped by
//!                    writes and invalidations of K
//! ```
//!
//! Channels:
//!
//! ```text
//! __cr:fills             K, when a fill, a released lease or a write finds K's waiters flag
//!                        (shared by every cache on the server; a waiter filters by key)
//! __cr:inv:<namespace>   a frame (see `inv`) naming the keys a write or an invalidation
//!                        changed (`WRITE`: its key; `invalidate`: one frame for all) or
//!                        the tags a tag invalidation moved; published always, in the same
//!                        script or pipeline as the change and after it. Fills, markers,
//!                        leases, `REPLACE`, `TAKEOVER`, `PEXPIRE .. GT`, refresh leases and
//!                        refresh fills publish nothing
//! ```
//!
//! **The stale-fill guard lives in `K` itself.** A lookup is `SET K <marker> NX PX .. GET`:
//! one command that returns the value (a hit, costing what a `GET` costs), or sets the
//! caller's marker (a miss), or returns another loader's marker. The fill stores only if `K`
//! still holds the marker the lookup saw; a write replaces it, an invalidation deletes it, and
//! a later lookup that found `K` empty sets its own. So a load that started before a write or
//! invalidation never stores its result, and a miss is two round trips (lookup, fill), like
//! a hand-written cache-aside. The guard is positive: a marker lost to eviction or expiry
//! rejects the fill (a miss), it never lets a stale one through. With `lock`, the marker is
//! also the lease: waiters see it, and the holder's fill releases it. A function that mostly
//! hits reads with a plain `GET` before it joins the key's flight (`Fetch::probes`), and sends
//! the `SET .. NX GET` only when that finds nothing: such a miss is three round trips, such a
//! hit exactly a `GET`.
//!
//! (`{K}` is written `K` when `K` already carries a hash tag, and `{T}K`, with `T` a short tag
//! of `K`'s slot, when `K` has no hash tag but contains a `}`; see `key::aux_key`.) Each
//! script touches `K` and its `{K}` keys only, one hash slot (its `PUBLISH`es name channels,
//! not keys). Every key has a TTL.
//!
//! The connection is made lazily, on the first operation, so building a cache never fails or
//! waits because Redis is down. While Redis is unreachable every operation fails fast (the
//! breaker) and the engine runs the function instead; a probe every `breaker_cooldown`
//! notices when Redis is back.

mod bus;
mod conn;
mod echo;
pub(crate) mod fleet;
mod inv;
mod lease;
mod scripts;
pub(crate) mod sentinel;
#[cfg(test)]
mod tests;
mod tls;
pub(crate) mod wb;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use self::bus::Bus;
use self::conn::{ClusterTarget, Connections, SlotPipe, Target};
use self::scripts::{FILL, REFRESH_FILL, REFRESH_LEASE, RELEASE, REPLACE, WRITE, evalsha, run};
use self::tls::TlsConfig;
use super::{Backend, BackendResult, Gen, LeaseReply, OnWait, PENDING_TTL, Read, Stored, Token};
use crate::breaker::FailureLog;
use crate::envelope::Header;
use crate::key::{KeyBuf, aux_key, key_slot};

/// The channel fills are published on (shared by every cache on the server; a waiter
/// filters by key).
const CHANNEL: &str = "__cr:fills";

const WAIT_PREFIX: &str = "__cr:wait:";
const STALE_PREFIX: &str = "__cr:stale:";
const REFRESH_PREFIX: &str = "__cr:refresh:";
const TAG_PREFIX: &str = "__cr:tag:";

/// How every pending load's marker starts (an envelope starts with its format byte, 1 or 2).
const MARKER: &str = "\0crp:";

/// Whether a value read from a value key is a pending load's marker.
fn is_marker(bytes: &[u8]) -> bool {
    bytes.starts_with(MARKER.as_bytes())
}

/// Whether Redis refused a command because it refuses writes (over `maxmemory` with
/// `noeviction`, a read-only replica or ACL user). Behind Sentinel, `READONLY` and
/// `MASTERDOWN` mean the master moved instead: not a refusal, an error (`conn` re-resolves).
fn refuses_writes(conns: &Connections, e: &redis::RedisError) -> bool {
    matches!(e.code(), Some("OOM" | "READONLY" | "NOPERM")) && !conns.target().wrong_master(e)
}

/// Adds `SET key value NX PX ttl GET` to `pipe`: the current value, or `value` set.
fn push_set_nx_get(pipe: &mut SlotPipe, key: &str, value: &str, ttl: Duration) {
    let mut set = redis::cmd("SET");
    set.arg(key)
        .arg(value)
        .arg("NX")
        .arg("PX")
        .arg(millis(ttl))
        .arg("GET");
    pipe.push(key_slot(key), set);
}

/// `GET key`.
fn get_cmd(key: &str) -> redis::Cmd {
    let mut get = redis::cmd("GET");
    get.arg(key);
    get
}

/// `PUBLISH channel payload`.
fn publish(channel: &str, payload: &[u8]) -> redis::Cmd {
    let mut publish = redis::cmd("PUBLISH");
    publish.arg(channel).arg(payload);
    publish
}

/// The tags' versions from their `SET .. NX GET` replies: the one found, or the one sent.
fn versions_of(found: impl Iterator<Item = Option<Vec<u8>>>, sent: Vec<String>) -> Vec<Bytes> {
    found
        .zip(sent)
        .map(|(found, sent)| match found {
            Some(v) => Bytes::from(v),
            None => Bytes::from(sent.into_bytes()),
        })
        .collect()
}

/// What a lookup of a value key found.
fn classify(value: Option<Vec<u8>>, marker: &str) -> Read {
    match value {
        None => Read::Miss(Gen(Bytes::copy_from_slice(marker.as_bytes()))),
        Some(v) if is_marker(&v) => Read::Miss(Gen(Bytes::from(v))),
        Some(v) => Read::Hit(Stored::bytes(Bytes::from(v))),
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// Connection and failure-handling settings.
#[derive(Debug, Clone)]
pub(crate) struct RedisOptions {
    pub(crate) operation_timeout: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) breaker_threshold: u32,
    pub(crate) breaker_cooldown: Duration,
    /// Certificates for `rediss://` (see `tls`).
    pub(crate) tls: TlsConfig,
}

impl Default for RedisOptions {
    fn default() -> Self {
        RedisOptions {
            operation_timeout: Duration::from_millis(250),
            connect_timeout: Duration::from_secs(1),
            breaker_threshold: 3,
            breaker_cooldown: Duration::from_secs(1),
            tls: TlsConfig::default(),
        }
    }
}

pub(crate) struct RedisBackend {
    conns: Connections,
    bus: Bus,
    /// This backend's identity in invalidation frames (see `inv`).
    origin: inv::Origin,
    /// `__cr:inv:<namespace>`.
    inv_channel: String,
    /// How this backend's markers start: `\0crp:<random>:`, then a counter.
    marker_prefix: String,
    /// Until when (ms since `started`) lookups skip the `SET` and read with a plain `GET`: the
    /// server refused a write (see `set_nx_get`), and asking again on every hit would cost a
    /// failed command each time. 0: writes are accepted.
    refusing_until: std::sync::atomic::AtomicU64,
    started: std::time::Instant,
}

/// How long a refused write makes lookups read-only before they try `SET` again.
const REFUSAL_BACKOFF: Duration = Duration::from_secs(1);

impl RedisBackend {
    /// Parses `url`; fails only on an invalid URL (or TLS settings: see `tls::client`). `namespace` is the cache's (checked by
    /// `key::validate_namespace`): its writes are announced on `__cr:inv:<namespace>`.
    pub(crate) fn new(
        url: &str,
        namespace: &str,
        options: RedisOptions,
        log: Arc<FailureLog>,
    ) -> Result<Self, redis::RedisError> {
        let client = tls::client(url, &options.tls)?;
        Ok(Self::with_target(
            Target::Single(client.clone()),
            vec![client],
            namespace,
            options,
            log,
        ))
    }

    /// A Redis Cluster reached through `seeds` (any of its nodes; the others are discovered).
    /// Fails only on an invalid URL, or one naming a database other than 0 (a cluster has
    /// only that one).
    pub(crate) fn cluster(
        seeds: &[String],
        namespace: &str,
        options: RedisOptions,
        log: Arc<FailureLog>,
    ) -> Result<Self, redis::RedisError> {
        let mut clients = Vec::with_capacity(seeds.len());
        for seed in seeds {
            let client = tls::client(seed.as_str(), &options.tls)?;
            if client.get_connection_info().redis_settings().db() != 0 {
                return Err(redis::RedisError::from((
                    redis::ErrorKind::InvalidClientConfig,
                    "a redis cluster has database 0 only",
                )));
            }
            clients.push(client);
        }
        if clients.is_empty() {
            return Err(redis::RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "no redis cluster node given",
            )));
        }
        let cluster = ClusterTarget::new(
            clients
                .iter()
                .map(|c| c.get_connection_info().clone())
                .collect(),
            options.connect_timeout,
            options.tls.clone(),
        )?;
        Ok(Self::with_target(
            Target::Cluster(Box::new(cluster)),
            clients,
            namespace,
            options,
            log,
        ))
    }

    /// Behind Sentinel: the master `config`'s sentinels name, found on first use and followed
    /// through failovers (see `sentinel`).
    pub(crate) fn sentinel(
        config: sentinel::SentinelConfig,
        namespace: &str,
        options: RedisOptions,
        log: Arc<FailureLog>,
    ) -> Self {
        let resolver =
            sentinel::Resolver::new(config, options.breaker_cooldown, options.connect_timeout);
        let target = Target::Sentinel(Arc::new(resolver));
        // The bus asks the sentinels for the master on every connection attempt.
        Self::with_target(target, Vec::new(), namespace, options, log)
    }

    fn with_target(
        target: Target,
        bus_clients: Vec<redis::Client>,
        namespace: &str,
        options: RedisOptions,
        log: Arc<FailureLog>,
    ) -> Self {
        let cluster = matches!(target, Target::Cluster(_));
        let origin = inv::new_origin();
        let inv_channel = inv::channel(namespace);
        let conns = Connections::new(target.clone(), options.clone(), log.clone());
        conns.report_as(namespace);
        // On a cluster a dead master opens its own breaker (whose opening tells the bus that
        // messages may be lost) and stops the echo; the cache-wide breaker, which only
        // operations over several slots use there, must not keep every shard's tier off.
        let bus_breaker = if cluster {
            Arc::new(crate::breaker::Breaker::new(
                options.breaker_threshold,
                options.breaker_cooldown,
            ))
        } else {
            conns.breaker().clone()
        };
        let bus = Bus::new(bus::Config {
            clients: bus_clients,
            cluster,
            target,
            fills: CHANNEL,
            invalidations: inv_channel.clone(),
            origin,
            connect_timeout: options.connect_timeout,
            log,
            breaker: bus_breaker,
        });
        // The in-process tier must not be used while Redis is unreachable.
        conns.on_breaker_open(Box::new(bus.on_lost()));
        RedisBackend {
            bus,
            conns,
            origin,
            inv_channel,
            marker_prefix: format!("{MARKER}{}:", crate::store::new_token()),
            refusing_until: std::sync::atomic::AtomicU64::new(0),
            started: std::time::Instant::now(),
        }
    }

    /// `"redis"`, `"redis-cluster"`, or `"redis-sentinel"` behind Sentinel.
    pub(crate) fn name(&self) -> &'static str {
        match self.conns.target() {
            Target::Single(_) => "redis",
            Target::Sentinel(_) => "redis-sentinel",
            Target::Cluster(_) => "redis-cluster",
        }
    }

    /// A new pending-load marker: never repeated. Cheap (one is made per lookup, in a reused
    /// buffer): the prefix, then a counter in hex.
    fn new_marker(&self) -> KeyBuf {
        use std::sync::atomic::{AtomicU64, Ordering};
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let mut n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let mut digits = [0u8; 16];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b"0123456789abcdef"[(n & 15) as usize];
            n >>= 4;
            if n == 0 {
                break;
            }
        }
        let mut marker = KeyBuf::new();
        marker.push_str(&self.marker_prefix);
        for &d in &digits[i..] {
            marker.push(char::from(d));
        }
        marker
    }

    /// Starts delivering other processes' invalidations to `sink` (see
    /// [`AnyBackend::watch`](super::AnyBackend::watch)): the bus subscribes to this cache's
    /// invalidation channel and sends a heartbeat every `heartbeat` (see `bus`). The first
    /// call's sink and heartbeat are kept; a later call only makes sure the subscriber runs
    /// (it is started in the calling Tokio runtime, and dies with it), which costs two atomic
    /// loads when it does.
    pub(crate) fn watch(&self, sink: &Arc<dyn super::Invalidations>, heartbeat: Duration) {
        self.bus.watch(sink, heartbeat);
    }

    /// The frame announcing that `names` (of `kind`) changed.
    fn frame<S: AsRef<str>>(&self, kind: inv::Kind, names: &[S]) -> Vec<u8> {
        inv::encode(kind, &self.origin, names)
    }

    /// The marker of `token`, made now if it has none yet.
    fn marker<'t>(&self, token: &'t Token) -> &'t str {
        token.get_or(|| self.new_marker())
    }

    fn waiters(&self, key: &str) -> String {
        aux_key(WAIT_PREFIX, key)
    }

    /// `stale`: where a filled value is kept, longer than the key, to be served if a later
    /// load fails.
    fn stale_copy(key: &str) -> String {
        aux_key(STALE_PREFIX, key)
    }

    /// `refresh`: the key of the one process refreshing `key` (see `scripts::REFRESH_LEASE`).
    fn refresh_lease_key(key: &str) -> String {
        aux_key(REFRESH_PREFIX, key)
    }

    /// A plain `GET`: a pending load's marker reads as nothing.
    async fn get(&self, key: &str) -> BackendResult<Option<Stored>> {
        let mut cmd = redis::Cmd::with_capacity(2, key.len() + 3);
        cmd.arg("GET").arg(key);
        let value: Option<Vec<u8>> = self.conns.query_for(key, "GET", cmd).await?;
        Ok(value
            .filter(|v| !is_marker(v))
            .map(|v| Stored::bytes(Bytes::from(v))))
    }

    /// `SET key marker NX PX ttl GET`: the value, or the marker this call set, or another
    /// loader's marker. One command: a hit costs what a `GET` does.
    ///
    /// A marker of this backend that is not `marker` is dead: the engine lets one call per key
    /// lead at a time in a cache, so its holder failed, was cancelled or was given up on, and
    /// its removal (in the background) has not happened yet. It is replaced with `marker`
    /// rather than filled against, which its removal would reject.
    async fn lookup(&self, key: &str, marker: &str, ttl: Duration) -> BackendResult<Read> {
        let read = self.set_nx_get(key, marker, ttl).await?;
        self.settle(key, read, marker, ttl).await
    }

    /// A lookup's answer, with a dead marker of this backend replaced (see [`Self::lookup`]).
    async fn settle(
        &self,
        key: &str,
        read: Read,
        marker: &str,
        ttl: Duration,
    ) -> BackendResult<Read> {
        match read {
            Read::Miss(other)
                if other.0 != marker.as_bytes()
                    && other.0.starts_with(self.marker_prefix.as_bytes()) =>
            {
                // Rare (a dead marker): boxed, so that every lookup's future stays small.
                if Box::pin(self.takeover(key, &other, marker, ttl)).await? {
                    Ok(Read::Miss(Gen(Bytes::copy_from_slice(marker.as_bytes()))))
                } else {
                    Box::pin(self.set_nx_get(key, marker, ttl)).await
                }
            }
            read => Ok(read),
        }
    }

    async fn set_nx_get(&self, key: &str, marker: &str, ttl: Duration) -> BackendResult<Read> {
        use std::sync::atomic::Ordering::Relaxed;
        let refusing = self.refusing_until.load(Relaxed);
        if refusing != 0 {
            if (self.started.elapsed().as_millis() as u64) < refusing {
                // Rare (the server refuses writes): boxed, like the other rare paths.
                return Box::pin(self.read_only_lookup(key)).await;
            }
            self.refusing_until.store(0, Relaxed);
        }
        let (value, marked) = self
            .conns
            .run_for(key, "SET NX GET", |mut conn| async move {
                let set = redis::Cmd::with_capacity(7, key.len() + marker.len() + 24)
                    .arg("SET")
                    .arg(key)
                    .arg(marker)
                    .arg("NX")
                    .arg("PX")
                    .arg(millis(ttl))
                    .arg("GET")
                    .query_async::<Option<Vec<u8>>>(&mut conn)
                    .await;
                match set {
                    Ok(v) => Ok((v, true)),
                    // A server that refuses writes (over `maxmemory` with `noeviction`, a
                    // read-only replica or user) still serves hits: a plain `GET`, and a miss
                    // without a marker (its fill is not stored).
                    Err(e) if refuses_writes(&self.conns, &e) => {
                        let v: Option<Vec<u8>> =
                            redis::cmd("GET").arg(key).query_async(&mut conn).await?;
                        Ok((v, false))
                    }
                    Err(e) => Err(e),
                }
            })
            .await?;
        if !marked {
            let until = self.started.elapsed() + REFUSAL_BACKOFF;
            self.refusing_until
                .store((until.as_millis() as u64).max(1), Relaxed);
            if value.as_deref().is_none_or(is_marker) {
                return Ok(Read::Miss(Gen::default()));
            }
        }
        Ok(classify(value, marker))
    }

    /// A lookup while the server refuses writes: a hit, or a miss with nothing to fill against.
    async fn read_only_lookup(&self, key: &str) -> BackendResult<Read> {
        Ok(match self.get(key).await? {
            Some(stored) => Read::Hit(stored),
            None => Read::Miss(Gen::default()),
        })
    }

    fn tag_keys(tags: &[&str]) -> Vec<String> {
        tags.iter().map(|t| aux_key(TAG_PREFIX, t)).collect()
    }
}

impl Backend for RedisBackend {
    fn read(&self, key: &str) -> impl Future<Output = BackendResult<Option<Stored>>> + Send {
        self.get(key)
    }

    async fn read_for_fill(&self, key: &str, token: &Token) -> BackendResult<Read> {
        self.lookup(key, self.marker(token), PENDING_TTL).await
    }

    async fn replace(&self, key: &str, token: &Token) -> BackendResult<Gen> {
        // A value written in between is lost to a miss, never to a stale fill: this call
        // loads after.
        let marker = self.marker(token);
        let found: Option<Vec<u8>> = self
            .conns
            .run_for(key, "replace", |mut conn| async move {
                let prefix = &self.marker_prefix;
                let mut cmd = evalsha(&REPLACE, 1, 4, key.len() + 2 * marker.len() + 16);
                cmd.arg(key)
                    .arg(marker)
                    .arg(millis(PENDING_TTL))
                    .arg(prefix);
                run(&mut conn, &REPLACE, &cmd).await
            })
            .await?;
        Ok(Gen(match found {
            Some(other) => Bytes::from(other),
            None => Bytes::copy_from_slice(marker.as_bytes()),
        }))
    }

    async fn read_stale(&self, key: &str) -> BackendResult<Option<Stored>> {
        let copy = Self::stale_copy(key);
        let found = self.get(&copy).await?;
        Ok(found)
    }

    async fn fill(
        &self,
        key: &str,
        value: Stored,
        ttl: Duration,
        generation: &Gen,
        _token: Option<&str>,
        keep: Option<Duration>,
    ) -> BackendResult<bool> {
        // With `lock`, the marker read is the lease: filling against it releases it.
        let waiters = self.waiters(key);
        let copy = keep.map(|_| Self::stale_copy(key));
        let copy = copy.as_deref();
        self.conns
            .run_for(key, "fill", |mut conn| async move {
                let keys = 2 + usize::from(copy.is_some());
                let mut cmd = evalsha(
                    &FILL,
                    keys,
                    8,
                    3 * key.len() + generation.0.len() + value.bytes.len() + 60,
                );
                cmd.arg(key).arg(&waiters);
                if let Some(copy) = copy {
                    cmd.arg(copy);
                }
                cmd.arg(&generation.0[..])
                    .arg(&value.bytes[..])
                    .arg(millis(ttl))
                    .arg(CHANNEL);
                if let Some(keep) = keep {
                    cmd.arg(millis(keep));
                }
                let stored: i64 = run(&mut conn, &FILL, &cmd).await?;
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

    async fn refresh_lease(
        &self,
        key: &str,
        token: &str,
        header: &Header,
        lease: Duration,
    ) -> BackendResult<Option<Gen>> {
        let refresh = Self::refresh_lease_key(key);
        let refresh = &refresh;
        let won = self
            .conns
            .run_for(key, "refresh lease", |mut conn| async move {
                let mut cmd = evalsha(&REFRESH_LEASE, 2, 3, 2 * key.len() + token.len() + 48);
                cmd.arg(key)
                    .arg(refresh)
                    .arg(token)
                    .arg(&header[..])
                    .arg(millis(lease));
                let won: i64 = run(&mut conn, &REFRESH_LEASE, &cmd).await?;
                Ok(won == 1)
            })
            .await?;
        Ok(won.then(|| Gen(Bytes::copy_from_slice(token.as_bytes()))))
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
        let refresh = Self::refresh_lease_key(key);
        let refresh = &refresh;
        let copy = keep.map(|_| Self::stale_copy(key));
        let copy = copy.as_deref();
        self.conns
            .run_for(key, "refresh fill", |mut conn| async move {
                let keys = 2 + usize::from(copy.is_some());
                let mut cmd = evalsha(
                    &REFRESH_FILL,
                    keys,
                    5,
                    3 * key.len() + lease.0.len() + value.bytes.len() + 64,
                );
                cmd.arg(key).arg(refresh);
                if let Some(copy) = copy {
                    cmd.arg(copy);
                }
                cmd.arg(&lease.0[..])
                    .arg(&header[..])
                    .arg(&value.bytes[..])
                    .arg(millis(ttl));
                if let Some(keep) = keep {
                    cmd.arg(millis(keep));
                }
                let stored: i64 = run(&mut conn, &REFRESH_FILL, &cmd).await?;
                Ok(stored == 1)
            })
            .await
    }

    async fn release(&self, key: &str, token: &str) -> BackendResult<()> {
        let waiters = self.waiters(key);
        self.conns
            .run_for(key, "release", |mut conn| async move {
                let mut cmd = evalsha(&RELEASE, 2, 4, 2 * key.len() + token.len() + 32);
                cmd.arg(key).arg(&waiters).arg(token).arg(CHANNEL);
                let _: i64 = run(&mut conn, &RELEASE, &cmd).await?;
                Ok(())
            })
            .await
    }

    async fn write(&self, key: &str, value: Stored, ttl: Duration) -> BackendResult<()> {
        let waiters = self.waiters(key);
        let copy = Self::stale_copy(key);
        let refresh = Self::refresh_lease_key(key);
        let frame = self.frame(inv::Kind::Keys, &[key]);
        let (frame, channel, copy, refresh) = (&frame, &self.inv_channel, &copy, &refresh);
        self.conns
            .run_for(key, "write", |mut conn| async move {
                let mut cmd = evalsha(
                    &WRITE,
                    4,
                    9,
                    4 * key.len() + value.bytes.len() + frame.len() + channel.len() + 80,
                );
                cmd.arg(key)
                    .arg(&waiters)
                    .arg(copy)
                    .arg(refresh)
                    .arg(&value.bytes[..])
                    .arg(millis(ttl))
                    .arg(CHANNEL)
                    .arg(channel)
                    .arg(&frame[..]);
                let _: i64 = run(&mut conn, &WRITE, &cmd).await?;
                Ok(())
            })
            .await
    }

    async fn invalidate(&self, keys: &[&str]) -> BackendResult<()> {
        if keys.is_empty() {
            return Ok(());
        }
        // A `DEL` per hash slot (one command on Redis Cluster may not span slots), pipelined:
        // one round trip. No script and no fill notification: a load holding a removed marker
        // wakes its waiters when its fill is rejected, and a waiter of a holder that is gone
        // finds the key empty at its next re-check. The `PUBLISH` of the keys' invalidation
        // frame follows the `DEL`s in the same pipeline (after them: never before the change).
        let mut by_slot: Vec<(u16, Vec<&str>)> = Vec::new();
        for key in keys {
            let slot = crate::key::key_slot(key);
            match by_slot.iter_mut().find(|(s, _)| *s == slot) {
                Some((_, group)) => group.push(key),
                None => by_slot.push((slot, vec![key])),
            }
        }
        let channel = &self.inv_channel;
        let by_slot = &by_slot;
        let op = |mut conn: conn::Conn| async move {
            let mut pipe = SlotPipe::new();
            for (slot, group) in by_slot {
                // With each key its stale copy (`stale`) and its refresh lease
                // (`refresh`: a running refresh does not store), in the same slot.
                let mut del = redis::cmd("DEL");
                del.arg(group);
                for key in group {
                    del.arg(Self::stale_copy(key))
                        .arg(Self::refresh_lease_key(key));
                }
                pipe.push_ignored(*slot, del);
                if conn.is_cluster() {
                    // Each slot's request announces its own keys (a cluster request may
                    // not span slots): never before their change.
                    let frame = self.frame(inv::Kind::Keys, group);
                    pipe.push_ignored(*slot, publish(channel, &frame));
                }
            }
            if !conn.is_cluster() {
                let slot = by_slot[0].0;
                pipe.push_ignored(slot, publish(channel, &self.frame(inv::Kind::Keys, keys)));
            }
            pipe.query::<()>(&mut conn).await
        };
        // Keys of one slot (the common case, one key): through their master's breaker.
        if by_slot.len() == 1 {
            self.conns.run_for(keys[0], "invalidate", op).await
        } else {
            self.conns.run("invalidate", op).await
        }
    }

    async fn read_for_fill_tagged(
        &self,
        key: &str,
        token: &Token,
        tags: &[&str],
        ttl: Duration,
    ) -> (BackendResult<Read>, BackendResult<Vec<Bytes>>) {
        if tags.is_empty() {
            return (self.read_for_fill(key, token).await, Ok(Vec::new()));
        }
        // The lookup and the tags' `SET .. NX GET`s in one pipeline: one round trip (on a
        // cluster one request per slot, concurrent: still one round trip).
        let marker = self.marker(token);
        let tag_keys = Self::tag_keys(tags);
        let fresh: Vec<String> = tags.iter().map(|_| crate::store::new_token()).collect();
        let versions_sent = &fresh;
        let found = self
            .conns
            .run("SET NX GET + tags", |mut conn| async move {
                let mut pipe = SlotPipe::new();
                push_set_nx_get(&mut pipe, key, marker, PENDING_TTL);
                for (tag, version) in tag_keys.iter().zip(versions_sent) {
                    push_set_nx_get(&mut pipe, tag, version, ttl);
                }
                match pipe.query::<Vec<Option<Vec<u8>>>>(&mut conn).await {
                    Ok(all) => Ok(Some(all)),
                    // A server that refuses writes: the separate calls know what to do.
                    Err(e) if refuses_writes(&self.conns, &e) => Ok(None),
                    Err(e) => Err(e),
                }
            })
            .await;
        let mut all = match found {
            Ok(Some(all)) if all.len() == tags.len() + 1 => all.into_iter(),
            Ok(_) => {
                return (
                    self.read_for_fill(key, token).await,
                    self.tag_versions(tags, ttl).await,
                );
            }
            Err(e) => return (Err(e.clone()), Err(e)),
        };
        let value = all.next().flatten();
        let versions = versions_of(all, fresh);
        let read = self
            .settle(key, classify(value, marker), marker, PENDING_TTL)
            .await;
        (read, Ok(versions))
    }

    async fn tag_versions(&self, tags: &[&str], ttl: Duration) -> BackendResult<Vec<Bytes>> {
        if tags.is_empty() {
            return Ok(Vec::new());
        }
        let keys = Self::tag_keys(tags);
        let fresh: Vec<String> = tags.iter().map(|_| crate::store::new_token()).collect();
        self.conns
            .run("tag versions", |mut conn| async move {
                // `SET .. NX GET`: the current version, or a new one: never none.
                let mut pipe = SlotPipe::new();
                for (key, version) in keys.iter().zip(&fresh) {
                    push_set_nx_get(&mut pipe, key, version, ttl);
                }
                let found: Vec<Option<Vec<u8>>> = match pipe.query(&mut conn).await {
                    Ok(found) => found,
                    // A server that refuses writes: the versions there are (an absent one,
                    // empty, matches no entry), none created.
                    Err(e) if refuses_writes(&self.conns, &e) => {
                        let mut get = SlotPipe::new();
                        for key in &keys {
                            get.push(key_slot(key), get_cmd(key));
                        }
                        let current: Vec<Option<Vec<u8>>> = get.query(&mut conn).await?;
                        return Ok(current
                            .into_iter()
                            .map(|v| v.map(Bytes::from).unwrap_or_default())
                            .collect());
                    }
                    Err(e) => return Err(e),
                };
                Ok(versions_of(found.into_iter(), fresh))
            })
            .await
    }

    async fn current_tags(
        &self,
        tags: &[&str],
        extend: Option<Duration>,
    ) -> BackendResult<Vec<Option<Bytes>>> {
        if tags.is_empty() {
            return Ok(Vec::new());
        }
        let keys = Self::tag_keys(tags);
        self.conns
            .run("tag check", |mut conn| async move {
                let mut pipe = SlotPipe::new();
                for key in &keys {
                    let slot = key_slot(key);
                    if let Some(ttl) = extend {
                        // A tag lives as long as its longest-lived entry, and no longer.
                        let mut pexpire = redis::cmd("PEXPIRE");
                        pexpire.arg(key).arg(millis(ttl)).arg("GT");
                        pipe.push_ignored(slot, pexpire);
                    }
                    pipe.push(slot, get_cmd(key));
                }
                let found: Vec<Option<Vec<u8>>> = pipe.query(&mut conn).await?;
                Ok(found.into_iter().map(|v| v.map(Bytes::from)).collect())
            })
            .await
    }

    async fn invalidate_tags(&self, tags: &[&str]) -> BackendResult<()> {
        if tags.is_empty() {
            return Ok(());
        }
        let keys = Self::tag_keys(tags);
        // The names as given (not the `__cr:tag:{..}` keys): what other processes' tiers know.
        let channel = &self.inv_channel;
        let keys = &keys;
        self.conns
            .run("invalidate tags", |mut conn| async move {
                // One command per tag, whatever the number of entries; a tag without a version
                // has no entry that could be served. Then one `PUBLISH` of all the names (on
                // a cluster, one per tag, in the tag's slot's request, after its change).
                let mut pipe = SlotPipe::new();
                for (key, tag) in keys.iter().zip(tags) {
                    let slot = key_slot(key);
                    let mut set = redis::cmd("SET");
                    set.arg(key)
                        .arg(crate::store::new_token())
                        .arg("XX")
                        .arg("KEEPTTL");
                    pipe.push_ignored(slot, set);
                    if conn.is_cluster() {
                        let frame = self.frame(inv::Kind::Tags, &[tag]);
                        pipe.push_ignored(slot, publish(channel, &frame));
                    }
                }
                if !conn.is_cluster() {
                    let frame = self.frame(inv::Kind::Tags, tags);
                    pipe.push_ignored(key_slot(&keys[0]), publish(channel, &frame));
                }
                pipe.query::<()>(&mut conn).await
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
