//! The write-behind runtime (issue 10) driven as the `#[write_behind]` expansion will drive
//! it: handlers registered by hand with `inventory::submit!`, calls through `WriteBehind`,
//! a real Redis, each test in its own namespace with its own queue functions.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::SeqCst};
use std::time::{Duration, Instant};

use cache_runtime::Cache;
use cache_runtime::write_behind::{self, Worker};
use cache_tests::{
    RawConn, RedisCluster, free_port, raw_cluster_connection, raw_connection, redis_url,
    shared_cluster, unique_namespace,
};
use redis::AsyncCommands;

/// Defines `async fn $name(cache, id: u64, v: String) -> Result<(), String>` exactly as the
/// expansion does (key `k:{id}`, value `v`, queue `$queue`), with `$body` as the body.
macro_rules! wb_fn {
    ($name:ident, $queue:literal, coalesce = $co:expr, |$id:ident, $v:ident| $body:block) => {
        async fn $name(cache: &Cache, $id: u64, $v: String) -> Result<(), String> {
            use cache_runtime::__private::{
                self, Applying, ArgsError, Call, CallKey, Site, WbFunction, WriteBehind,
            };
            async fn __cache_body($id: u64, $v: String) -> Result<(), String> $body
            static __CACHE_SITE: Site =
                Site::new(module_path!(), stringify!($name)).ttl_ms(600_000);
            fn __cache_apply(args: &[u8]) -> Result<Applying, ArgsError> {
                let (__a0, __a1): (u64, String) = __private::wb_decode(args)?;
                Ok(Applying::new(async move {
                    __private::wb_outcome!(__cache_body(__a0, __a1).await)
                }))
            }
            static __CACHE_WB: WbFunction =
                WbFunction::new(&__CACHE_SITE, $queue, __cache_apply).coalesce($co);
            __private::inventory::submit! { __private::WbHandler(&__CACHE_WB) }

            let __cache_key = format!("k:{}", $id);
            let mut __cache_wb = WriteBehind::new(
                Call {
                    cache,
                    site: &__CACHE_SITE,
                    self_type: None,
                    key: CallKey::Key(cache.full_key(&__cache_key).into()),
                },
                &__CACHE_WB,
            );
            __cache_wb.begin().await;
            if __cache_wb.wants_value() {
                __cache_wb.encode(&MaybeUnencodable(&$v));
            }
            __cache_wb.args(&(&$id, &$v));
            match __cache_wb.enqueue().await {
                None => Ok(()),
                Some(inline) => inline.run(__cache_body($id, $v)).await,
            }
        }
    };
}

/// Serializes as its string, but fails for `UNENCODABLE` (a value that does not encode).
struct MaybeUnencodable<'a>(&'a String);

const UNENCODABLE: &str = "<unencodable>";

impl serde::Serialize for MaybeUnencodable<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.0 == UNENCODABLE {
            return Err(serde::ser::Error::custom("this value does not encode"));
        }
        self.0.serialize(s)
    }
}

std::thread_local! {
    /// The cluster's URLs while a test's cluster variant runs (on its own thread).
    static CLUSTER_URLS: std::cell::RefCell<Option<Vec<String>>> =
        const { std::cell::RefCell::new(None) };
}

/// Makes this thread's test run on the Redis Cluster of `REDIS_CLUSTER_URLS` (or a private
/// one, kept alive by the guard returned).
fn use_cluster() -> Option<RedisCluster> {
    let (urls, guard) = shared_cluster();
    CLUSTER_URLS.with(|c| *c.borrow_mut() = Some(urls));
    guard
}

fn cluster_urls() -> Option<Vec<String>> {
    CLUSTER_URLS.with(|c| c.borrow().clone())
}

/// A raw connection to where this test's caches live (the shared Redis, or the cluster).
async fn raw() -> RawConn {
    match cluster_urls() {
        Some(urls) => RawConn::Cluster(raw_cluster_connection(&urls).await),
        None => RawConn::Single(raw_connection(&redis_url()).await),
    }
}

