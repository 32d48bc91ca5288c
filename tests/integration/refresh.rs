//! `refresh`: a hit on an entry past its refresh threshold starts one background reload and
//! returns the current value at once. On both backends: callers never wait for a load after
//! the first, loads come about once per refresh period, a refresh racing an evict is not
//! stored, a failing or panicking refresh stores nothing, a refreshed entry records its tags;
//! XFetch (the flag form) refreshes before expiry; with `local`, this process's copy is replaced. On Redis: 4 processes, one
//! refresh at a time across all of them.

use std::collections::BTreeSet;
use std::process::Child;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ::redis::AsyncCommands;
use cache_runtime::{Cache, FunctionStats, cached};
use cache_tests::{raw_connection, redis_url, spawn_test_worker, unique_namespace};

use crate::support::{Fx, Gate, on_both_backends};

/// How long a load takes: a call that waited for one takes at least this.
const LOAD: Duration = Duration::from_millis(200);

fn stats(cache: &Cache, name: &str) -> FunctionStats {
    cache
        .stats()
        .function(name)
        .cloned()
        .expect("the function ran")
}

/// Calls `call` every `every` for `run`, after the first call; returns every value seen and
/// the slowest of those calls.
async fn read_for<F, Fut, T>(run: Duration, every: Duration, mut call: F) -> (BTreeSet<T>, Duration)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = T>,
    T: Ord,
{
    let start = Instant::now();
    let mut seen = BTreeSet::new();
    let mut slowest = Duration::ZERO;
    while start.elapsed() < run {
        let t = Instant::now();
        seen.insert(call().await);
        slowest = slowest.max(t.elapsed());
        tokio::time::sleep(every).await;
    }
    (seen, slowest)
}

/// Polls `cond` for up to 5 s.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[cached(cache = cache, key = "ahead:{id}", ttl = 2, refresh = "50%", name = "ahead")]
async fn ahead(cache: &Cache, loads: &Arc<AtomicU32>, id: u64) -> Result<u32, String> {
    let n = loads.fetch_add(1, Ordering::SeqCst) + 1;
    tokio::time::sleep(LOAD).await;
    Ok(n)
}

#[cached(cache = cache, key = "xfetch:{id}", ttl = 2, refresh, name = "xfetch")]
async fn xfetch(cache: &Cache, loads: &Arc<AtomicU32>, id: u64) -> u32 {
    let n = loads.fetch_add(1, Ordering::SeqCst) + 1;
    tokio::time::sleep(LOAD).await;
    n
}

/// The database of the failure tests: a value, and whether reading it fails, panics or waits
/// at a gate.
#[derive(Default)]
struct Db {
    value: Mutex<String>,
    failing: AtomicBool,
    panicking: AtomicBool,
    gated: AtomicBool,
    gate: Arc<Gate>,
    reads: AtomicU32,
}

impl Db {
    fn new(v: &str) -> Arc<Db> {
        let db = Db::default();
        db.set(v);
        Arc::new(db)
    }
    fn set(&self, v: &str) {
        *self.value.lock().unwrap() = v.to_owned();
    }
    async fn read(&self) -> Result<String, String> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        if self.gated.load(Ordering::SeqCst) {
            self.gate.pass().await;
        }
        if self.panicking.load(Ordering::SeqCst) {
            panic!("the database driver panicked");
        }
        if self.failing.load(Ordering::SeqCst) {
            return Err("database down".to_owned());
        }
        Ok(self.value.lock().unwrap().clone())
    }
}

#[cached(cache = cache, key = "gated:{id}", ttl = 1, refresh = "50%", name = "gated")]
async fn gated(cache: &Cache, db: &Arc<Db>, id: u64) -> Result<String, String> {
    db.read().await
}

// Due after 500 ms; a failed refresh is tried again after one lease (the `lock` lease: long
// enough for a panic's backtrace to be printed in a debug build on a busy machine).
#[cached(cache = cache, key = "flaky:{id}", ttl = 10, refresh = "5%", lock = "2s", name = "flaky")]
async fn flaky(cache: &Cache, db: &Arc<Db>, id: u64) -> Result<String, String> {
    db.read().await
}

#[cached(cache = cache, key = "tagged:{id}", ttl = 1, refresh = "50%", tags = ["shop:{shop}"], name = "tagged")]
async fn tagged(cache: &Cache, db: &Arc<Db>, shop: u64, id: u64) -> Result<String, String> {
    db.read().await
}

