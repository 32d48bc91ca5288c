//! The `metrics` feature: a known call sequence, on memory and on the shared Redis, produces
//! exactly the expected counters, histograms and labels. Each test installs a debugging
//! recorder on its own thread (`with_local_recorder`, a current-thread runtime inside), so
//! tests running in parallel do not see each other's metrics.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use cache_runtime::write_behind::Worker;
use cache_runtime::{Cache, cache_evict, cache_put, cached, write_behind};
use cache_tests::{redis_url, shared_cluster, unique_namespace};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};

use crate::support::{Calls, Gate, Name};

#[cached(cache = cache, key = "m:{id}", ttl = 60, name = "metrics_get")]
async fn get(cache: &Cache, id: u64) -> Result<u64, String> {
    if id == 13 {
        return Err("unlucky".to_owned());
    }
    Ok(id * 10)
}

#[cache_put(cache = cache, key = "m:{id}", ttl = 60, name = "metrics_put")]
async fn put(cache: &Cache, id: u64) -> Result<u64, String> {
    Ok(id * 100)
}

#[cache_evict(cache = cache, keys = ["m:{id}"], name = "metrics_evict")]
async fn evict(cache: &Cache, id: u64) -> Result<(), String> {
    let _ = id;
    Ok(())
}

/// `condition` false for 0, or a `name` that does not render: the call bypasses the cache.
#[cached(cache = cache, key = "c:{id}:{name}", ttl = 60, condition = id != 0, name = "metrics_maybe")]
async fn maybe(cache: &Cache, id: u64, name: &Name) -> Result<u64, String> {
    let _ = name;
    Ok(id)
}

/// The first call is held at the gate; the others find its value.
#[cached(cache = cache, key = "l:{id}", ttl = 60, lock = 60, name = "metrics_locked")]
async fn locked(cache: &Cache, calls: &Calls, gate: &Gate, id: u64) -> Result<u64, String> {
    if calls.hit() == 1 {
        gate.pass().await;
    }
    Ok(id)
}

/// (name, sorted labels) -> value: counters and gauges as numbers, histograms as their
/// sample counts.
type Seen = BTreeMap<MetricKey, f64>;

/// A metric's name and its labels, sorted.
type MetricKey = (String, Vec<(String, String)>);

fn seen(recorder: &DebuggingRecorder) -> Seen {
    recorder
        .snapshotter()
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, value)| {
            let (_, key) = key.into_parts();
            let mut labels: Vec<(String, String)> = key
                .labels()
                .map(|l| (l.key().to_owned(), l.value().to_owned()))
                .collect();
            labels.sort();
            let value = match value {
                DebugValue::Counter(n) => n as f64,
                DebugValue::Gauge(g) => g.into_inner(),
                DebugValue::Histogram(samples) => samples.len() as f64,
            };
            ((key.name().to_owned(), labels), value)
        })
        .collect()
}

