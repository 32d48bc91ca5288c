//! Redis Sentinel: the master found through the sentinels (`redis+sentinel://` and
//! `redis_sentinel`), and followed through failovers (`SENTINEL FAILOVER`, and the master
//! killed with SIGKILL) while tasks call a cached function. Each test runs its own private
//! setup (`RedisSentinel`: master, replica, 3 sentinels); nothing touches the shared Redis.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cache_runtime::{Cache, cached};
use cache_tests::{RedisSentinel, free_port, raw_connection, unique_namespace};
use redis::AsyncCommands;

use crate::support::Calls;

/// What the function computes: a caller checks every result against it.
fn expected(n: u64) -> u64 {
    n * n + 7
}

#[cached(cache = cache, key = "square:{n}", ttl = 60, lock, name = "square")]
async fn square(cache: &Cache, calls: &AtomicU64, n: u64) -> u64 {
    calls.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(2)).await;
    expected(n)
}

#[cached(cache = cache, key = "local:{n}", ttl = 60, local)]
async fn local_square(cache: &Cache, calls: &Calls, n: u64) -> u64 {
    calls.hit();
    expected(n)
}

fn builder(url: &str, name: &str) -> cache_runtime::CacheBuilder {
    Cache::builder()
        .redis(url)
        .namespace(unique_namespace(name))
        .operation_timeout(Duration::from_millis(250))
        .connect_timeout(Duration::from_millis(500))
        .circuit_breaker(3, Duration::from_millis(500))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_hit_miss_lock_and_ttl() {
    let setup = RedisSentinel::start();
    let cache = builder(&setup.url(), "sentinel_basic")
        .build()
        .await
        .unwrap();
    assert_eq!(cache.backend_name(), "redis-sentinel");
    let calls = AtomicU64::new(0);

    // Miss, then hit: the first call waited for the first resolution.
    assert_eq!(square(&cache, &calls, 3).await, expected(3));
    assert_eq!(square(&cache, &calls, 3).await, expected(3));
    assert_eq!(calls.load(Ordering::SeqCst), 1, "the second call is a hit");

    // `lock`: 32 concurrent callers of a new key, one execution.
    let cache = Arc::new(cache);
    let calls = Arc::new(AtomicU64::new(0));
    let callers: Vec<_> = (0..32)
        .map(|_| {
            let (cache, calls) = (cache.clone(), calls.clone());
            tokio::spawn(async move { square(&cache, &calls, 4).await })
        })
        .collect();
    for c in callers {
        assert_eq!(c.await.unwrap(), expected(4));
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    // Stored on the master, with a TTL; the manual API works.
    let master = setup.master_port().unwrap();
    let mut raw = raw_connection(&setup.server(master).url()).await;
    let key = cache.full_key("square:3");
    let ttl: i64 = raw.pttl(&key).await.unwrap();
    assert!(ttl > 0 && ttl <= 60_000, "pttl {ttl}");
    cache
        .set("manual", &"value", Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(
        cache.get::<String>("manual").await.unwrap().as_deref(),
        Some("value")
    );
    let ttl: i64 = raw.pttl(cache.full_key("manual")).await.unwrap();
    assert!(ttl > 0 && ttl <= 30_000, "pttl {ttl}");

    // `local` starts the bus: its pub/sub connection is on the master too.
    let local_calls = Calls::default();
    assert_eq!(local_square(&cache, &local_calls, 5).await, expected(5));
    wait_for_bus_on(&setup, master).await;

    // The builder form reaches the same master and entries.
    let other = Cache::builder()
        .redis_sentinel(setup.sentinel_addrs(), RedisSentinel::SERVICE)
        .namespace(cache.namespace())
        .build()
        .await
        .unwrap();
    assert_eq!(other.backend_name(), "redis-sentinel");
    assert_eq!(
        other.get::<String>("manual").await.unwrap().as_deref(),
        Some("value")
    );
}

/// Waits (at most 5 s) until the server on `port` has a client named `cr-bus:..`.
async fn wait_for_bus_on(setup: &RedisSentinel, port: u16) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let clients = setup.server(port).query_text(&["CLIENT", "LIST"]);
        if clients.contains("name=cr-bus:") {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no bus connection on port {port}: {clients}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_down_at_startup_builds_and_runs_every_call() {
    // Nothing listens there: building succeeds, calls run uncached, none fails.
    let url = format!(
        "redis+sentinel://127.0.0.1:{},127.0.0.1:{}/mymaster",
        free_port(),
        free_port()
    );
    let cache = builder(&url, "sentinel_down").build().await.unwrap();
    let calls = AtomicU64::new(0);
    for _ in 0..20 {
        assert_eq!(square(&cache, &calls, 1).await, expected(1));
    }
    assert_eq!(calls.load(Ordering::SeqCst), 20);
    assert!(
        cache
            .get::<u64>("square:1")
            .await
            .unwrap_err()
            .is_unavailable()
    );
}

#[tokio::test]
async fn sentinel_configuration_errors_are_config_errors_without_the_password() {
    for url in [
        "redis+sentinel://u:topsecret@h1:26379",
        "redis+sentinel://u:topsecret@h1:x/svc",
        "redis+sentinel://u:topsecret@h1/svc/db",
        "rediss+sentinel://u:topsecret@h1/svc",
    ] {
        let err = Cache::builder().redis(url).build().await.unwrap_err();
        assert!(err.is_config(), "{url}: {err}");
        assert!(!err.to_string().contains("topsecret"), "{url}: {err}");
    }
    let err = Cache::builder()
        .redis_sentinel(Vec::<String>::new(), "svc")
        .build()
        .await
        .unwrap_err();
    assert!(err.is_config(), "{err}");
    let err = Cache::builder()
        .redis_sentinel(["redis://:topsecret@h1:1/3"], "svc")
        .build()
        .await
        .unwrap_err();
    assert!(
        err.is_config() && !err.to_string().contains("topsecret"),
        "{err}"
    );
}

enum Failover {
    /// `SENTINEL FAILOVER`: the old master is demoted to a replica (`READONLY`).
    Command,
    /// SIGKILL of the master: the sentinels notice after `down-after-milliseconds`.
    Kill,
}

/// 32 tasks call `square` over 8 keys throughout a failover: every call returns the right
/// value, and caching resumes on the new master within a bound after the sentinels name it.
async fn failover_under_load(kind: Failover, name: &str) {
    let mut setup = RedisSentinel::start();
    let cache = Arc::new(builder(&setup.url(), name).build().await.unwrap());
    let calls = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let local_calls = Calls::default();
    assert_eq!(local_square(&cache, &local_calls, 1).await, expected(1));
    let tasks: Vec<_> = (0..32u64)
        .map(|t| {
            let (cache, calls, stop) = (cache.clone(), calls.clone(), stop.clone());
            tokio::spawn(async move {
                let mut i = t;
                let mut done = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let n = i % 8;
                    assert_eq!(square(&cache, &calls, n).await, expected(n), "key {n}");
                    i += 1;
                    done += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                done
            })
        })
        .collect();

    // Caching works before the failover.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = calls.load(Ordering::SeqCst);
    assert!(
        before <= 8,
        "{before} executions for 8 keys before the failover"
    );
    let old = setup.master_port().unwrap();
    wait_for_bus_on(&setup, old).await;

    let started = Instant::now();
    match kind {
        Failover::Command => setup.failover(),
        Failover::Kill => {
            setup.kill_master();
        }
    }
    let new = setup.wait_for_new_master(old, Duration::from_secs(30));
    let named = Instant::now();
    eprintln!("{name}: new master {new} named after {:?}", named - started);

    // Caching resumes: a 500 ms window without executions (8 keys, 32 tasks calling every
    // ~5 ms: uncached, a window has hundreds), within the bound: the breaker's cooldown
    // (one re-resolution per cooldown) twice, plus the operation timeout and slack.
    let bound = Duration::from_millis(2 * 500 + 250 + 1500);
    let resumed = loop {
        let at = Instant::now();
        let count = calls.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(500)).await;
        if calls.load(Ordering::SeqCst) == count {
            break at;
        }
        assert!(
            at < named + bound,
            "{name}: caching did not resume within {bound:?} of the new master ({} executions)",
            calls.load(Ordering::SeqCst)
        );
    };
    eprintln!(
        "{name}: caching resumed {:?} after the new master was named; {} executions in all",
        resumed.saturating_duration_since(named),
        calls.load(Ordering::SeqCst)
    );
    // The bus followed: its pub/sub connection is on the new master.
    wait_for_bus_on(&setup, new).await;
    // And entries are written there (with a TTL).
    cache
        .set("after", &1u64, Duration::from_secs(30))
        .await
        .unwrap();
    let mut raw = raw_connection(&setup.server(new).url()).await;
    let ttl: i64 = raw.pttl(cache.full_key("after")).await.unwrap();
    assert!(ttl > 0, "pttl {ttl}");

    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for t in tasks {
        total += t.await.expect("every call returned the right value");
    }
    assert!(total > 1000, "{total} calls");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failover_command_under_load() {
    failover_under_load(Failover::Command, "sentinel_failover_command").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_master_killed_under_load() {
    failover_under_load(Failover::Kill, "sentinel_master_killed").await;
}

#[cached(key = "sentinel_default:{n}", ttl = 60)]
async fn default_square(calls: &AtomicU64, n: u64) -> u64 {
    calls.fetch_add(1, Ordering::SeqCst);
    expected(n)
}

/// Runs in a child process (see `sentinel_url_in_redis_url_selects_the_default_cache`) with
/// `REDIS_URL` set to a `redis+sentinel://` URL; a no-op otherwise.
#[tokio::test]
async fn sentinel_default_cache_child() {
    if std::env::var_os("CACHE_TEST_SENTINEL_CHILD").is_none() {
        return;
    }
    assert_eq!(
        cache_runtime::default_cache().backend_name(),
        "redis-sentinel"
    );
    let calls = AtomicU64::new(0);
    assert_eq!(default_square(&calls, 6).await, expected(6));
    assert_eq!(default_square(&calls, 6).await, expected(6));
    assert_eq!(calls.load(Ordering::SeqCst), 1, "the second call is a hit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_url_in_redis_url_selects_the_default_cache() {
    let setup = RedisSentinel::start();
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "sentinel::sentinel_default_cache_child",
            "--exact",
            "--nocapture",
        ])
        .env("CACHE_TEST_SENTINEL_CHILD", "1")
        .env("REDIS_URL", setup.url())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    // The child ran its test (not zero tests) and wrote to the master, with a TTL.
    assert!(String::from_utf8_lossy(&output.stdout).contains("1 passed"));
    let master = setup.master_port().unwrap();
    let mut raw = raw_connection(&setup.server(master).url()).await;
    let ttl: i64 = raw.pttl("sentinel_default:6").await.unwrap();
    assert!(ttl > 0 && ttl <= 60_000, "pttl {ttl}");
}