/// Defines each test twice, `<name>::redis::run` (the shared Redis) and `<name>::cluster::run` (the
/// Redis Cluster of `REDIS_CLUSTER_URLS`, or a private one): the body is copied, so each
/// variant has its own statics and its own registered functions.
macro_rules! on_redis_and_cluster {
    ($($(#[$attr:meta])* async fn $name:ident() $body:block)*) => {$(
        $(#[$attr])*
        mod $name {
            // A module per variant: the functions' ids (module path + name) differ.
            mod redis {
                #[allow(unused_imports)]
                use super::super::*;
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn run() $body
            }
            mod cluster {
                #[allow(unused_imports)]
                use super::super::*;
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn run() {
                    let _cluster = use_cluster();
                    $body
                }
            }
        }
    )*};
}

fn cache(name: &str, partitions: u16) -> (Cache, String) {
    let ns = unique_namespace(name);
    let builder = match cluster_urls() {
        Some(urls) => Cache::builder().redis_cluster(urls),
        None => Cache::builder().redis(redis_url()),
    };
    let cache = builder
        .namespace(ns.clone())
        .operation_timeout(Duration::from_secs(2))
        .write_behind_partitions(partitions)
        .build_sync()
        .unwrap();
    (cache, ns)
}

fn worker(cache: &Cache, queue: &str) -> cache_runtime::write_behind::WorkerBuilder {
    Worker::builder(cache)
        .queues([queue])
        .lease(Duration::from_secs(2))
        .poll(Duration::from_millis(50))
        .backoff(Duration::from_millis(10), Duration::from_millis(100))
}

fn stats_of(cache: &Cache, function: &str) -> cache_runtime::FunctionStats {
    cache
        .stats()
        .functions()
        .iter()
        .find(|f| f.name.ends_with(function))
        .cloned()
        .unwrap_or_else(|| panic!("no stats for {function}: {}", cache.stats()))
}

/// The dead letters of `queue`, oldest first, as field maps.
async fn dead_letters(
    _cache: &Cache,
    ns: &str,
    queue: &str,
) -> Vec<std::collections::HashMap<String, String>> {
    let mut conn = raw().await;
    type Fields = Vec<(Vec<u8>, Vec<u8>)>;
    let entries: Vec<(String, Fields)> = redis::cmd("XRANGE")
        .arg(format!("__cr:wb:{{{ns}:{queue}}}:dead"))
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    entries
        .into_iter()
        .map(|(_, fields)| {
            fields
                .into_iter()
                .map(|(k, v)| {
                    (
                        String::from_utf8_lossy(&k).into_owned(),
                        String::from_utf8_lossy(&v).into_owned(),
                    )
                })
                .collect()
        })
        .collect()
}

/// (id, value, write id) in the order the bodies ran.
type Log = Mutex<Vec<(u64, String, String)>>;

fn record(log: &Log, id: u64, v: &str) {
    let write = write_behind::current_id().expect("current_id inside the body");
    log.lock()
        .unwrap()
        .push((id, v.to_owned(), write.to_string()));
}

/// Every accepted write of `key` was applied at least once, in accepted order (a re-applied
/// suffix after a lost lease is allowed), and the last one applied is the last accepted.
fn assert_applied_in_order(key: u64, applied: &[String], accepted: &[String]) {
    let mut rest = applied;
    for v in accepted {
        let at = rest
            .iter()
            .position(|x| x == v)
            .unwrap_or_else(|| panic!("{v} of key {key} lost or out of order: {applied:?}"));
        rest = &rest[at + 1..];
    }
    assert_eq!(
        applied.last(),
        accepted.last(),
        "key {key}: the last write lands last"
    );
}

on_redis_and_cluster! {
async fn accepted_writes_are_applied_in_order_per_key() {
    static LOG: Log = Mutex::new(Vec::new());
    wb_fn!(wb_order, "order", coalesce = false, |id, v| {
        record(&LOG, id, &v);
        Ok(())
    });
    let (cache, _) = cache("wb_order", 4);
    let mut sent = Vec::new();
    for i in 0..30u64 {
        let (id, v) = (i % 3, format!("v{i}"));
        wb_order(&cache, id, v.clone()).await.unwrap();
        sent.push((id, v));
    }
    assert!(
        LOG.lock().unwrap().is_empty(),
        "nothing runs before a worker"
    );
    // Read your writes: the value is in the cache before the database has it.
    assert_eq!(
        cache.get::<String>("k:2").await.unwrap().as_deref(),
        Some("v29")
    );
    let depth = write_behind::depth(&cache, "order").await.unwrap();
    assert_eq!((depth.pending, depth.dead), (30, 0), "{depth}");
    assert!(depth.oldest.is_some());
    let w = worker(&cache, "order").start().unwrap();
    assert!(w.flush_for(Duration::from_secs(20)).await, "drained");
    let log = LOG.lock().unwrap().clone();
    assert_eq!(log.len(), 30, "applied once each (no coalescing)");
    for key in 0..3 {
        let applied: Vec<&String> = log.iter().filter(|e| e.0 == key).map(|e| &e.1).collect();
        let accepted: Vec<&String> = sent.iter().filter(|e| e.0 == key).map(|e| &e.1).collect();
        assert_eq!(applied, accepted, "key {key} in accepted order");
    }
    let ids: std::collections::HashSet<&String> = log.iter().map(|e| &e.2).collect();
    assert_eq!(ids.len(), 30, "a distinct write id per write");
    let s = stats_of(&cache, "wb_order");
    assert_eq!((s.accepted, s.write_through, s.applied), (30, 0, 30));
    let table = cache.stats().to_string();
    assert!(table.contains("write-behind"), "{table}");
    let ws = w.stats().await;
    assert!(ws.to_string().contains("wb_order"), "{ws}");
    assert_eq!(
        write_behind::depth(&cache, "order").await.unwrap().pending,
        0
    );
    w.shutdown().await;
}
}

on_redis_and_cluster! {
async fn queued_writes_of_a_key_coalesce_last_wins() {
    static LOG: Log = Mutex::new(Vec::new());
    wb_fn!(wb_coalesce, "coalesce", coalesce = true, |id, v| {
        record(&LOG, id, &v);
        Ok(())
    });
    let (cache, _) = cache("wb_coalesce", 2);
    for i in 0..10 {
        wb_coalesce(&cache, 1, format!("v{i}")).await.unwrap();
    }
    let w = worker(&cache, "coalesce").start().unwrap();
    assert!(w.flush_for(Duration::from_secs(20)).await);
    let log = LOG.lock().unwrap().clone();
    assert_eq!(log.len(), 1, "one batch, one statement: {log:?}");
    assert_eq!(log[0].1, "v9", "the last write wins");
    w.shutdown().await;
}
}

on_redis_and_cluster! {
async fn a_write_that_fails_three_times_is_applied_once_after_backoff() {
    static ATTEMPTS: AtomicU32 = AtomicU32::new(0);
    static TIMES: Mutex<Vec<Instant>> = Mutex::new(Vec::new());
    static LOG: Log = Mutex::new(Vec::new());
    wb_fn!(wb_flaky, "flaky", coalesce = true, |id, v| {
        TIMES.lock().unwrap().push(Instant::now());
        if ATTEMPTS.fetch_add(1, SeqCst) < 3 {
            if ATTEMPTS.load(SeqCst) == 2 {
                panic!("a panicking attempt counts as a failure");
            }
            return Err("database unavailable".into());
        }
        record(&LOG, id, &v);
        Ok(())
    });
    let (cache, _) = cache("wb_flaky", 2);
    wb_flaky(&cache, 5, "x".into()).await.unwrap();
    let w = worker(&cache, "flaky")
        .backoff(Duration::from_millis(40), Duration::from_millis(200))
        .start()
        .unwrap();
    assert!(w.flush_for(Duration::from_secs(20)).await);
    assert_eq!(ATTEMPTS.load(SeqCst), 4);
    assert_eq!(LOG.lock().unwrap().len(), 1, "applied once");
    let s = stats_of(&cache, "wb_flaky");
    assert_eq!((s.applied, s.retried, s.dead_lettered), (1, 3, 0));
    let times = TIMES.lock().unwrap().clone();
    // Equal jitter: the n-th retry waits at least half of min(max, base * 2^(n-1)).
    for (n, least) in [(1, 20), (2, 40), (3, 80)] {
        let gap = times[n] - times[n - 1];
        assert!(
            gap >= Duration::from_millis(least),
            "retry {n} after {gap:?}"
        );
    }
    w.shutdown().await;
}
}

on_redis_and_cluster! {
async fn a_permanent_failure_is_dead_lettered_and_other_keys_go_on() {
    static FIXED: AtomicBool = AtomicBool::new(false);
    static LOG: Log = Mutex::new(Vec::new());
    wb_fn!(wb_poison, "poison", coalesce = false, |id, v| {
        if id == 0 && !FIXED.load(SeqCst) {
            return Err(format!("constraint violated by {v}"));
        }
        record(&LOG, id, &v);
        Ok(())
    });
    // One partition: every key shares it with the failing one.
    let (cache, ns) = cache("wb_poison", 1);
    wb_poison(&cache, 0, "bad".into()).await.unwrap();
    for i in 1..=5 {
        wb_poison(&cache, i, format!("ok{i}")).await.unwrap();
    }
    let w = worker(&cache, "poison").max_attempts(3).start().unwrap();
    assert!(
        w.flush_for(Duration::from_secs(20)).await,
        "dead letters do not count"
    );
    let applied: Vec<u64> = LOG.lock().unwrap().iter().map(|e| e.0).collect();
    assert_eq!(applied, vec![1, 2, 3, 4, 5], "the other keys were applied");
    let s = stats_of(&cache, "wb_poison");
    assert_eq!((s.retried, s.dead_lettered), (2, 1));
    let depth = write_behind::depth(&cache, "poison").await.unwrap();
    assert_eq!((depth.pending, depth.dead), (0, 1), "{depth}");
    // The database never got "bad": the cache no longer holds it (the other keys keep theirs).
    assert_eq!(cache.get::<String>("k:0").await.unwrap(), None);
    assert_eq!(
        cache.get::<String>("k:1").await.unwrap().as_deref(),
        Some("ok1")
    );
    let letter = dead_letters(&cache, &ns, "poison").await;
    assert_eq!(letter.len(), 1);
    let letter = &letter[0];
    assert_eq!(letter["e"], "constraint violated by bad");
    assert_eq!(letter["n"], "3");
    assert!(
        letter["from"].starts_with(&format!("__cr:wb:{{{ns}:poison:0}} ")),
        "{letter:?}"
    );
    assert_eq!(letter["k"], cache.full_key("k:0"));
    // Fixed: the dead letter goes back and is applied.
    FIXED.store(true, SeqCst);
    assert_eq!(write_behind::retry_dead(&cache, "poison").await.unwrap(), 1);
    assert!(w.flush_for(Duration::from_secs(20)).await);
    assert!(LOG.lock().unwrap().iter().any(|e| e.0 == 0 && e.1 == "bad"));
    let depth = write_behind::depth(&cache, "poison").await.unwrap();
    assert_eq!((depth.pending, depth.dead), (0, 0), "{depth}");
    w.shutdown().await;
}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_function_is_left_pending_and_others_go_on() {
    static LOG: Log = Mutex::new(Vec::new());
    wb_fn!(wb_known, "mixed", coalesce = false, |id, v| {
        record(&LOG, id, &v);
        Ok(())
    });
    let (cache, ns) = cache("wb_unknown", 1);
    let mut conn = raw().await;
    let stream = format!("__cr:wb:{{{ns}:mixed:0}}");
    let _: String = redis::cmd("XADD")
        .arg(&stream)
        .arg("*")
        .arg(&[
            ("f", "some::newer::binary::fn"),
            ("k", &cache.full_key("k:9")[..]),
            ("i", "1-x-1"),
            ("a", "[9]"),
            ("v", ""),
            ("t", "1000"),
        ])
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = conn.pexpire(&stream, 60_000).await.unwrap();
    // Undecodable arguments of a known function: dead-lettered with the error.
    let _: String = redis::cmd("XADD")
        .arg(&stream)
        .arg("*")
        .arg(&[
            ("f", "integration::write_behind_runtime::wb_known"),
            ("k", &cache.full_key("k:8")[..]),
            ("i", "1-x-2"),
            ("a", "not json"),
            ("v", ""),
            ("t", "1000"),
        ])
        .query_async(&mut conn)
        .await
        .unwrap();
    for i in 1..=3 {
        wb_known(&cache, i, format!("v{i}")).await.unwrap();
    }
    let w = worker(&cache, "mixed").start().unwrap();
    assert!(
        !w.flush_for(Duration::from_secs(2)).await,
        "the unknown function's entry stays"
    );
    let applied: Vec<u64> = LOG.lock().unwrap().iter().map(|e| e.0).collect();
    assert_eq!(applied, vec![1, 2, 3]);
    let depth = write_behind::depth(&cache, "mixed").await.unwrap();
    assert_eq!((depth.pending, depth.dead), (1, 1), "{depth}");
    let dead: redis::Value = redis::cmd("XRANGE")
        .arg(format!("__cr:wb:{{{ns}:mixed}}:dead"))
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(format!("{dead:?}").contains("do not decode"), "{dead:?}");
    w.shutdown().await;
}

on_redis_and_cluster! {
async fn a_dead_workers_partitions_are_taken_over_with_nothing_lost() {
    static HANG: AtomicBool = AtomicBool::new(true);
    static ENTERED: AtomicU32 = AtomicU32::new(0);
    static LOG: Log = Mutex::new(Vec::new());
    wb_fn!(wb_takeover, "takeover", coalesce = false, |id, v| {
        if id == 0 && HANG.load(SeqCst) {
            ENTERED.fetch_add(1, SeqCst);
            std::future::pending::<()>().await;
        }
        record(&LOG, id, &v);
        Ok(())
    });
    let (cache, ns) = cache("wb_takeover", 2);
    for i in 0..20u64 {
        wb_takeover(&cache, i % 4, format!("v{i}")).await.unwrap();
    }
    let dying = Worker::builder(&cache)
        .queues(["takeover"])
        .lease(Duration::from_millis(600))
        .poll(Duration::from_millis(50))
        .start()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while ENTERED.load(SeqCst) == 0 {
        assert!(
            Instant::now() < deadline,
            "the first worker never took key 0"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // It dies mid-entry: its tasks stop, its leases are not given back.
    drop(dying);
    HANG.store(false, SeqCst);
    let mut conn = raw().await;
    let held: Option<String> = conn
        .get(format!("__cr:wb:{{{ns}:takeover:0}}:owner"))
        .await
        .unwrap();
    let held1: Option<String> = conn
        .get(format!("__cr:wb:{{{ns}:takeover:1}}:owner"))
        .await
        .unwrap();
    assert!(
        held.is_some() || held1.is_some(),
        "the dead worker's leases stay until they expire"
    );
    let w = Worker::builder(&cache)
        .queues(["takeover"])
        .lease(Duration::from_millis(600))
        .poll(Duration::from_millis(50))
        .start()
        .unwrap();
    assert!(
        w.flush_for(Duration::from_secs(20)).await,
        "everything applied"
    );
    // The dead worker's consumers were deleted when its partitions were taken over.
    for p in 0..2 {
        let consumers: redis::Value = redis::cmd("XINFO")
            .arg("CONSUMERS")
            .arg(format!("__cr:wb:{{{ns}:takeover:{p}}}"))
            .arg("cr")
            .query_async(&mut conn)
            .await
            .unwrap();
        let n = match consumers {
            redis::Value::Array(a) => a.len(),
            other => panic!("{other:?}"),
        };
        assert_eq!(n, 1, "only the live worker's consumer in partition {p}");
    }
    let log = LOG.lock().unwrap().clone();
    for key in 0..4u64 {
        let applied: Vec<String> = log
            .iter()
            .filter(|e| e.0 == key)
            .map(|e| e.1.clone())
            .collect();
        let expected: Vec<String> = (0..20u64)
            .filter(|i| i % 4 == key)
            .map(|i| format!("v{i}"))
            .collect();
        assert_applied_in_order(key, &applied, &expected);
    }
    w.shutdown().await;
}
}

on_redis_and_cluster! {
async fn the_worker_reasserts_the_value_and_an_older_write_never_wins() {
    static LOG: Log = Mutex::new(Vec::new());
    wb_fn!(wb_reassert, "reassert", coalesce = false, |id, v| {
        record(&LOG, id, &v);
        Ok(())
    });
    let (cache, _) = cache("wb_reassert", 2);
    let mut conn = raw().await;
    // Evicted while queued: back after the apply.
    wb_reassert(&cache, 1, "one".into()).await.unwrap();
    let _: () = conn.del(cache.full_key("k:1")).await.unwrap();
    // Two writes of key 2, then a fill from the old database: the last write ends up cached.
    wb_reassert(&cache, 2, "older".into()).await.unwrap();
    wb_reassert(&cache, 2, "newer".into()).await.unwrap();
    cache
        .set("k:2", &"from the old database", Duration::from_secs(60))
        .await
        .unwrap();
    let wbl = format!("__cr:wbl:{{{}}}", cache.full_key("k:2"));
    let ttl: i64 = conn.pttl(&wbl).await.unwrap();
    assert!(ttl > 0, "wbl has a TTL: {ttl}");
    // The value's TTL is 10 minutes; wbl lives at least an hour.
    assert!(ttl > 3_500_000, "wbl lives max(ttl, 1h): {ttl}");
    let w = worker(&cache, "reassert").start().unwrap();
    assert!(w.flush_for(Duration::from_secs(20)).await);
    assert_eq!(
        cache.get::<String>("k:1").await.unwrap().as_deref(),
        Some("one")
    );
    assert_eq!(
        cache.get::<String>("k:2").await.unwrap().as_deref(),
        Some("newer")
    );
    let left: bool = conn.exists(&wbl).await.unwrap();
    if cluster_urls().is_some() {
        // On a cluster it keeps the position of the key's last stored write.
        assert!(left, "wbl keeps the last position");
    } else {
        assert!(!left, "wbl removed once applied");
    }
    w.shutdown().await;
}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_unreachable_means_inline_write_through() {
    static RAN: AtomicU32 = AtomicU32::new(0);
    wb_fn!(wb_down, "down", coalesce = true, |id, v| {
        assert!(write_behind::current_id().is_some());
        RAN.fetch_add(1, SeqCst);
        if v == "fail" {
            return Err(format!("db refused {id}"));
        }
        Ok(())
    });
    let cache = Cache::builder()
        .redis(format!("redis://127.0.0.1:{}", free_port()))
        .namespace(unique_namespace("wb_down"))
        .build_sync()
        .unwrap();
    wb_down(&cache, 1, "x".into()).await.unwrap();
    assert_eq!(
        wb_down(&cache, 2, "fail".into()).await,
        Err("db refused 2".into())
    );
    assert_eq!(RAN.load(SeqCst), 2, "the bodies ran inline");
    let s = stats_of(&cache, "wb_down");
    assert_eq!((s.accepted, s.write_through), (0, 2));
    assert!(write_behind::depth(&cache, "down").await.is_err());
}

#[tokio::test]
async fn the_memory_backend_runs_inline_and_has_no_worker() {
    static RAN: AtomicU32 = AtomicU32::new(0);
    wb_fn!(wb_memory, "memory", coalesce = true, |_id, _v| {
        RAN.fetch_add(1, SeqCst);
        Ok(())
    });
    let cache = Cache::memory();
    wb_memory(&cache, 1, "m".into()).await.unwrap();
    assert_eq!(RAN.load(SeqCst), 1);
    assert_eq!(
        cache.get::<String>("k:1").await.unwrap().as_deref(),
        Some("m")
    );
    assert_eq!(stats_of(&cache, "wb_memory").write_through, 1);
    let e = Worker::builder(&cache)
        .queues(["memory"])
        .start()
        .unwrap_err();
    assert!(e.is_config(), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_gives_the_partitions_back_and_keys_have_ttls() {
    wb_fn!(wb_shutdown, "shutdown", coalesce = true, |_id, _v| {
        Ok(())
    });
    let (cache, ns) = cache("wb_shutdown", 2);
    wb_shutdown(&cache, 1, "a".into()).await.unwrap();
    let mut conn = raw().await;
    let w = worker(&cache, "shutdown").start().unwrap();
    assert!(w.flush_for(Duration::from_secs(20)).await);
    let owners: Vec<String> = (0..2)
        .map(|p| format!("__cr:wb:{{{ns}:shutdown:{p}}}:owner"))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let held: Vec<Option<String>> = redis::cmd("MGET")
            .arg(&owners)
            .query_async(&mut conn)
            .await
            .unwrap();
        if held.iter().all(Option::is_some) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the worker takes both partitions"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for key in [
        owners[0].clone(),
        format!("__cr:wb:{{{ns}:shutdown:0}}"),
        format!("__cr:wb:{{{ns}:shutdown}}:workers"),
        cache.full_key("k:1"),
    ] {
        let ttl: i64 = conn.pttl(&key).await.unwrap();
        assert!(ttl > 0, "{key} has a TTL ({ttl})");
    }
    w.shutdown().await;
    let held: Vec<Option<String>> = redis::cmd("MGET")
        .arg(&owners)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        held.iter().all(Option::is_none),
        "leases given back: {held:?}"
    );
    let live: i64 = conn
        .zcard(format!("__cr:wb:{{{ns}:shutdown}}:workers"))
        .await
        .unwrap();
    assert_eq!(live, 0, "left the live set");
}

on_redis_and_cluster! {
async fn two_workers_share_the_partitions_and_keep_each_keys_order() {
    static LOG: Log = Mutex::new(Vec::new());
    wb_fn!(wb_shared, "shared", coalesce = false, |id, v| {
        record(&LOG, id, &v);
        tokio::task::yield_now().await;
        Ok(())
    });
    let (cache, ns) = cache("wb_shared", 4);
    let a = worker(&cache, "shared")
        .lease(Duration::from_millis(800))
        .start()
        .unwrap();
    let b = worker(&cache, "shared")
        .lease(Duration::from_millis(800))
        .start()
        .unwrap();
    let mut sent = Vec::new();
    for i in 0..200u64 {
        let (id, v) = (i % 20, format!("v{i}"));
        wb_shared(&cache, id, v.clone()).await.unwrap();
        sent.push((id, v));
        if i % 50 == 0 {
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    }
    assert!(a.flush_for(Duration::from_secs(20)).await);
    // Each holds its fair share (2 of 4) once both are live.
    let mut conn = raw().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let owners: Vec<Option<String>> = redis::cmd("MGET")
            .arg(
                (0..4)
                    .map(|p| format!("__cr:wb:{{{ns}:shared:{p}}}:owner"))
                    .collect::<Vec<_>>(),
            )
            .query_async(&mut conn)
            .await
            .unwrap();
        let distinct: std::collections::HashSet<&String> = owners.iter().flatten().collect();
        if owners.iter().all(Option::is_some) && distinct.len() == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "fair share never reached: {owners:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = LOG.lock().unwrap().clone();
    for key in 0..20 {
        let applied: Vec<String> = log
            .iter()
            .filter(|e| e.0 == key)
            .map(|e| e.1.clone())
            .collect();
        let accepted: Vec<String> = sent
            .iter()
            .filter(|e| e.0 == key)
            .map(|e| e.1.clone())
            .collect();
        assert_applied_in_order(key, &applied, &accepted);
    }
    a.shutdown().await;
    b.shutdown().await;
}
}

/// Finding 1: the fair share counts the workers serving the queue, not every worker of the
/// namespace; two workers with disjoint queues each drain all of theirs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_with_disjoint_queues_each_drain_theirs() {
    static LOG: Log = Mutex::new(Vec::new());
    wb_fn!(wb_disjoint_a, "disjoint-a", coalesce = false, |id, v| {
        record(&LOG, id, &v);
        Ok(())
    });
    wb_fn!(wb_disjoint_b, "disjoint-b", coalesce = false, |id, v| {
        record(&LOG, id, &v);
        Ok(())
    });
    let (cache, ns) = cache("wb_disjoint", 4);
    for i in 0..16u64 {
        wb_disjoint_a(&cache, i, format!("a{i}")).await.unwrap();
        wb_disjoint_b(&cache, 100 + i, format!("b{i}"))
            .await
            .unwrap();
    }
    let a = worker(&cache, "disjoint-a").start().unwrap();
    let b = worker(&cache, "disjoint-b").start().unwrap();
    assert!(
        a.flush_for(Duration::from_secs(15)).await,
        "queue a drained"
    );
    assert!(
        b.flush_for(Duration::from_secs(15)).await,
        "queue b drained"
    );
    assert_eq!(LOG.lock().unwrap().len(), 32);
    let mut conn = raw().await;
    for q in ["disjoint-a", "disjoint-b"] {
        let live: i64 = conn
            .zcard(format!("__cr:wb:{{{ns}:{q}}}:workers"))
            .await
            .unwrap();
        assert_eq!(live, 1, "one worker serves {q}");
    }
    a.shutdown().await;
    b.shutdown().await;
}

on_redis_and_cluster! {
/// Finding 3: a body reads the entry's position; it increases per key in acceptance order,
/// is the same on every attempt, and a dead letter moved back keeps its first position, so a
/// versioned body refuses it once a newer write of its key was applied. Retries are spaced by
/// at least half the backoff.
async fn positions_order_retries_and_retried_dead_letters() {
    use cache_runtime::write_behind::Position;
    use std::collections::HashMap;
    static FIXED: AtomicBool = AtomicBool::new(false);
    static FLAKY: AtomicU32 = AtomicU32::new(0);
    /// (value, position) per attempt.
    static SEEN: Mutex<Vec<(String, Position)>> = Mutex::new(Vec::new());
    /// The "database": key -> (value, version).
    static ROWS: Mutex<Option<HashMap<u64, (String, Position)>>> = Mutex::new(None);
    wb_fn!(wb_versioned, "versioned", coalesce = false, |id, v| {
        let pos = write_behind::current_id()
            .and_then(|w| w.position())
            .expect("a queued write has a position");
        SEEN.lock().unwrap().push((v.clone(), pos));
        if v == "bad" && !FIXED.load(SeqCst) {
            return Err("refused".into());
        }
        if v == "flaky" && FLAKY.fetch_add(1, SeqCst) < 1 {
            return Err("flaky".into());
        }
        let mut rows = ROWS.lock().unwrap();
        let rows = rows.get_or_insert_with(HashMap::new);
        // UPDATE .. WHERE (ver_ms, ver_seq) < ($1, $2)
        if rows.get(&id).is_none_or(|(_, ver)| *ver < pos) {
            rows.insert(id, (v, pos));
        }
        Ok(())
    });
    let (cache, _) = cache("wb_versioned", 2);
    for v in ["a", "bad", "flaky"] {
        wb_versioned(&cache, 1, v.into()).await.unwrap();
    }
    let w = worker(&cache, "versioned")
        .max_attempts(2)
        .backoff(Duration::from_millis(40), Duration::from_millis(200))
        .start()
        .unwrap();
    assert!(w.flush_for(Duration::from_secs(20)).await);
    let seen = SEEN.lock().unwrap().clone();
    let of = |v: &str| -> Vec<Position> {
        seen.iter()
            .filter(|(x, _)| x == v)
            .map(|(_, p)| *p)
            .collect()
    };
    assert_eq!(of("bad").len(), 2, "{seen:?}");
    assert_eq!(of("flaky").len(), 2, "{seen:?}");
    assert!(
        of("bad").windows(2).all(|w| w[0] == w[1]),
        "same on retries"
    );
    assert!(
        of("flaky").windows(2).all(|w| w[0] == w[1]),
        "same on retries"
    );
    assert!(of("a")[0] < of("bad")[0] && of("bad")[0] < of("flaky")[0]);
    let p = of("a")[0];
    assert_eq!(p.to_string(), format!("{}-{}", p.ms(), p.seq()));
    assert_eq!(
        ROWS.lock().unwrap().as_ref().unwrap()[&1].0,
        "flaky",
        "the newest write landed"
    );
    // The dead letter comes back after the newer write: same position, refused by the body.
    FIXED.store(true, SeqCst);
    assert_eq!(
        write_behind::retry_dead(&cache, "versioned").await.unwrap(),
        1
    );
    assert!(w.flush_for(Duration::from_secs(20)).await);
    let again = SEEN.lock().unwrap().clone();
    let last = again.last().unwrap();
    assert_eq!(last.0, "bad");
    assert_eq!(last.1, of("bad")[0], "retry_dead keeps the first position");
    assert_eq!(
        ROWS.lock().unwrap().as_ref().unwrap()[&1].0,
        "flaky",
        "the older write did not win"
    );
    w.shutdown().await;
}
}

#[tokio::test]
async fn an_inline_run_has_no_position() {
    static POS: Mutex<Vec<Option<String>>> = Mutex::new(Vec::new());
    wb_fn!(wb_inline_pos, "inline-pos", coalesce = true, |_id, _v| {
        let id = write_behind::current_id().expect("current_id inline");
        POS.lock()
            .unwrap()
            .push(id.position().map(|p| p.to_string()));
        Ok(())
    });
    let cache = Cache::memory();
    wb_inline_pos(&cache, 1, "m".into()).await.unwrap();
    assert_eq!(*POS.lock().unwrap(), vec![None]);
}

/// Finding 4: a value that does not encode does not make the call run inline (overtaking
/// the key's queued writes): the entry is queued without a value, and the same step
/// invalidates the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_that_does_not_encode_is_queued_and_invalidates_the_key() {
    static LOG: Log = Mutex::new(Vec::new());
    wb_fn!(wb_unencodable, "unencodable", coalesce = false, |id, v| {
        record(&LOG, id, &v);
        Ok(())
    });
    let (cache, _) = cache("wb_unencodable", 2);
    wb_unencodable(&cache, 1, "first".into()).await.unwrap();
    assert_eq!(
        cache.get::<String>("k:1").await.unwrap().as_deref(),
        Some("first")
    );
    wb_unencodable(&cache, 1, UNENCODABLE.into()).await.unwrap();
    assert!(LOG.lock().unwrap().is_empty(), "nothing ran inline");
    assert_eq!(
        cache.get::<String>("k:1").await.unwrap(),
        None,
        "invalidated"
    );
    let mut conn = raw().await;
    let wbl: bool = conn
        .exists(format!("__cr:wbl:{{{}}}", cache.full_key("k:1")))
        .await
        .unwrap();
    assert!(!wbl, "no earlier write's re-assert puts its value back");
    let s = stats_of(&cache, "wb_unencodable");
    assert_eq!((s.accepted, s.write_through), (2, 0));
    let w = worker(&cache, "unencodable").start().unwrap();
    assert!(w.flush_for(Duration::from_secs(20)).await);
    let applied: Vec<String> = LOG.lock().unwrap().iter().map(|e| e.1.clone()).collect();
    assert_eq!(applied, vec!["first".to_owned(), UNENCODABLE.to_owned()]);
    assert_eq!(
        cache.get::<String>("k:1").await.unwrap(),
        None,
        "the older value is not re-asserted"
    );
    w.shutdown().await;
}

/// Finding 5: arguments that serialize but do not decode back (an `f64` NaN becomes `null`)
/// are not queued (they could only be dead-lettered): the call runs inline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arguments_that_do_not_decode_back_run_inline() {
    use cache_runtime::__private::{
        self, Applying, ArgsError, Call, CallKey, Site, WbFunction, WriteBehind,
    };
    static RAN: Mutex<Vec<f64>> = Mutex::new(Vec::new());
    async fn body(_id: u64, x: f64) -> Result<(), String> {
        RAN.lock().unwrap().push(x);
        Ok(())
    }
    static SITE: Site = Site::new(module_path!(), "wb_nan").ttl_ms(60_000);
    fn apply(args: &[u8]) -> Result<Applying, ArgsError> {
        let (a0, a1): (u64, f64) = __private::wb_decode(args)?;
        Ok(Applying::new(async move {
            __private::wb_outcome!(body(a0, a1).await)
        }))
    }
    static WB: WbFunction = WbFunction::new(&SITE, "nan", apply);
    __private::inventory::submit! { __private::WbHandler(&WB) }
    async fn call(cache: &Cache, id: u64, x: f64) -> Result<(), String> {
        let mut wb = WriteBehind::new(
            Call {
                cache,
                site: &SITE,
                self_type: None,
                key: CallKey::Key(cache.full_key(&format!("k:{id}")).into()),
            },
            &WB,
        );
        wb.begin().await;
        if wb.wants_value() {
            wb.encode(&id);
        }
        wb.args(&(&id, &x));
        match wb.enqueue().await {
            None => Ok(()),
            Some(inline) => inline.run(body(id, x)).await,
        }
    }
    let (cache, _) = cache("wb_nan", 2);
    call(&cache, 1, 1.5).await.unwrap();
    assert!(RAN.lock().unwrap().is_empty(), "a decodable call is queued");
    call(&cache, 2, f64::NAN).await.unwrap();
    assert_eq!(RAN.lock().unwrap().len(), 1, "the NaN call ran inline");
    assert!(RAN.lock().unwrap()[0].is_nan());
    let s = stats_of(&cache, "wb_nan");
    assert_eq!((s.accepted, s.write_through), (1, 1));
    let depth = write_behind::depth(&cache, "nan").await.unwrap();
    assert_eq!((depth.pending, depth.dead), (1, 0), "{depth}");
}

/// Finding 6: a worker that loses a partition's lease while a body runs cancels the body (it
/// does not acknowledge it), and the next owner applies the entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_running_when_the_lease_is_lost_is_cancelled() {
    static HANG: AtomicBool = AtomicBool::new(true);
    static ENTERED: AtomicU32 = AtomicU32::new(0);
    static CANCELLED: AtomicBool = AtomicBool::new(false);
    static LOG: Log = Mutex::new(Vec::new());
    wb_fn!(wb_lost, "lost", coalesce = false, |id, v| {
        if HANG.load(SeqCst) {
            struct Cancelled;
            impl Drop for Cancelled {
                fn drop(&mut self) {
                    CANCELLED.store(true, SeqCst);
                }
            }
            ENTERED.fetch_add(1, SeqCst);
            let _guard = Cancelled;
            std::future::pending::<()>().await;
        }
        record(&LOG, id, &v);
        Ok(())
    });
    let (cache, ns) = cache("wb_lost", 1);
    wb_lost(&cache, 1, "v".into()).await.unwrap();
    let a = worker(&cache, "lost")
        .lease(Duration::from_millis(800))
        .start()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while ENTERED.load(SeqCst) == 0 {
        assert!(Instant::now() < deadline, "the body never ran");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Someone else holds the lease now: the renewal fails.
    let mut conn = raw().await;
    let _: () = redis::cmd("SET")
        .arg(format!("__cr:wb:{{{ns}:lost:0}}:owner"))
        .arg("an-intruder")
        .arg("PX")
        .arg(1500)
        .query_async(&mut conn)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !CANCELLED.load(SeqCst) {
        assert!(
            Instant::now() < deadline,
            "the hanging body was not cancelled"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let depth = write_behind::depth(&cache, "lost").await.unwrap();
    assert_eq!(depth.pending, 1, "not acknowledged: {depth}");
    HANG.store(false, SeqCst);
    let b = worker(&cache, "lost")
        .lease(Duration::from_millis(800))
        .start()
        .unwrap();
    assert!(b.flush_for(Duration::from_secs(20)).await);
    assert_eq!(LOG.lock().unwrap().len(), 1, "the next owner applied it");
    a.shutdown().await;
    b.shutdown().await;
}

/// Finding 7: a key stuck on an unknown function keeps only a few entries in memory, so
/// even 1 100 of them do not stop the other keys of its partition; and the partition is
/// given back now and then when another worker serves the queue (a newer binary may have
/// the function).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_unknown_entries_of_one_key_do_not_stop_the_others() {
    static LOG: Log = Mutex::new(Vec::new());
    wb_fn!(wb_crowded, "crowded", coalesce = false, |id, v| {
        record(&LOG, id, &v);
        Ok(())
    });
    let (cache, ns) = cache("wb_crowded", 1);
    let mut conn = raw().await;
    let stream = format!("__cr:wb:{{{ns}:crowded:0}}");
    let key = cache.full_key("k:9");
    let mut pipe = redis::pipe();
    for i in 0..1100 {
        pipe.cmd("XADD")
            .arg(&stream)
            .arg("*")
            .arg(&[
                ("f", "some::newer::binary::fn"),
                ("k", &key[..]),
                ("i", &format!("1-x-{i}")[..]),
                ("a", "[9]"),
                ("v", ""),
                ("t", "1000"),
            ])
            .ignore();
    }
    pipe.cmd("PEXPIRE").arg(&stream).arg(60_000).ignore();
    let () = pipe.query_async(&mut conn).await.unwrap();
    for i in 1..=3 {
        wb_crowded(&cache, i, format!("v{i}")).await.unwrap();
    }
    let a = worker(&cache, "crowded")
        .lease(Duration::from_millis(600))
        .start()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while LOG.lock().unwrap().len() < 3 {
        assert!(
            Instant::now() < deadline,
            "the other keys were not applied: {:?}",
            LOG.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The applied entries are acknowledged; the unknown ones stay.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let depth = write_behind::depth(&cache, "crowded").await.unwrap();
        if depth.pending == 1100 {
            break;
        }
        assert!(Instant::now() < deadline, "{depth}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // With a second worker of the queue, the stuck partition changes hands now and then.
    let owner = format!("__cr:wb:{{{ns}:crowded:0}}:owner");
    let first: Option<String> = conn.get(&owner).await.unwrap();
    let first = first.expect("held");
    let b = worker(&cache, "crowded")
        .lease(Duration::from_millis(600))
        .start()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let now: Option<String> = conn.get(&owner).await.unwrap();
        if now.is_some_and(|o| o != first) {
            break;
        }
        assert!(Instant::now() < deadline, "the stuck partition never moved");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    a.shutdown().await;
    b.shutdown().await;
}

/// Finding 8: after a key's first failure its head is applied alone (no coalescing), and
/// attempts are counted per applied entry: a write that joins a failing run neither inherits
/// its attempts nor is dead-lettered with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_joining_a_failing_run_does_not_inherit_its_attempts() {
    static CALLS: AtomicU32 = AtomicU32::new(0);
    static LOG: Log = Mutex::new(Vec::new());
    wb_fn!(wb_joining, "joining", coalesce = true, |id, v| {
        if CALLS.fetch_add(1, SeqCst) < 3 {
            return Err(format!("down ({v})"));
        }
        record(&LOG, id, &v);
        Ok(())
    });
    let (cache, ns) = cache("wb_joining", 1);
    wb_joining(&cache, 1, "a".into()).await.unwrap();
    let w = worker(&cache, "joining")
        .max_attempts(3)
        .backoff(Duration::from_millis(300), Duration::from_millis(600))
        .start()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while CALLS.load(SeqCst) < 2 {
        assert!(Instant::now() < deadline, "never failed twice");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // "a" failed twice and waits for its third attempt: "b" joins the key's queue.
    wb_joining(&cache, 1, "b".into()).await.unwrap();
    assert!(w.flush_for(Duration::from_secs(20)).await);
    let letters = dead_letters(&cache, &ns, "joining").await;
    assert_eq!(letters.len(), 1, "only a is dead: {letters:?}");
    assert_eq!(letters[0]["e"], "down (a)");
    assert_eq!(letters[0]["n"], "3");
    let applied: Vec<String> = LOG.lock().unwrap().iter().map(|e| e.1.clone()).collect();
    assert_eq!(applied, vec!["b".to_owned()], "b applied on its own");
    w.shutdown().await;
}

/// Finding 10: an entry whose fields do not parse is dead-lettered with a clear error (not
/// taken for a deleted one and dropped), and counted; a partition key holding something
/// else than a stream is logged and backed off, without a panic, while the other
/// partitions go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_in_a_partition_is_dead_lettered_and_counted() {
    static LOG: Log = Mutex::new(Vec::new());
    wb_fn!(wb_garbage, "garbage", coalesce = false, |id, v| {
        record(&LOG, id, &v);
        Ok(())
    });
    let (cache, ns) = cache("wb_garbage", 1);
    let mut conn = raw().await;
    let stream = format!("__cr:wb:{{{ns}:garbage:0}}");
    let _: String = redis::cmd("XADD")
        .arg(&stream)
        .arg("*")
        .arg(&b"\xff\xfe"[..])
        .arg("x")
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: String = redis::cmd("XADD")
        .arg(&stream)
        .arg("*")
        .arg("just")
        .arg("garbage")
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = conn.pexpire(&stream, 60_000).await.unwrap();
    wb_garbage(&cache, 1, "ok".into()).await.unwrap();
    let w = worker(&cache, "garbage").start().unwrap();
    assert!(w.flush_for(Duration::from_secs(20)).await);
    assert_eq!(LOG.lock().unwrap().len(), 1);
    let letters = dead_letters(&cache, &ns, "garbage").await;
    assert_eq!(letters.len(), 2, "{letters:?}");
    assert!(
        letters
            .iter()
            .all(|l| l["e"].starts_with("a malformed entry")),
        "{letters:?}"
    );
    assert!(letters[0]["e"].contains("do not parse"), "{:?}", letters[0]);
    let stats = w.stats().await;
    assert_eq!(stats.malformed, 2, "{stats}");
    assert!(stats.to_string().contains("malformed"), "{stats}");
    w.shutdown().await;

    // A partition key that holds a string: no panic; the other partition goes on.
    static LOG2: Log = Mutex::new(Vec::new());
    wb_fn!(wb_wrongtype, "wrongtype", coalesce = false, |id, v| {
        record(&LOG2, id, &v);
        Ok(())
    });
    let (cache, ns) = self::cache("wb_wrongtype", 2);
    let _: () = redis::cmd("SET")
        .arg(format!("__cr:wb:{{{ns}:wrongtype:1}}"))
        .arg("not a stream")
        .arg("PX")
        .arg(60_000)
        .query_async(&mut conn)
        .await
        .unwrap();
    for i in 0..10 {
        wb_wrongtype(&cache, i, format!("v{i}")).await.unwrap();
    }
    let s = stats_of(&cache, "wb_wrongtype");
    assert_eq!(s.accepted + s.write_through, 10);
    assert!(
        s.accepted > 0 && s.write_through > 0,
        "both partitions used"
    );
    let w = worker(&cache, "wrongtype").start().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while stats_of(&cache, "wb_wrongtype").applied < s.accepted {
        assert!(Instant::now() < deadline, "partition 0 was not applied");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    w.shutdown().await;
}

/// Finding 11: settings out of range are refused by `start` with a `Config` error, not a
/// panic later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_out_of_range_are_refused() {
    wb_fn!(wb_ranges, "ranges", coalesce = true, |_id, _v| { Ok(()) });
    let (cache, _) = cache("wb_ranges", 1);
    let _ = wb_ranges; // registered: the queue exists
    let cases: Vec<(&str, cache_runtime::write_behind::WorkerBuilder)> = vec![
        (
            "backoff",
            worker(&cache, "ranges").backoff(Duration::MAX, Duration::MAX),
        ),
        (
            "backoff",
            worker(&cache, "ranges").backoff(Duration::from_millis(1), Duration::MAX),
        ),
        ("poll", worker(&cache, "ranges").poll(Duration::MAX)),
        ("lease", worker(&cache, "ranges").lease(Duration::MAX)),
        ("batch", worker(&cache, "ranges").batch(usize::MAX)),
    ];
    for (what, builder) in cases {
        let e = builder.start().unwrap_err();
        assert!(e.is_config(), "{e}");
        assert!(e.to_string().contains(what), "{what}: {e}");
    }
    worker(&cache, "ranges")
        .backoff(Duration::from_secs(3600), Duration::from_secs(3600))
        .lease(Duration::from_secs(3600))
        .poll(Duration::from_secs(60))
        .batch(10_000)
        .start()
        .unwrap()
        .shutdown()
        .await;
}

/// Finding 14: applied entries are acknowledged (and deleted) soon, also while a later body
/// of the pass is slow, so a crash re-applies little.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applied_entries_are_acknowledged_while_a_slow_body_runs() {
    static HANG: AtomicBool = AtomicBool::new(true);
    static ENTERED: AtomicBool = AtomicBool::new(false);
    wb_fn!(wb_acks, "acks", coalesce = false, |id, _v| {
        if id == 5 {
            ENTERED.store(true, SeqCst);
            while HANG.load(SeqCst) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        Ok(())
    });
    let (cache, _) = cache("wb_acks", 1);
    for i in 0..=5 {
        wb_acks(&cache, i, format!("v{i}")).await.unwrap();
    }
    let w = worker(&cache, "acks").start().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ENTERED.load(SeqCst) {
        assert!(Instant::now() < deadline, "the slow body never ran");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let depth = write_behind::depth(&cache, "acks").await.unwrap();
        if depth.pending == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the applied entries were not acknowledged: {depth}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    HANG.store(false, SeqCst);
    assert!(w.flush_for(Duration::from_secs(10)).await);
    w.shutdown().await;
}

/// The node (index in `cluster.nodes()`) that is master of `slot`, from `CLUSTER NODES`.
fn master_of(cluster: &RedisCluster, slot: u16) -> usize {
    for node in cluster.nodes() {
        let text = node.query_text(&["CLUSTER", "NODES"]);
        for line in text.lines() {
            let parts: Vec<&str> = line.split_whitespace().collect();
            if parts.len() < 9 || !parts[2].contains("master") || parts[2].contains("fail") {
                continue;
            }
            let owns = parts[8..].iter().any(|range| {
                let (a, b) = range.split_once('-').unwrap_or((range, range));
                match (a.parse::<u16>(), b.parse::<u16>()) {
                    (Ok(a), Ok(b)) => (a..=b).contains(&slot),
                    _ => false,
                }
            });
            if owns {
                let port: u16 = parts[1]
                    .split(['@', ':'])
                    .nth(1)
                    .and_then(|p| p.parse().ok())
                    .expect("a node address");
                return cluster
                    .nodes()
                    .iter()
                    .position(|n| n.port() == port)
                    .expect("a node of the cluster");
            }
        }
    }
    panic!("no master owns slot {slot}");
}

/// Writes go on while the master of a partition's stream (and of some value keys) is killed
/// and its replica promoted: every call returns `Ok` (queued, or run inline while the cluster
/// is down), every write is applied at least once, the versioned "database" ends with each
/// key's last write, and the cache agrees with it (or misses).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_a_master_killed_during_writes_loses_nothing() {
    use std::collections::HashMap;
    use std::sync::Arc;
    static LOG: Log = Mutex::new(Vec::new());
    static ROWS: Mutex<Option<HashMap<u64, u64>>> = Mutex::new(None);
    wb_fn!(wb_failover, "failover", coalesce = false, |id, v| {
        record(&LOG, id, &v);
        let n: u64 = v.parse().unwrap();
        let mut rows = ROWS.lock().unwrap();
        let row = rows.get_or_insert_with(HashMap::new).entry(id).or_insert(0);
        // A versioned UPDATE: an older write never wins.
        *row = (*row).max(n);
        Ok(())
    });
    let mut cluster = RedisCluster::start();
    CLUSTER_URLS.with(|c| *c.borrow_mut() = Some(cluster.urls()));
    let (cache, ns) = cache("wb_failover", 4);
    let w = worker(&cache, "failover").start().unwrap();
    const KEYS: u64 = 32;
    let stop = Arc::new(AtomicBool::new(false));
    let last = Arc::new(Mutex::new(HashMap::<u64, u64>::new()));
    let sent = Arc::new(Mutex::new(Vec::<(u64, u64)>::new()));
    let mut writers = Vec::new();
    for t in 0..8u64 {
        let (cache, stop, last, sent) = (cache.clone(), stop.clone(), last.clone(), sent.clone());
        writers.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(SeqCst) {
                n += 1;
                for k in (0..KEYS).filter(|k| k % 8 == t) {
                    wb_failover(&cache, k, n.to_string()).await.unwrap();
                    last.lock().unwrap().insert(k, n);
                    sent.lock().unwrap().push((k, n));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    let mut conn = raw().await;
    let slot: u16 = redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(format!("__cr:wb:{{{ns}:failover:0}}"))
        .query_async(&mut conn)
        .await
        .unwrap();
    let victim = master_of(&cluster, slot);
    cluster.node_mut(victim).kill();
    // Node timeout 2 s, then the replica's election.
    tokio::time::sleep(Duration::from_secs(7)).await;
    stop.store(true, SeqCst);
    for writer in writers {
        writer.await.unwrap();
    }
    if !w.flush_for(Duration::from_secs(40)).await {
        let depth = write_behind::depth(&cache, "failover").await;
        let (fresh, _) = self::cache("wb_failover_probe", 4);
        let probe = fresh.set("probe", &1u32, Duration::from_secs(5)).await;
        let mut raw = raw().await;
        let raw_probe: redis::RedisResult<i64> = redis::cmd("XLEN")
            .arg(format!("__cr:wb:{{{ns}:failover:0}}"))
            .query_async(&mut raw)
            .await;
        let old_probe = cache.set("probe", &1u32, Duration::from_secs(5)).await;
        eprintln!("fresh cache: {probe:?}; old cache: {old_probe:?}; raw XLEN: {raw_probe:?}");
        let stats = w.stats().await;
        panic!("not drained after the failover: {depth:?}\n{stats}");
    }
    let log = LOG.lock().unwrap().clone();
    let last = last.lock().unwrap().clone();
    let rows = ROWS.lock().unwrap().clone().unwrap_or_default();
    let applied: std::collections::HashSet<(u64, String)> =
        log.iter().map(|e| (e.0, e.1.clone())).collect();
    let sent = sent.lock().unwrap().clone();
    let lost: Vec<&(u64, u64)> = sent
        .iter()
        .filter(|(k, n)| !applied.contains(&(*k, n.to_string())))
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {} writes never applied: {lost:?}",
        lost.len(),
        sent.len()
    );
    let mut missing_in_cache = 0;
    for k in 0..KEYS {
        let final_n = last[&k];
        assert!(final_n > 10, "key {k}: writes went on ({final_n})");
        assert_eq!(
            rows.get(&k),
            Some(&final_n),
            "key {k}: the last write landed"
        );
        assert!(
            log.iter().any(|e| e.0 == k && e.1 == final_n.to_string()),
            "key {k}: its last write was applied"
        );
        match cache.get::<String>(&format!("k:{k}")).await.unwrap() {
            Some(v) => assert_eq!(v, final_n.to_string(), "key {k}: the cache agrees"),
            None => missing_in_cache += 1,
        }
    }
    let s = stats_of(&cache, "wb_failover");
    eprintln!(
        "failover: {} calls ({} queued, {} inline), {} applications, {missing_in_cache} keys missing from the cache",
        s.accepted + s.write_through,
        s.accepted,
        s.write_through,
        log.len()
    );
    assert!(s.accepted > 0 && s.write_through > 0, "{s:?}");
    let depth = write_behind::depth(&cache, "failover").await.unwrap();
    assert_eq!((depth.pending, depth.dead), (0, 0), "{depth}");
    w.shutdown().await;
}
