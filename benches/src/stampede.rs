//! The stampede measurement, shared by the `stampede` and `compare` programs: N processes x M
//! tasks call a function on one cold key at the same moment; how many times does the function
//! run, and how long after the fill do the waiters get the value?
//!
//! The calling program re-executes itself as the worker processes: it must call
//! [`worker_main_if_requested`] first thing in `main`.
//!
//! With [`Options::cluster_urls`] set, the workers' caches, the execution counter and the
//! hand-written lock run on that Redis Cluster instead (the `cached` crate has no cluster
//! store: [`run_only`] picks the contenders).
//!
//! Contenders, one after another, each on its own cold key:
//!
//! * `#[cached(lock)]` (this project): leases, waiters woken by the fill's notification;
//! * the `cached` crate's Redis-backed `#[concurrent_cached(redis = true)]`;
//! * the textbook fix: `GET`; on a miss `SET lock NX PX`; the winner loads and `SET`s, the
//!   others sleep 100 ms and retry.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::{Samples, User};
use cache_runtime::{Cache, cached};
use cached::macros::concurrent_cached;
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;

#[derive(Debug, Clone)]
struct BenchError(String);

impl std::fmt::Display for BenchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

tokio::task_local! {
    /// Set by the function body when this task ran it.
    static RAN: std::cell::Cell<bool>;
}

/// The id of the warm-up call that connects a peer's store before the start: not counted.
const WARM_UP: u64 = u64::MAX;

/// The "database" read: counts itself in Redis, takes `LOAD_MS`.
async fn load(id: u64) -> Result<User, BenchError> {
    if id == WARM_UP {
        return Ok(User::new(id));
    }
    let _ = RAN.try_with(|r| r.set(true));
    let ctx = worker_context();
    let mut conn = ctx.conn.clone();
    let _: i64 = conn
        .incr(&ctx.counter, 1)
        .await
        .map_err(|e| BenchError(e.to_string()))?;
    tokio::time::sleep(Duration::from_millis(ctx.load_ms)).await;
    Ok(User::new(id))
}

#[cached(cache = cache, key = "stampede:{id}", ttl = 60, lock = 10)]
async fn ours(cache: &Cache, id: u64) -> Result<User, BenchError> {
    load(id).await
}

#[concurrent_cached(
    redis = true,
    ttl_secs = 60,
    cache_prefix_block = { std::env::var("STAMPEDE_PREFIX").unwrap_or_default() },
    map_error = |e| BenchError(format!("{e:?}"))
)]
async fn peer(id: u64) -> Result<User, BenchError> {
    load(id).await
}