/// Runs the sequence on `cache` (and `other`, a second handle on the same namespace standing
/// for another process, when the backend is shared), inside `recorder`'s scope.
fn run(recorder: &DebuggingRecorder, build: impl AsyncFn() -> (Cache, Option<Cache>)) {
    metrics::with_local_recorder(recorder, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (cache, other) = build().await;
            assert_eq!(get(&cache, 1).await, Ok(10)); // miss
            assert_eq!(get(&cache, 1).await, Ok(10)); // hit
            assert_eq!(get(&cache, 1).await, Ok(10)); // hit
            assert!(get(&cache, 13).await.is_err()); // miss, load error
            assert_eq!(put(&cache, 2).await, Ok(200)); // put
            assert_eq!(evict(&cache, 1).await, Ok(())); // eviction
            assert_eq!(maybe(&cache, 0, &Name(Some("a"))).await, Ok(0)); // bypass (condition)
            assert_eq!(maybe(&cache, 0, &Name(Some("a"))).await, Ok(0)); // bypass (condition)
            assert_eq!(maybe(&cache, 5, &Name(None)).await, Ok(5)); // bypass (key)
            // A wait for another caller's load: another process's (a lock wait) on a
            // shared backend, this process's (coalesced) on memory.
            let calls = Arc::new(Calls::new());
            let gate = Gate::new();
            let first = {
                let (cache, calls, gate) = (cache.clone(), calls.clone(), gate.clone());
                tokio::spawn(async move { locked(&cache, &calls, &gate, 7).await })
            };
            gate.entered.notified().await;
            let second = {
                let cache = other.unwrap_or_else(|| cache.clone());
                let (calls, gate) = (calls.clone(), gate.clone());
                tokio::spawn(async move { locked(&cache, &calls, &gate, 7).await })
            };
            tokio::time::sleep(Duration::from_millis(200)).await;
            gate.release.notify_one();
            assert_eq!(first.await.unwrap(), Ok(7));
            assert_eq!(second.await.unwrap(), Ok(7));
            assert_eq!(calls.get(), 1);
        });
    });
}

/// The expected non-zero values; every other metric of the functions must be zero.
fn check(seen: &Seen, namespace: &str, shared: bool) {
    let key = |name: &str, function: &str, extra: Option<(&str, &str)>| {
        let mut labels = vec![
            ("cache".to_owned(), namespace.to_owned()),
            ("function".to_owned(), function.to_owned()),
        ];
        if let Some((k, v)) = extra {
            labels.push((k.to_owned(), v.to_owned()));
        }
        labels.sort();
        (name.to_owned(), labels)
    };
    let l2 = Some(("level", "l2"));
    let mut expected: Vec<(MetricKey, f64)> = vec![
        (key("cache_hits_total", "metrics_get", l2), 2.0),
        (key("cache_misses_total", "metrics_get", None), 2.0),
        (key("cache_loads_total", "metrics_get", None), 2.0),
        (key("cache_load_seconds", "metrics_get", None), 2.0),
        (key("cache_load_errors_total", "metrics_get", None), 1.0),
        (key("cache_puts_total", "metrics_put", None), 1.0),
        (key("cache_evictions_total", "metrics_evict", None), 1.0),
        (key("cache_hits_total", "metrics_locked", l2), 1.0),
        (key("cache_misses_total", "metrics_locked", None), 1.0),
        (key("cache_loads_total", "metrics_locked", None), 1.0),
        (key("cache_load_seconds", "metrics_locked", None), 1.0),
        // A bypassed call runs the function: a load, not a miss.
        (
            key(
                "cache_bypass_total",
                "metrics_maybe",
                Some(("reason", "condition")),
            ),
            2.0,
        ),
        (
            key(
                "cache_bypass_total",
                "metrics_maybe",
                Some(("reason", "key")),
            ),
            1.0,
        ),
        (key("cache_loads_total", "metrics_maybe", None), 3.0),
        (key("cache_load_seconds", "metrics_maybe", None), 3.0),
    ];
    if shared {
        expected.push((key("cache_lock_waits_total", "metrics_locked", None), 1.0));
        expected.push((key("cache_lock_wait_seconds", "metrics_locked", None), 1.0));
    } else {
        expected.push((key("cache_coalesced_total", "metrics_locked", None), 1.0));
    }
    for (k, want) in &expected {
        assert_eq!(seen.get(k), Some(want), "{k:?} in {seen:#?}");
    }
    for ((name, labels), value) in seen {
        assert!(name.starts_with("cache_"), "{name}");
        let names: Vec<&str> = labels.iter().map(|(k, _)| k.as_str()).collect();
        let allowed = match name.as_str() {
            "cache_breaker_open" => vec!["cache"],
            "cache_hits_total" => vec!["cache", "function", "level"],
            "cache_fail_open_total" => vec!["cache", "function", "kind"],
            "cache_bypass_total" => vec!["cache", "function", "reason"],
            _ => vec!["cache", "function"],
        };
        assert_eq!(names, allowed, "labels of {name}");
        assert_eq!(labels[0], ("cache".to_owned(), namespace.to_owned()));
        if !expected
            .iter()
            .any(|(k, _)| k == &(name.clone(), labels.clone()))
        {
            assert_eq!(*value, 0.0, "{name} {labels:?} in {seen:#?}");
        }
    }
    // The breaker's gauge on Redis (closed), none on memory.
    let breaker = (
        "cache_breaker_open".to_owned(),
        vec![("cache".to_owned(), namespace.to_owned())],
    );
    assert_eq!(seen.get(&breaker), shared.then_some(&0.0));
    // Every counter of every function is registered (at zero until it counts).
    for function in [
        "metrics_get",
        "metrics_put",
        "metrics_evict",
        "metrics_locked",
        "metrics_maybe",
    ] {
        for reason in ["condition", "key"] {
            let k = key("cache_bypass_total", function, Some(("reason", reason)));
            assert!(seen.contains_key(&k), "{k:?}");
        }
        for name in WRITE_BEHIND {
            let k = key(name, function, None);
            assert_eq!(seen.get(&k), Some(&0.0), "{k:?}");
        }
        for kind in ["unavailable", "timeout", "server", "decode"] {
            let k = key("cache_fail_open_total", function, Some(("kind", kind)));
            assert_eq!(seen.get(&k), Some(&0.0), "{k:?}");
        }
        let k = key("cache_hits_total", function, Some(("level", "l1")));
        assert_eq!(seen.get(&k), Some(&0.0), "{k:?}");
    }
}

