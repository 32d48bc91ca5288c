//! Regression tests for defects found in acceptance testing of the first release: a cache used
//! from several Tokio runtimes, what a `lock` hit and a manual miss cost in commands, values
//! JSON cannot round-trip, and a cache in a `static`.

use std::sync::LazyLock;
use std::time::Duration;

use cache_runtime::{Cache, cached};
use cache_tests::{RedisServer, raw_connection, redis_url, unique_namespace};

use crate::support::{Calls, User, on_both_backends};

static SHARED: LazyLock<Cache> = LazyLock::new(|| {
    Cache::builder()
        .redis(redis_url())
        .namespace(unique_namespace("runtimes"))
        .operation_timeout(Duration::from_secs(2))
        .build_sync()
        .expect("valid configuration, built without a runtime")
});

static CALLS: Calls = Calls::new();

#[cached(cache = SHARED, key = "user:{id}", ttl = 60, name = "in_static")]
async fn in_static(id: u64) -> User {
    CALLS.hit();
    User::new(id)
}

#[cached(cache = SHARED, key = "locked:{id}", ttl = 60, lock = 5, name = "in_static_locked")]
async fn in_static_locked(id: u64) -> User {
    CALLS.hit();
    User::new(id)
}

fn runtime(multi_thread: bool) -> tokio::runtime::Runtime {
    let mut b = if multi_thread {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    b.worker_threads(2).enable_all().build().unwrap()
}

/// Regression: the Redis connection belonged to the runtime that first used it; in every later
/// runtime the first operations failed ("broken pipe"), the call ran uncached and a backend
/// error was counted. This is every `#[tokio::test]` suite using a `static` or default cache.
#[test]
fn a_static_redis_cache_serves_five_sequential_runtimes() {
    for i in 0..5u64 {
        let rt = runtime(i % 2 == 0);
        rt.block_on(async {
            let before = CALLS.get();
            assert_eq!(in_static(100 + i).await, User::new(100 + i));
            assert_eq!(in_static(100 + i).await, User::new(100 + i));
            assert_eq!(in_static_locked(100 + i).await, User::new(100 + i));
            assert_eq!(in_static_locked(100 + i).await, User::new(100 + i));
            assert_eq!(
                CALLS.get() - before,
                2,
                "runtime {i}: the second calls are hits"
            );
        });
        drop(rt);
    }
    let stats = SHARED.stats();
    for name in ["in_static", "in_static_locked"] {
        let s = stats.function(name).unwrap();
        assert_eq!((s.hits, s.misses), (5, 5), "{name}: {s:?}");
        assert_eq!(s.backend_errors, 0, "{name}: {s:?}");
    }
}

/// Regression: with two runtimes alive, ending the one that made the connection cost the other
/// one misses.
#[test]
fn ending_one_runtime_does_not_disturb_another() {
    let cache = Cache::builder()
        .redis(redis_url())
        .namespace(unique_namespace("two_runtimes"))
        .operation_timeout(Duration::from_secs(2))
        .build_sync()
        .unwrap();
    let first = runtime(true);
    let second = runtime(true);
    let calls = Calls::default();
    first.block_on(async {
        assert_eq!(two_runtimes(&cache, &calls, 1).await, User::new(1));
    });
    second.block_on(async {
        assert_eq!(two_runtimes(&cache, &calls, 1).await, User::new(1));
    });
    drop(first);
    second.block_on(async {
        for _ in 0..10 {
            assert_eq!(two_runtimes(&cache, &calls, 1).await, User::new(1));
        }
    });
    assert_eq!(calls.get(), 1);
    let s = cache.stats().function("two_runtimes").cloned().unwrap();
    assert_eq!(s.backend_errors, 0, "{s:?}");
}

#[cached(cache = cache, key = "user:{id}", ttl = 60, name = "two_runtimes")]
async fn two_runtimes(cache: &Cache, calls: &Calls, id: u64) -> User {
    calls.hit();
    User::new(id)
}

#[cached(cache = cache, key = "user:{id}", ttl = 60, lock = 5, name = "locked_user")]
async fn locked_user(cache: &Cache, calls: &Calls, id: u64) -> User {
    calls.hit();
    User::new(id)
}

/// `calls` of `cmd` in `INFO commandstats`.
async fn command_calls(conn: &mut ::redis::aio::MultiplexedConnection, cmd: &str) -> u64 {
    let info: String = ::redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
        .unwrap();
    let prefix = format!("cmdstat_{cmd}:calls=");
    info.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().unwrap())
}

/// Regression: every hit of a `lock` function ran the lease script (1.41x a plain `GET` +
/// decode); and a manual `get` that missed paid a second round trip for the generation.
/// A hit is one `SET .. NX GET` (the lookup that leaves a marker on a miss), no script.
/// Counted on a private server, where nothing else runs commands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_hit_is_one_command_and_a_manual_miss_is_one_get() {
    let server = RedisServer::start();
    let cache = Cache::builder()
        .redis(server.url())
        .operation_timeout(Duration::from_secs(2))
        .build()
        .await
        .unwrap();
    let mut conn = raw_connection(&server.url()).await;
    let calls = Calls::default();
    assert_eq!(locked_user(&cache, &calls, 1).await, User::new(1)); // the miss: fills
    let _: () = ::redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut conn)
        .await
        .unwrap();
    for _ in 0..10 {
        assert_eq!(locked_user(&cache, &calls, 1).await, User::new(1));
    }
    assert_eq!(calls.get(), 1);
    assert_eq!(
        command_calls(&mut conn, "set").await,
        10,
        "one SET NX GET per hit"
    );
    assert_eq!(command_calls(&mut conn, "get").await, 0, "and nothing else");
    assert_eq!(
        command_calls(&mut conn, "evalsha").await,
        0,
        "no script on a hit"
    );
    assert_eq!(
        command_calls(&mut conn, "eval").await,
        0,
        "no script on a hit"
    );

    let _: () = ::redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(cache.get::<User>("absent").await.unwrap(), None);
    assert_eq!(
        command_calls(&mut conn, "get").await,
        1,
        "a manual miss is one GET"
    );
}

