//! `compare --only write_behind`: `#[write_behind]` against a direct PostgreSQL `UPDATE` per
//! call, in the same run (`PG_URL`, default the local `test` database):
//!
//! - 64 concurrent callers: calls per second and call latency (p50, p99), `#[write_behind]`
//!   (the call returns once the write is queued in Redis) against `UPDATE .. WHERE id = $1`
//!   on a pool of 8 connections;
//! - database statements per 1 000 writes to 10 hot keys, queued and then applied by a
//!   worker, with coalescing (the default) and without;
//! - the time a worker takes to drain a backlog of 100 000 entries (`--quick`: 5 000) over
//!   as many keys (no coalescing possible), and its rate.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use cache_benches::{Samples, median, process_cpu_time};
use cache_runtime::write_behind::Worker;
use cache_runtime::{Cache, write_behind};
use tokio_postgres::{Client, NoTls};

use super::{Figure, with_ratios};

/// The cache the bench's write-behind functions write to (their arguments must be
/// serializable, so it cannot be one).
static CACHE: OnceLock<Cache> = OnceLock::new();
/// The bench's table.
static TABLE: OnceLock<String> = OnceLock::new();
/// Statements the bodies ran.
static STATEMENTS: AtomicU64 = AtomicU64::new(0);

fn cache() -> &'static Cache {
    CACHE.get().expect("the write-behind bench's cache")
}

fn pg_url() -> String {
    std::env::var("PG_URL")
        .ok()
        .filter(|u| !u.trim().is_empty())
        .unwrap_or_else(|| "host=127.0.0.1 port=5432 user=postgres dbname=test".to_owned())
}

async fn connect() -> Result<Client, String> {
    let (client, conn) = tokio_postgres::connect(&pg_url(), NoTls)
        .await
        .map_err(|e| format!("cannot connect to PostgreSQL at '{}': {e}", pg_url()))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// The connections the bodies use: a pool of 8, as the direct baseline's (a connection runs
/// its statements one after another, each commit waiting for its WAL flush).
static BODY_POOL: Mutex<Vec<Arc<Client>>> = Mutex::new(Vec::new());
static NEXT: AtomicU64 = AtomicU64::new(0);

async fn body_client() -> Result<Arc<Client>, String> {
    {
        let mut pool = BODY_POOL.lock().unwrap();
        pool.retain(|c| !c.is_closed());
        if pool.len() >= 8 {
            let i = NEXT.fetch_add(1, Ordering::Relaxed) as usize % pool.len();
            return Ok(pool[i].clone());
        }
    }
    let c = Arc::new(connect().await?);
    BODY_POOL.lock().unwrap().push(c.clone());
    Ok(c)
}

async fn update(client: &Client, id: i64, name: &str) -> Result<(), String> {
    let table = TABLE.get().expect("the bench's table");
    client
        .execute(
            &format!("UPDATE {table} SET name = $2 WHERE id = $1"),
            &[&id, &name],
        )
        .await
        .map_err(|e| e.to_string())?;
    STATEMENTS.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

#[write_behind(cache = cache(), key = "wbu:{id}", ttl = 600, value = name, queue = "bench", name = "bench_wb_save")]
async fn wb_save(id: i64, name: String) -> Result<(), String> {
    let client = body_client().await?;
    update(&client, id, &name).await
}

#[write_behind(cache = cache(), key = "wbu:{id}", ttl = 600, value = name, queue = "bench_nc", coalesce = false, name = "bench_wb_save_nc")]
async fn wb_save_uncoalesced(id: i64, name: String) -> Result<(), String> {
    let client = body_client().await?;
    update(&client, id, &name).await
}

/// `tasks` tasks each making `per_task` calls of `call(i)`; the calls' figures.
async fn calls<F, Fut>(
    label: &str,
    contender: &str,
    tasks: usize,
    per_task: usize,
    call: F,
) -> Figure
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), String>> + Send,
{
    let call = Arc::new(call);
    let cpu0 = process_cpu_time();
    let t0 = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for t in 0..tasks {
        let call = call.clone();
        set.spawn(async move {
            let mut lat = Vec::with_capacity(per_task);
            for i in 0..per_task {
                let s = Instant::now();
                call(t * per_task + i).await.expect("a write");
                lat.push(s.elapsed().as_nanos() as u64);
            }
            lat
        });
    }
    let mut samples = Samples(Vec::with_capacity(tasks * per_task));
    while let Some(lat) = set.join_next().await {
        samples.0.extend(lat.expect("a bench task"));
    }
    let wall = t0.elapsed();
    let n = (tasks * per_task) as f64;
    Figure {
        scenario: label.to_owned(),
        contender: contender.to_owned(),
        p50_ns: samples.percentile(50.0) as f64,
        p99_ns: samples.percentile(99.0) as f64,
        cpu_ns_per_op: process_cpu_time().saturating_sub(cpu0).as_nanos() as f64 / n,
        ops_per_sec: n / wall.as_secs_f64(),
        ..Figure::default()
    }
}

/// Starts a worker for `queue`, waits until it drained, stops it; how long that took.
async fn drain(queue: &'static str) -> Result<Duration, String> {
    let t0 = Instant::now();
    let worker = Worker::builder(cache())
        .queues([queue])
        .start()
        .map_err(|e| e.to_string())?;
    if !worker.flush_for(Duration::from_secs(600)).await {
        return Err(format!("the {queue} queue did not drain within 10 minutes"));
    }
    let took = t0.elapsed();
    worker.shutdown().await;
    Ok(took)
}

/// The scenario. `rounds` rounds of the 64-caller comparison (medians); one drain.
pub(super) async fn scenario(
    redis_url: &str,
    run_id: &str,
    quick: bool,
    rounds: usize,
) -> Result<Vec<Figure>, String> {
    let table = format!("cache_bench_{run_id}");
    let admin = connect().await?;
    let backlog: i64 = if quick { 5_000 } else { 100_000 };
    admin
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS {table};
             CREATE TABLE {table} (id bigint PRIMARY KEY, name text NOT NULL);
             INSERT INTO {table} SELECT g, 'user ' || g FROM generate_series(0, {backlog}) g;"
        ))
        .await
        .map_err(|e| e.to_string())?;
    let _ = TABLE.set(table.clone());
    let cache = Cache::builder()
        .redis(redis_url)
        .namespace(format!("cache-bench:{run_id}:wb"))
        .build()
        .await
        .map_err(|e| e.to_string())?;
    let _ = CACHE.set(cache);
    let result = measure(&admin, backlog, quick, rounds).await;
    let _ = admin
        .batch_execute(&format!("DROP TABLE IF EXISTS {table}"))
        .await;
    result
}

