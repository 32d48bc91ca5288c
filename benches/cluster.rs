//! `compare --only cluster`: the same annotated functions on a Redis Cluster (issue 11),
//! each scenario against a hand-written redis-rs cluster baseline measured in the same run:
//!
//! - hit latency, sequential: a `ClusterConnection` `GET` + `serde_json` decode (what
//!   `raw_get` does on one Redis) against `#[cached]` and `#[cached(lock)]` on the cluster;
//!   the single Redis's raw `GET` and `#[cached]` for reference;
//! - miss + fill, sequential: cluster `GET` + `SET EX` against `#[cached]` and
//!   `#[cached(lock)]` on the cluster; the single Redis's raw miss for reference;
//! - throughput, N tasks over spread keys: raw cluster against `#[cached]` on the cluster;
//! - stampede: `#[cached(lock)]` on the cluster and on the single Redis (executions, wake-up);
//! - write-behind enqueue, sequential: on the cluster (three one-slot steps) against the
//!   single Redis (one script).
//!
//! Runs when a cluster is given (`--cluster-urls URL,URL,..` or `REDIS_CLUSTER_URLS`); the
//! single Redis (`--redis-url`) is the reference. Every key is under `cache-bench:<run_id>:`
//! with a TTL.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use cache_runtime::write_behind::Worker;
use cache_runtime::{Cache, write_behind};
use redis::aio::ConnectionManager;
use redis::cluster_async::ClusterConnection;
use std::hint::black_box;

use super::{
    Args, Figure, Op, RoundFigures, concurrent, ids, interleaved, load, ours, ours_lock,
    out_stampede, raw_get, raw_miss, scenario_wanted, sequential_scenario, with_ratios,
};

/// An `Op` running `raw_get` on its own clone of a connection (single or cluster).
fn raw_get_op<C>(conn: &C, prefix: &Arc<str>) -> Op
where
    C: redis::aio::ConnectionLike + Clone + Send + Sync + 'static,
{
    let (conn, prefix) = (conn.clone(), prefix.clone());
    Arc::new(move |id| {
        let (mut conn, prefix) = (conn.clone(), prefix.clone());
        Box::pin(async move {
            black_box(raw_get(&mut conn, &prefix, id).await);
        })
    })
}

/// Ids never used before (see the `miss` scenario); a range of their own.
static NEXT_MISS: AtomicU64 = AtomicU64::new(0);

fn next_miss() -> u64 {
    NEXT_MISS.fetch_add(1, Ordering::Relaxed)
}

/// An `Op` running `raw_miss` on a fresh id.
fn raw_miss_op<C>(conn: &C, prefix: &Arc<str>) -> Op
where
    C: redis::aio::ConnectionLike + Clone + Send + Sync + 'static,
{
    let (conn, prefix) = (conn.clone(), prefix.clone());
    Arc::new(move |_| {
        let (mut conn, prefix) = (conn.clone(), prefix.clone());
        Box::pin(async move {
            black_box(raw_miss(&mut conn, &prefix, next_miss()).await);
        })
    })
}

// ---- write-behind enqueue ------------------------------------------------------------------

static WB_SINGLE: OnceLock<Cache> = OnceLock::new();
static WB_CLUSTER: OnceLock<Cache> = OnceLock::new();

fn wb_single_cache() -> &'static Cache {
    WB_SINGLE
        .get()
        .expect("the single Redis write-behind cache")
}

fn wb_cluster_cache() -> &'static Cache {
    WB_CLUSTER.get().expect("the cluster write-behind cache")
}

/// What the queued writes do when applied: nothing (only the enqueue is measured).
#[write_behind(cache = wb_single_cache(), key = "wbe:{id}", ttl = 600, value = name, queue = "bench_enqueue", name = "bench_wb_enqueue_single")]
async fn wb_single(id: i64, name: String) -> Result<(), String> {
    let _ = (id, name);
    Ok(())
}

#[write_behind(cache = wb_cluster_cache(), key = "wbe:{id}", ttl = 600, value = name, queue = "bench_enqueue", name = "bench_wb_enqueue_cluster")]
async fn wb_cluster(id: i64, name: String) -> Result<(), String> {
    let _ = (id, name);
    Ok(())
}

/// Applies what the enqueue rows queued (not timed), so the streams end empty.
async fn wb_drain(cache: &Cache) -> Result<(), String> {
    let worker = Worker::builder(cache)
        .queues(["bench_enqueue"])
        .start()
        .map_err(|e| e.to_string())?;
    let drained = worker.flush_for(Duration::from_secs(120)).await;
    worker.shutdown().await;
    if drained {
        Ok(())
    } else {
        Err("the write-behind enqueue rows' queue did not drain within 2 minutes".to_owned())
    }
}