#[test]
fn metrics_known_sequence_memory() {
    let recorder = DebuggingRecorder::new();
    let namespace = unique_namespace("metrics");
    run(&recorder, async || {
        let cache = Cache::builder()
            .namespace(namespace.as_str())
            .build()
            .await
            .unwrap();
        (cache, None)
    });
    check(&seen(&recorder), &namespace, false);
}

#[test]
fn metrics_known_sequence_redis() {
    let recorder = DebuggingRecorder::new();
    let namespace = unique_namespace("metrics");
    run(&recorder, async || {
        let on_redis = async || {
            Cache::builder()
                .redis(redis_url())
                .namespace(namespace.as_str())
                .operation_timeout(Duration::from_secs(2))
                .build()
                .await
                .unwrap()
        };
        (on_redis().await, Some(on_redis().await))
    });
    check(&seen(&recorder), &namespace, true);
}

/// The write-behind counters.
const WRITE_BEHIND: [&str; 5] = [
    "cache_write_behind_enqueued_total",
    "cache_write_behind_inline_total",
    "cache_write_behind_applied_total",
    "cache_write_behind_retries_total",
    "cache_write_behind_dead_lettered_total",
];

// Write-behind functions name their caches (their arguments are queued): one per backend,
// each used by one test only, so that its counters are registered inside that test's
// recorder.
static WB_MEMORY: std::sync::LazyLock<Cache> = std::sync::LazyLock::new(|| {
    Cache::builder()
        .namespace(unique_namespace("metrics_wb"))
        .build_sync()
        .unwrap()
});

static WB_REDIS: std::sync::LazyLock<Cache> = std::sync::LazyLock::new(|| {
    Cache::builder()
        .redis(redis_url())
        .namespace(unique_namespace("metrics_wb"))
        .operation_timeout(Duration::from_secs(2))
        .build_sync()
        .unwrap()
});

#[write_behind(cache = WB_MEMORY, key = "w:{id}", ttl = 60, value = value, queue = "mwb", name = "metrics_wb_memory")]
async fn wb_memory(id: u64, value: u64) -> Result<(), String> {
    let _ = (id, value);
    Ok(())
}

