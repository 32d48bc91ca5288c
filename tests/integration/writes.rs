//! Write-through and event invalidation: `#[cache_put]`, `#[cache_evict]`, tags. The races
//! (a slow `#[cached]` load against a put, an evict, a tag invalidation) on both backends, and
//! on Redis from another `Cache` (another process); the costs and the key hygiene on private
//! servers.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cache_runtime::{Cache, cache_evict, cache_put, cached};
use cache_tests::{RedisServer, raw_connection, redis_url};

use crate::support::{Calls, Gate, User, on_both_backends};

/// The database: users by id, and how many times each row was written.
#[derive(Default)]
struct Db {
    users: Mutex<HashMap<u64, User>>,
    writes: AtomicU64,
}

impl Db {
    fn new() -> Arc<Db> {
        Arc::new(Db::default())
    }

    fn read(&self, id: u64) -> User {
        self.users
            .lock()
            .unwrap()
            .get(&id)
            .cloned()
            .unwrap_or_else(|| User::new(id))
    }

    fn write(&self, user: &User) {
        self.writes.fetch_add(1, Ordering::SeqCst);
        self.users.lock().unwrap().insert(user.id, user.clone());
    }
}

fn renamed(id: u64, name: &str) -> User {
    User {
        id,
        name: name.to_owned(),
    }
}

// The readers: a user, tagged with its org; a slow one held by a gate.

#[cached(cache = cache, key = "user:{id}", ttl = 60, tags = ["org:{org}"], name = "get_user")]
async fn get_user(
    cache: &Cache,
    db: &Db,
    calls: &Calls,
    org: u64,
    id: u64,
) -> Result<User, String> {
    calls.hit();
    Ok(db.read(id))
}

#[cached(cache = cache, key = "user:{id}", ttl = 60, tags = ["org:{org}"], name = "slow_user")]
async fn slow_user(
    cache: &Cache,
    db: &Db,
    calls: &Calls,
    gate: &Gate,
    org: u64,
    id: u64,
) -> Result<User, String> {
    calls.hit();
    // The row is read before the gate: what a slow query returns is the row as it was.
    let user = db.read(id);
    gate.pass().await;
    Ok(user)
}

#[cached(cache = cache, key = "user_profile:{id}", ttl = 60)]
async fn get_profile(cache: &Cache, db: &Db, calls: &Calls, id: u64) -> String {
    calls.hit();
    format!("profile of {}", db.read(id).name)
}

#[cached(cache = cache, key = "user_list", ttl = 60)]
async fn user_list(cache: &Cache, db: &Db, calls: &Calls) -> Vec<String> {
    calls.hit();
    vec![db.read(1).name, db.read(2).name]
}

#[cached(cache = cache, key = "team:{team}", ttl = 60, tags = ["org:{org}", "teams"])]
async fn team(cache: &Cache, db: &Db, calls: &Calls, org: u64, team: u64) -> String {
    calls.hit();
    format!("team {team} of org {org}: {}", db.read(team).name)
}

// The writers.

/// Write-through of the returned value: the stored value is the `Ok`'s `User`.
#[cache_put(cache = cache, key = "user:{id}", ttl = 60, tags = ["org:{org}"], name = "save_user")]
async fn save_user(cache: &Cache, db: &Db, org: u64, id: u64, name: &str) -> Result<User, String> {
    if name.is_empty() {
        return Err("empty name".to_owned());
    }
    let user = renamed(id, name);
    db.write(&user);
    Ok(user)
}

/// Write-through of an argument: the function returns `()`.
#[cache_put(cache = cache, key = "user:{id}", ttl = 60, tags = ["org:{org}"], value = user)]
async fn store_user(cache: &Cache, db: &Db, org: u64, id: u64, user: User) -> Result<(), String> {
    db.write(&user);
    Ok(())
}

/// The seed's event invalidation, as one attribute.
#[cache_evict(cache = cache, keys = ["user:{id}", "user_profile:{id}", "user_list"], tags = ["org:{org}", "teams"], name = "on_user_updated")]
async fn on_user_updated(cache: &Cache, org: u64, id: u64, ok: bool) -> Result<(), String> {
    if ok {
        Ok(())
    } else {
        Err("the update failed".to_owned())
    }
}

#[cache_evict(cache = cache, keys = ["user:{id}"], before)]
async fn half_failing_update(cache: &Cache, db: &Db, id: u64, name: &str) -> Result<(), String> {
    // The write lands, then the call fails: `before` already evicted the old value.
    db.write(&renamed(id, name));
    Err("the second statement failed".to_owned())
}