// ---- the scenario --------------------------------------------------------------------------

/// The single Redis the rest of `compare` uses: the reference rows.
pub(super) struct Single<'a> {
    pub(super) url: &'a str,
    pub(super) conn: &'a ConnectionManager,
    pub(super) raw_prefix: &'a Arc<str>,
    pub(super) cache: &'a Cache,
}

/// Every cluster row. `urls`: some of the cluster's nodes.
pub(super) async fn scenario(
    args: &Args,
    urls: &[String],
    run_id: &str,
    single: Single<'_>,
) -> Result<Vec<Figure>, String> {
    let client = redis::cluster::ClusterClient::new(urls.iter().map(String::as_str))
        .map_err(|e| format!("cluster URLs {urls:?}: {e}"))?;
    let cconn: ClusterConnection = client
        .get_async_connection()
        .await
        .map_err(|e| format!("cannot connect to the cluster at {urls:?}: {e}"))?;
    let cache = Cache::builder()
        .redis_cluster(urls.iter().cloned())
        .namespace(format!("cache-bench:{run_id}:cluster"))
        .build()
        .await
        .map_err(|e| e.to_string())?;
    let craw_prefix: Arc<str> = format!("cache-bench:{run_id}:craw:").into();
    let scale = if args.quick { 1 } else { 5 };
    let (seq_ops, conc_ops, miss_ops) = (2_000 * scale, 20_000 * scale, 1_000 * scale);
    let keys = args.keys;

    // Warm every key the hit and throughput rows read (the single Redis's too, in case no
    // other scenario did), 32 tasks at a time.
    eprintln!("cluster: warming {keys} keys ...");
    let mut set = tokio::task::JoinSet::new();
    for t in 0..32u64 {
        let (cache, single_cache) = (cache.clone(), single.cache.clone());
        let (mut cconn, mut sconn) = (cconn.clone(), single.conn.clone());
        let (cprefix, sprefix) = (craw_prefix.clone(), single.raw_prefix.clone());
        set.spawn(async move {
            for id in (t..keys).step_by(32) {
                let _ = ours(&cache, id).await;
                let _ = ours(&single_cache, id).await;
                let bytes = serde_json::to_vec(&load(id)).unwrap_or_default();
                let set = |prefix: &str| {
                    let mut cmd = redis::cmd("SET");
                    cmd.arg(format!("{prefix}user:{id}"))
                        .arg(&bytes)
                        .arg("EX")
                        .arg(3600);
                    cmd
                };
                let _: Result<(), _> = set(&cprefix).query_async(&mut cconn).await;
                let _: Result<(), _> = set(&sprefix).query_async(&mut sconn).await;
            }
        });
    }
    while set.join_next().await.is_some() {}
    // The hit rows must measure hits: the warm-up reached the cluster.
    let warmed = cache.stats();
    let f = warmed.function("ours");
    let (fills, errors) = (f.map_or(0, |f| f.misses), f.map_or(0, |f| f.backend_errors));
    if fills < keys || errors > 0 {
        return Err(format!(
            "cluster: warming filled {fills} of {keys} keys, with {errors} backend errors:\n{warmed}"
        ));
    }

    let mut out = Vec::new();
    let raw_cluster = raw_get_op(&cconn, &craw_prefix);
    let raw_single = raw_get_op(single.conn, single.raw_prefix);
    let ours_cluster = cache_op!(cache, ours);

    // 1. Hit latency.
    eprintln!("cluster: hit latency (sequential) ...");
    let contenders = [
        ("raw redis-rs cluster GET + serde_json", raw_cluster.clone()),
        (
            "#[cached] on the cluster (this project)",
            ours_cluster.clone(),
        ),
        (
            "#[cached(lock)] on the cluster (this project)",
            cache_op!(cache, ours_lock),
        ),
        (
            "reference: raw redis-rs GET + serde_json, single Redis",
            raw_single.clone(),
        ),
        (
            "reference: #[cached], single Redis",
            cache_op!(single.cache, ours),
        ),
    ];
    out.extend(
        sequential_scenario(
            "cluster: hit latency, sequential",
            &contenders,
            args.rounds,
            |round| ids(seq_ops, keys, 0.0, round as u64 + 101),
        )
        .await,
    );

    // 2. Miss + fill.
    eprintln!("cluster: miss + fill (sequential) ...");
    let epoch_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    NEXT_MISS.store((1 << 61) | (epoch_ms << 16), Ordering::Relaxed);
    let contenders = [
        (
            "raw redis-rs cluster GET + SET EX",
            raw_miss_op(&cconn, &craw_prefix),
        ),
        (
            "#[cached] on the cluster (this project)",
            cache_op!(cache, ours, |_| next_miss()),
        ),
        (
            "#[cached(lock)] on the cluster (this project)",
            cache_op!(cache, ours_lock, |_| next_miss()),
        ),
        (
            "reference: raw redis-rs GET + SET EX, single Redis",
            raw_miss_op(single.conn, single.raw_prefix),
        ),
        (
            "reference: #[cached], single Redis",
            cache_op!(single.cache, ours, |_| next_miss()),
        ),
    ];
    out.extend(
        sequential_scenario(
            "cluster: miss + fill, sequential",
            &contenders,
            args.rounds,
            |_| vec![0u64; miss_ops],
        )
        .await,
    );

    // 3. Throughput over spread keys.
    let label = format!("cluster: throughput, {} tasks, {keys} keys", args.tasks);
    eprintln!("{label} ...");
    let contenders = [
        ("raw redis-rs cluster GET + serde_json", raw_cluster),
        ("#[cached] on the cluster (this project)", ours_cluster),
        (
            "reference: raw redis-rs GET + serde_json, single Redis",
            raw_single,
        ),
    ];
    let tasks = args.tasks;
    let figs = interleaved(&label, &contenders, args.rounds, |op, round| {
        let ids = Arc::new(ids(conc_ops, keys, 0.0, round as u64 + 121));
        async move {
            let mut f = RoundFigures::default();
            concurrent(&op, &ids, tasks, &mut f).await;
            f
        }
    })
    .await;
    out.extend(with_ratios(
        contenders
            .iter()
            .zip(&figs)
            .map(|((name, _), f)| f.figure(&label, name))
            .collect(),
    ));

    // 4. Stampede: `#[cached(lock)]` on the cluster, then on the single Redis.
    for (place, cluster_urls) in [("cluster", urls.to_vec()), ("single Redis", Vec::new())] {
        if !scenario_wanted("cluster: stampede") {
            break;
        }
        let opts = cache_benches::stampede::Options {
            processes: if args.quick { 2 } else { 4 },
            tasks: if args.quick { 50 } else { 250 },
            load_ms: if args.quick { 150 } else { 250 },
            redis_url: single.url.to_owned(),
            cluster_urls,
        };
        for mut r in cache_benches::stampede::run_only(&opts, &["ours"]).await? {
            r.contender = format!("{} on the {place}", r.contender);
            let waited = |v: Option<f64>| v.map_or(f64::NAN, |us| us * 1e3);
            let (p50, p99) = (waited(r.wake_p50_us), waited(r.wake_p99_us));
            let mut one = Vec::new();
            out_stampede(&mut one, &opts, &r, p50, p99);
            for f in &mut one {
                f.scenario = format!("cluster: {}", f.scenario);
            }
            out.extend(one);
        }
    }

    // 5. Write-behind enqueue: three one-slot steps on the cluster, one script on one Redis.
    eprintln!("cluster: write-behind enqueue (sequential) ...");
    let wb_ns = format!("cache-bench:{run_id}:wbe");
    let single_wb = Cache::builder()
        .redis(single.url)
        .namespace(&wb_ns)
        .build()
        .await
        .map_err(|e| e.to_string())?;
    let cluster_wb = Cache::builder()
        .redis_cluster(urls.iter().cloned())
        .namespace(&wb_ns)
        .build()
        .await
        .map_err(|e| e.to_string())?;
    let _ = WB_SINGLE.set(single_wb);
    let _ = WB_CLUSTER.set(cluster_wb);
    let wb_op = |cluster: bool| -> Op {
        Arc::new(move |id| {
            Box::pin(async move {
                let (id, name) = (id as i64, format!("name {id}"));
                let r = if cluster {
                    wb_cluster(id, name).await
                } else {
                    wb_single(id, name).await
                };
                let _ = black_box(r);
            })
        })
    };
    let contenders = [
        (
            "#[write_behind] on the single Redis (one script)",
            wb_op(false),
        ),
        ("#[write_behind] on the cluster (three steps)", wb_op(true)),
    ];
    out.extend(
        sequential_scenario(
            "cluster: write-behind enqueue, sequential",
            &contenders,
            args.rounds,
            |round| ids(seq_ops / 2, keys, 0.0, round as u64 + 131),
        )
        .await,
    );
    // The calls must have been queued, not run inline (Redis failed): the enqueue is what is
    // measured.
    for (cache, name) in [
        (wb_single_cache(), "bench_wb_enqueue_single"),
        (wb_cluster_cache(), "bench_wb_enqueue_cluster"),
    ] {
        let inline = cache.stats().function(name).map_or(0, |f| f.write_through);
        if inline > 0 {
            return Err(format!(
                "cluster: {name}: {inline} calls ran inline instead of queueing"
            ));
        }
    }
    wb_drain(wb_single_cache()).await?;
    wb_drain(wb_cluster_cache()).await?;
    Ok(out)
}