async fn measure(
    admin: &Client,
    backlog: i64,
    quick: bool,
    rounds: usize,
) -> Result<Vec<Figure>, String> {
    const TASKS: usize = 64;
    let per_task = if quick { 30 } else { 150 };
    let keys = 10_000usize;
    let label = "write, 64 concurrent callers (call latency; calls/s)";
    let mut pool = Vec::new();
    for _ in 0..8 {
        pool.push(Arc::new(connect().await?));
    }
    let pool = Arc::new(pool);
    let mut direct = Vec::new();
    let mut ours = Vec::new();
    for round in 0..rounds {
        let run_direct = async {
            let pool = pool.clone();
            calls(
                label,
                "direct PostgreSQL UPDATE per call (8 connections)",
                TASKS,
                per_task,
                move |i| {
                    let client = pool[i % pool.len()].clone();
                    async move {
                        update(&client, (i % keys) as i64, &format!("direct {round} {i}")).await
                    }
                },
            )
            .await
        };
        let run_ours = async {
            calls(
                label,
                "#[write_behind] (this project): queued in Redis",
                TASKS,
                per_task,
                move |i| async move { wb_save((i % keys) as i64, format!("wb {round} {i}")).await },
            )
            .await
        };
        if round % 2 == 0 {
            direct.push(run_direct.await);
            ours.push(run_ours.await);
        } else {
            ours.push(run_ours.await);
            direct.push(run_direct.await);
        }
    }
    // The rounds' queued writes are applied here (not timed).
    drain("bench").await?;
    let med = |figs: &[Figure]| {
        let mut f = figs[0].clone();
        f.p50_ns = median(&figs.iter().map(|f| f.p50_ns).collect::<Vec<_>>());
        f.p99_ns = median(&figs.iter().map(|f| f.p99_ns).collect::<Vec<_>>());
        f.cpu_ns_per_op = median(&figs.iter().map(|f| f.cpu_ns_per_op).collect::<Vec<_>>());
        f.ops_per_sec = median(&figs.iter().map(|f| f.ops_per_sec).collect::<Vec<_>>());
        f
    };
    let mut out = with_ratios(vec![med(&direct), med(&ours)]);

    // Statements per 1 000 writes to 10 hot keys, queued, then applied.
    for (queue, contender) in [
        ("bench", "#[write_behind], coalescing (default)"),
        ("bench_nc", "#[write_behind], coalesce = false"),
    ] {
        for i in 0..1_000i64 {
            let name = format!("hot {i}");
            if queue == "bench" {
                wb_save(i % 10, name).await?;
            } else {
                wb_save_uncoalesced(i % 10, name).await?;
            }
        }
        let before = STATEMENTS.load(Ordering::Relaxed);
        drain(queue).await?;
        let statements = STATEMENTS.load(Ordering::Relaxed) - before;
        out.push(Figure {
            scenario: "1 000 queued writes to 10 keys: database statements".to_owned(),
            contender: contender.to_owned(),
            note: format!("{statements} statements per 1 000 writes"),
            ..Figure::default()
        });
    }

    // Drain a backlog.
    let t0 = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for t in 0..TASKS as i64 {
        set.spawn(async move {
            let mut id = t;
            while id < backlog {
                wb_save(id, format!("backlog {id}")).await?;
                id += TASKS as i64;
            }
            Ok::<_, String>(())
        });
    }
    while let Some(r) = set.join_next().await {
        r.map_err(|e| e.to_string())??;
    }
    let queued = t0.elapsed();
    let took = drain("bench").await?;
    let applied: i64 = admin
        .query_one(
            &format!(
                "SELECT count(*) FROM {} WHERE name LIKE 'backlog %'",
                TABLE.get().expect("table")
            ),
            &[],
        )
        .await
        .map_err(|e| e.to_string())?
        .get(0);
    if applied < backlog {
        return Err(format!(
            "the backlog drained, but only {applied} of {backlog} rows were written"
        ));
    }
    out.push(Figure {
        scenario: format!("drain a backlog of {backlog} entries ({backlog} keys)"),
        contender: "#[write_behind] worker (16 partitions, one process)".to_owned(),
        ops_per_sec: backlog as f64 / took.as_secs_f64(),
        note: format!(
            "drained in {:.1} s ({:.0} writes/s); queued by 64 callers in {:.1} s",
            took.as_secs_f64(),
            backlog as f64 / took.as_secs_f64(),
            queued.as_secs_f64()
        ),
        ..Figure::default()
    });
    Ok(out)
}
