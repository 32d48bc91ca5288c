//! The per-test fixture: a cache in its own namespace, on memory or on the shared Redis.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use cache_runtime::Cache;
use cache_tests::{
    RawConn, RedisCluster, raw_cluster_connection, raw_connection, redis_url, shared_cluster,
    unique_namespace,
};
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

/// A user record, as a database would return it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct User {
    pub id: u64,
    pub name: String,
}

impl User {
    pub fn new(id: u64) -> User {
        User {
            id,
            name: format!("user {id}"),
        }
    }
}

/// A key argument whose `Display` fails when it holds `None`: a call with it cannot render
/// its key (or tag) and bypasses the cache.
pub struct Name(pub Option<&'static str>);

impl std::fmt::Display for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(name) => f.write_str(name),
            None => Err(std::fmt::Error),
        }
    }
}

/// Counts calls of the functions under test.
#[derive(Default)]
pub struct Calls(AtomicU32);

impl Calls {
    pub const fn new() -> Calls {
        Calls(AtomicU32::new(0))
    }

    pub fn hit(&self) -> u32 {
        self.0.fetch_add(1, Ordering::SeqCst) + 1
    }

    pub fn get(&self) -> u32 {
        self.0.load(Ordering::SeqCst)
    }
}

/// Holds a function inside its body until the test releases it.
#[derive(Default)]
pub struct Gate {
    pub entered: Notify,
    pub release: Notify,
}

impl Gate {
    pub fn new() -> Arc<Gate> {
        Arc::new(Gate::default())
    }

    /// Called by the function: signals that it is inside, waits for the release.
    pub async fn pass(&self) {
        self.entered.notify_one();
        self.release.notified().await;
    }
}

pub enum Backend {
    Memory,
    Redis,
    Cluster,
}

pub struct Fx {
    pub cache: Cache,
    pub backend: Backend,
    conn: Option<RawConn>,
    /// A private cluster, when `REDIS_CLUSTER_URLS` named none: stopped with the fixture.
    _cluster: Option<RedisCluster>,
}

impl Fx {
    pub async fn memory(_name: &str) -> Fx {
        Fx {
            cache: Cache::builder().namespace("t").build().await.unwrap(),
            backend: Backend::Memory,
            conn: None,
            _cluster: None,
        }
    }

    pub async fn redis(name: &str) -> Fx {
        let url = redis_url();
        let cache = Cache::builder()
            .redis(&url)
            .namespace(unique_namespace(name))
            // CI machines are shared and busy: a slow answer must not look like a failure.
            .operation_timeout(Duration::from_secs(2))
            .build()
            .await
            .unwrap();
        Fx {
            cache,
            backend: Backend::Redis,
            conn: Some(RawConn::Single(raw_connection(&url).await)),
            _cluster: None,
        }
    }

    /// A cache on the Redis Cluster of `REDIS_CLUSTER_URLS` (or a private one).
    pub async fn cluster(name: &str) -> Fx {
        let (urls, cluster) = shared_cluster();
        let cache = Cache::builder()
            .redis_cluster(urls.iter().cloned())
            .namespace(unique_namespace(name))
            .operation_timeout(Duration::from_secs(2))
            .build()
            .await
            .unwrap();
        Fx {
            cache,
            backend: Backend::Cluster,
            conn: Some(RawConn::Cluster(raw_cluster_connection(&urls).await)),
            _cluster: cluster,
        }
    }

    /// Whether the cache is on Redis (one server or a cluster).
    pub fn is_redis(&self) -> bool {
        matches!(self.backend, Backend::Redis | Backend::Cluster)
    }

    fn conn(&self) -> RawConn {
        self.conn.clone().expect("a redis fixture")
    }

    /// `PTTL` of `key` (namespace added) in milliseconds; `None` on the memory backend.
    pub async fn pttl(&self, key: &str) -> Option<i64> {
        if !self.is_redis() {
            return None;
        }
        let ms: i64 = self.conn().pttl(self.cache.full_key(key)).await.unwrap();
        Some(ms)
    }

    /// The raw bytes under `key` (namespace added); `None` on the memory backend.
    pub async fn raw_get(&self, key: &str) -> Option<Vec<u8>> {
        if !self.is_redis() {
            return None;
        }
        // A load whose result is not stored removes its pending-load marker in the
        // background: give it a moment (a marker that stays is returned, and fails the test).
        let mut conn = self.conn();
        for _ in 0..50 {
            let v: Option<Vec<u8>> = conn.get(self.cache.full_key(key)).await.unwrap();
            match v {
                Some(marker) if marker.starts_with(b"\0crp:") => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                other => return other,
            }
        }
        conn.get(self.cache.full_key(key)).await.unwrap()
    }

    /// Removes `key` (namespace added) without telling the cache, as Redis's eviction would;
    /// nothing on the memory backend (which has no way around itself).
    pub async fn evict_behind_the_cache(&self, key: &str) {
        if self.is_redis() {
            let _: () = self.conn().del(self.cache.full_key(key)).await.unwrap();
        }
    }

    /// Puts something under `key` that is not a valid cached value of the function's type.
    pub async fn plant_garbage(&self, key: &str) {
        if self.is_redis() {
            let _: () = self
                .conn()
                .set_ex(
                    self.cache.full_key(key),
                    b"\x00\xffnot an envelope".as_slice(),
                    60,
                )
                .await
                .unwrap();
        } else {
            // A valid envelope of the wrong type.
            self.cache
                .set(key, &"not a user", Duration::from_secs(60))
                .await
                .unwrap();
        }
    }
}

/// Defines each test once and runs it on every backend: `memory::<name>`, `redis::<name>`
/// (the shared Redis) and `cluster::<name>` (the Redis Cluster of `REDIS_CLUSTER_URLS`).
macro_rules! on_both_backends {
    ($(async fn $name:ident($fx:ident: Fx) $body:block)*) => {
        $(
            async fn $name($fx: crate::support::Fx) $body
        )*
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name(crate::support::Fx::memory(stringify!($name)).await).await
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name(crate::support::Fx::redis(stringify!($name)).await).await
                }
            )*
        }
        mod cluster {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name(crate::support::Fx::cluster(stringify!($name)).await).await
                }
            )*
        }
    };
}
pub(crate) use on_both_backends;
