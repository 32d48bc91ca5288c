//! Redis Cluster: what the behaviour suite (`on_both_backends!`, its `cluster::` variants)
//! cannot show on a healthy cluster: a master killed under load, the stampede guarantee after
//! its replica took over, scripts reloaded after `SCRIPT FLUSH`, configuration errors.

use std::process::Child;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cache_runtime::__private::key_slot;
use cache_runtime::{Cache, cached};
use cache_tests::{RedisCluster, raw_connection, redis_url, shared_cluster, unique_namespace};
use redis::AsyncCommands;

use crate::stampede::{counter_value, now_ms, spawn_worker_on, wait_ok};

/// A value that names its argument: a wrong value is visible.
#[cached(cache = cache, key = "v:{id}", ttl = 60, lock, name = "cluster_value")]
async fn value(cache: &Cache, calls: &AtomicU64, id: u64) -> String {
    calls.fetch_add(1, Ordering::SeqCst);
    format!("value {id}")
}

fn cluster_cache(urls: &[String], namespace: &str) -> Cache {
    Cache::builder()
        .redis_cluster(urls.iter().cloned())
        .namespace(namespace)
        .build_sync()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_master_costs_loads_never_a_wrong_answer_and_caching_resumes() {
    let mut cluster = RedisCluster::start();
    let ns = unique_namespace("failover");
    let cache = cluster_cache(&cluster.urls(), &ns);
    let calls = Arc::new(AtomicU64::new(0));
    // 64 tasks over 600 keys, spread over the three shards.
    let keys = 600u64;
    for id in 0..keys {
        assert_eq!(value(&cache, &calls, id).await, format!("value {id}"));
    }
    let warm = calls.load(Ordering::SeqCst);
    assert_eq!(warm, keys, "each key loaded once");
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for t in 0..64u64 {
        let (cache, calls, stop, done) = (cache.clone(), calls.clone(), stop.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let mut id = t;
            while !stop.load(Ordering::Relaxed) {
                id = (id * 31 + 7) % keys;
                let got = value(&cache, &calls, id).await;
                assert_eq!(got, format!("value {id}"), "a call returned a wrong value");
                done.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        warm,
        "a healthy cluster serves every call from the cache"
    );
    // Kill the master of key 0's shard.
    let slot = key_slot(&cache.full_key("v:0"));
    let port = cluster
        .master_port_of(slot)
        .expect("a master serves the slot");
    let killed_at = Instant::now();
    cluster.node_on_port(port).kill();
    tokio::task::block_in_place(|| {
        cluster.wait_for_failover(slot, port, Duration::from_secs(30));
    });
    let failed_over = killed_at.elapsed();
    // Caching resumes on the promoted replica: within a few seconds, a round over the keys
    // loads nothing.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let before = calls.load(Ordering::SeqCst);
        for id in 0..keys {
            assert_eq!(value(&cache, &calls, id).await, format!("value {id}"));
        }
        let after = calls.load(Ordering::SeqCst);
        if after == before {
            break;
        }
        eprintln!(
            "not resumed: {} loads; a read of v:0 gives {:?}",
            after - before,
            cache.get::<String>("v:0").await
        );
        assert!(
            Instant::now() < deadline,
            "caching did not resume within 20 s of the failover ({} loads in the last round)",
            after - before
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let resumed = killed_at.elapsed();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.expect("no call panicked or returned a wrong value");
    }
    let loads = calls.load(Ordering::SeqCst) - warm;
    eprintln!(
        "failover after {failed_over:?}, caching resumed after {resumed:?}; {} calls, {loads} loads during the outage",
        done.load(Ordering::Relaxed)
    );
    assert!(
        done.load(Ordering::Relaxed) > 1000,
        "the callers kept going"
    );

    // The stampede guarantee on the promoted shard: 4 processes x 250 callers, one execution.
    // A namespace whose `job:7` lives on the shard that failed over.
    let promoted = cluster.master_port_of(slot);
    let ns2 = loop {
        let ns = unique_namespace("failover_stampede");
        let job_slot = key_slot(&cluster_cache(&cluster.urls(), &ns).full_key("job:7"));
        if cluster.master_port_of(job_slot) == promoted {
            break ns;
        }
    };
    let counter = format!("{ns2}:executions");
    let mut conn = raw_connection(&redis_url()).await;
    let _: () = conn.set_ex(&counter, 0, 120).await.unwrap();
    let urls = cluster.urls_env();
    let start_at = now_ms() + 3_000;
    let workers: Vec<Child> = (0..4)
        .map(|_| spawn_worker_on(&ns2, &counter, 250, 300, start_at, Some(&urls)))
        .collect();
    for w in workers {
        wait_ok(w, Duration::from_secs(60));
    }
    assert_eq!(
        counter_value(&mut conn, &counter).await,
        1,
        "4 x 250 concurrent callers on the failed-over cluster, one execution"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripts_are_reloaded_on_the_node_that_lost_them() {
    let (urls, _private) = shared_cluster();
    let ns = unique_namespace("noscript");
    let cache = cluster_cache(&urls, &ns);
    let calls = AtomicU64::new(0);
    assert_eq!(value(&cache, &calls, 1).await, "value 1");
    // Every master forgets its scripts (as a restarted or newly promoted node has none).
    let mut raw = cache_tests::raw_cluster_connection(&urls).await;
    let flushed: redis::Value = raw
        .route_command(
            redis::cmd("SCRIPT").arg("FLUSH").clone(),
            redis::cluster_routing::RoutingInfo::MultiNode((
                redis::cluster_routing::MultipleNodeRoutingInfo::AllMasters,
                Some(redis::cluster_routing::ResponsePolicy::AllSucceeded),
            )),
        )
        .await
        .unwrap();
    drop(flushed);
    cache.invalidate("v:1").await.unwrap();
    // The next call's lookup and fill scripts answer NOSCRIPT once, are loaded on that
    // master, and the call is cached as usual: no failure counted, no bypass.
    for round in 0..3 {
        assert_eq!(value(&cache, &calls, 1).await, "value 1", "round {round}");
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "loaded again once, then hits"
    );
    let stats = cache.stats();
    let f = stats.function("cluster_value").unwrap();
    assert_eq!(f.backend_errors, 0, "no backend error: {stats}");
    assert_eq!(f.bypassed, 0, "no call bypassed the cache: {stats}");
}

#[tokio::test]
async fn a_cluster_url_with_a_database_is_a_configuration_error() {
    for urls in [
        vec!["redis://127.0.0.1:7000/1".to_owned()],
        vec![],
        vec!["nonsense://x".to_owned()],
    ] {
        let err = Cache::builder()
            .redis_cluster(urls.clone())
            .build()
            .await
            .unwrap_err();
        assert!(err.is_config(), "{urls:?}: {err}");
    }
    // A password never shows in the error.
    let err = Cache::builder()
        .redis_cluster(["redis://app:s3cret@127.0.0.1:7000/2"])
        .build()
        .await
        .unwrap_err();
    assert!(!err.to_string().contains("s3cret"), "{err}");
    // A cluster that is not there is not a configuration error.
    let cache = Cache::builder()
        .redis_cluster(["redis://127.0.0.1:1"])
        .build()
        .await
        .unwrap();
    assert_eq!(cache.backend_name(), "redis-cluster");
}

/// Runs in a child process with `REDIS_CLUSTER_URLS` set (a no-op otherwise): the default
/// cache is on that cluster, and works.
#[test]
fn default_cache_worker() {
    if std::env::var("CACHE_TEST_DEFAULT_CLUSTER").is_err() {
        return;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let cache = cache_runtime::default_cache();
        assert_eq!(cache.backend_name(), "redis-cluster");
        let key = format!("{}:k", unique_namespace("default_cluster"));
        cache
            .set(&key, &7u32, Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(cache.get::<u32>(&key).await.unwrap(), Some(7));
        cache.invalidate(&key).await.unwrap();
        println!("DEFAULT CLUSTER OK");
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_cache_follows_redis_cluster_urls() {
    let (urls, _private) = shared_cluster();
    let child = cache_tests::spawn_test_worker(
        "cluster::default_cache_worker",
        &[
            ("CACHE_TEST_DEFAULT_CLUSTER", "1".to_owned()),
            ("REDIS_CLUSTER_URLS", urls.join(",")),
        ],
    );
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("DEFAULT CLUSTER OK"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// With `cluster-require-full-coverage no`, the other shards keep serving while a master is
/// down: their keys keep hitting (the dead master's breaker is its own), only the dead shard's
/// keys run the function, until its replica takes over.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_dead_master_sends_only_its_slots_to_the_function() {
    let mut cluster = RedisCluster::start_with(&["--cluster-require-full-coverage", "no"]);
    let ns = unique_namespace("per_shard");
    let cache = cluster_cache(&cluster.urls(), &ns);
    let calls = AtomicU64::new(0);
    let keys = 300u64;
    for id in 0..keys {
        assert_eq!(value(&cache, &calls, id).await, format!("value {id}"));
    }
    let slot_of = |id: u64| key_slot(&cache.full_key(&format!("v:{id}")));
    let dead_slot = slot_of(0);
    let port = cluster.master_port_of(dead_slot).unwrap();
    let (dead, alive): (Vec<u64>, Vec<u64>) =
        (0..keys).partition(|&id| cluster.master_port_of(slot_of(id)) == Some(port));
    assert!(
        !dead.is_empty() && alive.len() > dead.len(),
        "keys on every shard"
    );
    // Let the breakers learn the masters (the slot table is read on first use).
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster.node_on_port(port).kill();
    // While the master is down (before the node timeout lets its replica take over): the
    // dead shard's keys run the function; the others are hits.
    let outage = Instant::now();
    let mut rounds = 0;
    while outage.elapsed() < Duration::from_millis(1500) {
        let before = calls.load(Ordering::SeqCst);
        for &id in &alive {
            assert_eq!(value(&cache, &calls, id).await, format!("value {id}"));
        }
        assert_eq!(
            calls.load(Ordering::SeqCst),
            before,
            "a key of a healthy shard ran the function while another master was down"
        );
        for &id in &dead {
            assert_eq!(value(&cache, &calls, id).await, format!("value {id}"));
        }
        rounds += 1;
    }
    assert!(rounds >= 2, "the outage window saw {rounds} rounds");
    // Still during the outage: invalidating a healthy shard's key works (its own master's
    // breaker), and the key is cached again after one load.
    let id = alive[0];
    cache
        .invalidate(&format!("v:{id}"))
        .await
        .expect("an invalidation on a healthy shard while another master is down");
    let before = calls.load(Ordering::SeqCst);
    for _ in 0..3 {
        assert_eq!(value(&cache, &calls, id).await, format!("value {id}"));
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        before + 1,
        "loaded once, then hits"
    );
    assert!(
        outage.elapsed() < Duration::from_secs(3),
        "checked while the master was still down (node timeout 2 s)"
    );
    let stats = cache.stats();
    let f = stats.function("cluster_value").unwrap();
    assert!(f.bypassed > 0 || f.backend_errors > 0, "{stats}");
    eprintln!("{rounds} rounds during the outage; {stats}");
}
