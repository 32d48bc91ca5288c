//! The [`Cache`] handle, its builder, the default cache and the manual API.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::backend::{AnyBackend, MemoryBackend, RedisBackend, RedisOptions, Stored};
use crate::breaker::{FailureKind, FailureLog};
use crate::envelope;
use crate::error::{Error, ErrorKind, Result};
use crate::key;
use crate::stats::{Stats, StatsRegistry};
use crate::store::{LocalConfig, Store, WbConfig};

const DEFAULT_TTL: Duration = Duration::from_secs(3600);
const DEFAULT_MAX_ENTRIES: u64 = 100_000;

/// A cache: a backend (Redis or in-process memory), a key namespace, a default TTL, and the
/// counters of every function that uses it.
///
/// `Cache` is a cheap handle (an `Arc` inside): clone it freely. Every cached function uses
/// [`default_cache()`] unless its attribute says `cache = <expr>`.
///
/// # Concurrency and failure
///
/// * Concurrent lookups of one key in one process share one backend read and, on a miss, one
///   run of the function; the other callers wait for its result. A result that is not stored
///   (`None` without `cache_none`, `unless`) is shared with them all the same. If the run
///   returns an error, panics or is cancelled (its future dropped), *one* of the waiting
///   callers runs the function next: at most one load of a key runs at a time in a process.
/// * Functions with `lock` load once across all processes sharing a Redis (leases; see
///   [`cached`](crate::cached)).
/// * A load's result is not stored if the key was written ([`Cache::set`]) or invalidated
///   ([`Cache::invalidate`]) by any process since the load read it.
/// * A Redis that is down, slow or holds garbage never fails a call: the function runs and its
///   result is returned. Operations time out after [`CacheBuilder::operation_timeout`]; after
///   repeated failures a circuit breaker skips Redis entirely (a call then costs nanoseconds
///   more than the bare function) and probes it again every
///   [`CacheBuilder::circuit_breaker`] cooldown.
///
/// ```
/// use cache_runtime::Cache;
/// use std::time::Duration;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), cache_runtime::Error> {
/// let cache = Cache::memory();
/// cache.set("greeting", &"hello", Duration::from_secs(60)).await?;
/// assert_eq!(cache.get::<String>("greeting").await?, Some("hello".to_owned()));
/// cache.invalidate("greeting").await?;
/// assert_eq!(cache.get::<String>("greeting").await?, None);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Cache {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    stats: StatsRegistry,
    /// `publish_stats`: the fleet stats publisher.
    publisher: Option<crate::stats::fleet::Publisher>,
}

/// A [`Cache`] that does not keep it alive (background tasks hold one).
pub(crate) struct WeakCache(std::sync::Weak<Inner>);

impl WeakCache {
    /// The cache, if it was not dropped.
    pub(crate) fn upgrade(&self) -> Option<Cache> {
        self.0.upgrade().map(|inner| Cache { inner })
    }
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("backend", &self.backend_name())
            .field("namespace", &self.namespace())
            .field("default_ttl", &self.default_ttl())
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
enum BackendConfig {
    Memory {
        max_entries: u64,
    },
    Redis {
        url: SecretUrl,
    },
    RedisCluster {
        urls: Vec<SecretUrl>,
    },
    Sentinel {
        sentinels: Vec<SecretUrl>,
        service: String,
    },
}

/// A Redis URL as the builder keeps it: `Debug` and `Display` hide its password (see
/// [`redact`]), so that neither the builder's `Debug` nor an error message can show it.
struct SecretUrl(String);

impl std::fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", redact(&self.0))
    }
}

impl std::fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&redact(&self.0))
    }
}

/// Configures and builds a [`Cache`]. Start with [`Cache::builder`].
///
/// [`build`](CacheBuilder::build) is `async` for symmetry with the rest of the API;
/// [`build_sync`](CacheBuilder::build_sync) does the same without a runtime, for a cache in a
/// `static`:
///
/// ```
/// use cache_runtime::Cache;
/// use std::sync::LazyLock;
///
/// static CACHE: LazyLock<Cache> = LazyLock::new(|| {
///     Cache::builder()
///         .redis("redis://127.0.0.1:6379")
///         .namespace("app")
///         .build_sync()
///         .expect("valid cache configuration")
/// });
///
/// #[cache_runtime::cached(cache = CACHE, key = "answer", ttl = 60)]
/// async fn answer() -> u64 {
///     42
/// }
/// ```
///
/// ```no_run
/// use cache_runtime::Cache;
/// use std::time::Duration;
///
/// # async fn demo() -> Result<(), cache_runtime::Error> {
/// let cache = Cache::builder()
///     .redis("redis://127.0.0.1:6379")
///     .namespace("app")
///     .default_ttl(Duration::from_secs(3600))
///     .build()
///     .await?;
/// cache_runtime::set_default(cache)?;
/// # Ok(()) }
/// ```
#[must_use = "a builder does nothing until `build` is called"]
pub struct CacheBuilder {
    backend: BackendConfig,
    namespace: String,
    default_ttl: Duration,
    redis: RedisOptions,
    log_every: Duration,
    local: LocalConfig,
    wb: WbConfig,
    publish_stats: Option<Duration>,
    trace_keys: bool,
}