#[cache_evict(cache = cache, tags = ["org:{org}", "teams"])]
async fn reorganize(cache: &Cache, org: u64) {}

/// Another handle on the same entries: on Redis a second `Cache` (what another process
/// sees); on memory the same cache (memory is not shared).
async fn other_handle(cache: &Cache) -> Cache {
    if cache.backend_name() == "redis" {
        Cache::builder()
            .redis(redis_url())
            .namespace(cache.namespace())
            .operation_timeout(Duration::from_secs(2))
            .build()
            .await
            .unwrap()
    } else {
        cache.clone()
    }
}

/// Starts the slow load of user 1 (org 7) and waits until it has read the row.
async fn slow_load(
    cache: &Cache,
    db: &Arc<Db>,
    calls: &Arc<Calls>,
    gate: &Arc<Gate>,
) -> tokio::task::JoinHandle<Result<User, String>> {
    let (cache, db, calls, gate2) = (cache.clone(), db.clone(), calls.clone(), gate.clone());
    let load = tokio::spawn(async move { slow_user(&cache, &db, &calls, &gate2, 7, 1).await });
    gate.entered.notified().await;
    load
}

on_both_backends! {
    async fn a_put_during_a_slow_load_wins(fx: Fx) {
        let (db, calls, gate) = (Db::new(), Arc::new(Calls::default()), Gate::new());
        let other = other_handle(&fx.cache).await;
        let load = slow_load(&fx.cache, &db, &calls, &gate).await;
        // While the slow read holds the old row, a writer (here or in another process)
        // writes through.
        assert_eq!(save_user(&other, &db, 7, 1, "renamed").await, Ok(renamed(1, "renamed")));
        gate.release.notify_one();
        assert_eq!(load.await.unwrap(), Ok(User::new(1)), "the slow caller gets its own read");
        let before = calls.get();
        for cache in [&fx.cache, &other] {
            assert_eq!(get_user(cache, &db, &calls, 7, 1).await, Ok(renamed(1, "renamed")));
        }
        assert_eq!(calls.get(), before, "the put value is served, not reloaded");
        let s = other.stats().function("save_user").cloned().unwrap();
        assert_eq!(s.puts, 1);
        assert!(other.stats().to_string().contains("puts"));
    }

    async fn an_evict_during_a_slow_load_wins(fx: Fx) {
        let (db, calls, gate) = (Db::new(), Arc::new(Calls::default()), Gate::new());
        let other = other_handle(&fx.cache).await;
        let load = slow_load(&fx.cache, &db, &calls, &gate).await;
        db.write(&renamed(1, "changed"));
        on_user_updated(&other, 7, 1, true).await.unwrap();
        gate.release.notify_one();
        assert_eq!(load.await.unwrap(), Ok(User::new(1)));
        for cache in [&fx.cache, &other] {
            assert_eq!(get_user(cache, &db, &calls, 7, 1).await, Ok(renamed(1, "changed")));
        }
        let s = other.stats().function("on_user_updated").cloned().unwrap();
        assert_eq!((s.evictions, s.tag_invalidations), (1, 2));
    }

    async fn a_tag_invalidation_during_a_slow_load_wins(fx: Fx) {
        let (db, calls, gate) = (Db::new(), Arc::new(Calls::default()), Gate::new());
        let other = other_handle(&fx.cache).await;
        let load = slow_load(&fx.cache, &db, &calls, &gate).await;
        db.write(&renamed(1, "changed"));
        other.invalidate_tag("org:7").await.unwrap();
        gate.release.notify_one();
        assert_eq!(load.await.unwrap(), Ok(User::new(1)));
        for cache in [&fx.cache, &other] {
            assert_eq!(get_user(cache, &db, &calls, 7, 1).await, Ok(renamed(1, "changed")));
        }
        // The load that read the old row stored nothing readable: the next reader reloaded
        // once, then everyone hits.
        let loads = calls.get();
        assert_eq!(get_user(&other, &db, &calls, 7, 1).await, Ok(renamed(1, "changed")));
        assert_eq!(calls.get(), loads);
    }

    async fn a_caller_joining_a_load_after_a_tag_invalidation_gets_fresh_data(fx: Fx) {
        let (db, calls, gate) = (Db::new(), Arc::new(Calls::default()), Gate::new());
        let load = slow_load(&fx.cache, &db, &calls, &gate).await;
        db.write(&renamed(1, "changed"));
        fx.cache.invalidate_tag("org:7").await.unwrap();
        // A caller that starts now joins the running load in this process.
        let late = {
            let (cache, db, calls, gate) = (fx.cache.clone(), db.clone(), calls.clone(), gate.clone());
            tokio::spawn(async move { slow_user(&cache, &db, &calls, &gate, 7, 1).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        gate.release.notify_one();
        assert_eq!(load.await.unwrap(), Ok(User::new(1)));
        // It loads again (the gate lets the second load through) and gets the new row.
        gate.entered.notified().await;
        gate.release.notify_one();
        assert_eq!(late.await.unwrap(), Ok(renamed(1, "changed")));
    }

    async fn a_failed_put_or_evict_writes_and_evicts_nothing(fx: Fx) {
        let (db, calls) = (Db::new(), Calls::default());
        assert_eq!(get_user(&fx.cache, &db, &calls, 7, 1).await, Ok(User::new(1)));
        assert_eq!(save_user(&fx.cache, &db, 7, 1, "").await, Err("empty name".to_owned()));
        assert_eq!(on_user_updated(&fx.cache, 7, 1, false).await, Err("the update failed".to_owned()));
        assert_eq!(get_user(&fx.cache, &db, &calls, 7, 1).await, Ok(User::new(1)));
        assert_eq!(calls.get(), 1, "still cached: nothing was evicted");
        let s = fx.cache.stats();
        assert_eq!(s.function("save_user").unwrap().puts, 0);
        assert_eq!(s.function("on_user_updated").unwrap().evictions, 0);
        // `before`: evicted before the call, so a write that half-failed is not hidden.
        assert_eq!(get_profile(&fx.cache, &db, &calls, 1).await, "profile of user 1");
        half_failing_update(&fx.cache, &db, 1, "half").await.unwrap_err();
        assert_eq!(get_user(&fx.cache, &db, &calls, 7, 1).await, Ok(renamed(1, "half")));
    }

    async fn one_evict_invalidates_three_keys_and_two_tags(fx: Fx) {
        let (db, calls) = (Db::new(), Calls::default());
        get_user(&fx.cache, &db, &calls, 7, 1).await.unwrap();
        get_profile(&fx.cache, &db, &calls, 1).await;
        user_list(&fx.cache, &db, &calls).await;
        team(&fx.cache, &db, &calls, 7, 3).await;
        team(&fx.cache, &db, &calls, 8, 4).await;
        get_user(&fx.cache, &db, &calls, 8, 2).await.unwrap();
        assert_eq!(calls.get(), 6);
        db.write(&renamed(1, "new"));
        // One call: three keys and two tags (`org:7`, `teams`).
        on_user_updated(&fx.cache, 7, 1, true).await.unwrap();
        assert_eq!(get_user(&fx.cache, &db, &calls, 7, 1).await, Ok(renamed(1, "new")));
        assert_eq!(get_profile(&fx.cache, &db, &calls, 1).await, "profile of new");
        assert_eq!(user_list(&fx.cache, &db, &calls).await, vec!["new".to_owned(), "user 2".to_owned()]);
        assert_eq!(calls.get(), 9, "three keys evicted");
        team(&fx.cache, &db, &calls, 7, 3).await; // under `org:7`
        team(&fx.cache, &db, &calls, 8, 4).await; // under `teams`
        assert_eq!(calls.get(), 11, "both tags invalidated");
        get_user(&fx.cache, &db, &calls, 8, 2).await.unwrap(); // under `org:8` only
        assert_eq!(calls.get(), 11, "an entry under neither tag is kept");
        let s = fx.cache.stats().function("on_user_updated").cloned().unwrap();
        assert_eq!((s.evictions, s.tag_invalidations), (1, 2));
        // Tags only, no keys.
        reorganize(&fx.cache, 9).await;
        team(&fx.cache, &db, &calls, 8, 4).await;
        assert_eq!(calls.get(), 12);
        assert_eq!(fx.cache.stats().function(&format!("{}::reorganize", module_path!())).unwrap().tag_invalidations, 2);
    }

    async fn a_put_value_from_an_argument_is_what_readers_decode(fx: Fx) {
        let (db, calls) = (Db::new(), Calls::default());
        store_user(&fx.cache, &db, 7, 5, renamed(5, "stored")).await.unwrap();
        assert_eq!(get_user(&fx.cache, &db, &calls, 7, 5).await, Ok(renamed(5, "stored")));
        assert_eq!(calls.get(), 0, "the put value is a hit for the reader");
        // The put recorded the reader's tag: invalidating it reaches the put value too.
        fx.cache.invalidate_tag("org:7").await.unwrap();
        assert_eq!(get_user(&fx.cache, &db, &calls, 7, 5).await, Ok(renamed(5, "stored")));
        assert_eq!(calls.get(), 1);
    }

    async fn an_untagged_entry_is_not_served_to_a_tagged_reader(fx: Fx) {
        // It would escape the reader's tag invalidations.
        let (db, calls) = (Db::new(), Calls::default());
        fx.cache.set("user:6", &renamed(6, "by hand"), Duration::from_secs(60)).await.unwrap();
        assert_eq!(get_user(&fx.cache, &db, &calls, 7, 6).await, Ok(User::new(6)));
        assert_eq!(calls.get(), 1);
        // The manual API checks the tags an entry records.
        assert_eq!(fx.cache.get::<User>("user:6").await.unwrap(), Some(User::new(6)));
        fx.cache.invalidate_tags(&["org:7", "unused"]).await.unwrap();
        assert_eq!(fx.cache.get::<User>("user:6").await.unwrap(), None);
    }
}

/// Counts of each command since the last `CONFIG RESETSTAT`.
async fn commandstats(conn: &mut ::redis::aio::MultiplexedConnection) -> HashMap<String, u64> {
    let info: String = ::redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
        .unwrap();
    info.lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(":calls=")?;
            Some((name.to_owned(), rest.split(',').next()?.parse().ok()?))
        })
        .collect()
}

async fn private_cache(server: &RedisServer, namespace: &str) -> Cache {
    Cache::builder()
        .redis(server.url())
        .namespace(namespace)
        .operation_timeout(Duration::from_secs(2))
        .build()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_with_ten_thousand_entries_is_invalidated_in_one_command() {
    let server = RedisServer::start();
    let cache = private_cache(&server, "tag_o1").await;
    let (db, calls) = (Db::new(), Calls::default());
    for id in 0..10_000 {
        get_user(&cache, &db, &calls, 7, id).await.unwrap();
    }
    assert_eq!(calls.get(), 10_000);
    let mut conn = raw_connection(&server.url()).await;
    let _: () = ::redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut conn)
        .await
        .unwrap();
    cache.invalidate_tag("org:7").await.unwrap();
    let stats = commandstats(&mut conn).await;
    let total: u64 = stats
        .iter()
        .filter(|(c, _)| !matches!(c.as_str(), "info" | "config|resetstat" | "publish"))
        .map(|(_, n)| n)
        .sum();
    assert_eq!(total, 1, "one command for 10 000 entries: {stats:?}");
    assert_eq!(stats.get("set"), Some(&1), "{stats:?}");
    // And, in the same pipeline, the announcement to other processes' in-process tiers.
    assert_eq!(stats.get("publish"), Some(&1), "{stats:?}");
    for id in [0, 4_999, 9_999] {
        get_user(&cache, &db, &calls, 7, id).await.unwrap();
    }
    assert_eq!(calls.get(), 10_003, "every entry of the tag reloads");
}

/// Every key on the (private) server with its PTTL; a key gone between the listing and its
/// PTTL (a marker removed in the background, say) is left out.
async fn keys_and_ttls(conn: &mut ::redis::aio::MultiplexedConnection) -> Vec<(String, i64)> {
    let keys: Vec<String> = ::redis::cmd("KEYS")
        .arg("*")
        .query_async(conn)
        .await
        .unwrap();
    let mut out = Vec::new();
    for key in keys {
        let ttl: i64 = ::redis::cmd("PTTL")
            .arg(&key)
            .query_async(conn)
            .await
            .unwrap();
        if ttl != -2 {
            out.push((key, ttl));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_key_written_has_a_ttl_and_tags_go_with_their_entries() {
    let server = RedisServer::start();
    let cache = private_cache(&server, "ttl").await;
    let (db, calls) = (Db::new(), Calls::default());
    // Fills, puts, evictions, tag invalidations, a failed load, a lock wait.
    for id in 0..20 {
        get_user(&cache, &db, &calls, id % 3, id).await.unwrap();
    }
    team(&cache, &db, &calls, 1, 1).await;
    save_user(&cache, &db, 1, 1, "put").await.unwrap();
    on_user_updated(&cache, 2, 2, true).await.unwrap();
    reorganize(&cache, 1).await;
    cache.invalidate_tag("org:0").await.unwrap();
    // A failed load leaves its marker until it is removed (in the background), and a lock
    // wait leaves a waiters key: both have TTLs (looked at while they exist).
    #[cached(cache = cache, key = "failing:{id}", tags = ["org:{id}"])]
    async fn failing(cache: &Cache, gate: &Gate, id: u64) -> Result<u64, String> {
        gate.pass().await;
        Err(format!("no row {id}"))
    }
    #[cached(cache = cache, key = "locked:{id}", lock = 5)]
    async fn locked(cache: &Cache, gate: &Gate, id: u64) -> u64 {
        gate.pass().await;
        id
    }
    let (g1, g2) = (Gate::new(), Gate::new());
    let other = private_cache(&server, "ttl").await;
    let fail = {
        let (c, g) = (cache.clone(), g1.clone());
        tokio::spawn(async move { failing(&c, &g, 1).await })
    };
    let lock_holder = {
        let (c, g) = (cache.clone(), g2.clone());
        tokio::spawn(async move { locked(&c, &g, 1).await })
    };
    g1.entered.notified().await;
    g2.entered.notified().await;
    let waiter = {
        let (c, g) = (other.clone(), Gate::new());
        tokio::spawn(async move { locked(&c, &g, 1).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut conn = raw_connection(&server.url()).await;
    let during = keys_and_ttls(&mut conn).await;
    assert!(
        during.iter().any(|(k, _)| k.starts_with("__cr:wait:")),
        "{during:?}"
    );
    for (key, ttl) in &during {
        assert!(*ttl > 0, "{key} has no TTL ({ttl})");
    }
    g1.release.notify_one();
    g2.release.notify_one();
    assert!(fail.await.unwrap().is_err());
    assert_eq!(lock_holder.await.unwrap(), 1);
    assert_eq!(waiter.await.unwrap(), 1);
    let all = keys_and_ttls(&mut conn).await;
    assert!(
        all.iter().any(|(k, _)| k.starts_with("__cr:tag:")),
        "{all:?}"
    );
    for (key, ttl) in &all {
        assert!(*ttl > 0, "{key} has no TTL ({ttl})");
    }

    // Short-lived entries: their tag keys expire with them, not later than the longest TTL.
    let short = private_cache(&server, "short").await;
    #[cached(cache = cache, key = "brief:{id}", ttl = "1s", tags = ["brief_tag"])]
    async fn brief(cache: &Cache, id: u64) -> u64 {
        id
    }
    for id in 0..10 {
        brief(&short, id).await;
    }
    let tag_key = cache_runtime::__private::aux_key("__cr:tag:", "short:brief_tag");
    let ttl: i64 = ::redis::cmd("PTTL")
        .arg(&tag_key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        (1..=1000).contains(&ttl),
        "the tag lives as long as its entries: {ttl}"
    );
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let left: Vec<String> = keys_and_ttls(&mut conn)
        .await
        .into_iter()
        .map(|(k, _)| k)
        .filter(|k| k.contains("short:"))
        .collect();
    assert!(left.is_empty(), "nothing outlives the entries: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn under_memory_pressure_a_tag_invalidation_never_lets_a_stale_value_be_read() {
    // A private Redis that evicts any key (values, tag versions, markers) when full.
    let server =
        RedisServer::start_with(&["--maxmemory", "3mb", "--maxmemory-policy", "allkeys-lru"]);
    let cache = private_cache(&server, "lru").await;
    let (db, calls) = (Db::new(), Calls::default());
    let mut conn = raw_connection(&server.url()).await;
    let ballast = "x".repeat(10_000);
    for round in 0..40u64 {
        // Readers fill entries of org 1 (and ballast pushes the server over its limit).
        for id in 0..50 {
            let user = get_user(&cache, &db, &calls, 1, id).await.unwrap();
            assert!(
                user.name == db.read(id).name,
                "round {round}: user {id} read {:?}, the database has {:?}",
                user.name,
                db.read(id).name
            );
        }
        for i in 0..30 {
            let _: () = ::redis::cmd("SET")
                .arg(format!("ballast:{round}:{i}"))
                .arg(&ballast)
                .arg("EX")
                .arg(60)
                .query_async(&mut conn)
                .await
                .unwrap();
        }
        // An update of every user of the org, then the event: one tag invalidation.
        for id in 0..50 {
            db.write(&renamed(id, &format!("user {id} v{round}")));
        }
        cache.invalidate_tag("org:1").await.unwrap();
    }
    let evicted: String = ::redis::cmd("INFO")
        .arg("stats")
        .query_async(&mut conn)
        .await
        .unwrap();
    let evicted: u64 = evicted
        .lines()
        .find_map(|l| l.strip_prefix("evicted_keys:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap();
    assert!(evicted > 0, "the server evicted keys during the test");
}