/// The hand-written fix: lock with `SET NX`, everyone else sleeps 100 ms and retries.
async fn sleep_retry(conn: &Conn, prefix: &str, id: u64) -> Result<User, BenchError> {
    let mut conn = conn.clone();
    let key = format!("{prefix}user:{id}");
    let lock = format!("{prefix}lock:{id}");
    let err = |e: redis::RedisError| BenchError(e.to_string());
    loop {
        let cached: Option<Vec<u8>> = conn.get(&key).await.map_err(err)?;
        if let Some(user) = cached.and_then(|b| serde_json::from_slice(&b).ok()) {
            return Ok(user);
        }
        let won: bool = redis::cmd("SET")
            .arg(&lock)
            .arg(1)
            .arg("NX")
            .arg("PX")
            .arg(10_000)
            .query_async::<Option<String>>(&mut conn)
            .await
            .map_err(err)?
            .is_some();
        if won {
            let user = load(id).await?;
            let bytes = serde_json::to_vec(&user).unwrap_or_default();
            let _: () = conn.set_ex(&key, bytes, 60).await.map_err(err)?;
            let _: () = conn.del(&lock).await.map_err(err)?;
            return Ok(user);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---- worker ---------------------------------------------------------------------------------

/// A connection to the single Redis or to the cluster, for the counter and the hand-written
/// lock.
#[derive(Clone)]
enum Conn {
    Single(redis::aio::MultiplexedConnection),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// The cluster when `cluster_urls` is not empty, else the single Redis.
async fn connect(redis_url: &str, cluster_urls: &[String]) -> Result<Conn, String> {
    if cluster_urls.is_empty() {
        let client = redis::Client::open(redis_url).map_err(|e| e.to_string())?;
        let conn = client
            .get_multiplexed_async_connection()
            .await
            .map_err(|e| e.to_string())?;
        Ok(Conn::Single(conn))
    } else {
        let client = redis::cluster::ClusterClient::new(cluster_urls.iter().map(String::as_str))
            .map_err(|e| e.to_string())?;
        let conn = client
            .get_async_connection()
            .await
            .map_err(|e| e.to_string())?;
        Ok(Conn::Cluster(conn))
    }
}

struct WorkerContext {
    conn: Conn,
    counter: String,
    load_ms: u64,
}

static CONTEXT: std::sync::OnceLock<WorkerContext> = std::sync::OnceLock::new();

fn worker_context() -> &'static WorkerContext {
    CONTEXT
        .get()
        .expect("worker context is set before any call")
}

/// One task's result.
#[derive(Debug, Serialize, Deserialize)]
struct TaskResult {
    done_us: u64,
    ran: bool,
    ok: bool,
}

#[derive(Debug, Serialize, Deserialize)]
struct WorkerArgs {
    contender: String,
    redis_url: String,
    #[serde(default)]
    cluster_urls: Vec<String>,
    prefix: String,
    counter: String,
    tasks: usize,
    load_ms: u64,
    start_at_us: u64,
}

async fn run_worker(args: WorkerArgs) -> Result<Vec<TaskResult>, String> {
    let conn = connect(&args.redis_url, &args.cluster_urls).await?;
    let _ = CONTEXT.set(WorkerContext {
        conn: conn.clone(),
        counter: args.counter.clone(),
        load_ms: args.load_ms,
    });
    let builder = if args.cluster_urls.is_empty() {
        Cache::builder().redis(&args.redis_url)
    } else {
        Cache::builder().redis_cluster(args.cluster_urls.iter().cloned())
    };
    let cache = builder
        .namespace(args.prefix.trim_end_matches(':'))
        .operation_timeout(Duration::from_secs(2))
        .build()
        .await
        .map_err(|e| e.to_string())?;
    // Connect everything before the start, so that every process starts at once.
    let _ = cache.get::<u64>("warm-up").await;
    if args.contender == "peer" {
        let _ = peer(WARM_UP).await;
    }
    let wait = args.start_at_us.saturating_sub(now_us());
    tokio::time::sleep(Duration::from_micros(wait)).await;

    let prefix: Arc<str> = args.prefix.clone().into();
    let mut set = JoinSet::new();
    for _ in 0..args.tasks {
        let (cache, conn, prefix, contender) = (
            cache.clone(),
            conn.clone(),
            prefix.clone(),
            args.contender.clone(),
        );
        set.spawn(RAN.scope(std::cell::Cell::new(false), async move {
            let result = match contender.as_str() {
                "ours" => ours(&cache, 1).await,
                "peer" => peer(1).await,
                _ => sleep_retry(&conn, &prefix, 1).await,
            };
            TaskResult {
                done_us: now_us(),
                ran: RAN.with(|r| r.get()),
                ok: result.is_ok_and(|u| u.id == 1),
            }
        }));
    }
    let mut results = Vec::with_capacity(args.tasks);
    while let Some(r) = set.join_next().await {
        results.push(r.map_err(|e| e.to_string())?);
    }
    Ok(results)
}

// ---- coordinator ----------------------------------------------------------------------------

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Worker processes per contender.
    pub processes: usize,
    /// Concurrent tasks per process.
    pub tasks: usize,
    /// How long the function takes.
    pub load_ms: u64,
    /// The Redis.
    pub redis_url: String,
    /// A Redis Cluster's nodes (some of them): when not empty, everything runs there instead.
    pub cluster_urls: Vec<String>,
}

/// One contender's result.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    #[allow(missing_docs)]
    pub contender: String,
    #[allow(missing_docs)]
    pub processes: usize,
    #[allow(missing_docs)]
    pub tasks_per_process: usize,
    #[allow(missing_docs)]
    pub executions: i64,
    #[allow(missing_docs)]
    pub correct: usize,
    #[allow(missing_docs)]
    pub waiters: usize,
    #[allow(missing_docs)]
    pub wake_p50_us: Option<f64>,
    #[allow(missing_docs)]
    pub wake_p99_us: Option<f64>,
    #[allow(missing_docs)]
    pub wake_max_us: Option<f64>,
    #[allow(missing_docs)]
    pub total_ms: f64,
}

async fn run_contender(
    args: &Options,
    contender: &str,
    label: &str,
    run_id: &str,
) -> Result<Row, String> {
    let prefix = format!("cache-bench:{run_id}:{contender}:");
    let counter = format!("{prefix}executions");
    let mut conn = connect(&args.redis_url, &args.cluster_urls).await?;
    let _: () = conn
        .set_ex(&counter, 0, 300)
        .await
        .map_err(|e| e.to_string())?;
    let start_at_us = now_us() + 2_000_000;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut children = Vec::new();
    for _ in 0..args.processes {
        let worker = WorkerArgs {
            contender: contender.to_owned(),
            redis_url: args.redis_url.clone(),
            cluster_urls: args.cluster_urls.clone(),
            prefix: prefix.clone(),
            counter: counter.clone(),
            tasks: args.tasks,
            load_ms: args.load_ms,
            start_at_us,
        };
        let child = Command::new(&exe)
            .arg(WORKER_FLAG)
            .arg(serde_json::to_string(&worker).map_err(|e| e.to_string())?)
            .env("CACHED_REDIS_CONNECTION_STRING", &args.redis_url)
            .env("STAMPEDE_PREFIX", &prefix)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("spawning a worker: {e}"))?;
        children.push(child);
    }
    let mut results: Vec<TaskResult> = Vec::new();
    for child in children {
        let out = tokio::task::spawn_blocking(move || child.wait_with_output())
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .find_map(|l| l.strip_prefix("RESULTS "))
            .ok_or_else(|| format!("a {label} worker printed no results (exit {})", out.status))?;
        results.extend(serde_json::from_str::<Vec<TaskResult>>(line).map_err(|e| e.to_string())?);
    }
    let executions: Option<i64> = conn.get(&counter).await.map_err(|e| e.to_string())?;
    let first_fill = results.iter().filter(|r| r.ran).map(|r| r.done_us).min();
    let last = results
        .iter()
        .map(|r| r.done_us)
        .max()
        .unwrap_or(start_at_us);
    let mut delays = Samples(
        results
            .iter()
            .filter(|r| !r.ran)
            .filter_map(|r| first_fill.map(|f| r.done_us.saturating_sub(f)))
            .collect(),
    );
    let waiters = delays.0.len();
    let stat = |d: &mut Samples, p: f64| (waiters > 0).then(|| d.percentile(p) as f64);
    Ok(Row {
        contender: label.to_owned(),
        processes: args.processes,
        tasks_per_process: args.tasks,
        executions: executions.unwrap_or(0),
        correct: results.iter().filter(|r| r.ok).count(),
        waiters,
        wake_p50_us: stat(&mut delays, 50.0),
        wake_p99_us: stat(&mut delays, 99.0),
        wake_max_us: stat(&mut delays, 100.0),
        total_ms: last.saturating_sub(start_at_us) as f64 / 1e3,
    })
}