/// Shows the configuration with the Redis URL's password replaced by `***` and
/// certificates as `<set>`.
impl std::fmt::Debug for CacheBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheBuilder")
            .field("backend", &self.backend)
            .field("namespace", &self.namespace)
            .field("default_ttl", &self.default_ttl)
            .field("redis", &self.redis)
            .field("local", &self.local)
            .field("write_behind", &self.wb)
            .field("publish_stats", &self.publish_stats)
            .field("trace_keys", &self.trace_keys)
            .finish_non_exhaustive()
    }
}

impl Default for CacheBuilder {
    fn default() -> Self {
        CacheBuilder {
            backend: BackendConfig::Memory {
                max_entries: DEFAULT_MAX_ENTRIES,
            },
            namespace: String::new(),
            default_ttl: DEFAULT_TTL,
            redis: RedisOptions::default(),
            log_every: Duration::from_secs(10),
            local: LocalConfig::default(),
            wb: WbConfig::default(),
            publish_stats: None,
            trace_keys: false,
        }
    }
}

impl CacheBuilder {
    /// Stores values in this process, at most `max_entries` of them (the default backend,
    /// with 100 000 entries).
    pub fn memory(mut self, max_entries: u64) -> Self {
        self.backend = BackendConfig::Memory { max_entries };
        self
    }

    /// Stores values in Redis at `url`: `redis://[[user]:password@]host[:port][/db]`, or
    /// `rediss://..` for TLS (the `tls` feature; see `CacheBuilder::redis_tls_root_ca`). With
    /// a user, the connections
    /// authenticate as that ACL user (`AUTH user password`); with a password alone, as the
    /// `default` user. The connection is made on first use; `build` does not wait for it.
    ///
    /// Credentials the server refuses make the cache unavailable, not the calls: they run
    /// uncached, and the log says that redis refused the credentials of user `app`, never
    /// the password. The password is not shown by this builder's `Debug`, the cache's, its
    /// [`Stats`] or any error message. The ACL user needs the commands the cache sends (`+@all`,
    /// or at least `+@read +@write +@scripting +@pubsub +@stream +@connection`), its keys
    /// (`~*`, or `~<namespace>:*` and `~__cr:*`) and its pub/sub channels (`&__cr:*`; Redis 7
    /// grants none by default).
    ///
    /// A Sentinel URL selects the master that Redis Sentinel names (see
    /// [`redis_sentinel`](CacheBuilder::redis_sentinel)):
    /// `redis+sentinel://[user:password@]host1:26379,host2:26379/<service>[/<db>]` (port
    /// 26379 if omitted; `user:password` and the database are the master's, and are not sent
    /// to the sentinels).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), cache_runtime::Error> {
    /// let cache = cache_runtime::Cache::builder()
    ///     .redis("redis+sentinel://:secret@10.0.0.1:26379,10.0.0.2:26379/mymaster/0")
    ///     .build()
    ///     .await?; // nothing is connected yet
    /// assert_eq!(cache.backend_name(), "redis-sentinel");
    /// # Ok(()) }
    /// ```
    pub fn redis(mut self, url: impl Into<String>) -> Self {
        self.backend = BackendConfig::Redis {
            url: SecretUrl(url.into()),
        };
        self
    }

    /// Trusts the CA certificates in `pem` (a PEM bundle: one or more `-----BEGIN
    /// CERTIFICATE-----` blocks), instead of the system's roots, for every `rediss://`
    /// connection of this cache: a private or self-signed CA. On a cluster
    /// ([`redis_cluster`](CacheBuilder::redis_cluster) with `rediss://` seeds) it is used for
    /// every node's connections, the nodes discovered from the slot table included. Without
    /// it, the system's roots are trusted. It is ignored for `redis://` URLs. Available with
    /// the `tls` feature.
    ///
    /// A certificate that is not trusted makes the cache unavailable, not the calls: they run
    /// uncached, and the log says "redis's TLS certificate is not trusted".
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// let cache = cache_runtime::Cache::builder()
    ///     .redis("rediss://app:s3cret@redis.internal:6380")
    ///     .redis_tls_root_ca(std::fs::read("/etc/redis/ca.crt")?)
    ///     .build()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`build`](CacheBuilder::build) fails with [`ErrorKind::Config`] if `pem` holds no
    /// certificate.
    #[cfg(feature = "tls")]
    pub fn redis_tls_root_ca(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.redis.tls.root_ca = Some(pem.into());
        self
    }