on_both_backends! {
    async fn no_call_waits_and_loads_come_once_per_period(fx: Fx) {
        let loads = Arc::new(AtomicU32::new(0));
        assert_eq!(ahead(&fx.cache, &loads, 1).await, Ok(1), "the first call loads");
        let (seen, slowest) =
            read_for(Duration::from_secs(5), Duration::from_millis(10), || ahead(&fx.cache, &loads, 1)).await;
        // Let a refresh that started at the end finish.
        tokio::time::sleep(LOAD + Duration::from_millis(100)).await;
        let f = stats(&fx.cache, "ahead");
        let n = loads.load(Ordering::SeqCst);
        eprintln!("loads {n}, slowest call {slowest:?}, values {seen:?}, {f:?}");
        assert!(slowest < LOAD, "a call waited for a load: {slowest:?}");
        // One refresh per second (at 50% of 2 s, plus the load's 200 ms): about 5.
        assert!((3..=7).contains(&n), "{n} loads in 5 s");
        assert_eq!(f.misses, 1, "never a miss after the first call");
        assert_eq!(f.loads, 1, "refreshes are not loads");
        assert_eq!(f.refreshes, u64::from(n) - 1);
        assert_eq!(f.refresh_errors, 0);
        assert!(seen.len() >= 3, "the refreshed values were served: {seen:?}");
    }

    async fn xfetch_refreshes_before_expiry(fx: Fx) {
        let loads = Arc::new(AtomicU32::new(0));
        assert_eq!(xfetch(&fx.cache, &loads, 1).await, 1);
        let (seen, slowest) =
            read_for(Duration::from_secs(5), Duration::from_millis(5), || xfetch(&fx.cache, &loads, 1)).await;
        tokio::time::sleep(LOAD + Duration::from_millis(100)).await;
        let f = stats(&fx.cache, "xfetch");
        eprintln!("slowest call {slowest:?}, values {seen:?}, {f:?}");
        assert!(slowest < LOAD, "a call waited for a load: {slowest:?}");
        // Every entry was refreshed before it expired (TTL 2 s, 5 s of reads).
        assert_eq!(f.misses, 1, "an entry expired before its refresh");
        assert!(f.refreshes >= 2, "{f:?}");
        assert_eq!(u64::from(loads.load(Ordering::SeqCst)), f.refreshes + 1);
    }

    async fn a_refresh_racing_an_evict_or_a_write_is_not_stored(fx: Fx) {
        let db = Db::new("v1");
        assert_eq!(gated(&fx.cache, &db, 1).await.unwrap(), "v1");
        tokio::time::sleep(Duration::from_millis(600)).await;
        db.set("v2");
        db.gated.store(true, Ordering::SeqCst);
        // Due: the current value at once, and a refresh that waits at the gate.
        assert_eq!(gated(&fx.cache, &db, 1).await.unwrap(), "v1");
        tokio::time::timeout(Duration::from_secs(5), db.gate.entered.notified())
            .await
            .expect("the refresh started");
        fx.cache.invalidate("gated:1").await.unwrap();
        db.gated.store(false, Ordering::SeqCst);
        db.set("v3");
        db.gate.release.notify_one();
        eventually("the refresh ended", || stats(&fx.cache, "gated").stale_fills == 1).await;
        assert_eq!(fx.cache.get::<String>("gated:1").await.unwrap(), None, "the refreshed v2 was not stored");
        assert_eq!(gated(&fx.cache, &db, 1).await.unwrap(), "v3");
        let f = stats(&fx.cache, "gated");
        assert_eq!((f.refreshes, f.misses), (1, 2));
        // The same with a write: the written value stays.
        tokio::time::sleep(Duration::from_millis(600)).await;
        db.set("v4");
        db.gated.store(true, Ordering::SeqCst);
        assert_eq!(gated(&fx.cache, &db, 1).await.unwrap(), "v3");
        tokio::time::timeout(Duration::from_secs(5), db.gate.entered.notified())
            .await
            .expect("the refresh started");
        fx.cache.set("gated:1", &"written", Duration::from_secs(60)).await.unwrap();
        db.gated.store(false, Ordering::SeqCst);
        db.gate.release.notify_one();
        eventually("the refresh ended", || stats(&fx.cache, "gated").stale_fills == 2).await;
        assert_eq!(gated(&fx.cache, &db, 1).await.unwrap(), "written");
    }

    async fn a_refresh_records_the_tags(fx: Fx) {
        let db = Db::new("v1");
        assert_eq!(tagged(&fx.cache, &db, 7, 1).await.unwrap(), "v1");
        tokio::time::sleep(Duration::from_millis(600)).await;
        db.set("v2");
        // The refreshed entry is served: it records the call's tags.
        let deadline = Instant::now() + Duration::from_secs(2);
        while tagged(&fx.cache, &db, 7, 1).await.unwrap() != "v2" {
            assert!(Instant::now() < deadline, "never refreshed");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(stats(&fx.cache, "tagged").misses, 1);
        // A tag invalidation hides it.
        fx.cache.invalidate_tag("shop:7").await.unwrap();
        db.set("v3");
        assert_eq!(tagged(&fx.cache, &db, 7, 1).await.unwrap(), "v3");
        assert_eq!(stats(&fx.cache, "tagged").misses, 2);
        // A tag invalidated while a refresh runs: its value records the old version, and is
        // never served.
        tokio::time::sleep(Duration::from_millis(600)).await;
        db.set("v4");
        db.gated.store(true, Ordering::SeqCst);
        assert_eq!(tagged(&fx.cache, &db, 7, 1).await.unwrap(), "v3");
        tokio::time::timeout(Duration::from_secs(5), db.gate.entered.notified())
            .await
            .expect("the refresh started");
        fx.cache.invalidate_tag("shop:7").await.unwrap();
        db.gated.store(false, Ordering::SeqCst);
        db.gate.release.notify_one();
        tokio::time::sleep(Duration::from_millis(300)).await;
        db.set("v5");
        assert_eq!(tagged(&fx.cache, &db, 7, 1).await.unwrap(), "v5", "never v4");
        let f = stats(&fx.cache, "tagged");
        assert_eq!((f.misses, f.refreshes), (3, 2), "{f:?}");
    }

    async fn a_failing_or_panicking_refresh_keeps_the_current_value(fx: Fx) {
        const LEASE: Duration = Duration::from_millis(2_050);
        let db = Db::new("v1");
        assert_eq!(flaky(&fx.cache, &db, 1).await.unwrap(), "v1");
        tokio::time::sleep(Duration::from_millis(700)).await;
        // An error.
        db.failing.store(true, Ordering::SeqCst);
        assert_eq!(flaky(&fx.cache, &db, 1).await.unwrap(), "v1");
        eventually("the refresh failed", || stats(&fx.cache, "flaky").refresh_errors == 1).await;
        assert_eq!(flaky(&fx.cache, &db, 1).await.unwrap(), "v1", "still served");
        assert_eq!(fx.cache.get::<String>("flaky:1").await.unwrap().as_deref(), Some("v1"));
        // A panic, once the failed refresh's lease is over.
        tokio::time::sleep(LEASE).await;
        db.failing.store(false, Ordering::SeqCst);
        db.panicking.store(true, Ordering::SeqCst);
        assert_eq!(flaky(&fx.cache, &db, 1).await.unwrap(), "v1");
        eventually("the refresh panicked", || stats(&fx.cache, "flaky").refresh_errors == 2).await;
        assert_eq!(flaky(&fx.cache, &db, 1).await.unwrap(), "v1", "still served");
        assert_eq!(fx.cache.get::<String>("flaky:1").await.unwrap().as_deref(), Some("v1"));
        // The database is back: the next refresh stores its value.
        tokio::time::sleep(LEASE).await;
        db.panicking.store(false, Ordering::SeqCst);
        db.set("v2");
        let deadline = Instant::now() + Duration::from_secs(1);
        while flaky(&fx.cache, &db, 1).await.unwrap() != "v2" {
            assert!(Instant::now() < deadline, "never refreshed");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let f = stats(&fx.cache, "flaky");
        assert_eq!((f.misses, f.loads, f.load_errors), (1, 1, 0), "{f:?}");
        assert_eq!((f.refreshes, f.refresh_errors), (3, 2), "{f:?}");
        assert_eq!(db.reads.load(Ordering::SeqCst), 4);
    }
}

/// A service whose methods refresh with their own copy of `self`.
#[derive(Clone)]
struct Prices {
    cache: Cache,
    loads: Arc<AtomicU32>,
    currency: Arc<str>,
}

impl Prices {
    #[cached(cache = self.cache, key = "price:{id}", ttl = 1, refresh = "50%", name = "price")]
    async fn price(&self, id: u64, label: &str) -> String {
        let n = self.loads.fetch_add(1, Ordering::SeqCst) + 1;
        format!("{label} {id}: {n} {}", self.currency)
    }
}

#[async_trait::async_trait]
trait Quotes {
    async fn quote(&self, symbol: &str) -> Result<String, String>;
}

#[async_trait::async_trait]
impl Quotes for Prices {
    #[cached(cache = self.cache, key = "quote:{symbol}", ttl = 1, refresh = "50%", name = "quote")]
    async fn quote(&self, symbol: &str) -> Result<String, String> {
        let n = self.loads.fetch_add(1, Ordering::SeqCst) + 1;
        Ok(format!("{symbol}: {n} {}", self.currency))
    }
}

/// Methods (native and `#[async_trait]`) refresh on copies of `self` and of their arguments.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn methods_refresh_with_a_copy_of_self() {
    let prices = Prices {
        cache: Cache::memory(),
        loads: Arc::new(AtomicU32::new(0)),
        currency: "EUR".into(),
    };
    let label = String::from("item");
    assert_eq!(prices.price(1, &label).await, "item 1: 1 EUR");
    assert_eq!(prices.quote("ACME").await.unwrap(), "ACME: 2 EUR");
    tokio::time::sleep(Duration::from_millis(600)).await;
    // Due: the current values, and a refresh of each.
    assert_eq!(prices.price(1, &label).await, "item 1: 1 EUR");
    assert_eq!(prices.quote("ACME").await.unwrap(), "ACME: 2 EUR");
    drop(label);
    eventually("both refreshed", || {
        let s = prices.cache.stats();
        ["price", "quote"]
            .iter()
            .all(|f| s.function(f).is_some_and(|f| f.refreshes == 1))
    })
    .await;
    let (price, quote) = (
        prices.price(1, "other label").await,
        prices.quote("ACME").await.unwrap(),
    );
    let mut got = [price, quote];
    got.sort();
    // The refreshes ran in either order: loads 3 and 4.
    assert!(
        got == ["ACME: 3 EUR", "item 1: 4 EUR"] || got == ["ACME: 4 EUR", "item 1: 3 EUR"],
        "{got:?}"
    );
}

#[cached(cache = cache, key = "near:{id}", ttl = 2, refresh = "50%", local, name = "near")]
async fn near(cache: &Cache, loads: &Arc<AtomicU32>, id: u64) -> Result<u32, String> {
    let n = loads.fetch_add(1, Ordering::SeqCst) + 1;
    tokio::time::sleep(LOAD).await;
    Ok(n)
}

/// With `local`, in-process hits start the refresh too, and a refresh replaces this process's
/// copy: the next call reads the new value.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_local_the_own_copy_is_replaced() {
    let fx = Fx::redis("refresh_local").await;
    let loads = Arc::new(AtomicU32::new(0));
    assert_eq!(near(&fx.cache, &loads, 1).await, Ok(1));
    let (seen, slowest) = read_for(Duration::from_secs(4), Duration::from_millis(5), || {
        near(&fx.cache, &loads, 1)
    })
    .await;
    tokio::time::sleep(LOAD + Duration::from_millis(100)).await;
    let f = stats(&fx.cache, "near");
    eprintln!("slowest call {slowest:?}, values {seen:?}, {f:?}");
    assert!(slowest < LOAD, "a call waited for a load: {slowest:?}");
    assert!(f.l1_hits > 0, "{f:?}");
    assert_eq!(f.misses, 1);
    assert!(f.refreshes >= 2, "{f:?}");
    let n = loads.load(Ordering::SeqCst);
    assert!((3..=6).contains(&n), "{n} loads in 4 s");
    // Every refreshed value but one still being loaded was served.
    assert!(seen.len() >= 3, "{seen:?}");
    let last = near(&fx.cache, &loads, 1).await.unwrap();
    assert!(last >= n - 1, "the copy was replaced: {last} of {n}");
}

