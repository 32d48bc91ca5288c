//! The in-process tier (`local`) on a Redis Cluster whose nodes die or whose slots move: each
//! test starts a private cluster (`RedisCluster::start`), since it kills nodes or reshards.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cache_runtime::{Cache, cached};
use cache_tests::{RedisCluster, free_port, unique_namespace};

use crate::local::{BOUND, Db, Server, row, save_row, until_l1_hit_within, until_value};
use crate::support::Calls;

/// The subscribed node is killed; the next seed is dead too. The bus moves to a node it learnt
/// from the slot table; a write made meanwhile is not served from the old copy later than the
/// bound; the tier is cleared, and trusted again once every master echoes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_subscription_survives_its_node_and_a_dead_seed() {
    let mut cluster = RedisCluster::start();
    let urls = cluster.urls();
    // Seeds: node 0 (a master) and an address where nothing listens.
    let seeds = vec![
        urls[0].clone(),
        format!("redis://127.0.0.1:{}", free_port()),
    ];
    let server = Server::Cluster(seeds);
    let ns = unique_namespace("l1_cluster_kill");
    let (a, b) = (server.cache(&ns).await, server.cache(&ns).await);
    let (db, calls) = (Db::new(), Calls::new());
    let read = || row(&a, &db, &calls, 1, 7);
    until_l1_hit_within(&a, "row", Duration::from_secs(10), read).await;
    // `b` connects now (a cache whose seeds are all dead when it first connects cannot).
    let b_calls = Calls::new();
    until_l1_hit_within(&b, "row", Duration::from_secs(10), || {
        row(&b, &db, &b_calls, 1, 7)
    })
    .await;
    assert_eq!(
        cluster.nodes_with_client("cr-bus:"),
        [0],
        "both buses subscribe on the first seed"
    );

    let clears = a.stats().l1_clears();
    cluster.node_mut(0).kill();
    save_row(&b, &db, 1, 7, "after kill").await.unwrap();
    let took = until_value("after kill", BOUND, || async { read().await.unwrap() }).await;
    eprintln!("after the kill: the old copy was gone after {took:?}");
    let deadline = Instant::now() + BOUND;
    while a.stats().l1_clears() == clears {
        assert!(Instant::now() < deadline, "the tier was not cleared");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // The replica takes over; the buses find a live node (not a seed: both are dead), and the
    // tier is trusted again.
    let start = Instant::now();
    until_l1_hit_within(&a, "row", Duration::from_secs(30), read).await;
    eprintln!("the tier was trusted again after {:?}", start.elapsed());
    let subscribed = cluster.nodes_with_client("cr-bus:");
    assert!(
        !subscribed.is_empty() && !subscribed.contains(&0),
        "subscribed on {subscribed:?}"
    );
    // Still coherent.
    save_row(&b, &db, 1, 7, "after the move").await.unwrap();
    until_value("after the move", BOUND, || async { read().await.unwrap() }).await;
    eprintln!("{}", a.stats());
}

#[cached(cache = cache, key = "hot:{id}", ttl = 60, lock, local, name = "hot")]
async fn hot(cache: &Cache, calls: &Calls, id: u64) -> Result<String, String> {
    calls.hit();
    tokio::time::sleep(Duration::from_millis(5)).await;
    Ok(format!("hot {id}"))
}

/// The slots of the hot keys move to other masters (`MIGRATE`, `ASK`, `TRYAGAIN`) while 48
/// tasks of two caches (two processes' views) call a cached function with `lock` and `local`
/// and invalidate its keys: every call returns its own arguments' value, and no waiter waits
/// longer than the re-check bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn resharding_under_load() {
    let cluster = Arc::new(RedisCluster::start());
    let server = Server::Cluster(cluster.urls());
    let ns = unique_namespace("l1_reshard");
    let caches = [server.cache(&ns).await, server.cache(&ns).await];
    let calls = Arc::new(Calls::new());
    for cache in &caches {
        until_l1_hit_within(cache, "hot", Duration::from_secs(10), || {
            hot(cache, &calls, 0)
        })
        .await;
    }
    const KEYS: u64 = 8;
    let stop = Arc::new(AtomicBool::new(false));
    let (done, slowest) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let failures = Arc::new(std::sync::Mutex::new(std::collections::BTreeMap::<
        String,
        u32,
    >::new()));
    let tasks: Vec<_> = (0..48u64)
        .map(|t| {
            let cache = caches[(t % 2) as usize].clone();
            let (calls, stop, done, slowest, failures) = (
                calls.clone(),
                stop.clone(),
                done.clone(),
                slowest.clone(),
                failures.clone(),
            );
            tokio::spawn(async move {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let id = (t * 7 + i) % KEYS;
                    let start = Instant::now();
                    let got = hot(&cache, &calls, id).await;
                    let took = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
                    slowest.fetch_max(took, Ordering::Relaxed);
                    assert_eq!(got, Ok(format!("hot {id}")), "task {t}, call {i}");
                    if i % 10 == t % 10 {
                        // Fail open: an invalidation may fail while its slot moves; the call
                        // itself must not.
                        if let Err(e) = cache.invalidate(&format!("hot:{id}")).await {
                            *failures.lock().unwrap().entry(e.to_string()).or_default() += 1;
                        }
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            })
        })
        .collect();

    tokio::time::sleep(Duration::from_millis(500)).await;
    let slots: std::collections::BTreeSet<u16> = (0..KEYS)
        .map(|id| cluster.key_slot(&caches[0].full_key(&format!("hot:{id}"))))
        .collect();
    let before = done.load(Ordering::Relaxed);
    let moves = {
        let cluster = cluster.clone();
        tokio::task::spawn_blocking(move || {
            slots
                .into_iter()
                .map(|slot| (slot, cluster.migrate_slot(slot, Duration::from_millis(20))))
                .collect::<Vec<_>>()
        })
        .await
        .unwrap()
    };
    let during = done.load(Ordering::Relaxed) - before;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.unwrap();
    }
    eprintln!(
        "moved {moves:?}; {during} calls during the moves, {} in all, {} loads, slowest call {} ms",
        done.load(Ordering::Relaxed),
        calls.get(),
        slowest.load(Ordering::Relaxed) / 1000
    );
    eprintln!("failed invalidations: {:?}", failures.lock().unwrap());
    for cache in &caches {
        let f = cache.stats().function("hot").unwrap().clone();
        eprintln!(
            "lock waits {} (max {:?}), wait timeouts {}, cache errors {}, L1 clears {}",
            f.lock_waits,
            f.lock_wait_max,
            f.wait_timeouts,
            f.backend_errors,
            cache.stats().l1_clears()
        );
        assert!(during > 0, "calls ran while the slots moved");
        // Waiters are woken by the fill's message, or re-check at most every second.
        assert!(
            f.lock_wait_max < Duration::from_millis(1500),
            "a waiter waited {:?}",
            f.lock_wait_max
        );
    }
    // The tier works on the new owners.
    for cache in &caches {
        until_l1_hit_within(cache, "hot", Duration::from_secs(10), || {
            hot(cache, &calls, 1)
        })
        .await;
    }
}
