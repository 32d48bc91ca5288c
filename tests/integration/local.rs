//! The in-process tier (`local`): hits without a round trip, and coherence: writes and
//! invalidations in this process, in another `Cache` (another process's view) and in other OS
//! processes remove the copies; a lost subscription or a Redis restart clears the tier.
//!
//! The behaviour tests run twice (`on_redis_and_cluster!`): on the shared Redis and on a Redis
//! Cluster (`REDIS_CLUSTER_URLS`'s, or a private one); tests that kill nodes or move slots
//! start a private cluster of their own.

use std::collections::HashMap;
use std::process::Child;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ::redis::AsyncCommands;
use cache_runtime::{Cache, cache_evict, cache_put, cached};
use cache_tests::{
    RawConn, RedisServer, raw_cluster_connection, raw_connection, redis_url, spawn_test_worker,
    unique_namespace,
};

use crate::support::{Calls, Gate, User};

/// The documented bound: no copy is served later than this after a write elsewhere returned
/// (the default `local_staleness`).
pub(crate) const BOUND: Duration = Duration::from_secs(1);

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

async fn cache_on(url: &str, namespace: &str) -> Cache {
    Server::Single(url.to_owned()).cache(namespace).await
}

/// Where a test's caches live.
#[derive(Clone)]
pub(crate) enum Server {
    /// One Redis (its URL).
    Single(String),
    /// A Redis Cluster (its nodes' URLs).
    Cluster(Vec<String>),
}

impl Server {
    /// A cache (another process's, when called twice) in `namespace`.
    pub(crate) async fn cache(&self, namespace: &str) -> Cache {
        let builder = match self {
            Server::Single(url) => Cache::builder().redis(url),
            Server::Cluster(urls) => Cache::builder().redis_cluster(urls.iter().cloned()),
        };
        builder
            .namespace(namespace)
            .operation_timeout(Duration::from_secs(2))
            .build()
            .await
            .unwrap()
    }

    /// A raw connection, to change what the caches stored behind their backs.
    async fn raw(&self) -> RawConn {
        match self {
            Server::Single(url) => RawConn::Single(raw_connection(url).await),
            Server::Cluster(urls) => RawConn::Cluster(raw_cluster_connection(urls).await),
        }
    }
}

/// Defines each test once and runs it on the shared Redis (`redis::<name>`) and on a Redis
/// Cluster (`cluster::<name>`).
macro_rules! on_redis_and_cluster {
    ($($(#[$doc:meta])* async fn $name:ident($server:ident: Server) $body:block)*) => {
        $(
            $(#[$doc])* async fn $name($server: Server) $body
        )*
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name(super::Server::Single(cache_tests::redis_url())).await
                }
            )*
        }
        mod cluster {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let (urls, _private) = cache_tests::shared_cluster();
                    super::$name(super::Server::Cluster(urls)).await
                }
            )*
        }
    };
}

/// The "database": one row per id in a map shared by the test's caches.
#[derive(Default)]
pub(crate) struct Db(std::sync::Mutex<HashMap<u64, String>>);

impl Db {
    pub(crate) fn new() -> Arc<Db> {
        Arc::new(Db::default())
    }
    fn get(&self, id: u64) -> String {
        self.0
            .lock()
            .unwrap()
            .get(&id)
            .cloned()
            .unwrap_or_else(|| format!("row {id}"))
    }
    pub(crate) fn set(&self, id: u64, v: &str) {
        self.0.lock().unwrap().insert(id, v.to_owned());
    }
}

#[cached(cache = cache, key = "row:{id}", ttl = 60, tags = ["group:{group}"], local, name = "row")]
pub(crate) async fn row(
    cache: &Cache,
    db: &Db,
    calls: &Calls,
    group: u64,
    id: u64,
) -> Result<String, String> {
    calls.hit();
    Ok(db.get(id))
}