#[cached(cache = cache, key = "ratio:{id}", ttl = 60, name = "ratio")]
async fn ratio(cache: &Cache, calls: &Calls, id: u64) -> Vec<f64> {
    calls.hit();
    vec![id as f64, f64::NAN, f64::INFINITY]
}

// Regression: NaN and infinities are written by JSON as `null`, which never decodes: on Redis
// every call was a miss, a decode error and a rewrite of what cannot be read back.
on_both_backends! {
    async fn values_json_cannot_round_trip_are_not_stored(fx: Fx) {
        let calls = Calls::default();
        for _ in 0..3 {
            let v = ratio(&fx.cache, &calls, 2).await;
            assert_eq!(v[0], 2.0);
            assert!(v[1].is_nan() && v[2].is_infinite());
        }
        assert_eq!(calls.get(), 3, "nothing was cached");
        let s = fx.cache.stats().function("ratio").cloned().unwrap();
        assert_eq!((s.not_stored, s.decode_errors), (3, 0), "{s:?}");
        assert_eq!(fx.raw_get("ratio:2").await, None, "nothing was written");
        assert!(fx.cache.set("nan", &f64::NAN, Duration::from_secs(5)).await.unwrap_err().kind()
            == cache_runtime::ErrorKind::Encode);
    }

    // Regression: a return type that is a type parameter was cached as a plain value, so an
    // `Err` was stored. The macro now rejects a function's own type parameter; an impl's is
    // caught at run time: nothing is cached.
    async fn a_result_through_an_impl_type_parameter_is_never_cached(fx: Fx) {
        let failing = Generic::<Result<u64, String>> {
            cache: fx.cache.clone(),
            calls: Calls::default(),
            make: |id| Err(format!("no user {id}")),
        };
        for _ in 0..3 {
            assert_eq!(failing.load(1).await, Err("no user 1".to_owned()));
        }
        assert_eq!(failing.calls.get(), 3, "the Err was not cached");
        let s = fx.cache.stats().function("generic_impl").cloned().unwrap();
        assert_eq!(s.not_stored, 3, "{s:?}");
        let plain = Generic::<Vec<u64>> {
            cache: fx.cache.clone(),
            calls: Calls::default(),
            make: |id| vec![id],
        };
        assert_eq!(plain.load(2).await, vec![2]);
        assert_eq!(plain.load(2).await, vec![2]);
        assert_eq!(plain.calls.get(), 1, "other types are cached");
    }
}

#[cached(cache = cache, key = "leased:{id}", ttl = 60, lock = 5, name = "leased")]
async fn leased(cache: &Cache, calls: &Calls, id: u64) -> User {
    calls.hit();
    User::new(id)
}

/// Regression: a caller dropped (a request timeout) while its lease request was in flight
/// left the lease held for its whole length: every other process then waited it out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_cancelled_while_asking_for_the_lease_gives_it_back() {
    let server = RedisServer::start();
    let build = || {
        Cache::builder()
            .redis(server.url())
            .operation_timeout(Duration::from_secs(3))
            .build_sync()
            .unwrap()
    };
    let (a, b) = (build(), build());
    let calls = Calls::default();
    // Warm both connections, and load the scripts (a first EVALSHA answers NOSCRIPT).
    a.get::<User>("warm").await.unwrap();
    b.get::<User>("warm").await.unwrap();
    assert_eq!(leased(&a, &calls, 99).await, User::new(99));
    let mut conn = raw_connection(&server.url()).await;
    // Writes (the lease script among them) wait 600 ms; reads do not.
    let _: () = ::redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(600)
        .arg("WRITE")
        .query_async(&mut conn)
        .await
        .unwrap();
    let cancelled = tokio::time::timeout(Duration::from_millis(200), leased(&a, &calls, 1)).await;
    assert!(
        cancelled.is_err(),
        "the caller gave up while the lease request waited"
    );
    // The pause ends; the lease request runs (granting the lease to nobody), then its release.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let started = std::time::Instant::now();
    assert_eq!(leased(&b, &calls, 1).await, User::new(1));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "another process waited {:?} for a lease nobody held (lease: 5 s)",
        started.elapsed()
    );
    let s = b.stats().function("leased").cloned().unwrap();
    assert_eq!((s.lock_waits, s.takeovers), (0, 0), "{s:?}");
}

/// A repository generic over what it loads: the macro cannot see the impl's `R`.
struct Generic<R> {
    cache: Cache,
    calls: Calls,
    make: fn(u64) -> R,
}

impl<R: serde::Serialize + serde::de::DeserializeOwned + Send + Sync> Generic<R> {
    #[cached(cache = self.cache, key = "generic:{id}", name = "generic_impl")]
    async fn load(&self, id: u64) -> R {
        self.calls.hit();
        (self.make)(id)
    }
}
