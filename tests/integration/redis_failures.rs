//! Fail-open on Redis: down at start-up, killed and restarted, paused (slow), holding the
//! wrong type. Each test that breaks Redis runs its own `redis-server` on a free port.

use std::time::{Duration, Instant};

use cache_runtime::{Cache, cached, default_cache};
use cache_tests::{RedisServer, free_port, raw_connection, redis_url, unique_namespace};
use redis::AsyncCommands;

use crate::support::{Calls, User};

#[cached(cache = cache, key = "user:{id}", ttl = 60, name = "user")]
async fn user(cache: &Cache, calls: &Calls, id: u64) -> Result<User, String> {
    calls.hit();
    Ok(User::new(id))
}

async fn redis_cache(url: &str, name: &str) -> Cache {
    Cache::builder()
        .redis(url)
        .namespace(unique_namespace(name))
        .operation_timeout(Duration::from_millis(300))
        .connect_timeout(Duration::from_millis(300))
        .circuit_breaker(2, Duration::from_millis(200))
        .build()
        .await
        .expect("building never fails because redis is down")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_at_startup_runs_every_call() {
    let url = format!("redis://127.0.0.1:{}", free_port());
    let cache = redis_cache(&url, "down_at_startup").await;
    let calls = Calls::default();
    for i in 0..50 {
        assert_eq!(user(&cache, &calls, 1).await, Ok(User::new(1)), "call {i}");
    }
    assert_eq!(
        calls.get(),
        50,
        "nothing could be cached, every call ran the function"
    );
    let s = cache.stats().function("user").cloned().unwrap();
    assert!(s.backend_errors >= 50, "failures are counted: {s:?}");
    assert!(
        cache
            .get::<User>("user:1")
            .await
            .unwrap_err()
            .is_unavailable()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_keeps_answering_then_resumes_caching() {
    let mut server = RedisServer::start();
    let cache = redis_cache(&server.url(), "killed").await;
    let calls = Calls::default();

    assert_eq!(user(&cache, &calls, 1).await, Ok(User::new(1)));
    assert_eq!(user(&cache, &calls, 1).await, Ok(User::new(1)));
    assert_eq!(calls.get(), 1, "cached while redis is up");

    server.kill();
    for i in 0..30 {
        assert_eq!(
            user(&cache, &calls, 1).await,
            Ok(User::new(1)),
            "call {i} while down"
        );
    }
    assert_eq!(
        calls.get(),
        31,
        "every call ran the function while redis was down"
    );

    server.restart();
    // The restarted server is empty. Within a few breaker cooldowns a probe reconnects, a
    // fill lands, and the next call is a hit again.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let before = calls.get();
        assert_eq!(user(&cache, &calls, 1).await, Ok(User::new(1)));
        assert_eq!(user(&cache, &calls, 1).await, Ok(User::new(1)));
        if calls.get() - before <= 1 {
            break; // the second call was a hit
        }
        assert!(
            Instant::now() < deadline,
            "caching did not resume after redis came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut conn = raw_connection(&server.url()).await;
    let ttl: i64 = conn.pttl(cache.full_key("user:1")).await.unwrap();
    assert!(ttl > 0, "the resumed fill has a TTL ({ttl})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_paused_calls_time_out_into_the_function() {
    let server = RedisServer::start();
    let cache = redis_cache(&server.url(), "paused").await;
    let calls = Calls::default();
    assert_eq!(user(&cache, &calls, 1).await, Ok(User::new(1)));

    // CLIENT PAUSE stops the server answering other clients: a slow, not a dead, Redis.
    let mut admin = raw_connection(&server.url()).await;
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(2000)
        .query_async(&mut admin)
        .await
        .unwrap();
    for i in 0..5 {
        assert_eq!(
            user(&cache, &calls, 1).await,
            Ok(User::new(1)),
            "call {i} while paused"
        );
    }
    assert!(
        calls.get() >= 2,
        "calls ran the function instead of waiting for redis"
    );
    let s = cache.stats().function("user").cloned().unwrap();
    assert!(s.backend_errors >= 1, "timeouts are counted: {s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_type_under_the_key_is_a_miss_and_is_replaced() {
    let url = redis_url();
    let cache = redis_cache(&url, "wrong_type").await;
    let mut conn = raw_connection(&url).await;
    let key = cache.full_key("user:3");
    let _: () = conn.hset(&key, "field", "value").await.unwrap();
    let _: () = conn.expire(&key, 60).await.unwrap();

    let calls = Calls::default();
    assert_eq!(user(&cache, &calls, 3).await, Ok(User::new(3)));
    assert_eq!(user(&cache, &calls, 3).await, Ok(User::new(3)));
    assert_eq!(calls.get(), 1, "the hash was replaced by the fill");
    let kind: String = redis::cmd("TYPE")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(kind, "string");
    // (A read is an `MGET`, which answers nil for a key of another type: a plain miss.)
    assert_eq!(cache.stats().function("user").unwrap().misses, 1);
}

#[cached(key = "{ns}:default", ttl = 30)]
async fn on_default_cache(calls: &Calls, ns: &str) -> String {
    calls.hit();
    format!("value for {ns}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_cache_follows_redis_url() {
    let cache = default_cache();
    let set = |name: &str| std::env::var(name).is_ok_and(|u| !u.trim().is_empty());
    let expected = if set("REDIS_CLUSTER_URLS") {
        "redis-cluster"
    } else if set("REDIS_URL") {
        "redis"
    } else {
        "memory"
    };
    assert_eq!(cache.backend_name(), expected);
    let ns = unique_namespace("default");
    let calls = Calls::default();
    assert_eq!(
        on_default_cache(&calls, &ns).await,
        format!("value for {ns}")
    );
    assert_eq!(
        on_default_cache(&calls, &ns).await,
        format!("value for {ns}")
    );
    assert_eq!(calls.get(), 1);
    // Tidy up the shared Redis (the key has a TTL anyway).
    cache
        .invalidate(&format!("{}:default", cache_runtime::escape_key_part(&ns)))
        .await
        .unwrap();
}