    /// Presents this client certificate (a PEM chain, the client's first) and its private key
    /// (PEM: PKCS#8, PKCS#1 or SEC1) on every `rediss://` connection of this cache (on a
    /// cluster: to every node): mutual TLS, for a server started with `tls-auth-clients yes`. It is ignored for `redis://` URLs.
    /// Available with the `tls` feature.
    ///
    /// The key is kept in memory only for making connections; no `Debug` output shows it or
    /// the certificate.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// let cache = cache_runtime::Cache::builder()
    ///     .redis("rediss://redis.internal:6380")
    ///     .redis_tls_root_ca(std::fs::read("/etc/redis/ca.crt")?)
    ///     .redis_tls_client_cert(
    ///         std::fs::read("/etc/app/client.crt")?,
    ///         std::fs::read("/etc/app/client.key")?,
    ///     )
    ///     .build()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`build`](CacheBuilder::build) fails with [`ErrorKind::Config`] if `cert_pem` holds no
    /// certificate or `key_pem` no private key.
    #[cfg(feature = "tls")]
    pub fn redis_tls_client_cert(
        mut self,
        cert_pem: impl Into<Vec<u8>>,
        key_pem: impl Into<Vec<u8>>,
    ) -> Self {
        self.redis.tls.client_cert = Some((cert_pem.into(), key_pem.into()));
        self
    }

    /// Stores values in the Redis master that Redis Sentinel names for `service`, asking the
    /// `sentinels` (each `host[:port]`, port 26379 by default, or
    /// `redis://[user:password@]host[:port]` for a sentinel that requires credentials of its
    /// own). To log in to the master, or to use a database other than 0, use the URL form in
    /// [`redis`](CacheBuilder::redis) instead.
    ///
    /// The master is found on first use (`build` does not wait for the sentinels, and does
    /// not fail if they are down; calls run uncached until they answer) and followed through
    /// failovers: when the master stops answering or answers as a replica (`READONLY`), the
    /// sentinels are asked again, at most once per [`circuit_breaker`](CacheBuilder::circuit_breaker)
    /// cooldown, and connections move to the new master; meanwhile calls run uncached.
    /// [`Cache::backend_name`] is `"redis-sentinel"`.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), cache_runtime::Error> {
    /// let cache = cache_runtime::Cache::builder()
    ///     .redis_sentinel(["10.0.0.1:26379", "10.0.0.2:26379", "10.0.0.3"], "mymaster")
    ///     .namespace("app")
    ///     .build()
    ///     .await?;
    /// assert_eq!(cache.backend_name(), "redis-sentinel");
    /// # Ok(()) }
    /// ```
    pub fn redis_sentinel(
        mut self,
        sentinels: impl IntoIterator<Item = impl Into<String>>,
        service: impl Into<String>,
    ) -> Self {
        self.backend = BackendConfig::Sentinel {
            sentinels: sentinels.into_iter().map(|s| SecretUrl(s.into())).collect(),
            service: service.into(),
        };
        self
    }

    /// Prefixes every key this cache writes with `<namespace>:`. Default: no prefix.
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// The TTL of values whose function has no `ttl` option. Default: one hour.
    pub fn default_ttl(mut self, ttl: Duration) -> Self {
        self.default_ttl = ttl;
        self
    }

    /// How long one Redis operation may take before the call gives up on the cache and runs
    /// the function. Default: 250 ms.
    pub fn operation_timeout(mut self, timeout: Duration) -> Self {
        self.redis.operation_timeout = timeout;
        self
    }

