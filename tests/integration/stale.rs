//! `stale`: a value is kept past its TTL and returned when the load fails (an error or a
//! panic), until the stale time runs out; never after a write, an invalidation or a tag
//! invalidation of it. On both backends, and on Redis across caches.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use cache_runtime::{Cache, cached};

use crate::support::{Fx, on_both_backends};

/// The database: a value that can start failing, or panicking.
#[derive(Default)]
struct Db {
    value: Mutex<String>,
    failing: AtomicBool,
    panicking: AtomicBool,
    loads: AtomicU32,
}

impl Db {
    fn new(v: &str) -> Db {
        let db = Db::default();
        db.set(v);
        db
    }
    fn set(&self, v: &str) {
        *self.value.lock().unwrap() = v.to_owned();
    }
    fn read(&self) -> Result<String, String> {
        self.loads.fetch_add(1, Ordering::SeqCst);
        if self.panicking.load(Ordering::SeqCst) {
            panic!("the database driver panicked");
        }
        if self.failing.load(Ordering::SeqCst) {
            return Err("database down".to_owned());
        }
        Ok(self.value.lock().unwrap().clone())
    }
}

const TTL: Duration = Duration::from_millis(400);
const STALE: Duration = Duration::from_millis(2500);

#[cached(cache = cache, key = "price:{id}", ttl = "400ms", stale = "2500ms", name = "price")]
async fn price(cache: &Cache, db: &Db, id: u64) -> Result<String, String> {
    db.read()
}

#[cached(cache = cache, key = "tagged_price:{id}", ttl = "400ms", stale = "2500ms", tags = ["shop:{shop}"], name = "tagged_price")]
async fn tagged_price(cache: &Cache, db: &Db, shop: u64, id: u64) -> Result<String, String> {
    db.read()
}

#[cached(cache = cache, key = "quote:{id}", ttl = "400ms", stale = "2500ms", refresh = "50%", name = "quote")]
async fn quote(cache: &Cache, db: &std::sync::Arc<Db>, id: u64) -> Result<String, String> {
    db.read()
}

fn served(cache: &Cache, name: &str) -> u64 {
    cache.stats().function(name).map_or(0, |f| f.stale_served)
}