/// The contenders, in order: (id, label).
pub const CONTENDERS: [(&str, &str); 3] = [
    ("ours", "#[cached(lock)] (this project)"),
    ("peer", "cached crate #[concurrent_cached(redis)]"),
    ("retry", "SET NX lock + sleep 100 ms and retry"),
];

/// Runs every contender, one after another.
///
/// # Errors
///
/// When Redis cannot be reached or a worker process fails.
pub async fn run(opts: &Options) -> Result<Vec<Row>, String> {
    run_only(opts, &["ours", "peer", "retry"]).await
}

/// Runs the contenders whose ids (see [`CONTENDERS`]) are in `ids`, one after another.
///
/// # Errors
///
/// When Redis cannot be reached or a worker process fails.
pub async fn run_only(opts: &Options, ids: &[&str]) -> Result<Vec<Row>, String> {
    let run_id = format!("{:x}", now_us() ^ u64::from(std::process::id()));
    let mut rows = Vec::new();
    for (contender, label) in CONTENDERS.into_iter().filter(|(c, _)| ids.contains(c)) {
        eprintln!(
            "stampede, {label}: {} processes x {} tasks ...",
            opts.processes, opts.tasks
        );
        rows.push(run_contender(opts, contender, label, &run_id).await?);
    }
    Ok(rows)
}

const WORKER_FLAG: &str = "--stampede-worker";

/// If this process was started as a stampede worker, runs the worker and exits.
pub fn worker_main_if_requested() {
    let mut argv = std::env::args().skip(1);
    if argv.next().as_deref() != Some(WORKER_FLAG) {
        return;
    }
    let spec = argv.next().unwrap_or_default();
    let args: WorkerArgs = match serde_json::from_str(&spec) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("stampede worker: bad arguments: {e}");
            std::process::exit(2);
        }
    };
    let rt = crate::runtime();
    match rt.block_on(run_worker(args)) {
        Ok(results) => {
            println!(
                "RESULTS {}",
                serde_json::to_string(&results).unwrap_or_default()
            );
            std::process::exit(0);
        }
        Err(e) => {
            eprintln!("stampede worker: {e}");
            std::process::exit(1);
        }
    }
}