    /// How long connecting to Redis may take. Default: 1 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.redis.connect_timeout = timeout;
        self
    }

    /// After `threshold` consecutive connectivity failures, skip Redis for `cooldown`, then
    /// let one call probe it. Default: 3 failures, 1 s.
    pub fn circuit_breaker(mut self, threshold: u32, cooldown: Duration) -> Self {
        self.redis.breaker_threshold = threshold;
        self.redis.breaker_cooldown = cooldown;
        self
    }

    /// The size of the in-process tier that functions with `local` use in front of Redis: at
    /// most `max_entries` decoded values (10 000 by default). The tier is made when a `local`
    /// function is first called; a cache whose functions have no `local` has none. On the
    /// memory backend, values are in process already and `local` changes nothing.
    ///
    /// Copies are kept coherent across processes: every write or invalidation in any process
    /// removes them everywhere (see [`cached`](crate::cached)'s `local` and
    /// [`local_staleness`](CacheBuilder::local_staleness)).
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), cache_runtime::Error> {
    /// let cache = cache_runtime::Cache::builder()
    ///     .redis("redis://127.0.0.1:6379")
    ///     .local(50_000)
    ///     .build()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn local(mut self, max_entries: u64) -> Self {
        self.local.capacity = max_entries;
        self
    }

    /// The in-process tier's staleness bound (1 s by default): if invalidation messages may
    /// have been missed (Redis unreachable, the subscription dropped, a heartbeat unanswered),
    /// no in-process copy is served later than this after a write in another process
    /// returned. Normally copies are gone within the message's delivery time (about a
    /// millisecond); this bounds the failure cases. Heartbeats go out twice per bound.
    pub fn local_staleness(mut self, bound: Duration) -> Self {
        self.local.staleness = bound;
        self
    }

    /// Write-behind (`#[write_behind]`): how many partitions (Redis streams) each queue is
    /// split into, by the hash of the key (1 to 1024, default 16). At most one worker applies
    /// a partition at a time, so this bounds how many workers share a queue. It must be the
    /// same in every process: change it only while the queues are drained
    /// ([`Worker::flush`](crate::write_behind::Worker::flush)), or writes of one key may be
    /// applied out of order.
    pub fn write_behind_partitions(mut self, partitions: u16) -> Self {
        self.wb.partitions = partitions;
        self
    }

    /// Write-behind: how long a queue (its partitions, their bookkeeping, its dead letters)
    /// lives after the last write to it or the last poll of a worker (default 30 days). A
    /// queue nobody touches for that long is removed with what it holds.
    pub fn write_behind_retention(mut self, retention: Duration) -> Self {
        self.wb.retention = retention;
        self
    }

    /// Publishes this cache's [`Stats`] snapshot to Redis every `interval` (at least 100 ms;
    /// 5 to 10 s is plenty), so that [`Cache::fleet_stats`] (and `cachectl stats`) can sum
    /// the counters of every instance sharing the namespace. Off by default.
    ///
    /// Each instance (each `Cache` built with this option: an id `<host>:<pid>:<random>`)
    /// writes one hash, `__cr:fleet:{<namespace>:stats}:<id>`, with a TTL of three
    /// intervals, and its id in the registry `__cr:fleet:{<namespace>:stats}` (a sorted set
    /// scored by the snapshot's expiry, living an hour after the last publish): an instance
    /// that stops publishing (it died, its cache was dropped) drops out of the sum after
    /// three intervals. The keys share a hash slot, so a Redis Cluster is served by one node.
    ///
    /// Cost: every `interval`, one snapshot of the counters (a lock and a read of each
    /// function's counters: microseconds) and one `MULTI` of six commands whose size grows
    /// with the number of functions (about 600 bytes each). Calls pay one atomic load to
    /// check that the publishing task runs. The task is started in the Tokio runtime of
    /// the cache's first use after building (building connects nothing), and again in the
    /// runtime of a later use if that one shut down; it ends when the cache is dropped. A
    /// failed publish is logged at `debug` (and by the backend's rate-limited failure log)
    /// and never affects calls. On the memory backend nothing is published: the fleet is
    /// this cache.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), cache_runtime::Error> {
    /// let cache = cache_runtime::Cache::builder()
    ///     .redis("redis://127.0.0.1:6379")
    ///     .namespace("app")
    ///     .publish_stats(std::time::Duration::from_secs(5))
    ///     .build()
    ///     .await?;
    /// println!("{}", cache.fleet_stats().await?);
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`build`](CacheBuilder::build) fails with [`ErrorKind::Config`] if `interval` is
    /// under 100 ms.
    pub fn publish_stats(mut self, interval: Duration) -> Self {
        self.publish_stats = Some(interval);
        self
    }

    /// Whether each cached call's `tracing` span (`cache_call`, at `debug`: see the README's
    /// "Tracing") records the call's key, as its `key` field (with the namespace). Off by
    /// default: keys can carry personal data (`user:{email}`), and spans often leave the
    /// process. The other fields (`function`, `cache`, `outcome`, `level`) never hold
    /// argument values.
    pub fn trace_keys(mut self, on: bool) -> Self {
        self.trace_keys = on;
        self
    }

    /// Stores values in a Redis Cluster, reached through `urls`: some of its nodes
    /// (`redis://[user:password@]host:port`, database 0 only), from which the others are
    /// discovered. Give several: pub/sub notifications subscribe on one of them, and move to
    /// the next (or to another node the cluster names) when it fails. Every feature works on a
    /// cluster, the in-process tier (`local`) included: its heartbeat is an echo published on
    /// every master, so it is trusted only while every master's messages are known to arrive
    /// (see the README's "Redis Cluster"). The connection is made on first use; `build` does
    /// not wait for it.
    ///
    /// The keys of one cached value and its bookkeeping share a hash slot, so every atomic
    /// step is one script on one node; operations over several keys (invalidating several
    /// keys, tags) send one request per slot, concurrently.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), cache_runtime::Error> {
    /// let cache = cache_runtime::Cache::builder()
    ///     .redis_cluster(["redis://10.0.0.1:7000", "redis://10.0.0.2:7000", "redis://10.0.0.3:7000"])
    ///     .namespace("app")
    ///     .build()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn redis_cluster<I>(mut self, urls: I) -> Self
    where
        I: IntoIterator,
        I::Item: Into<String>,
    {
        self.backend = BackendConfig::RedisCluster {
            urls: urls.into_iter().map(|u| SecretUrl(u.into())).collect(),
        };
        self
    }

    /// Builds the cache.
    ///
    /// # Errors
    ///
    /// Fails with [`ErrorKind::Config`] on invalid configuration only: a malformed Redis URL, a
    /// `rediss://` URL without the `tls` feature, TLS certificates or a key that are not PEM,
    /// a zero TTL, timeout or entry limit, a `local_staleness` under 10 ms, a namespace with
    /// braces, spaces or control characters, `write_behind_partitions` outside 1 to 1024, a
    /// `write_behind_retention` under 1 s, a `publish_stats` interval under 100 ms. It never
    /// fails, nor waits, because Redis is down: the connection is made on first use, and until it succeeds calls run uncached.
    pub async fn build(self) -> Result<Cache> {
        self.build_sync()
    }

    /// Builds the cache without `await`: the same as [`build`](CacheBuilder::build), usable
    /// outside a runtime (a `LazyLock<Cache>`, a `main` before the runtime starts). Nothing is
    /// connected until the first operation, which may run in any Tokio runtime: each runtime
    /// that uses the cache gets its own Redis connection.
    ///
    /// # Errors
    ///
    /// As [`build`](CacheBuilder::build): invalid configuration only.
    pub fn build_sync(self) -> Result<Cache> {
        if self.default_ttl.is_zero() {
            return Err(Error::config("default_ttl must be greater than zero"));
        }
        key::validate_namespace(&self.namespace).map_err(Error::config)?;
        if self.local.capacity == 0 {
            return Err(Error::config("local max_entries must be greater than zero"));
        }
        if self.local.staleness < Duration::from_millis(10) {
            return Err(Error::config("local_staleness must be at least 10ms"));
        }
        if !(1..=1024).contains(&self.wb.partitions) {
            return Err(Error::config("write_behind_partitions must be 1 to 1024"));
        }
        if self.wb.retention < Duration::from_secs(1) {
            return Err(Error::config("write_behind_retention must be at least 1s"));
        }
        if self
            .publish_stats
            .is_some_and(|i| i < crate::stats::fleet::MIN_INTERVAL)
        {
            return Err(Error::config(
                "publish_stats interval must be at least 100ms",
            ));
        }
        let log = Arc::new(FailureLog::new(self.log_every));
        let backend = match self.backend {
            BackendConfig::Memory { max_entries } => {
                if max_entries == 0 {
                    return Err(Error::config(
                        "memory max_entries must be greater than zero",
                    ));
                }
                AnyBackend::Memory(MemoryBackend::new(max_entries))
            }
            BackendConfig::Redis { .. } | BackendConfig::Sentinel { .. }
                if self.redis.operation_timeout.is_zero()
                    || self.redis.connect_timeout.is_zero() =>
            {
                return Err(Error::config("redis timeouts must be greater than zero"));
            }
            BackendConfig::Redis { url } if crate::backend::sentinel::is_sentinel_url(&url.0) => {
                let config = crate::backend::sentinel::SentinelConfig::parse_url(&url.0)
                    .map_err(|e| Error::config(format!("invalid redis url {url:?}: {e}")))?;
                sentinel_backend(config, &self.namespace, &self.redis, &log)
            }
            BackendConfig::Sentinel { sentinels, service } => {
                let config = crate::backend::sentinel::SentinelConfig::from_parts(
                    sentinels.into_iter().map(|s| s.0).collect(),
                    service,
                )
                .map_err(|e| Error::config(format!("invalid redis sentinel configuration: {e}")))?;
                sentinel_backend(config, &self.namespace, &self.redis, &log)
            }
            BackendConfig::Redis { url } => {
                let backend =
                    RedisBackend::new(&url.0, &self.namespace, self.redis.clone(), log.clone())
                        .map_err(|e| Error::config(format!("invalid redis url {url:?}: {e}")))?;
                AnyBackend::Redis(backend)
            }
            BackendConfig::RedisCluster { urls } => {
                if self.redis.operation_timeout.is_zero() || self.redis.connect_timeout.is_zero() {
                    return Err(Error::config("redis timeouts must be greater than zero"));
                }
                let seeds: Vec<String> = urls.iter().map(|u| u.0.clone()).collect();
                let backend =
                    RedisBackend::cluster(&seeds, &self.namespace, self.redis.clone(), log.clone())
                        .map_err(|e| {
                            Error::config(format!("invalid redis cluster urls {urls:?}: {e}"))
                        })?;
                AnyBackend::Redis(backend)
            }
        };
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let stats = StatsRegistry::new(id)
            .named(&self.namespace)
            .with_trace_keys(self.trace_keys);
        Ok(Cache {
            inner: Arc::new(Inner {
                store: Store::new(
                    backend,
                    self.namespace,
                    self.default_ttl,
                    log,
                    self.local,
                    self.wb,
                ),
                stats,
                publisher: self.publish_stats.map(crate::stats::fleet::Publisher::new),
            }),
        })
    }
}

