//! Fleet-wide stats (`publish_stats`, `Cache::fleet_stats`): three real processes publish
//! their snapshots, the sums are exact, and a killed process drops out once its snapshot's
//! TTL passes. On Redis, and on a Redis Cluster (`CACHE_TESTS_CLUSTER_URLS`, else one
//! started for the test binary).

use std::process::Child;
use std::time::{Duration, Instant};

use cache_runtime::{Cache, cached};
use cache_tests::{raw_connection, redis_url, shared_cluster, spawn_test_worker, unique_namespace};
use redis::AsyncCommands;

/// How often the worker processes publish.
const INTERVAL: Duration = Duration::from_millis(200);

/// Generous: these tests wait for processes to start and for TTLs, not for speed.
const PATIENCE: Duration = Duration::from_secs(30);

#[cached(cache = cache, key = "item:{worker}:{id}", ttl = 60, name = "fleet_item")]
async fn item(cache: &Cache, worker: u64, id: u64) -> u64 {
    worker * 100 + id
}

/// A cache on the cluster of `cluster` (comma-separated) if not empty, else on `REDIS_URL`.
async fn cache_for(namespace: &str, cluster: &str, publish: Option<Duration>) -> Cache {
    let builder = if cluster.is_empty() {
        Cache::builder().redis(redis_url())
    } else {
        Cache::builder().redis_cluster(cluster.split(','))
    };
    let builder = builder
        .namespace(namespace)
        .operation_timeout(Duration::from_secs(2));
    let builder = match publish {
        Some(interval) => builder.publish_stats(interval),
        None => builder,
    };
    builder.build().await.unwrap()
}

/// Runs in a child process when `CACHE_TEST_FLEET_WORKER` is set; a no-op otherwise: calls
/// `item(worker, i % 4)` `calls` times (4 misses, the rest hits), publishes, and keeps
/// publishing for at most a minute (the parent kills it sooner).
#[test]
fn fleet_worker() {
    let Ok(namespace) = std::env::var("CACHE_TEST_FLEET_WORKER") else {
        return;
    };
    let var = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name} is set"));
    let worker: u64 = var("CACHE_TEST_FLEET_INDEX").parse().unwrap();
    let calls: u64 = var("CACHE_TEST_FLEET_CALLS").parse().unwrap();
    let cluster = var("CACHE_TEST_FLEET_CLUSTER");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let cache = cache_for(&namespace, &cluster, Some(INTERVAL)).await;
        for i in 0..calls {
            assert_eq!(item(&cache, worker, i % 4).await, worker * 100 + i % 4);
        }
        cache_runtime::__private::publish_now(&cache).await.unwrap();
        println!("FLEET WORKER {worker} published");
        tokio::time::sleep(Duration::from_secs(60)).await;
    });
}

fn spawn_fleet_worker(namespace: &str, index: u64, calls: u64, cluster: &str) -> Child {
    spawn_test_worker(
        "fleet::fleet_worker",
        &[
            ("CACHE_TEST_FLEET_WORKER", namespace.to_owned()),
            ("CACHE_TEST_FLEET_INDEX", index.to_string()),
            ("CACHE_TEST_FLEET_CALLS", calls.to_string()),
            ("CACHE_TEST_FLEET_CLUSTER", cluster.to_owned()),
        ],
    )
}

