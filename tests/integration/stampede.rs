//! `lock`: one load per key across processes, leases, woken waiters, stale fills rejected.
//!
//! Several `Cache` handles on one namespace stand for several processes (each has its own
//! in-process coalescing and its own subscription); the tests marked "processes" run real OS
//! processes: this test binary, re-executed as a worker (`worker` below).

use std::process::Child;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cache_runtime::{Cache, cached};
use cache_tests::{RedisServer, raw_connection, redis_url, spawn_test_worker, unique_namespace};
use redis::AsyncCommands;
use tokio::task::JoinSet;

use crate::support::{Calls, Gate, User};

/// Generous: these tests look for hangs and for waiting out leases, not for speed.
const NO_HANG: Duration = Duration::from_secs(20);

/// Starts a call of a function under test as a task, with its own handles.
fn start<T, Fut>(
    cache: &Cache,
    calls: &Arc<Calls>,
    gate: &Arc<Gate>,
    call: impl FnOnce(Cache, Arc<Calls>, Arc<Gate>) -> Fut,
) -> tokio::task::JoinHandle<T>
where
    Fut: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    tokio::spawn(call(cache.clone(), calls.clone(), gate.clone()))
}

async fn cache_on(url: &str, namespace: &str) -> Cache {
    Cache::builder()
        .redis(url)
        .namespace(namespace)
        .operation_timeout(Duration::from_secs(2))
        .build()
        .await
        .unwrap()
}

#[cached(cache = cache, key = "user:{id}", ttl = 60, lock, name = "locked")]
async fn locked(cache: &Cache, calls: &Calls, id: u64) -> Result<User, String> {
    calls.hit();
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(User::new(id))
}

/// The first call is held at the gate, then fails; later calls succeed at once.
#[cached(cache = cache, key = "gated:{id}", ttl = 60, lock = 60, name = "gated_lock")]
async fn gated(cache: &Cache, calls: &Calls, gate: &Gate, id: u64) -> Result<User, String> {
    if calls.hit() == 1 {
        gate.pass().await;
        return Err("the first load fails".to_owned());
    }
    Ok(User::new(id))
}

/// The first call is held at the gate, then succeeds.
#[cached(cache = cache, key = "held:{id}", ttl = 60, lock = 60, name = "held")]
async fn held(cache: &Cache, calls: &Calls, gate: &Gate, id: u64) -> Result<User, String> {
    if calls.hit() == 1 {
        gate.pass().await;
    }
    Ok(User::new(id))
}

