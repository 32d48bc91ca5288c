//! Regressions found in review of the write side (issue 8): tag invalidations racing in-process
//! retries, `lock` after a tag invalidation (one load, no stall behind a failed load), a Redis
//! that refuses writes, `before` counted once, an empty tag list.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cache_runtime::{Cache, cache_evict, cache_put, cached};
use cache_tests::{RedisServer, raw_connection, redis_url, unique_namespace};

use crate::support::{Calls, Gate};

#[cached(cache = cache, key = "u:{id}", ttl = 60, tags = ["org:{org}"])]
async fn p_get(
    cache: &Cache,
    db: &std::sync::Mutex<String>,
    calls: &Calls,
    org: u64,
    id: u64,
) -> Result<String, String> {
    calls.hit();
    Ok(db.lock().unwrap().clone())
}

#[cached(cache = cache, key = "u:{id}", ttl = 60, tags = ["org:{org}"])]
async fn p_slow(
    cache: &Cache,
    db: &std::sync::Mutex<String>,
    calls: &Calls,
    gate: &Gate,
    org: u64,
    id: u64,
) -> Result<String, String> {
    calls.hit();
    let v = db.lock().unwrap().clone();
    gate.pass().await;
    Ok(v)
}

/// Memory: a caller that joined a flight before a tag invalidation, retries after it with
/// the versions it read before, leads, and serves (to a follower that started after the
/// invalidation) the entry recorded under the old version.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_a_retry_after_a_tag_invalidation_does_not_serve_the_old_value() {
    let mut stale = 0;
    for _ in 0..20 {
        let cache = Cache::memory();
        let db = Arc::new(std::sync::Mutex::new("old".to_owned()));
        let calls = Arc::new(Calls::default());
        let gate = Gate::new();
        let l = {
            let (c, d, k, g) = (cache.clone(), db.clone(), calls.clone(), gate.clone());
            tokio::spawn(async move { p_slow(&c, &d, &k, &g, 7, 1).await })
        };
        gate.entered.notified().await;
        // C: starts before the invalidation, follows L.
        let c_task = {
            let (c, d, k) = (cache.clone(), db.clone(), calls.clone());
            tokio::spawn(async move { p_get(&c, &d, &k, 7, 1).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        *db.lock().unwrap() = "new".to_owned();
        cache.invalidate_tag("org:7").await.unwrap();
        // F: starts after the invalidation returned.
        let f_task = {
            let (c, d, k) = (cache.clone(), db.clone(), calls.clone());
            tokio::spawn(async move { p_get(&c, &d, &k, 7, 1).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        gate.release.notify_one();
        l.await.unwrap().unwrap();
        let _c = c_task.await.unwrap().unwrap();
        let f = f_task.await.unwrap().unwrap();
        if f == "old" {
            stale += 1;
        }
    }
    assert_eq!(
        stale, 0,
        "F (started after invalidate_tag) got the old value {stale}/20 times"
    );
}

#[cached(cache = cache, key = "score:{id}", ttl = 60)]
async fn read_score(cache: &Cache, id: u64) -> u64 {
    let _ = id;
    0
}

#[cache_evict(cache = cache, keys = ["u:{id}"], before)]
async fn evict_before(cache: &Cache, id: u64) -> Result<(), String> {
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn before_counts() {
    let cache = Cache::memory();
    evict_before(&cache, 1).await.unwrap();
    let s = cache.stats();
    let f = s
        .functions()
        .iter()
        .find(|f| f.name.ends_with("evict_before"))
        .unwrap()
        .clone();
    assert_eq!(
        f.evictions, 1,
        "docs: counted once per call, `before` included"
    );
}

// Redis: lock + tag invalidation + failing load: the unguarded marker stalls other processes.
#[cached(cache = cache, key = "lk:{id}", ttl = 60, tags = ["g"], lock = 2)]
async fn locked(cache: &Cache, calls: &Calls, fail: bool, id: u64) -> Result<u64, String> {
    calls.hit();
    if fail { Err("db down".into()) } else { Ok(id) }
}

async fn redis_cache(ns: &str) -> Cache {
    Cache::builder()
        .redis(redis_url())
        .namespace(ns)
        .operation_timeout(Duration::from_secs(2))
        .build()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_after_tag_invalidation_a_failed_load_does_not_stall_another_process() {
    let ns = unique_namespace("stall");
    let a = redis_cache(&ns).await;
    let b = redis_cache(&ns).await;
    let calls = Calls::default();
    locked(&a, &calls, false, 1).await.unwrap();
    a.invalidate_tag("g").await.unwrap();
    // A's load (over the tag-stale entry) fails.
    assert!(locked(&a, &calls, true, 1).await.is_err());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t = Instant::now();
    locked(&b, &calls, false, 1).await.unwrap();
    let el = t.elapsed();
    assert!(
        el < Duration::from_millis(500),
        "another process waited {el:?} for a dead marker"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_after_tag_invalidation_one_process_loads() {
    let ns = unique_namespace("stamp");
    let caches: Vec<Cache> = futures_join(&ns, 8).await;
    let calls = Arc::new(Calls::default());
    locked(&caches[0], &calls, false, 1).await.unwrap();
    caches[0].invalidate_tag("g").await.unwrap();
    let before = calls.get();
    let mut hs = Vec::new();
    for c in caches {
        let calls = calls.clone();
        hs.push(tokio::spawn(
            async move { slow_locked(&c, &calls, 1).await },
        ));
    }
    for h in hs {
        h.await.unwrap().unwrap();
    }
    assert_eq!(
        calls.get() - before,
        1,
        "loads after invalidate_tag with lock across 8 'processes'"
    );
}

#[cached(cache = cache, key = "lk:{id}", ttl = 60, tags = ["g"], lock = 2)]
async fn slow_locked(cache: &Cache, calls: &Calls, id: u64) -> Result<u64, String> {
    calls.hit();
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(id)
}

async fn futures_join(ns: &str, n: usize) -> Vec<Cache> {
    let mut v = Vec::new();
    for _ in 0..n {
        v.push(redis_cache(ns).await);
    }
    v
}

#[cached(cache = cache, key = "oom:{id}", ttl = 600)]
async fn oom_get(cache: &Cache, calls: &Calls, id: u64) -> u64 {
    calls.hit();
    id
}

/// noeviction at maxmemory: hits are `SET NX GET` (a denyoom write).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn noeviction_full_redis_still_serves_hits() {
    let server =
        RedisServer::start_with(&["--maxmemory", "2mb", "--maxmemory-policy", "noeviction"]);
    let cache = Cache::builder()
        .redis(server.url())
        .namespace("oom")
        .operation_timeout(Duration::from_secs(2))
        .build()
        .await
        .unwrap();
    let calls = Calls::default();
    for id in 0..10 {
        oom_get(&cache, &calls, id).await;
    }
    assert_eq!(calls.get(), 10);
    let mut conn = raw_connection(&server.url()).await;
    let ballast = "x".repeat(10_000);
    for i in 0..1000 {
        let r: ::redis::RedisResult<()> = ::redis::cmd("SET")
            .arg(format!("b:{i}"))
            .arg(&ballast)
            .query_async(&mut conn)
            .await;
        if r.is_err() {
            break;
        }
    }
    let _: () = ::redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg("1mb")
        .query_async(&mut conn)
        .await
        .unwrap();
    let refused: ::redis::RedisResult<Option<Vec<u8>>> = ::redis::cmd("SET")
        .arg("oom:oom:1")
        .arg("m")
        .arg("NX")
        .arg("GET")
        .query_async(&mut conn)
        .await;
    assert!(
        refused.as_ref().is_err_and(|e| e.code() == Some("OOM")),
        "the server refuses writes: {refused:?}"
    );
    for id in 0..10 {
        oom_get(&cache, &calls, id).await;
    }
    assert_eq!(
        calls.get(),
        10,
        "entries that are in Redis were not served: {}",
        cache.stats()
    );
    // The refusal is remembered: the hits that follow are one plain GET each, not a refused
    // SET and a GET.
    let _: () = ::redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut conn)
        .await
        .unwrap();
    for id in 0..10 {
        oom_get(&cache, &calls, id).await;
    }
    let info: String = ::redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .unwrap();
    let calls_of = |cmd: &str| -> u64 {
        info.lines()
            .find_map(|l| l.strip_prefix(&format!("cmdstat_{cmd}:calls=")))
            .and_then(|rest| rest.split(',').next())
            .map_or(0, |n| n.parse().unwrap())
    };
    assert!(calls_of("set") <= 1, "{info}");
    assert!(calls_of("get") >= 10, "{info}");
    // Writes accepted again: within the back-off, lookups try SET again and fills resume.
    let _: () = ::redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg("0")
        .query_async(&mut conn)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    oom_get(&cache, &calls, 100).await;
    oom_get(&cache, &calls, 100).await;
    oom_get(&cache, &calls, 100).await;
    assert_eq!(
        calls.get(),
        11,
        "cached again once the server accepts writes"
    );
}

#[cache_put(cache = cache, key = "score:{id}", ttl = 60, tags = [])]
async fn put_empty_tags(cache: &Cache, id: u64) -> u64 {
    let _ = id;
    7
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_with_empty_tags_on_redis() {
    let c = redis_cache(&unique_namespace("emptytags")).await;
    put_empty_tags(&c, 1).await;
    assert_eq!(read_score(&c, 1).await, 7, "{}", c.stats());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_lock_after_tag_invalidation_one_caller_loads() {
    let cache = Cache::memory();
    let calls = Arc::new(Calls::default());
    slow_locked(&cache, &calls, 1).await.unwrap();
    cache.invalidate_tag("g").await.unwrap();
    let before = calls.get();
    let mut hs = Vec::new();
    for _ in 0..20 {
        let (c, calls) = (cache.clone(), calls.clone());
        hs.push(tokio::spawn(
            async move { slow_locked(&c, &calls, 1).await },
        ));
    }
    for h in hs {
        h.await.unwrap().unwrap();
    }
    assert_eq!(
        calls.get() - before,
        1,
        "memory + lock: loads after invalidate_tag by 20 concurrent callers"
    );
}

#[cached(cache = cache, key = "row:{id}", ttl = 60)]
async fn read_row(cache: &Cache, calls: &Calls, id: u64) -> u64 {
    calls.hit();
    id
}

#[cache_put(cache = cache, key = "row:{id}", ttl = 60)]
async fn put_row_slowly(cache: &Cache, gate: &Gate, id: u64) -> u64 {
    // The database write has happened; the call is dropped before it returns.
    gate.pass().await;
    id + 1
}

#[cache_evict(cache = cache, keys = ["row:{id}"])]
async fn evict_row_slowly(cache: &Cache, gate: &Gate, id: u64) {
    gate.pass().await;
}

/// A put or evict dropped after its function started (a timeout, a client that went away)
/// may have written the database: the key is invalidated anyway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_or_evict_dropped_mid_call_invalidates_its_key() {
    for cache in [
        Cache::memory(),
        redis_cache(&unique_namespace("dropped")).await,
    ] {
        let calls = Arc::new(Calls::default());
        read_row(&cache, &calls, 1).await;
        read_row(&cache, &calls, 2).await;
        assert_eq!(calls.get(), 2);
        let gate = Gate::new();
        let put = {
            let (c, g) = (cache.clone(), gate.clone());
            tokio::spawn(async move { put_row_slowly(&c, &g, 1).await })
        };
        gate.entered.notified().await;
        put.abort();
        assert!(put.await.unwrap_err().is_cancelled());
        let gate = Gate::new();
        let evict = {
            let (c, g) = (cache.clone(), gate.clone());
            tokio::spawn(async move { evict_row_slowly(&c, &g, 2).await })
        };
        gate.entered.notified().await;
        evict.abort();
        assert!(evict.await.unwrap_err().is_cancelled());
        tokio::time::sleep(Duration::from_millis(200)).await;
        read_row(&cache, &calls, 1).await;
        read_row(&cache, &calls, 2).await;
        assert_eq!(
            calls.get(),
            4,
            "both keys reloaded on {}",
            cache.backend_name()
        );
        // A future dropped before it ran evicts nothing.
        drop(evict_row_slowly(&cache, &Gate::default(), 1));
        tokio::time::sleep(Duration::from_millis(100)).await;
        read_row(&cache, &calls, 1).await;
        assert_eq!(calls.get(), 4, "not evicted on {}", cache.backend_name());
    }
}

/// A function that mostly hits reads with a plain `GET` first (its marker only on a miss): a
/// miss there still guards its fill, so a write during the load wins.
#[cached(cache = cache, key = "hot:{id}", ttl = 60, name = "hot")]
async fn hot(
    cache: &Cache,
    db: &std::sync::Mutex<String>,
    calls: &Calls,
    gate: Option<&Gate>,
    id: u64,
) -> Result<String, String> {
    calls.hit();
    let v = db.lock().unwrap().clone();
    if let Some(gate) = gate {
        gate.pass().await;
    }
    Ok(v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_mostly_hitting_function_still_guards_its_fills() {
    let cache = Cache::builder()
        .redis(redis_url())
        .namespace(unique_namespace("mostly_hits"))
        .operation_timeout(Duration::from_secs(2))
        .build()
        .await
        .unwrap();
    let db = Arc::new(std::sync::Mutex::new("old".to_owned()));
    let calls = Arc::new(Calls::new());
    for _ in 0..40 {
        assert_eq!(hot(&cache, &db, &calls, None, 1).await.unwrap(), "old");
    }
    assert_eq!(calls.get(), 1);
    let f = cache.stats().function("hot").unwrap().clone();
    assert_eq!((f.hits, f.misses), (39, 1));
    cache.invalidate("hot:1").await.unwrap();
    // A miss on the `GET` path, held in its load; a write meanwhile.
    let gate = Gate::new();
    let load = {
        let (cache, db, calls, gate) = (cache.clone(), db.clone(), calls.clone(), gate.clone());
        tokio::spawn(async move { hot(&cache, &db, &calls, Some(&gate), 1).await })
    };
    gate.entered.notified().await;
    *db.lock().unwrap() = "new".to_owned();
    cache
        .set("hot:1", &"new", Duration::from_secs(60))
        .await
        .unwrap();
    gate.release.notify_one();
    assert_eq!(
        load.await.unwrap().unwrap(),
        "old",
        "the caller gets what it loaded"
    );
    assert_eq!(
        hot(&cache, &db, &calls, None, 1).await.unwrap(),
        "new",
        "the old load was not stored over the write"
    );
    assert_eq!(calls.get(), 2);
    assert_eq!(cache.stats().function("hot").unwrap().stale_fills, 1);
}
