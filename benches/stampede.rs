//! `stampede`: N processes x M tasks call a function on one cold key at the same moment.
//! How many times does the function run, and how long after the fill do the waiters get the
//! value?
//!
//! ```text
//! cargo run --release --bin stampede -- [--processes N] [--tasks M] [--load-ms L]
//!                                       [--json FILE] [--quick] [--redis-url URL]
//! ```
//!
//! Contenders, one after another in one run, each on its own cold key:
//!
//! * `#[cached(lock)]` (this project): leases, waiters woken by the fill's notification;
//! * the `cached` crate's Redis-backed `#[concurrent_cached(redis = true)]`;
//! * the textbook fix: `GET`; on a miss `SET lock NX PX`; the winner loads and `SET`s, the
//!   others sleep 100 ms and retry.
//!
//! The program re-executes itself as the worker processes. Each worker records, per task, when
//! it got its value and whether it ran the function itself; the coordinator counts the
//! function's executions in Redis (`INCR`) and measures each waiter's delay after the first
//! executor finished (its fill had landed by then).

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cache_benches::{Samples, Table, User, fmt_ns, machine_description};
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
async fn sleep_retry(
    conn: &redis::aio::MultiplexedConnection,
    prefix: &str,
    id: u64,
) -> Result<User, BenchError> {
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

struct WorkerContext {
    conn: redis::aio::MultiplexedConnection,
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
    prefix: String,
    counter: String,
    tasks: usize,
    load_ms: u64,
    start_at_us: u64,
}

async fn run_worker(args: WorkerArgs) -> Result<Vec<TaskResult>, String> {
    let client = redis::Client::open(args.redis_url.as_str()).map_err(|e| e.to_string())?;
    let conn = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| e.to_string())?;
    let _ = CONTEXT.set(WorkerContext {
        conn: conn.clone(),
        counter: args.counter.clone(),
        load_ms: args.load_ms,
    });
    let cache = Cache::builder()
        .redis(&args.redis_url)
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

struct Args {
    processes: usize,
    tasks: usize,
    load_ms: u64,
    json: Option<String>,
    redis_url: String,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        processes: 4,
        tasks: 250,
        load_ms: 200,
        json: None,
        redis_url: std::env::var("REDIS_URL")
            .unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned()),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--processes" => {
                a.processes = value("--processes")?
                    .parse()
                    .map_err(|e| format!("--processes: {e}"))?
            }
            "--tasks" => {
                a.tasks = value("--tasks")?
                    .parse()
                    .map_err(|e| format!("--tasks: {e}"))?
            }
            "--load-ms" => {
                a.load_ms = value("--load-ms")?
                    .parse()
                    .map_err(|e| format!("--load-ms: {e}"))?
            }
            "--json" => a.json = Some(value("--json")?),
            "--redis-url" => a.redis_url = value("--redis-url")?,
            "--quick" => {
                a.processes = 2;
                a.tasks = 50;
                a.load_ms = 100;
            }
            "-h" | "--help" => {
                println!(
                    "stampede [--processes N] [--tasks M] [--load-ms L] [--json FILE] [--quick] [--redis-url URL]"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    if a.processes == 0 || a.tasks == 0 {
        return Err("--processes and --tasks must be > 0".to_owned());
    }
    Ok(a)
}

#[derive(Debug, Serialize)]
struct Row {
    contender: String,
    processes: usize,
    tasks_per_process: usize,
    executions: i64,
    correct: usize,
    waiters: usize,
    wake_p50_us: Option<f64>,
    wake_p99_us: Option<f64>,
    wake_max_us: Option<f64>,
    total_ms: f64,
}

async fn run_contender(
    args: &Args,
    contender: &str,
    label: &str,
    run_id: &str,
) -> Result<Row, String> {
    let prefix = format!("cache-bench:{run_id}:{contender}:");
    let counter = format!("{prefix}executions");
    let client = redis::Client::open(args.redis_url.as_str()).map_err(|e| e.to_string())?;
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| e.to_string())?;
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
            prefix: prefix.clone(),
            counter: counter.clone(),
            tasks: args.tasks,
            load_ms: args.load_ms,
            start_at_us,
        };
        let child = Command::new(&exe)
            .arg("--worker")
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

#[derive(Serialize)]
struct Report {
    machine: String,
    args: String,
    rows: Vec<Row>,
}

fn main() {
    let mut argv = std::env::args().skip(1);
    if argv.next().as_deref() == Some("--worker") {
        let spec = argv.next().unwrap_or_default();
        let args: WorkerArgs = match serde_json::from_str(&spec) {
            Ok(a) => a,
            Err(e) => {
                eprintln!("stampede worker: bad arguments: {e}");
                std::process::exit(2);
            }
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        match rt.block_on(run_worker(args)) {
            Ok(results) => {
                println!(
                    "RESULTS {}",
                    serde_json::to_string(&results).unwrap_or_default()
                );
            }
            Err(e) => {
                eprintln!("stampede worker: {e}");
                std::process::exit(1);
            }
        }
        return;
    }

    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("stampede: {e}");
            std::process::exit(2);
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    if let Err(e) = rt.block_on(coordinate(args)) {
        eprintln!("stampede: {e}");
        std::process::exit(1);
    }
}

async fn coordinate(args: Args) -> Result<(), String> {
    let client = redis::Client::open(args.redis_url.as_str()).map_err(|e| e.to_string())?;
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| format!("cannot connect to {}: {e}", args.redis_url))?;
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut conn)
        .await
        .map_err(|e| e.to_string())?;
    let redis_version = info
        .lines()
        .find_map(|l| l.strip_prefix("redis_version:"))
        .unwrap_or("?")
        .trim()
        .to_owned();
    let run_id = format!("{:x}", now_us() ^ u64::from(std::process::id()));
    let mut rows = Vec::new();
    for (contender, label) in [
        ("ours", "#[cached(lock)] (this project)"),
        ("peer", "cached crate #[concurrent_cached(redis)]"),
        ("retry", "SET NX lock + sleep 100 ms and retry"),
    ] {
        eprintln!(
            "{label}: {} processes x {} tasks ...",
            args.processes, args.tasks
        );
        rows.push(run_contender(&args, contender, label, &run_id).await?);
    }

    let us = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| fmt_ns(v * 1e3));
    let mut table = Table::new(&[
        "contender",
        "callers",
        "executions",
        "correct",
        "waiters",
        "wake-up p50",
        "wake-up p99",
        "wake-up max",
        "all done after",
    ]);
    for r in &rows {
        table.row(vec![
            r.contender.clone(),
            format!("{} x {}", r.processes, r.tasks_per_process),
            r.executions.to_string(),
            format!("{}/{}", r.correct, r.processes * r.tasks_per_process),
            r.waiters.to_string(),
            us(r.wake_p50_us),
            us(r.wake_p99_us),
            us(r.wake_max_us),
            format!("{:.0} ms", r.total_ms),
        ]);
    }
    let machine = machine_description(&redis_version);
    let argline = format!(
        "processes={} tasks={} load={} ms",
        args.processes, args.tasks, args.load_ms
    );
    println!("Machine: {machine}");
    println!("Run: {argline}\n");
    println!("{}", table.render());
    println!(
        "executions: times the function ran (counted in Redis); waiters: callers that did not run it; wake-up: how long after the first execution finished (its fill had landed) each waiter got the value."
    );
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&Report {
            machine,
            args: argline,
            rows,
        })
        .map_err(|e| e.to_string())?;
        std::fs::write(path, json).map_err(|e| format!("writing {path}: {e}"))?;
        eprintln!("wrote {path}");
    }
    Ok(())
}