/// Without `lock`: the stale-set race across processes.
#[cached(cache = cache, key = "plain:{id}", ttl = 60, name = "plain")]
async fn plain(cache: &Cache, calls: &Calls, gate: &Gate, id: u64) -> u64 {
    if calls.hit() == 1 {
        gate.pass().await;
        return id; // read before the update
    }
    id + 100 // read after it
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_load_across_caches() {
    let url = redis_url();
    let ns = unique_namespace("lock_caches");
    let calls = Arc::new(Calls::default());
    let mut set = JoinSet::new();
    for _ in 0..3 {
        let cache = cache_on(&url, &ns).await;
        for _ in 0..100 {
            let (cache, calls) = (cache.clone(), calls.clone());
            set.spawn(async move { locked(&cache, &calls, 1).await });
        }
    }
    while let Some(r) = tokio::time::timeout(NO_HANG, set.join_next())
        .await
        .expect("no hang")
    {
        assert_eq!(r.unwrap(), Ok(User::new(1)));
    }
    assert_eq!(calls.get(), 1, "300 callers on 3 caches, one load");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stale_fill_from_another_process_is_rejected() {
    let url = redis_url();
    let ns = unique_namespace("stale_set");
    let (reader, writer) = (cache_on(&url, &ns).await, cache_on(&url, &ns).await);
    let calls = Arc::new(Calls::default());
    let gate = Gate::new();
    let load = start(&reader, &calls, &gate, |c, n, g| async move {
        plain(&c, &n, &g, 1).await
    });
    // The slow reader has missed and read the database; now the row changes and the writer,
    // another process, invalidates.
    gate.entered.notified().await;
    writer.invalidate("plain:1").await.unwrap();
    gate.release.notify_one();
    assert_eq!(
        load.await.unwrap(),
        1,
        "the slow reader's caller gets what it read"
    );
    assert_eq!(reader.stats().function("plain").unwrap().stale_fills, 1);
    assert_eq!(
        writer.get::<u64>("plain:1").await.unwrap(),
        None,
        "the stale value was not stored"
    );
    assert_eq!(
        plain(&writer, &calls, &gate, 1).await,
        101,
        "the next read loads fresh"
    );
    assert_eq!(reader.get::<u64>("plain:1").await.unwrap(), Some(101));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_holder_releases_its_lease_at_once() {
    let url = redis_url();
    let ns = unique_namespace("holder_fails");
    let (a, b) = (cache_on(&url, &ns).await, cache_on(&url, &ns).await);
    let calls = Arc::new(Calls::default());
    let gate = Gate::new();
    let holder = start(&a, &calls, &gate, |c, n, g| async move {
        gated(&c, &n, &g, 5).await
    });
    gate.entered.notified().await;
    let waiter = start(&b, &calls, &gate, |c, n, g| async move {
        gated(&c, &n, &g, 5).await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        b.stats().function("gated_lock").unwrap().lock_waits,
        1,
        "the other process waits"
    );
    gate.release.notify_one();
    assert!(holder.await.unwrap().is_err());
    // The lease is 60 s: finishing within NO_HANG means the waiter did not wait it out.
    let got = tokio::time::timeout(NO_HANG, waiter)
        .await
        .expect("the waiter did not wait out the lease");
    assert_eq!(got.unwrap(), Ok(User::new(5)));
    let s = b.stats().function("gated_lock").cloned().unwrap();
    assert_eq!((s.lock_acquired, s.takeovers), (1, 1), "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn waiters_are_woken_by_the_fill() {
    let url = redis_url();
    let ns = unique_namespace("woken");
    let (a, b) = (cache_on(&url, &ns).await, cache_on(&url, &ns).await);
    let calls = Arc::new(Calls::default());
    let gate = Gate::new();
    let holder = start(&a, &calls, &gate, |c, n, g| async move {
        held(&c, &n, &g, 2).await
    });
    gate.entered.notified().await;
    let mut waiters = JoinSet::new();
    for _ in 0..50 {
        let (cache, calls, gate) = (b.clone(), calls.clone(), gate.clone());
        waiters.spawn(async move { held(&cache, &calls, &gate, 2).await });
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    gate.release.notify_one();
    let released = Instant::now();
    assert_eq!(holder.await.unwrap(), Ok(User::new(2)));
    while let Some(r) = tokio::time::timeout(NO_HANG, waiters.join_next())
        .await
        .expect("no hang")
    {
        assert_eq!(r.unwrap(), Ok(User::new(2)));
    }
    eprintln!("waiters done {:?} after the release", released.elapsed());
    assert_eq!(calls.get(), 1, "the waiting process did not load");
    let s = b.stats().function("held").cloned().unwrap();
    assert_eq!(
        (s.lock_waits, s.lock_acquired, s.takeovers),
        (1, 0, 0),
        "{s:?}"
    );
    assert_eq!(s.hits, 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lost_notification_is_covered_by_the_recheck() {
    // CLIENT KILL TYPE pubsub would disturb other tests: a private server.
    let server = RedisServer::start();
    let ns = unique_namespace("lost_notification");
    let (a, b) = (
        cache_on(&server.url(), &ns).await,
        cache_on(&server.url(), &ns).await,
    );
    let calls = Arc::new(Calls::default());
    let gate = Gate::new();
    let holder = start(&a, &calls, &gate, |c, n, g| async move {
        held(&c, &n, &g, 3).await
    });
    gate.entered.notified().await;
    let waiter = start(&b, &calls, &gate, |c, n, g| async move {
        held(&c, &n, &g, 3).await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut admin = raw_connection(&server.url()).await;
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut admin)
        .await
        .unwrap();
    assert!(killed >= 1, "the waiter's subscription was killed");
    gate.release.notify_one();
    assert_eq!(holder.await.unwrap(), Ok(User::new(3)));
    let got = tokio::time::timeout(NO_HANG, waiter)
        .await
        .expect("the waiter finished through its re-check");
    assert_eq!(got.unwrap(), Ok(User::new(3)));
    assert_eq!(calls.get(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_evicted_marker_does_not_let_a_stale_fill_through() {
    // The stale-fill guard is the loader's marker in the value key: positive. A marker lost to
    // eviction or expiry (here: deleted) rejects the fill; it can never let one through, even
    // when an invalidation follows.
    let url = redis_url();
    let ns = unique_namespace("marker_eviction");
    let (reader, writer) = (cache_on(&url, &ns).await, cache_on(&url, &ns).await);
    writer.invalidate("plain:1").await.unwrap();
    let calls = Arc::new(Calls::default());
    let gate = Gate::new();
    let load = start(&reader, &calls, &gate, |c, n, g| async move {
        plain(&c, &n, &g, 1).await
    });
    gate.entered.notified().await;
    // The loader's marker is evicted, then another process invalidates.
    let mut conn = raw_connection(&url).await;
    let value_key = reader.full_key("plain:1");
    let removed: i64 = conn.del(&value_key).await.unwrap();
    assert_eq!(removed, 1, "the marker is under {value_key}");
    writer.invalidate("plain:1").await.unwrap();
    gate.release.notify_one();
    assert_eq!(load.await.unwrap(), 1);
    assert_eq!(
        writer.get::<u64>("plain:1").await.unwrap(),
        None,
        "the stale fill was rejected"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_caller_joining_after_a_remote_invalidation_gets_fresh_data() {
    let url = redis_url();
    let ns = unique_namespace("join_after_invalidation");
    let (a, b) = (cache_on(&url, &ns).await, cache_on(&url, &ns).await);
    let calls = Arc::new(Calls::default());
    let gate = Gate::new();
    let leader = start(&a, &calls, &gate, |c, n, g| async move {
        plain(&c, &n, &g, 1).await
    });
    gate.entered.notified().await;
    // Another process updates the row and invalidates; then a new caller in this process
    // joins the load that read the old row.
    b.invalidate("plain:1").await.unwrap();
    let late = start(&a, &calls, &gate, |c, n, g| async move {
        plain(&c, &n, &g, 1).await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    gate.release.notify_one();
    assert_eq!(
        leader.await.unwrap(),
        1,
        "the leader's own caller gets what it read"
    );
    assert_eq!(
        late.await.unwrap(),
        101,
        "the late caller does not get the pre-invalidation value"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wrong_type_under_a_locked_key_is_replaced() {
    let url = redis_url();
    let cache = cache_on(&url, &unique_namespace("lock_wrong_type")).await;
    let mut conn = raw_connection(&url).await;
    let key = cache.full_key("user:9");
    let _: () = conn.hset(&key, "f", "v").await.unwrap();
    let _: () = conn.expire(&key, 60).await.unwrap();
    let calls = Calls::default();
    assert_eq!(locked(&cache, &calls, 9).await, Ok(User::new(9)));
    assert_eq!(locked(&cache, &calls, 9).await, Ok(User::new(9)));
    assert_eq!(calls.get(), 1, "the hash was replaced by the fill");
}

#[cached(cache = cache, key = "stuck:{id}", ttl = 60, lock = 1, name = "stuck")]
async fn stuck(cache: &Cache, calls: &Calls, id: u64) -> u64 {
    if calls.hit() == 1 {
        std::future::pending::<()>().await;
    }
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn in_process_a_stuck_leader_is_taken_over_after_the_lease() {
    for cache in [
        Cache::memory(),
        cache_on(&redis_url(), &unique_namespace("stuck")).await,
    ] {
        let calls = Arc::new(Calls::default());
        let leader = {
            let (cache, calls) = (cache.clone(), calls.clone());
            tokio::spawn(async move { stuck(&cache, &calls, 4).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        let got = tokio::time::timeout(NO_HANG, stuck(&cache, &calls, 4)).await;
        assert_eq!(
            got.expect("taken over after the 1 s lease"),
            4,
            "{}",
            cache.backend_name()
        );
        assert!(cache.stats().function("stuck").unwrap().takeovers >= 1);
        leader.abort();
    }
}

// ---- real processes ------------------------------------------------------------------------

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The function the worker processes call. Counts its executions in Redis.
#[cached(cache = cache, key = "job:{id}", ttl = 60, lock = 3, name = "job")]
async fn job(
    cache: &Cache,
    conn: &redis::aio::MultiplexedConnection,
    counter: &str,
    load_ms: u64,
    id: u64,
) -> Result<User, String> {
    let mut conn = conn.clone();
    let _: i64 = conn.incr(counter, 1).await.map_err(|e| e.to_string())?;
    tokio::time::sleep(Duration::from_millis(load_ms)).await;
    Ok(User::new(id))
}

/// Runs in a child process when `CACHE_TEST_WORKER` is set; a no-op otherwise.
#[test]
fn worker() {
    let Ok(namespace) = std::env::var("CACHE_TEST_WORKER") else {
        return;
    };
    let var = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name} is set"));
    let callers: usize = var("CACHE_TEST_CALLERS").parse().unwrap();
    let load_ms: u64 = var("CACHE_TEST_LOAD_MS").parse().unwrap();
    let start_at: u64 = var("CACHE_TEST_START_AT").parse().unwrap();
    let counter = var("CACHE_TEST_COUNTER");
    // The cache on a Redis Cluster when set (the counter stays on the shared Redis).
    let cluster: Vec<String> = std::env::var("CACHE_TEST_CLUSTER_URLS")
        .unwrap_or_default()
        .split(',')
        .filter(|u| !u.is_empty())
        .map(str::to_owned)
        .collect();
    let url = redis_url();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let cache = if cluster.is_empty() {
            cache_on(&url, &namespace).await
        } else {
            Cache::builder()
                .redis_cluster(cluster)
                .namespace(&namespace)
                .operation_timeout(Duration::from_secs(2))
                .build()
                .await
                .unwrap()
        };
        let conn = raw_connection(&url).await;
        // Connect the cache before the start, so that every process starts at once.
        let _ = cache.get::<u64>("warm-up").await;
        let wait = start_at.saturating_sub(now_ms());
        tokio::time::sleep(Duration::from_millis(wait)).await;
        let counter: Arc<str> = counter.into();
        let mut set = JoinSet::new();
        for _ in 0..callers {
            let (cache, conn, counter) = (cache.clone(), conn.clone(), counter.clone());
            set.spawn(async move { job(&cache, &conn, &counter, load_ms, 7).await });
        }
        let mut ok = 0;
        while let Some(r) = set.join_next().await {
            assert_eq!(
                r.unwrap(),
                Ok(User::new(7)),
                "every caller gets the right value"
            );
            ok += 1;
        }
        println!("WORKER ok={ok} stats={:?}", cache.stats().function("job"));
    });
}

fn spawn_worker(
    namespace: &str,
    counter: &str,
    callers: usize,
    load_ms: u64,
    start_at: u64,
) -> Child {
    spawn_worker_on(namespace, counter, callers, load_ms, start_at, None)
}

/// A worker process with `callers` concurrent calls of `job(7)`; its cache on the cluster
/// of `cluster` (comma-separated URLs) when given.
pub(crate) fn spawn_worker_on(
    namespace: &str,
    counter: &str,
    callers: usize,
    load_ms: u64,
    start_at: u64,
    cluster: Option<&str>,
) -> Child {
    spawn_test_worker(
        "stampede::worker",
        &[
            ("CACHE_TEST_WORKER", namespace.to_owned()),
            ("CACHE_TEST_COUNTER", counter.to_owned()),
            ("CACHE_TEST_CALLERS", callers.to_string()),
            ("CACHE_TEST_LOAD_MS", load_ms.to_string()),
            ("CACHE_TEST_START_AT", start_at.to_string()),
            ("CACHE_TEST_CLUSTER_URLS", cluster.unwrap_or("").to_owned()),
        ],
    )
}

pub(crate) fn wait_ok(child: Child, within: Duration) {
    let deadline = Instant::now() + within;
    let mut child = child;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            assert!(
                status.success(),
                "worker failed: {status}\n{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            return;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("a worker process hung");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub(crate) async fn counter_value(
    conn: &mut redis::aio::MultiplexedConnection,
    counter: &str,
) -> i64 {
    let v: Option<i64> = conn.get(counter).await.unwrap();
    v.unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_4_x_250_callers_one_execution() {
    let ns = unique_namespace("processes");
    let counter = format!("{ns}:executions");
    let mut conn = raw_connection(&redis_url()).await;
    let _: () = conn.set_ex(&counter, 0, 120).await.unwrap();
    // All four start at the same moment, after they have connected.
    let start_at = now_ms() + 3_000;
    let workers: Vec<Child> = (0..4)
        .map(|_| spawn_worker(&ns, &counter, 250, 300, start_at))
        .collect();
    for w in workers {
        wait_ok(w, Duration::from_secs(60));
    }
    assert_eq!(
        counter_value(&mut conn, &counter).await,
        1,
        "4 x 250 concurrent callers, one execution"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_a_killed_holder_is_taken_over() {
    let ns = unique_namespace("killed_holder");
    let counter = format!("{ns}:executions");
    let mut conn = raw_connection(&redis_url()).await;
    let _: () = conn.set_ex(&counter, 0, 120).await.unwrap();
    // The holder takes the lease (3 s) and hangs in its load.
    let mut holder = spawn_worker(&ns, &counter, 1, 600_000, now_ms());
    let deadline = Instant::now() + Duration::from_secs(20);
    while counter_value(&mut conn, &counter).await < 1 {
        assert!(
            Instant::now() < deadline,
            "the holder never started its load"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let acquired = Instant::now();
    // Another process's callers wait for it...
    let waiters = spawn_worker(&ns, &counter, 50, 0, now_ms());
    tokio::time::sleep(Duration::from_millis(500)).await;
    // ...and the holder dies mid-load.
    holder.kill().unwrap();
    let _ = holder.wait();
    wait_ok(waiters, Duration::from_secs(30));
    let took = acquired.elapsed();
    eprintln!("taken over and filled {took:?} after the holder acquired its 3 s lease");
    assert_eq!(
        counter_value(&mut conn, &counter).await,
        2,
        "one takeover load"
    );
    // The lease (3 s) plus one second, plus slack for starting processes on a busy machine.
    assert!(took < Duration::from_secs(3 + 1 + 3), "took {took:?}");
}