/// The backend behind the master `config`'s sentinels name.
fn sentinel_backend(
    config: crate::backend::sentinel::SentinelConfig,
    namespace: &str,
    redis: &RedisOptions,
    log: &Arc<FailureLog>,
) -> AnyBackend {
    AnyBackend::Redis(RedisBackend::sentinel(
        config,
        namespace,
        redis.clone(),
        log.clone(),
    ))
}

/// Hides a password in a Redis URL for `Debug`, logs and error messages: `user:password@`
/// becomes `user:***@`; a user part without `:` (which could be a password written in the
/// wrong place) becomes `***@`. Without a scheme (`user:password@host`, as a sentinel entry
/// may be mistyped), everything up to the last `@` becomes `***@`.
pub(crate) fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = match userinfo.split_once(':') {
                Some((user, _)) => format!("{user}:***"),
                None => "***".to_owned(),
            };
            format!("{}://{user}@{}", &url[..scheme], &url[at + 1..])
        }
        // No scheme (`user:password@host:port`, a mistake): everything up to the last `@`.
        (None, Some(at)) => format!("***@{}", &url[at + 1..]),
        _ => url.to_owned(),
    }
}

impl Cache {
    /// A builder; see [`CacheBuilder`].
    pub fn builder() -> CacheBuilder {
        CacheBuilder::default()
    }