#[cache_put(cache = cache, key = "row:{id}", ttl = 60, tags = ["group:{group}"], value = value.to_owned())]
pub(crate) async fn save_row(
    cache: &Cache,
    db: &Db,
    group: u64,
    id: u64,
    value: &str,
) -> Result<(), String> {
    db.set(id, value);
    Ok(())
}

#[cache_evict(cache = cache, keys = ["row:{id}"])]
async fn delete_row(cache: &Cache, db: &Db, id: u64) -> Result<(), String> {
    db.set(id, "deleted");
    Ok(())
}

/// Calls `read` until it is answered from the in-process tier (the tier becomes usable when
/// its subscription's first heartbeat comes back); panics after 10 s.
pub(crate) async fn until_l1_hit<F, Fut>(cache: &Cache, name: &str, read: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future,
{
    until_l1_hit_within(cache, name, Duration::from_secs(10), read).await;
}

/// [`until_l1_hit`], waiting at most `within`.
pub(crate) async fn until_l1_hit_within<F, Fut>(
    cache: &Cache,
    name: &str,
    within: Duration,
    mut read: F,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future,
{
    let deadline = Instant::now() + within;
    let before = cache.stats().function(name).map_or(0, |f| f.l1_hits);
    loop {
        read().await;
        if cache.stats().function(name).map_or(0, |f| f.l1_hits) > before {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no in-process hit within {within:?}: {}",
            cache.stats()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Calls `read` until it returns `want`, at most `within`; returns how long it took.
pub(crate) async fn until_value<F, Fut>(want: &str, within: Duration, mut read: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = String>,
{
    let start = Instant::now();
    loop {
        let got = read().await;
        if got == want {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "still {got:?} instead of {want:?} after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

on_redis_and_cluster! {

async fn an_l1_hit_makes_no_round_trip(server: Server) {
    let ns = unique_namespace("l1_hit");
    let cache = server.cache(&ns).await;
    let (db, calls) = (Db::new(), Calls::new());
    until_l1_hit(&cache, "row", || row(&cache, &db, &calls, 1, 7)).await;
    assert_eq!(calls.get(), 1, "loaded once");
    // Replace the Redis entry behind the framework's back (no invalidation is published):
    // the in-process copy still answers, so the hit did not read Redis.
    let mut conn = server.raw().await;
    let _: () = conn
        .set_ex(cache.full_key("row:7"), b"\x00garbage".as_slice(), 60)
        .await
        .unwrap();
    let hits = cache.stats().function("row").unwrap().l1_hits;
    for _ in 0..10 {
        assert_eq!(row(&cache, &db, &calls, 1, 7).await.unwrap(), "row 7");
    }
    let f = cache.stats().function("row").unwrap().clone();
    assert_eq!(f.l1_hits, hits + 10, "{}", cache.stats());
    assert_eq!(calls.get(), 1);
    assert!(f.l2_hits() <= f.hits);
    assert!(cache.stats().to_string().contains("L1 hits"));
}

async fn this_process_s_put_evict_and_tag_invalidation_drop_the_copy(server: Server) {
    let ns = unique_namespace("l1_own_writes");
    let cache = server.cache(&ns).await;
    let (db, calls) = (Db::new(), Calls::new());
    until_l1_hit(&cache, "row", || row(&cache, &db, &calls, 1, 7)).await;

    save_row(&cache, &db, 1, 7, "put").await.unwrap();
    assert_eq!(row(&cache, &db, &calls, 1, 7).await.unwrap(), "put");
    until_l1_hit(&cache, "row", || row(&cache, &db, &calls, 1, 7)).await;

    delete_row(&cache, &db, 7).await.unwrap();
    assert_eq!(row(&cache, &db, &calls, 1, 7).await.unwrap(), "deleted");
    until_l1_hit(&cache, "row", || row(&cache, &db, &calls, 1, 7)).await;

    db.set(7, "tagged");
    cache.invalidate_tag("group:1").await.unwrap();
    assert_eq!(row(&cache, &db, &calls, 1, 7).await.unwrap(), "tagged");
    until_l1_hit(&cache, "row", || row(&cache, &db, &calls, 1, 7)).await;

    db.set(7, "manual");
    cache.invalidate("row:7").await.unwrap();
    assert_eq!(row(&cache, &db, &calls, 1, 7).await.unwrap(), "manual");
}

async fn another_cache_s_writes_drop_the_copy_within_the_bound(server: Server) {
    let ns = unique_namespace("l1_other");
    let (a, b) = (server.cache(&ns).await, server.cache(&ns).await);
    let (db, calls) = (Db::new(), Calls::new());
    let read = || row(&a, &db, &calls, 1, 7);
    until_l1_hit(&a, "row", read).await;

    // A put in the other cache: the new value.
    save_row(&b, &db, 1, 7, "put").await.unwrap();
    let took = until_value("put", BOUND, || async { read().await.unwrap() }).await;
    eprintln!("put: the copy was gone after {took:?}");
    until_l1_hit(&a, "row", read).await;

    // An evict there: the next read loads.
    delete_row(&b, &db, 7).await.unwrap();
    let took = until_value("deleted", BOUND, || async { read().await.unwrap() }).await;
    eprintln!("evict: {took:?}");
    until_l1_hit(&a, "row", read).await;

    // A tag invalidation there.
    db.set(7, "tagged");
    b.invalidate_tag("group:1").await.unwrap();
    let took = until_value("tagged", BOUND, || async { read().await.unwrap() }).await;
    eprintln!("tag: {took:?}");
    until_l1_hit(&a, "row", read).await;

    // The manual API there (an untagged `set` would not be served to this tagged reader, so
    // an invalidation).
    db.set(7, "manual");
    b.invalidate("row:7").await.unwrap();
    let took = until_value("manual", BOUND, || async { read().await.unwrap() }).await;
    eprintln!("invalidate: {took:?}");
}

/// An in-process copy made under one tag is not served to a call under another (the key
/// leaves the tag's argument out): as on a read of Redis, where the entry does not record the
/// call's tag.
async fn an_l1_copy_is_served_only_under_its_own_tags(server: Server) {
    let ns = unique_namespace("l1_tags");
    let cache = server.cache(&ns).await;
    let calls = Calls::new();
    until_l1_hit(&cache, "item", || item(&cache, &calls, 1, 7)).await;
    let org2 = item(&cache, &calls, 2, 7).await.unwrap();
    assert!(org2.ends_with("org 2"), "{org2}");
    cache.invalidate_tag("org:2").await.unwrap();
    let again = item(&cache, &calls, 2, 7).await.unwrap();
    assert_ne!(again, org2, "invalidated under org:2");
    assert!(again.ends_with("org 2"), "{again}");
}

async fn lock_and_local_together(server: Server) {
    let ns = unique_namespace("l1_lock");
    let (a, b) = (server.cache(&ns).await, server.cache(&ns).await);
    let calls = Calls::new();
    until_l1_hit(&a, "locked", || locked(&a, &calls, 3)).await;
    until_l1_hit(&b, "locked", || locked(&b, &calls, 3)).await;
    assert_eq!(calls.get(), 1, "one load for both caches (the lease)");
    b.invalidate("locked:3").await.unwrap();
    // `a`'s copy is dropped when the message arrives: within the bound, a call loads again
    // (once, under the lease).
    let start = Instant::now();
    while calls.get() < 2 {
        assert_eq!(locked(&a, &calls, 3).await, User::new(3));
        assert!(
            start.elapsed() < BOUND,
            "a's copy outlived the invalidation"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(locked(&b, &calls, 3).await, User::new(3));
    assert_eq!(calls.get(), 2);
}

/// A load that read the old row, racing a write in another cache: neither Redis nor the
/// in-process tier keeps its result.
async fn a_load_racing_a_write_elsewhere_is_not_kept(server: Server) {
    let ns = unique_namespace("l1_race");
    let (a, b) = (server.cache(&ns).await, server.cache(&ns).await);
    let db = Db::new();
    // Make the tier usable first (a warm-up key).
    let warm = Calls::new();
    until_l1_hit(&a, "row", || row(&a, &db, &warm, 9, 9)).await;

    let gate = Gate::new();
    let load = {
        let (a, db, gate) = (a.clone(), db.clone(), gate.clone());
        tokio::spawn(async move { slow(&a, &db, &gate, 5).await })
    };
    gate.entered.notified().await;
    // The load read "row 5"; now the row changes and another process writes it.
    db.set(5, "new");
    b.set("slow:5", &"new", Duration::from_secs(60))
        .await
        .unwrap();
    gate.release.notify_one();
    assert_eq!(
        load.await.unwrap(),
        "row 5",
        "the caller gets what it loaded"
    );
    for _ in 0..20 {
        let g = Gate::new();
        g.release.notify_one();
        assert_eq!(
            slow(&a, &db, &g, 5).await,
            "new",
            "never the old load's value"
        );
    }
}

}

#[cached(cache = cache, key = "item:{id}", ttl = 60, tags = ["org:{org}"], local, name = "item")]
async fn item(cache: &Cache, calls: &Calls, org: u64, id: u64) -> Result<String, String> {
    Ok(format!("load {} org {org}", calls.hit()))
}

#[cached(cache = cache, key = "locked:{id}", ttl = 60, lock, local, name = "locked")]
async fn locked(cache: &Cache, calls: &Calls, id: u64) -> User {
    calls.hit();
    User::new(id)
}

#[cached(cache = cache, key = "slow:{id}", ttl = 60, local, name = "slow")]
async fn slow(cache: &Cache, db: &Db, gate: &Gate, id: u64) -> String {
    let v = db.get(id);
    gate.pass().await;
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_subscription_or_a_restart_clears_the_tier() {
    let mut server = RedisServer::start();
    let url = server.url();
    let ns = unique_namespace("l1_kill");
    let (a, b) = (cache_on(&url, &ns).await, cache_on(&url, &ns).await);
    let (db, calls) = (Db::new(), Calls::new());
    let read = || row(&a, &db, &calls, 1, 7);
    until_l1_hit(&a, "row", read).await;

    // Every subscription is killed; a write made meanwhile is not delivered to `a`.
    let mut conn = raw_connection(&url).await;
    let _: i64 = ::redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut conn)
        .await
        .unwrap();
    save_row(&b, &db, 1, 7, "while killed").await.unwrap();
    until_value("while killed", BOUND, || async { read().await.unwrap() }).await;
    let deadline = Instant::now() + BOUND;
    while a.stats().l1_clears() == 0 {
        assert!(Instant::now() < deadline, "the tier was not cleared");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    until_l1_hit(&a, "row", read).await;

    // A restart loses everything Redis held, messages included.
    let clears = a.stats().l1_clears();
    server.kill();
    db.set(7, "after restart");
    server.restart();
    until_value("after restart", Duration::from_secs(10), || async {
        read().await.unwrap()
    })
    .await;
    assert!(a.stats().l1_clears() > clears, "{}", a.stats());
    until_l1_hit(&a, "row", read).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn local_on_memory_is_the_memory_backend() {
    let cache = Cache::memory();
    let (db, calls) = (Db::new(), Calls::new());
    assert_eq!(row(&cache, &db, &calls, 1, 7).await.unwrap(), "row 7");
    assert_eq!(row(&cache, &db, &calls, 1, 7).await.unwrap(), "row 7");
    save_row(&cache, &db, 1, 7, "put").await.unwrap();
    assert_eq!(row(&cache, &db, &calls, 1, 7).await.unwrap(), "put");
    assert_eq!(calls.get(), 1);
    let f = cache.stats().function("row").unwrap().clone();
    assert_eq!((f.hits, f.l1_hits), (2, 0));
}

// ---- real processes ------------------------------------------------------------------------

#[cached(cache = cache, key = "setting:{id}", ttl = 60, tags = ["group:{group}"], local, name = "setting")]
async fn setting(
    cache: &Cache,
    conn: &::redis::aio::MultiplexedConnection,
    db_key: &str,
    group: u64,
    id: u64,
) -> Result<String, String> {
    let mut conn = conn.clone();
    let v: Option<String> = conn.get(db_key).await.map_err(|e| e.to_string())?;
    Ok(v.unwrap_or_default())
}

#[cache_put(cache = cache, key = "setting:{id}", ttl = 60, tags = ["group:{group}"], value = value.to_owned())]
async fn save_setting(
    cache: &Cache,
    conn: &::redis::aio::MultiplexedConnection,
    db_key: &str,
    group: u64,
    id: u64,
    value: &str,
) -> Result<(), String> {
    let mut conn = conn.clone();
    conn.set::<_, _, ()>(db_key, value)
        .await
        .map_err(|e| e.to_string())
}

#[cache_evict(cache = cache, keys = ["setting:{id}"])]
async fn evict_setting(cache: &Cache, id: u64) -> Result<(), String> {
    Ok(())
}

/// Runs in a child process when `CACHE_TEST_L1_WORKER` is set (a no-op otherwise): reads the
/// setting until the stop key appears, and prints, per value, when it last read it.
#[test]
fn l1_worker() {
    let Ok(namespace) = std::env::var("CACHE_TEST_L1_WORKER") else {
        return;
    };
    let url = redis_url();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let cache = cache_on(&url, &namespace).await;
        let conn = raw_connection(&url).await;
        let db_key = format!("{namespace}:db");
        let mut control = conn.clone();
        until_l1_hit(&cache, "setting", || setting(&cache, &conn, &db_key, 1, 1)).await;
        let _: i64 = control.incr(format!("{namespace}:ready"), 1).await.unwrap();
        let mut last_seen: HashMap<String, u64> = HashMap::new();
        let mut n = 0u64;
        loop {
            let v = setting(&cache, &conn, &db_key, 1, 1).await.unwrap();
            last_seen.insert(v, now_ms());
            n += 1;
            if n % 50 == 0 {
                let stop: Option<String> = control.get(format!("{namespace}:stop")).await.unwrap();
                if stop.is_some() {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        let f = cache.stats().function("setting").unwrap().clone();
        for (v, at) in &last_seen {
            println!("LAST {v} {at}");
        }
        println!("READS {n} L1 {} LOADS {}", f.l1_hits, f.loads);
    });
}

fn spawn_l1_worker(namespace: &str) -> Child {
    spawn_test_worker(
        "local::l1_worker",
        &[("CACHE_TEST_L1_WORKER", namespace.to_owned())],
    )
}

/// 4 processes hold the setting in their in-process tier; this process (the fifth) puts it,
/// evicts it, and invalidates its tag. After each write returned, no process reads the old
/// value later than the documented bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_4_readers_see_every_write_of_a_fifth() {
    let ns = unique_namespace("l1_processes");
    let url = redis_url();
    let cache = cache_on(&url, &ns).await;
    let conn = raw_connection(&url).await;
    let mut control = conn.clone();
    let db_key = format!("{ns}:db");
    let _: () = control.set_ex(&db_key, "v1", 120).await.unwrap();
    let workers: Vec<Child> = (0..4).map(|_| spawn_l1_worker(&ns)).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ready: Option<u32> = control.get(format!("{ns}:ready")).await.unwrap();
        if ready == Some(4) {
            break;
        }
        assert!(Instant::now() < deadline, "the workers never became ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let settle = Duration::from_millis(1500);
    // v1 -> v2: a put.
    save_setting(&cache, &conn, &db_key, 1, 1, "v2")
        .await
        .unwrap();
    let put_at = now_ms();
    tokio::time::sleep(settle).await;
    // v2 -> v3: the row changes, then an evict.
    let _: () = control.set_ex(&db_key, "v3", 120).await.unwrap();
    evict_setting(&cache, 1).await.unwrap();
    let evict_at = now_ms();
    tokio::time::sleep(settle).await;
    // v3 -> v4: the row changes, then a tag invalidation.
    let _: () = control.set_ex(&db_key, "v4", 120).await.unwrap();
    cache.invalidate_tag("group:1").await.unwrap();
    let tag_at = now_ms();
    tokio::time::sleep(settle).await;
    let _: () = control
        .set_ex(format!("{ns}:stop"), "1", 120)
        .await
        .unwrap();
    let bound = BOUND.as_millis() as u64;
    for w in workers {
        let out = w.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "worker failed\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let last: HashMap<&str, u64> = stdout
            .lines()
            // The harness may print `test .. ` on the same line as the first one.
            .filter_map(|l| l.find("LAST ").map(|i| &l[i + 5..]))
            .filter_map(|l| l.split_once(' '))
            .map(|(v, at)| (v, at.parse().unwrap()))
            .collect();
        eprintln!(
            "{} | v1 last read {}ms after the put, v2 {}ms after the evict, v3 {}ms after the tag invalidation",
            stdout
                .lines()
                .find(|l| l.starts_with("READS"))
                .unwrap_or(""),
            last.get("v1").map_or(-1, |t| *t as i64 - put_at as i64),
            last.get("v2").map_or(-1, |t| *t as i64 - evict_at as i64),
            last.get("v3").map_or(-1, |t| *t as i64 - tag_at as i64),
        );
        for (old, write_at) in [("v1", put_at), ("v2", evict_at), ("v3", tag_at)] {
            if let Some(&seen) = last.get(old) {
                assert!(
                    seen <= write_at + bound,
                    "{old} read {}ms after the write returned\n{stdout}",
                    seen - write_at
                );
            }
        }
        assert!(last.contains_key("v4"), "the last value was read\n{stdout}");
        // The readers were answered from their in-process tier (not from Redis) throughout.
        let (reads, l1) = stdout
            .lines()
            .find_map(|l| {
                let rest = &l[l.find("READS ")? + 6..];
                let mut w = rest.split_whitespace();
                let reads: u64 = w.next()?.parse().ok()?;
                let l1: u64 = w.nth(1)?.parse().ok()?;
                Some((reads, l1))
            })
            .expect("the worker's READS line");
        assert!(
            l1 * 10 >= reads * 9,
            "{l1} of {reads} reads from L1\n{stdout}"
        );
    }
}

/// The tier keeps working when the runtime that started its subscription ends and another
/// uses the cache (a `static` cache under several `#[tokio::test]`s).
#[test]
fn the_tier_survives_the_runtime_that_started_it() {
    let ns = unique_namespace("l1_runtimes");
    let cache = Cache::builder()
        .redis(redis_url())
        .namespace(&ns)
        .operation_timeout(Duration::from_secs(2))
        .build_sync()
        .unwrap();
    let (db, calls) = (Db::new(), Calls::new());
    for round in 0..2 {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            until_l1_hit(&cache, "row", || row(&cache, &db, &calls, 1, 7)).await;
            // Still coherent: a write elsewhere reaches this runtime's subscription.
            let other = cache_on(&redis_url(), &ns).await;
            let value = format!("round {round}");
            save_row(&other, &db, 1, 7, &value).await.unwrap();
            until_value(&value, BOUND, || async {
                row(&cache, &db, &calls, 1, 7).await.unwrap()
            })
            .await;
        });
        drop(rt);
    }
}