#[write_behind(cache = WB_REDIS, key = "w:{id}", ttl = 60, value = value, queue = "mwb", name = "metrics_wb_ok")]
async fn wb_ok(id: u64, value: u64) -> Result<(), String> {
    let _ = (id, value);
    Ok(())
}

#[write_behind(cache = WB_REDIS, key = "f:{id}", ttl = 60, value = value, queue = "mwb", name = "metrics_wb_failing")]
async fn wb_failing(id: u64, value: u64) -> Result<(), String> {
    let _ = (id, value);
    Err("the database refuses".to_owned())
}

/// The write-behind counters of `function` on the cache named `namespace`, in
/// [`WRITE_BEHIND`]'s order.
fn wb_counts(seen: &Seen, namespace: &str, function: &str) -> Vec<f64> {
    WRITE_BEHIND
        .iter()
        .map(|name| {
            let labels = vec![
                ("cache".to_owned(), namespace.to_owned()),
                ("function".to_owned(), function.to_owned()),
            ];
            seen.get(&((*name).to_owned(), labels))
                .copied()
                .unwrap_or(f64::NAN)
        })
        .collect()
}

/// On memory a write-behind call runs its body inline: one inline fallback each.
#[test]
fn metrics_write_behind_memory() {
    let recorder = DebuggingRecorder::new();
    metrics::with_local_recorder(&recorder, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            wb_memory(1, 10).await.unwrap();
            wb_memory(2, 20).await.unwrap();
        });
    });
    let seen = seen(&recorder);
    assert_eq!(
        wb_counts(&seen, WB_MEMORY.namespace(), "metrics_wb_memory"),
        [0.0, 2.0, 0.0, 0.0, 0.0]
    );
}

/// On Redis: three calls queued and applied (two of one key, coalesced into one run: each
/// entry counts, so that enqueued = applied + dead-lettered); one whose body fails, retried
/// once and then dead-lettered (`max_attempts(2)`).
#[test]
fn metrics_write_behind_redis() {
    let recorder = DebuggingRecorder::new();
    metrics::with_local_recorder(&recorder, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            wb_ok(1, 10).await.unwrap();
            wb_ok(1, 11).await.unwrap();
            wb_ok(2, 20).await.unwrap();
            wb_failing(3, 30).await.unwrap();
            let worker = Worker::builder(&WB_REDIS)
                .queues(["mwb"])
                .poll(Duration::from_millis(20))
                .max_attempts(2)
                .backoff(Duration::from_millis(10), Duration::from_millis(20))
                .start()
                .unwrap();
            assert!(worker.flush_for(Duration::from_secs(30)).await, "drained");
            worker.shutdown().await;
        });
    });
    let seen = seen(&recorder);
    let ns = WB_REDIS.namespace();
    assert_eq!(
        wb_counts(&seen, ns, "metrics_wb_ok"),
        [3.0, 0.0, 3.0, 0.0, 0.0]
    );
    assert_eq!(
        wb_counts(&seen, ns, "metrics_wb_failing"),
        [1.0, 0.0, 0.0, 1.0, 1.0]
    );
}

/// On a cluster, each master's breaker reports its own gauge (`node`: its address), closed
/// (0) while it answers, next to the cache-wide one.
#[test]
fn metrics_breaker_per_master_cluster() {
    let (urls, _cluster) = shared_cluster();
    let recorder = DebuggingRecorder::new();
    let namespace = unique_namespace("metrics");
    let masters = metrics::with_local_recorder(&recorder, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let cache = Cache::builder()
                .redis_cluster(urls.iter().cloned())
                .namespace(namespace.as_str())
                .operation_timeout(Duration::from_secs(2))
                .build()
                .await
                .unwrap();
            let masters = cluster_masters(&urls[0]).await;
            // The slot table is read in the background after the first operations.
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            let mut id = 0;
            while node_gauges(&seen(&recorder), &namespace).len() < masters.len() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "per-master gauges: {:?}",
                    node_gauges(&seen(&recorder), &namespace)
                );
                id += 1;
                assert_eq!(get(&cache, id).await, Ok(id * 10));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            masters
        })
    });
    let seen = seen(&recorder);
    let gauges = node_gauges(&seen, &namespace);
    let nodes: Vec<&str> = gauges.keys().map(String::as_str).collect();
    assert_eq!(
        nodes,
        masters.iter().map(String::as_str).collect::<Vec<_>>()
    );
    assert!(gauges.values().all(|v| *v == 0.0), "{gauges:?}");
    let cache_wide = (
        "cache_breaker_open".to_owned(),
        vec![("cache".to_owned(), namespace.clone())],
    );
    assert_eq!(seen.get(&cache_wide), Some(&0.0));
}