/// Polls `reader`'s fleet stats until `done` holds; panics with the last table after
/// [`PATIENCE`].
async fn wait_for(
    reader: &Cache,
    what: &str,
    done: impl Fn(&cache_runtime::FleetStats) -> bool,
) -> cache_runtime::FleetStats {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let fleet = reader.fleet_stats().await.unwrap();
        if done(&fleet) {
            return fleet;
        }
        assert!(Instant::now() < deadline, "{what}; last read:\n{fleet}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Kills the children when the test ends, passed or failed.
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

async fn three_processes_sum_and_a_dead_one_expires(cluster: &str) {
    let ns = unique_namespace("fleet");
    // 10, 20 and 30 calls: 4 misses each, 6 + 16 + 26 hits.
    let mut children = Children(
        [(1, 10), (2, 20), (3, 30)]
            .into_iter()
            .map(|(index, calls)| spawn_fleet_worker(&ns, index, calls, cluster))
            .collect(),
    );
    let reader = cache_for(&ns, cluster, None).await;
    // The publishers also run while their processes call: wait for the final counts.
    let calls = |f: &cache_runtime::FleetStats| {
        f.function("fleet_item")
            .map_or(0, |f| f.stats.hits + f.stats.misses)
    };
    let fleet = wait_for(&reader, "three instances publish 60 calls", |f| {
        f.instances() == 3 && calls(f) == 60
    })
    .await;
    let f = fleet
        .function("fleet_item")
        .expect("the function is reported");
    assert_eq!(
        (f.stats.hits, f.stats.misses, f.stats.loads, f.instances),
        (48, 12, 12, 3),
        "{fleet}"
    );
    assert_eq!(fleet.skipped(), 0, "{fleet}");
    assert_eq!(f.hit_rate(), Some(0.8));
    assert!(!f.is_low(), "80% is not under 80%");
    assert_eq!(f.hint, None);
    let table = fleet.to_string();
    assert!(table.starts_with("3 instances\n"), "{table}");
    assert!(table.contains("fleet_item"), "{table}");

    // Every key has a TTL: each snapshot at most three intervals, the registry its own.
    let registry = format!("__cr:fleet:{{{ns}:stats}}");
    let mut conn = RawConn::new(cluster).await;
    let members: Vec<String> = conn
        .query(redis::cmd("ZRANGE").arg(&registry).arg(0).arg(-1))
        .await;
    assert_eq!(members.len(), 3, "{members:?}");
    for id in &members {
        let pttl: i64 = conn
            .query(redis::cmd("PTTL").arg(format!("{registry}:{id}")))
            .await;
        assert!(
            pttl > 0 && pttl <= 3 * INTERVAL.as_millis() as i64,
            "snapshot of {id}: PTTL {pttl}"
        );
    }
    let pttl: i64 = conn.query(redis::cmd("PTTL").arg(&registry)).await;
    assert!(pttl > 0, "registry PTTL {pttl}");

    // Worker 3 (30 calls: 26 hits) dies: its snapshot expires after three intervals.
    let mut third = children.0.pop().unwrap();
    let third_id = members
        .iter()
        .find(|id| id.contains(&format!(":{}:", third.id())))
        .expect("the third worker is registered under its pid")
        .clone();
    third.kill().unwrap();
    third.wait().unwrap();
    let fleet = wait_for(&reader, "the dead instance drops out", |f| {
        f.instances() == 2
    })
    .await;
    let f = fleet.function("fleet_item").unwrap();
    assert_eq!(
        (f.stats.hits, f.stats.misses, f.instances),
        (22, 8, 2),
        "{fleet}"
    );
    assert!(f.is_low(), "22 / 30 is under 80%");
    assert_eq!(
        f.hint,
        Some(cache_runtime::Hint::NotReread),
        "stored, never invalidated, missed: {fleet}"
    );
    assert!(fleet.to_string().contains("! 73.3%"), "{fleet}");
    // Gone from Redis, not only from the sum.
    let exists: i64 = conn
        .query(redis::cmd("EXISTS").arg(format!("{registry}:{third_id}")))
        .await;
    assert_eq!(exists, 0, "the dead instance's snapshot expired");
}

/// A plain connection to the Redis (`cluster` empty) or to the cluster of `cluster`.
enum RawConn {
    Single(redis::aio::MultiplexedConnection),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl RawConn {
    async fn new(cluster: &str) -> RawConn {
        if cluster.is_empty() {
            return RawConn::Single(raw_connection(&redis_url()).await);
        }
        let client =
            redis::cluster::ClusterClient::new(cluster.split(',').collect::<Vec<_>>()).unwrap();
        RawConn::Cluster(client.get_async_connection().await.unwrap())
    }

    async fn query<T: redis::FromRedisValue>(&mut self, cmd: &mut redis::Cmd) -> T {
        match self {
            RawConn::Single(c) => cmd.query_async(c).await.unwrap(),
            RawConn::Cluster(c) => cmd.query_async(c).await.unwrap(),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_fleet_stats_of_3_processes_sum_and_a_dead_one_expires() {
    three_processes_sum_and_a_dead_one_expires("").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_fleet_stats_on_a_cluster() {
    let (urls, _cluster) = shared_cluster();
    three_processes_sum_and_a_dead_one_expires(&urls.join(",")).await;
}

#[tokio::test]
async fn on_memory_the_fleet_is_this_cache() {
    let cache = Cache::builder()
        .namespace("fleet_memory")
        .publish_stats(Duration::from_millis(100))
        .build()
        .await
        .unwrap();
    for i in 0..5 {
        item(&cache, 0, i % 2).await;
    }
    let fleet = cache.fleet_stats().await.unwrap();
    assert_eq!(fleet.instances(), 1);
    let f = fleet.function("fleet_item").unwrap();
    assert_eq!((f.stats.hits, f.stats.misses), (3, 2));
}

#[tokio::test]
async fn a_corrupt_snapshot_is_skipped_and_counted() {
    let url = redis_url();
    let ns = unique_namespace("fleet_corrupt");
    let cache = cache_for(&ns, "", Some(Duration::from_millis(100))).await;
    item(&cache, 0, 1).await;
    item(&cache, 0, 1).await;
    cache_runtime::__private::publish_now(&cache).await.unwrap();
    // Another program's hash, registered as an instance.
    let registry = format!("__cr:fleet:{{{ns}:stats}}");
    let mut conn = raw_connection(&url).await;
    let expires = cache_tests_now_ms() + 60_000;
    let _: () = conn.zadd(&registry, "intruder", expires).await.unwrap();
    let intruder = format!("{registry}:intruder");
    let _: () = conn.hset(&intruder, "meta", "{not json").await.unwrap();
    let _: () = conn.expire(&intruder, 60).await.unwrap();
    let fleet = cache.fleet_stats().await.unwrap();
    assert_eq!((fleet.instances(), fleet.skipped()), (1, 1), "{fleet}");
    let f = fleet.function("fleet_item").unwrap();
    assert_eq!((f.stats.hits, f.stats.misses), (1, 1));
    assert!(fleet.to_string().contains("1 undecodable"), "{fleet}");
}

/// Registers, as an instance of `ns`'s fleet, a copy of `cache`'s published snapshot under
/// `id`, scored `score_ms` (a publisher's clock) and expiring in 60 s.
async fn register_copy(
    conn: &mut redis::aio::MultiplexedConnection,
    cache: &Cache,
    ns: &str,
    id: &str,
    score_ms: u64,
) {
    cache_runtime::__private::publish_now(cache).await.unwrap();
    let registry = format!("__cr:fleet:{{{ns}:stats}}");
    let own: Vec<String> = conn.zrange(&registry, 0, -1).await.unwrap();
    let hash: Vec<(Vec<u8>, Vec<u8>)> = conn
        .hgetall(format!("{registry}:{}", own[0]))
        .await
        .unwrap();
    let copy = format!("{registry}:{id}");
    let _: () = conn.hset_multiple(&copy, &hash).await.unwrap();
    let _: () = conn.expire(&copy, 60).await.unwrap();
    let _: () = conn.zadd(&registry, id, score_ms).await.unwrap();
}

/// A publisher whose clock is behind the reader's by far more than three intervals (its
/// registry score is in the reader's past) counts while its snapshot lives in Redis.
#[tokio::test]
async fn a_publisher_with_a_slow_clock_counts() {
    let ns = unique_namespace("fleet_clock");
    let cache = cache_for(&ns, "", Some(Duration::from_millis(100))).await;
    item(&cache, 0, 1).await;
    item(&cache, 0, 1).await;
    let mut conn = raw_connection(&redis_url()).await;
    // 10 s behind: its snapshot "expires" (by its clock) 10 s before the reader's now.
    register_copy(
        &mut conn,
        &cache,
        &ns,
        "slow-clock",
        cache_tests_now_ms() - 10_000,
    )
    .await;
    let fleet = cache.fleet_stats().await.unwrap();
    assert_eq!((fleet.instances(), fleet.skipped()), (2, 0), "{fleet}");
    let f = fleet.function("fleet_item").unwrap();
    assert_eq!((f.stats.hits, f.stats.misses, f.instances), (2, 2, 2));
}

/// Registry members that are not snapshot hashes (a string key: `WRONGTYPE`; a hash with a
/// field name that is not UTF-8) are skipped and counted, one each; the others still sum.
#[tokio::test]
async fn foreign_registry_members_are_skipped_and_counted() {
    let ns = unique_namespace("fleet_foreign");
    let cache = cache_for(&ns, "", Some(Duration::from_millis(100))).await;
    item(&cache, 0, 1).await;
    item(&cache, 0, 1).await;
    let mut conn = raw_connection(&redis_url()).await;
    // A healthy second instance (a copy) so that the sum is over two.
    register_copy(
        &mut conn,
        &cache,
        &ns,
        "copy",
        cache_tests_now_ms() + 60_000,
    )
    .await;
    let registry = format!("__cr:fleet:{{{ns}:stats}}");
    let expires = cache_tests_now_ms() + 60_000;
    let string = format!("{registry}:a-string");
    let _: () = conn.set_ex(&string, "not a hash", 60).await.unwrap();
    let _: () = conn.zadd(&registry, "a-string", expires).await.unwrap();
    // The copy's fields plus one whose name is not UTF-8: the field is skipped, the rest
    // of the snapshot counts.
    let binary = format!("{registry}:binary-field");
    let copy: Vec<(Vec<u8>, Vec<u8>)> = conn.hgetall(format!("{registry}:copy")).await.unwrap();
    let _: () = conn.hset_multiple(&binary, &copy).await.unwrap();
    let _: () = conn
        .hset(&binary, b"f:\xff\xfe".as_slice(), b"{}".as_slice())
        .await
        .unwrap();
    let _: () = conn.expire(&binary, 60).await.unwrap();
    let _: () = conn.zadd(&registry, "binary-field", expires).await.unwrap();
    let fleet = cache.fleet_stats().await.unwrap();
    assert_eq!((fleet.instances(), fleet.skipped()), (3, 2), "{fleet}");
    let f = fleet.function("fleet_item").unwrap();
    assert_eq!((f.stats.hits, f.stats.misses, f.instances), (3, 3, 3));
}

#[tokio::test]
async fn publish_stats_checks_its_interval() {
    let e = Cache::builder()
        .publish_stats(Duration::from_millis(10))
        .build()
        .await
        .unwrap_err();
    assert!(
        e.is_config() && e.to_string().contains("publish_stats"),
        "{e}"
    );
}

fn cache_tests_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