on_both_backends! {
    async fn a_failing_load_returns_the_stale_value_until_stale_runs_out(fx: Fx) {
        let db = Db::new("v1");
        let filled = Instant::now();
        assert_eq!(price(&fx.cache, &db, 1).await.unwrap(), "v1");
        assert_eq!(price(&fx.cache, &db, 1).await.unwrap(), "v1", "a hit");
        assert_eq!(db.loads.load(Ordering::SeqCst), 1);
        tokio::time::sleep(TTL + Duration::from_millis(100)).await;
        db.failing.store(true, Ordering::SeqCst);
        // Past the TTL: the load runs, fails, and the stale value is returned.
        assert_eq!(price(&fx.cache, &db, 1).await.unwrap(), "v1");
        assert_eq!(db.loads.load(Ordering::SeqCst), 2, "the load was tried");
        assert_eq!(price(&fx.cache, &db, 1).await.unwrap(), "v1");
        assert_eq!(served(&fx.cache, "price"), 2);
        // Once the stale time is over, the error.
        tokio::time::sleep((TTL + STALE + Duration::from_millis(200)).saturating_sub(filled.elapsed())).await;
        assert_eq!(price(&fx.cache, &db, 1).await, Err("database down".to_owned()));
        // The database is back: the new value, cached again.
        db.failing.store(false, Ordering::SeqCst);
        db.set("v2");
        assert_eq!(price(&fx.cache, &db, 1).await.unwrap(), "v2");
        assert_eq!(price(&fx.cache, &db, 1).await.unwrap(), "v2");
    }

    async fn during_an_outage_a_key_is_loaded_at_most_once_a_second(fx: Fx) {
        let db = Db::new("v1");
        assert_eq!(price(&fx.cache, &db, 13).await.unwrap(), "v1");
        tokio::time::sleep(TTL + Duration::from_millis(100)).await;
        db.failing.store(true, Ordering::SeqCst);
        for _ in 0..10 {
            assert_eq!(price(&fx.cache, &db, 13).await.unwrap(), "v1");
        }
        assert_eq!(db.loads.load(Ordering::SeqCst), 2, "one failing load for ten calls");
        assert_eq!(served(&fx.cache, "price"), 10);
        // A second later, the load is tried again.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_eq!(price(&fx.cache, &db, 13).await.unwrap(), "v1");
        assert_eq!(db.loads.load(Ordering::SeqCst), 3);
        // And once the database is back, the next try stores its value.
        db.failing.store(false, Ordering::SeqCst);
        db.set("v2");
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_eq!(price(&fx.cache, &db, 13).await.unwrap(), "v2");
    }

    async fn a_successful_reload_replaces_the_stale_value(fx: Fx) {
        let db = Db::new("v1");
        assert_eq!(price(&fx.cache, &db, 2).await.unwrap(), "v1");
        tokio::time::sleep(TTL + Duration::from_millis(100)).await;
        db.set("v2");
        assert_eq!(price(&fx.cache, &db, 2).await.unwrap(), "v2", "expired: reloaded");
        db.failing.store(true, Ordering::SeqCst);
        assert_eq!(price(&fx.cache, &db, 2).await.unwrap(), "v2", "a hit");
        assert_eq!(served(&fx.cache, "price"), 0);
    }

    async fn an_invalidated_value_is_never_served_stale(fx: Fx) {
        let db = Db::new("v1");
        assert_eq!(price(&fx.cache, &db, 3).await.unwrap(), "v1");
        tokio::time::sleep(TTL + Duration::from_millis(100)).await;
        db.failing.store(true, Ordering::SeqCst);
        // One failure keeps the stale copy...
        assert_eq!(price(&fx.cache, &db, 3).await.unwrap(), "v1");
        // ...which an invalidation drops.
        fx.cache.invalidate("price:3").await.unwrap();
        assert_eq!(price(&fx.cache, &db, 3).await, Err("database down".to_owned()));
    }

    async fn a_written_value_is_never_replaced_by_a_stale_one(fx: Fx) {
        let db = Db::new("v1");
        assert_eq!(price(&fx.cache, &db, 4).await.unwrap(), "v1");
        tokio::time::sleep(TTL + Duration::from_millis(100)).await;
        db.failing.store(true, Ordering::SeqCst);
        assert_eq!(price(&fx.cache, &db, 4).await.unwrap(), "v1");
        // A write drops the stale copy; once the written value expires, a failing load has
        // nothing to fall back on (a write keeps no stale copy): the error, never v1.
        fx.cache.set("price:4", &"written", TTL).await.unwrap();
        assert_eq!(price(&fx.cache, &db, 4).await.unwrap(), "written");
        tokio::time::sleep(TTL + Duration::from_millis(100)).await;
        assert_eq!(price(&fx.cache, &db, 4).await, Err("database down".to_owned()));
    }

    async fn a_newer_fill_replaces_the_stale_copy(fx: Fx) {
        let db = Db::new("v1");
        assert_eq!(price(&fx.cache, &db, 10).await.unwrap(), "v1");
        tokio::time::sleep(TTL + Duration::from_millis(100)).await;
        db.set("v2");
        assert_eq!(price(&fx.cache, &db, 10).await.unwrap(), "v2");
        // The entry disappears early (evicted under memory pressure, say), then loads fail:
        // the copy kept is v2's, never the older v1.
        fx.evict_behind_the_cache("price:10").await;
        db.failing.store(true, Ordering::SeqCst);
        assert_eq!(price(&fx.cache, &db, 10).await.unwrap(), "v2");
    }

    async fn a_refreshed_value_replaces_the_stale_copy(fx: Fx) {
        let db = std::sync::Arc::new(Db::new("v1"));
        assert_eq!(quote(&fx.cache, &db, 12).await.unwrap(), "v1");
        tokio::time::sleep(Duration::from_millis(250)).await;
        db.set("v2");
        // Due: the current value at once, and a refresh in the background.
        assert_eq!(quote(&fx.cache, &db, 12).await.unwrap(), "v1");
        let deadline = Instant::now() + Duration::from_secs(5);
        while quote(&fx.cache, &db, 12).await.unwrap() != "v2" {
            assert!(Instant::now() < deadline, "the refresh never landed");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The refreshed entry expires, loads fail: the copy is the refreshed value.
        db.failing.store(true, Ordering::SeqCst);
        tokio::time::sleep(TTL + Duration::from_millis(100)).await;
        assert_eq!(quote(&fx.cache, &db, 12).await.unwrap(), "v2");
    }

    async fn past_its_ttl_a_value_is_gone_for_every_reader(fx: Fx) {
        let db = Db::new("v1");
        assert_eq!(price(&fx.cache, &db, 11).await.unwrap(), "v1");
        assert_eq!(fx.cache.get::<String>("price:11").await.unwrap(), Some("v1".to_owned()));
        tokio::time::sleep(TTL + Duration::from_millis(100)).await;
        // The stale copy is not the entry: other readers see the entry expired.
        assert_eq!(fx.cache.get::<String>("price:11").await.unwrap(), None);
        assert_eq!(fx.pttl("price:11").await.map(|ms| ms < 0), fx.is_redis().then_some(true));
    }

    async fn a_tag_invalidated_value_is_never_served_stale(fx: Fx) {
        let db = Db::new("v1");
        assert_eq!(tagged_price(&fx.cache, &db, 7, 5).await.unwrap(), "v1");
        tokio::time::sleep(TTL + Duration::from_millis(100)).await;
        db.failing.store(true, Ordering::SeqCst);
        assert_eq!(tagged_price(&fx.cache, &db, 7, 5).await.unwrap(), "v1");
        fx.cache.invalidate_tag("shop:7").await.unwrap();
        assert_eq!(tagged_price(&fx.cache, &db, 7, 5).await, Err("database down".to_owned()));
    }

    async fn a_panicking_load_returns_the_stale_value(fx: Fx) {
        let db = std::sync::Arc::new(Db::new("v1"));
        assert_eq!(price(&fx.cache, &db, 6).await.unwrap(), "v1");
        tokio::time::sleep(TTL + Duration::from_millis(100)).await;
        db.panicking.store(true, Ordering::SeqCst);
        assert_eq!(price(&fx.cache, &db, 6).await.unwrap(), "v1");
        assert_eq!(served(&fx.cache, "price"), 1);
        let f = fx.cache.stats().function("price").unwrap().clone();
        assert_eq!(f.load_errors, 1, "the panic is a failed load");
        // Without a stale value the panic reaches the caller.
        let (cache, db2) = (fx.cache.clone(), db.clone());
        let r = tokio::spawn(async move { price(&cache, &db2, 66).await }).await;
        assert!(r.unwrap_err().is_panic());
    }

    async fn callers_waiting_for_a_failed_load_get_the_stale_value(fx: Fx) {
        let db = std::sync::Arc::new(Db::new("v1"));
        assert_eq!(price(&fx.cache, &db, 8).await.unwrap(), "v1");
        tokio::time::sleep(TTL + Duration::from_millis(100)).await;
        db.failing.store(true, Ordering::SeqCst);
        let calls: Vec<_> = (0..8)
            .map(|_| {
                let (cache, db) = (fx.cache.clone(), db.clone());
                tokio::spawn(async move { price(&cache, &db, 8).await })
            })
            .collect();
        for c in calls {
            assert_eq!(c.await.unwrap().unwrap(), "v1");
        }
    }
}

/// Another process (another cache on the same Redis) whose load fails gets the value this
/// one kept past its TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn another_process_gets_the_stale_value() {
    let a = Fx::redis("stale_other").await;
    let b = Cache::builder()
        .redis(cache_tests::redis_url())
        .namespace(a.cache.namespace())
        .build()
        .await
        .unwrap();
    let db = Db::new("v1");
    assert_eq!(price(&a.cache, &db, 9).await.unwrap(), "v1");
    tokio::time::sleep(TTL + Duration::from_millis(100)).await;
    db.failing.store(true, Ordering::SeqCst);
    assert_eq!(price(&b, &db, 9).await.unwrap(), "v1");
    assert_eq!(price(&a.cache, &db, 9).await.unwrap(), "v1");
    // Every key has a TTL: the stale copy lives as long as the value would have.
    let mut conn = cache_tests::raw_connection(&cache_tests::redis_url()).await;
    let copy = cache_runtime::__private::aux_key("__cr:stale:", &a.cache.full_key("price:9"));
    let pttl: i64 = ::redis::cmd("PTTL")
        .arg(&copy)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        pttl > 0 && pttl <= STALE.as_millis() as i64,
        "the stale copy's PTTL is {pttl}"
    );
}