// ---- real processes ------------------------------------------------------------------------

/// How long the workers' load takes.
const WORKER_LOAD: Duration = Duration::from_millis(300);

/// The function the worker processes read. Counts its loads in Redis.
#[cached(cache = cache, key = "shared:{id}", ttl = 2, refresh = "50%", name = "shared")]
async fn shared(
    cache: &Cache,
    conn: &::redis::aio::MultiplexedConnection,
    counter: &str,
    id: u64,
) -> Result<u64, String> {
    let mut conn = conn.clone();
    let n: u64 = conn.incr(counter, 1).await.map_err(|e| e.to_string())?;
    tokio::time::sleep(WORKER_LOAD).await;
    Ok(n)
}

/// Runs in a child process when `CACHE_TEST_REFRESH_WORKER` is set (a no-op otherwise): reads
/// until the stop key appears, and prints its slowest call after the first.
#[test]
fn refresh_worker() {
    let Ok(namespace) = std::env::var("CACHE_TEST_REFRESH_WORKER") else {
        return;
    };
    let url = redis_url();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let cache = Cache::builder()
            .redis(&url)
            .namespace(&namespace)
            .operation_timeout(Duration::from_secs(2))
            .build()
            .await
            .unwrap();
        let conn = raw_connection(&url).await;
        let mut control = conn.clone();
        let counter = format!("{namespace}:loads");
        shared(&cache, &conn, &counter, 1).await.unwrap();
        let _: i64 = control.incr(format!("{namespace}:ready"), 1).await.unwrap();
        let (mut calls, mut slowest) = (0u64, Duration::ZERO);
        loop {
            let t = Instant::now();
            shared(&cache, &conn, &counter, 1).await.unwrap();
            slowest = slowest.max(t.elapsed());
            calls += 1;
            if calls % 20 == 0 {
                let stop: Option<String> = control.get(format!("{namespace}:stop")).await.unwrap();
                if stop.is_some() {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let f = cache.stats().function("shared").unwrap().clone();
        println!(
            "REFRESH_WORKER calls {calls} slowest_us {} refreshes {} misses {}",
            slowest.as_micros(),
            f.refreshes,
            f.misses
        );
    });
}

fn spawn_refresh_worker(namespace: &str) -> Child {
    spawn_test_worker(
        "refresh::refresh_worker",
        &[("CACHE_TEST_REFRESH_WORKER", namespace.to_owned())],
    )
}

/// 4 processes read one key continuously for 10 s (TTL 2 s, `refresh = "50%"`): about one
/// load per second across all of them, and no call waits for a load after its first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_4_readers_one_refresh_at_a_time() {
    let ns = unique_namespace("refresh_processes");
    let mut control = raw_connection(&redis_url()).await;
    let counter = format!("{ns}:loads");
    let workers: Vec<Child> = (0..4).map(|_| spawn_refresh_worker(&ns)).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ready: Option<u32> = control.get(format!("{ns}:ready")).await.unwrap();
        if ready == Some(4) {
            break;
        }
        assert!(Instant::now() < deadline, "the workers never became ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let loads = |v: Option<u64>| v.unwrap_or(0);
    let before = loads(control.get(&counter).await.unwrap());
    tokio::time::sleep(Duration::from_secs(10)).await;
    let during = loads(control.get(&counter).await.unwrap()) - before;
    let _: () = control
        .set_ex(format!("{ns}:stop"), "1", 120)
        .await
        .unwrap();
    let mut refreshes = 0;
    for w in workers {
        let out = w.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "worker failed\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report = stdout
            .lines()
            .find_map(|l| l.find("REFRESH_WORKER ").map(|i| &l[i..]))
            .unwrap_or_else(|| panic!("no report\n{stdout}"));
        eprintln!("{report}");
        let field = |name: &str| -> u64 {
            let mut words = report.split_whitespace();
            words.find(|w| *w == name);
            words.next().unwrap().parse().unwrap()
        };
        let slowest = Duration::from_micros(field("slowest_us"));
        assert!(
            slowest < WORKER_LOAD,
            "a call waited for a load: {slowest:?}\n{report}"
        );
        refreshes += field("refreshes");
    }
    eprintln!("{during} loads in 10 s; {refreshes} refreshes in all");
    // TTL 2 s, refreshed at 1 s, plus the 300 ms load: one load every 1.3 s, about 8.
    assert!((6..=14).contains(&during), "{during} loads in 10 s");
}