    /// An in-process cache with the defaults: 100 000 entries, a one-hour default TTL, no
    /// namespace.
    pub fn memory() -> Cache {
        match CacheBuilder::default().build_sync() {
            Ok(cache) => cache,
            // The defaults are valid; this arm exists so that no path panics.
            Err(e) => unreachable!("default memory cache configuration is valid: {e}"),
        }
    }

    /// `"redis"`, `"redis-cluster"`, `"redis-sentinel"` (behind Redis Sentinel) or
    /// `"memory"`.
    pub fn backend_name(&self) -> &'static str {
        self.inner.store.backend_name()
    }

    /// The namespace given to the builder (empty if none).
    pub fn namespace(&self) -> &str {
        self.inner.store.namespace()
    }

    /// The TTL used by functions without a `ttl` option.
    pub fn default_ttl(&self) -> Duration {
        self.inner.store.default_ttl()
    }

    pub(crate) fn store(&self) -> &Store {
        &self.inner.store
    }

    /// The per-function counters (every cached call asks for them: with `publish_stats`,
    /// this makes sure the publisher runs).
    #[inline]
    pub(crate) fn stats_registry(&self) -> &StatsRegistry {
        if let Some(publisher) = &self.inner.publisher {
            publisher.ensure(self);
        }
        &self.inner.stats
    }

    /// A handle that does not keep the cache alive.
    pub(crate) fn downgrade(&self) -> WeakCache {
        WeakCache(Arc::downgrade(&self.inner))
    }

    /// The fleet stats publisher, with `publish_stats`.
    pub(crate) fn publisher(&self) -> Option<&crate::stats::fleet::Publisher> {
        self.inner.publisher.as_ref()
    }

    /// The backend key for `key`: `<namespace>:<key>`, or `key` without a namespace; the same
    /// key a function whose `key = "..."` renders `key` uses.
    ///
    /// A full key longer than 256 bytes (or containing `%#`) is replaced by its digest form,
    /// at most 256 bytes long: `<readable prefix>%#<digest>[{<hash tag>}]`, where the digest is
    /// the first 16 bytes of the SHA-256 of the full key in lowercase hex, the readable prefix
    /// is the full key's beginning (cut at a character boundary, braces written `%7B`/`%7D`),
    /// and the full key's Redis Cluster hash tag, if it has one of at most 64 bytes, is
    /// re-appended so that the key keeps its hash slot.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let cache = cache_runtime::Cache::builder().namespace("app").build().await.unwrap();
    /// assert_eq!(cache.full_key("user:42"), "app:user:42");
    /// let long = cache.full_key(&format!("{{tenant}}:search:{}", "x".repeat(300)));
    /// assert_eq!(long.len(), 256);
    /// assert!(long.starts_with("app:%7Btenant%7D:search:xxx"));
    /// assert!(long.ends_with("{tenant}"));
    /// # }
    /// ```
    pub fn full_key(&self, key: &str) -> String {
        let ns = self.namespace();
        key::bound_key(if ns.is_empty() {
            key.to_owned()
        } else {
            format!("{ns}:{key}")
        })
    }

    /// Reads the value stored under `key` (without the namespace, which is added), the same
    /// entry that a function with `key = "..."` rendering to `key` reads and writes.
    ///
    /// A value that does not decode as `T` is a miss (`Ok(None)`).
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Unavailable`] or [`ErrorKind::Timeout`] when the backend cannot be reached
    /// (including while the circuit breaker is open); [`ErrorKind::Backend`] when it replies
    /// with an error.
    pub async fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        let full = self.full_key(key);
        let Some(stored) = self.inner.store.read(&full).await? else {
            return Ok(None);
        };
        if envelope::is_tagged(&stored.bytes) && !self.tags_current(&stored.bytes).await? {
            return Ok(None);
        }
        match envelope::decode::<T>(&stored.bytes) {
            Ok(v) => Ok(Some(v)),
            Err(e) => {
                self.inner.store.log().warn(
                    FailureKind::Decode,
                    &format_args!("cached value could not be decoded, treated as a miss: {e}"),
                );
                Ok(None)
            }
        }
    }

    /// Stores `value` under `key` (the namespace is added) for `ttl`, replacing any entry.
    ///
    /// Lookups of `key` that start after this returns see `value` (or something newer): a
    /// concurrent load of the same key that started before is not stored over it.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`] for a zero `ttl`; [`ErrorKind::Encode`] if `value` fails to
    /// serialize; otherwise as [`Cache::get`].
    pub async fn set<T: Serialize + ?Sized>(
        &self,
        key: &str,
        value: &T,
        ttl: Duration,
    ) -> Result<()> {
        if ttl.is_zero() {
            return Err(Error::config("ttl must be greater than zero"));
        }
        let full = self.full_key(key);
        let bytes = envelope::encode(value, Duration::ZERO, None)
            .map_err(|e| Error::new(ErrorKind::Encode, e.to_string()))?;
        self.inner
            .store
            .write(&full, Stored::bytes(bytes), ttl, None)
            .await?;
        Ok(())
    }

    /// Removes the entry under `key` (the namespace is added).
    ///
    /// A load of `key` that is running when this is called does not store its (possibly
    /// stale) result; lookups that start after this returns load afresh.
    ///
    /// # Errors
    ///
    /// As [`Cache::get`].
    pub async fn invalidate(&self, key: &str) -> Result<()> {
        let full = self.full_key(key);
        self.inner.store.invalidate(&[&full]).await?;
        Ok(())
    }

    /// Invalidates every entry recorded under `tag` (without the namespace, which is added),
    /// in every process: the `tags = [..]` of `#[cached]` and `#[cache_put]` record entries
    /// under tags. One command, whatever the number of entries.
    ///
    /// A load that read the tag before this call is never served after it returns.
    ///
    /// ```
    /// use cache_runtime::{Cache, cached};
    ///
    /// #[cached(key = "user:{id}", tags = ["org:{org}"], cache = cache)]
    /// async fn user_name(cache: &Cache, org: u32, id: u32) -> String {
    ///     format!("user {id} of org {org}")
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let cache = Cache::memory();
    /// user_name(&cache, 1, 7).await; // a miss: stored under the tag `org:1`
    /// user_name(&cache, 1, 7).await; // a hit
    /// cache.invalidate_tag("org:1").await.unwrap();
    /// user_name(&cache, 1, 7).await; // a miss again
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// As [`Cache::get`].
    pub async fn invalidate_tag(&self, tag: &str) -> Result<()> {
        self.invalidate_tags(&[tag]).await
    }

    /// Invalidates every entry recorded under any of `tags` (see [`Cache::invalidate_tag`]):
    /// one round trip.
    ///
    /// # Errors
    ///
    /// As [`Cache::get`].
    pub async fn invalidate_tags(&self, tags: &[&str]) -> Result<()> {
        let full: Vec<String> = tags.iter().map(|t| self.full_key(t)).collect();
        let names: Vec<&str> = full.iter().map(String::as_str).collect();
        self.inner.store.invalidate_tags(&names).await?;
        Ok(())
    }

    /// Whether every tag a tagged envelope records still has the version it recorded.
    async fn tags_current(&self, bytes: &[u8]) -> Result<bool> {
        let recorded: Vec<(&str, &[u8])> = envelope::recorded_tags(bytes)
            .filter_map(|(n, v)| std::str::from_utf8(n).ok().map(|n| (n, v)))
            .collect();
        let names: Vec<&str> = recorded.iter().map(|(n, _)| *n).collect();
        let current = self.inner.store.current_tags(&names, None).await?;
        Ok(current
            .iter()
            .zip(&recorded)
            .all(|(c, (_, v))| c.as_deref() == Some(*v)))
    }

    /// A snapshot of the per-function counters; `Display` prints them as a table.
    ///
    /// With the `metrics` feature the same counters, incremented at the same points, are
    /// also reported to the `metrics` recorder installed when a function is first called on
    /// this cache, labelled `function` and `cache` (this cache's namespace, `default` without
    /// one); see the README's "Metrics".
    pub fn stats(&self) -> Stats {
        let clears = self.store().local().map_or(0, |l| l.clears());
        self.inner.stats.snapshot().with_l1_clears(clears)
    }

    /// The per-function counters of every live instance sharing this cache's namespace on
    /// its Redis, summed: the instances built with
    /// [`publish_stats`](CacheBuilder::publish_stats) whose last snapshot has not expired
    /// (this cache is among them only if it publishes too, as of its last publish). Each
    /// function's row has its fleet hit rate, the under-80% flag and, when low, a
    /// [`Hint`](crate::Hint) of the likely cause. `Display` prints a table.
    ///
    /// On the memory backend the fleet is this cache: its own [`Cache::stats`], as one
    /// instance.
    ///
    /// Snapshots that do not decode (another program's hash under the fleet's keys, a
    /// corrupt one) are skipped and counted in [`FleetStats::skipped`](crate::FleetStats::skipped).
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Unavailable`] or [`ErrorKind::Timeout`] when Redis cannot be reached
    /// (including while the circuit breaker is open); [`ErrorKind::Backend`] when it replies
    /// with an error.
    pub async fn fleet_stats(&self) -> Result<crate::stats::fleet::FleetStats> {
        crate::stats::fleet::read(self).await
    }
}

static DEFAULT: OnceLock<Cache> = OnceLock::new();

/// Makes `cache` the cache of every cached function without a `cache = ...` option.
///
/// Call it once at start-up, before the first cached call.
///
/// # Errors
///
/// [`ErrorKind::Config`] if the default cache was already set, or already built because a
/// cached function ran first.
pub fn set_default(cache: Cache) -> Result<()> {
    DEFAULT.set(cache).map_err(|_| {
        Error::config(
            "the default cache is already initialized; call set_default before the first cached call",
        )
    })
}

/// The cache used by cached functions without a `cache = ...` option.
///
/// Unless [`set_default`] ran first, it is built on first use from the environment:
/// `REDIS_CLUSTER_URLS` set (comma-separated node URLs, and valid) selects that Redis
/// Cluster; otherwise `REDIS_URL` set (and valid) selects Redis at that URL (a
/// `redis+sentinel://` URL selects the master Redis Sentinel names, see
/// [`CacheBuilder::redis`]); otherwise an in-process memory cache.
/// Building connects nothing, so the first use may happen anywhere; operations need a Tokio
/// runtime, and each runtime that uses the cache (every `#[tokio::test]`, say) gets its own
/// Redis connection.
pub fn default_cache() -> &'static Cache {
    DEFAULT.get_or_init(|| {
        let cluster = std::env::var("REDIS_CLUSTER_URLS")
            .ok()
            .filter(|u| !u.trim().is_empty());
        if let Some(urls) = cluster {
            let urls = urls.split(',').map(str::trim).filter(|u| !u.is_empty());
            match Cache::builder().redis_cluster(urls).build_sync() {
                Ok(cache) => return cache,
                Err(e) => tracing::error!(
                    target: "cache_runtime",
                    "REDIS_CLUSTER_URLS is set but unusable ({e}); trying REDIS_URL"
                ),
            }
        }
        let url = std::env::var("REDIS_URL")
            .ok()
            .filter(|u| !u.trim().is_empty());
        if let Some(url) = url {
            match Cache::builder().redis(url).build_sync() {
                Ok(cache) => return cache,
                Err(e) => tracing::error!(
                    target: "cache_runtime",
                    "REDIS_URL is set but unusable ({e}); the default cache is in memory"
                ),
            }
        }
        Cache::memory()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn build_checks_configuration() {
        for invalid in [
            Cache::builder().redis("nonsense://x"),
            Cache::builder().default_ttl(Duration::ZERO),
            Cache::builder().namespace("a{b}"),
            Cache::builder().memory(0),
        ] {
            assert!(invalid.build().await.unwrap_err().is_config());
        }
        // A Redis that is not there is not a configuration error.
        let c = Cache::builder()
            .redis("redis://127.0.0.1:1")
            .build()
            .await
            .unwrap();
        assert_eq!(c.backend_name(), "redis");
    }

    /// `rediss://` is a configuration error naming the feature without it, a cache with it;
    /// the password is in neither the error nor the `Debug` output.
    #[tokio::test]
    async fn rediss_needs_the_tls_feature() {
        let url = "rediss://app:hunter2@127.0.0.1:1/0";
        let built = Cache::builder().redis(url).build().await;
        #[cfg(not(feature = "tls"))]
        {
            let e = built.unwrap_err();
            assert!(e.is_config());
            assert!(e.to_string().contains("`tls` feature"), "{e}");
            assert!(!e.to_string().contains("hunter2"), "{e}");
        }
        #[cfg(feature = "tls")]
        {
            let cache = built.unwrap();
            assert!(!format!("{cache:?}").contains("hunter2"));
            let e = Cache::builder()
                .redis(url)
                .redis_tls_root_ca("not pem")
                .build()
                .await
                .unwrap_err();
            assert!(
                e.is_config() && e.to_string().contains("redis_tls_root_ca"),
                "{e}"
            );
            assert!(!e.to_string().contains("hunter2"), "{e}");
        }
    }

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact("redis://u:secret@host:6379"),
            "redis://u:***@host:6379"
        );
        assert_eq!(redact("rediss://:secret@host/2"), "rediss://:***@host/2");
        assert_eq!(redact("redis://secret@host"), "redis://***@host");
        // An `@` in the password (not percent-encoded): everything before the last is hidden.
        assert_eq!(redact("redis://u:se@cret@host"), "redis://u:***@host");
        assert_eq!(redact("redis://host:6379"), "redis://host:6379");
        assert_eq!(redact("u:secret@host:26379"), "***@host:26379");
        assert_eq!(redact("secret@host"), "***@host");
        let builder = Cache::builder().redis("redis://app:hunter2@127.0.0.1:1/3");
        let shown = format!("{builder:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("app:***@127.0.0.1:1/3"), "{shown}");
    }

    #[tokio::test]
    async fn manual_api_round_trip_and_garbage_is_a_miss() {
        let c = Cache::builder().namespace("t").build().await.unwrap();
        c.set("k", &vec![1, 2], Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(c.get::<Vec<i32>>("k").await.unwrap(), Some(vec![1, 2]));
        // Wrong type: a miss, not an error.
        assert_eq!(c.get::<String>("k").await.unwrap(), None);
        assert!(
            c.set("k", &1, Duration::ZERO)
                .await
                .unwrap_err()
                .is_config()
        );
        c.invalidate("k").await.unwrap();
        assert_eq!(c.get::<Vec<i32>>("k").await.unwrap(), None);
    }
}