/// `cache_breaker_open{cache, node}` of the cache named `namespace`: node -> value.
fn node_gauges(seen: &Seen, namespace: &str) -> BTreeMap<String, f64> {
    seen.iter()
        .filter(|((name, labels), _)| {
            name == "cache_breaker_open" && labels.len() == 2 && labels[0].1 == namespace
        })
        .map(|((_, labels), value)| {
            assert_eq!(labels[1].0, "node");
            (labels[1].1.clone(), *value)
        })
        .collect()
}

/// The cluster's masters (`host:port`, sorted), from `CLUSTER SLOTS` on `url`.
async fn cluster_masters(url: &str) -> Vec<String> {
    let mut conn = cache_tests::raw_connection(url).await;
    let reply: redis::Value = redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query_async(&mut conn)
        .await
        .unwrap();
    let redis::Value::Array(ranges) = reply else {
        panic!("CLUSTER SLOTS: {reply:?}")
    };
    let mut masters: Vec<String> = ranges
        .iter()
        .filter_map(|range| {
            let redis::Value::Array(fields) = range else {
                return None;
            };
            let Some(redis::Value::Array(master)) = fields.get(2) else {
                return None;
            };
            let host = match master.first()? {
                redis::Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
                redis::Value::SimpleString(s) => s.clone(),
                _ => return None,
            };
            let redis::Value::Int(port) = master.get(1)? else {
                return None;
            };
            Some(format!("{host}:{port}"))
        })
        .collect();
    masters.sort();
    masters.dedup();
    masters
}

#[cached(cache = cache, key = "d:{id}", ttl = 60, name = "metrics_decode")]
async fn decoded(cache: &Cache, id: u64) -> Result<u64, String> {
    Ok(id)
}

#[test]
fn metrics_fail_open_decode_redis() {
    let recorder = DebuggingRecorder::new();
    let namespace = metrics::with_local_recorder(&recorder, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let fx = crate::support::Fx::redis("metrics").await;
            fx.plant_garbage("d:5").await;
            assert_eq!(decoded(&fx.cache, 5).await, Ok(5)); // unusable value: a miss
            assert_eq!(decoded(&fx.cache, 5).await, Ok(5)); // overwritten: a hit
            fx.cache.namespace().to_owned()
        })
    });
    let seen = seen(&recorder);
    let labels = |kind: Option<(&str, &str)>| {
        let mut l = vec![
            ("cache".to_owned(), namespace.clone()),
            ("function".to_owned(), "metrics_decode".to_owned()),
        ];
        l.extend(kind.map(|(k, v)| (k.to_owned(), v.to_owned())));
        l
    };
    let value = |name: &str, extra| seen.get(&(name.to_owned(), labels(extra))).copied();
    assert_eq!(
        value("cache_fail_open_total", Some(("kind", "decode"))),
        Some(1.0)
    );
    assert_eq!(
        value("cache_fail_open_total", Some(("kind", "unavailable"))),
        Some(0.0)
    );
    assert_eq!(value("cache_misses_total", None), Some(1.0));
    assert_eq!(value("cache_hits_total", Some(("level", "l2"))), Some(1.0));
}
