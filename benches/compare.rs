//! `compare`: this project against raw redis-rs, the `cached` crate and moka, against one Redis,
//! in one run, with interleaved rounds and medians.
//!
//! ```text
//! cargo run --release --bin compare -- [--quick] [--json FILE] [--keys N] [--hot-share F]
//!                                      [--tasks N] [--rounds N] [--redis-url URL]
//!                                      [--cluster-urls URL,URL,..] [--only a,b,..]
//!                                      [--contender NAME] [--scenario LABEL]
//! ```
//!
//! Every figure is reported with its ratio to the raw redis-rs baseline measured in the same
//! run (the machines are shared and noisy: absolute numbers move, ratios much less).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cache_benches::{
    Samples, Table, User, fmt_ns, fmt_rate, machine_description, median, process_cpu_time,
};
use cache_runtime::{Cache, cache_evict, cache_put, cached};
use cached::macros::concurrent_cached;
use redis::aio::ConnectionManager;
use serde::Serialize;
use std::hint::black_box;

#[path = "wb.rs"]
mod wb;

#[derive(Debug, Clone)]
struct BenchError(String);

impl std::fmt::Display for BenchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The "database": builds the record (no I/O, so misses measure the cache's own cost).
fn load(id: u64) -> User {
    User::new(id)
}

// ---- the contenders ----------------------------------------------------------------------

#[cached(cache = cache, key = "user:{id}", ttl = 3600, name = "ours")]
async fn ours(cache: &Cache, id: u64) -> Result<User, BenchError> {
    Ok(load(id))
}

/// The same entries as `ours`, on a cache whose metrics go to a Prometheus recorder (the
/// `metrics` scenario): a function of its own, so that its counters are registered with that
/// recorder, and its call site's one-entry lookup is its own cache's, as `ours`' is.
#[cached(cache = cache, key = "user:{id}", ttl = 3600, name = "ours_metered")]
async fn ours_metered(cache: &Cache, id: u64) -> Result<User, BenchError> {
    Ok(load(id))
}

/// The same entries through `lock`: a hit must cost what a plain hit costs.
#[cached(cache = cache, key = "user:{id}", ttl = 3600, lock, name = "ours_lock")]
async fn ours_lock(cache: &Cache, id: u64) -> Result<User, BenchError> {
    Ok(load(id))
}

/// The same entries through the in-process tier: an L1 hit makes no round trip.
#[cached(cache = cache, key = "user:{id}", ttl = 3600, local, name = "ours_local")]
async fn ours_local(cache: &Cache, id: u64) -> Result<User, BenchError> {
    Ok(load(id))
}

/// The Zipf workload's keys, through Redis alone.
#[cached(cache = cache, key = "zipf:{id}", ttl = 3600, name = "zipf_redis")]
async fn zipf_redis(cache: &Cache, id: u64) -> Result<User, BenchError> {
    Ok(load(id))
}

/// The same keys through the in-process tier in front of Redis.
#[cached(cache = cache, key = "zipf:{id}", ttl = 3600, local, name = "zipf_local")]
async fn zipf_local(cache: &Cache, id: u64) -> Result<User, BenchError> {
    Ok(load(id))
}

/// The same entries under a tag (ten orgs): a tagged hit reads the tag's version with the value.
#[cached(cache = cache, key = "tagged:{id}", ttl = 3600, tags = ["org:{org}"], name = "ours_tagged")]
async fn ours_tagged_in(cache: &Cache, org: u64, id: u64) -> Result<User, BenchError> {
    Ok(load(id))
}

async fn ours_tagged(cache: &Cache, id: u64) -> Result<User, BenchError> {
    ours_tagged_in(cache, id % 10, id).await
}

/// Write-through: the database write (none here), then the entry.
#[cache_put(cache = cache, key = "user:{id}", ttl = 3600, name = "ours_put")]
async fn ours_put(cache: &Cache, id: u64) -> Result<User, BenchError> {
    Ok(load(id))
}

/// Event invalidation: three keys.
#[cache_evict(cache = cache, keys = ["user:{id}", "profile:{id}", "list"], name = "ours_evict")]
async fn ours_evict(cache: &Cache, id: u64) -> Result<(), BenchError> {
    let _ = id;
    Ok(())
}

/// A hand-written write-through: encode, `SET EX`.
async fn raw_set(conn: &mut ConnectionManager, prefix: &str, id: u64) {
    let bytes = serde_json::to_vec(&load(id)).unwrap_or_default();
    let _: Result<(), _> = redis::cmd("SET")
        .arg(format!("{prefix}user:{id}"))
        .arg(bytes)
        .arg("EX")
        .arg(3600)
        .query_async(conn)
        .await;
}

/// A hand-written invalidation of three keys: one `DEL`.
async fn raw_del(conn: &mut ConnectionManager, prefix: &str, id: u64) {
    let _: Result<(), _> = redis::cmd("DEL")
        .arg(format!("{prefix}user:{id}"))
        .arg(format!("{prefix}profile:{id}"))
        .arg(format!("{prefix}list"))
        .query_async(conn)
        .await;
}

#[concurrent_cached(
    redis = true,
    ttl_secs = 3600,
    cache_prefix_block = { "cache-bench:peer:" },
    map_error = |e| BenchError(format!("{e:?}"))
)]
async fn peer(id: u64) -> Result<User, BenchError> {
    Ok(load(id))
}

/// The peer pointed at a Redis that is down (the URL in `$env`), its store built the way its
/// macro builds one by default (`build().await`, panicking on failure).
macro_rules! peer_down {
    ($name:ident, $env:literal) => {
        #[concurrent_cached(
                    map_error = |e| BenchError(format!("{e:?}")),
                    ty = "cached::AsyncRedisCache<u64, User>",
                    create = {
                        cached::AsyncRedisCache::builder("cache-bench:peer-down:")
                            .connection_string(&std::env::var($env).unwrap_or_default())
                            .ttl(std::time::Duration::from_secs(60))
                            .build()
                            .await
                            .unwrap_or_else(|e| panic!("error constructing AsyncRedisCache: {e}"))
                    }
                )]
        async fn $name(id: u64) -> Result<User, BenchError> {
            Ok(load(id))
        }
    };
}

// Refuses connections.
peer_down!(peer_refused, "CACHE_BENCH_REFUSED_URL");
// Accepts connections and never answers.
peer_down!(peer_hung, "CACHE_BENCH_HUNG_URL");

/// The floor: what a hand-written cache-aside read costs. Formats the key, `GET`, decodes.
/// (`conn`: a `ConnectionManager`, or a `ClusterConnection` in the cluster rows.)
async fn raw_get<C: redis::aio::ConnectionLike>(
    conn: &mut C,
    prefix: &str,
    id: u64,
) -> Option<User> {
    let key = format!("{prefix}user:{id}");
    let bytes: Option<Vec<u8>> = redis::cmd("GET").arg(&key).query_async(conn).await.ok()?;
    serde_json::from_slice(&bytes?).ok()
}

/// A hand-written miss: `GET`, load, encode, `SET EX`.
async fn raw_miss<C: redis::aio::ConnectionLike>(conn: &mut C, prefix: &str, id: u64) -> User {
    let key = format!("{prefix}user:{id}");
    let found: Option<Vec<u8>> = redis::cmd("GET")
        .arg(&key)
        .query_async(conn)
        .await
        .ok()
        .flatten();
    if let Some(user) = found.and_then(|b| serde_json::from_slice(&b).ok()) {
        return user;
    }
    let user = load(id);
    let bytes = serde_json::to_vec(&user).unwrap_or_default();
    let _: Result<(), _> = redis::cmd("SET")
        .arg(&key)
        .arg(bytes)
        .arg("EX")
        .arg(3600)
        .query_async(conn)
        .await;
    user
}

// ---- arguments ---------------------------------------------------------------------------

struct Args {
    quick: bool,
    json: Option<String>,
    keys: u64,
    hot_share: f64,
    tasks: usize,
    rounds: usize,
    redis_url: String,
    /// Some nodes of a Redis Cluster (`--cluster-urls`, else `REDIS_CLUSTER_URLS`); empty: the
    /// cluster rows are skipped.
    cluster_urls: Vec<String>,
    only: Vec<String>,
    contender: Option<String>,
    scenario: Option<String>,
}

impl Args {
    /// Whether the scenario whose name contains `word` was asked for (`--only`).
    fn wants(&self, word: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|o| word.contains(o.as_str()))
    }
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        quick: false,
        json: None,
        keys: 10_000,
        hot_share: 1.0,
        tasks: 64,
        rounds: 0,
        redis_url: std::env::var("REDIS_URL")
            .unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned()),
        cluster_urls: split_urls(&std::env::var("REDIS_CLUSTER_URLS").unwrap_or_default()),
        only: Vec::new(),
        contender: None,
        scenario: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--quick" => a.quick = true,
            "--json" => a.json = Some(value("--json")?),
            "--keys" => {
                a.keys = value("--keys")?
                    .parse()
                    .map_err(|e| format!("--keys: {e}"))?
            }
            "--hot-share" => {
                a.hot_share = value("--hot-share")?
                    .parse()
                    .map_err(|e| format!("--hot-share: {e}"))?
            }
            "--tasks" => {
                a.tasks = value("--tasks")?
                    .parse()
                    .map_err(|e| format!("--tasks: {e}"))?
            }
            "--rounds" => {
                a.rounds = value("--rounds")?
                    .parse()
                    .map_err(|e| format!("--rounds: {e}"))?
            }
            "--redis-url" => a.redis_url = value("--redis-url")?,
            "--cluster-urls" => a.cluster_urls = split_urls(&value("--cluster-urls")?),
            "--contender" => a.contender = Some(value("--contender")?),
            "--scenario" => a.scenario = Some(value("--scenario")?),
            "--only" => a
                .only
                .extend(value("--only")?.split(',').map(str::to_owned)),
            "-h" | "--help" => {
                println!(
                    "compare [--quick] [--json FILE] [--keys N] [--hot-share F] [--tasks N] [--rounds N] [--redis-url URL] [--cluster-urls URL,URL,..] [--only hit,memory,spread,hot,zipf,invalidation,coherence,miss,writes,down,stampede,write_behind,cluster,metrics] [--contender NAME] [--scenario LABEL]"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    if a.keys == 0 || a.tasks == 0 || !(0.0..=1.0).contains(&a.hot_share) {
        return Err("--keys and --tasks must be > 0, --hot-share within 0..=1".to_owned());
    }
    if a.rounds == 0 {
        a.rounds = if a.quick { 3 } else { 7 };
    }
    Ok(a)
}

/// `URL,URL,..` (what `scripts/redis-cluster` prints) as a list; blanks dropped.
fn split_urls(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(str::to_owned)
        .collect()
}

// ---- measurement -------------------------------------------------------------------------

/// One contender's figures in one scenario, medians over rounds.
#[derive(Debug, Clone, Serialize, Default)]
struct Figure {
    scenario: String,
    contender: String,
    p50_ns: f64,
    p99_ns: f64,
    cpu_ns_per_op: f64,
    ops_per_sec: f64,
    /// Ratio to the scenario's baseline (latency and CPU: contender / baseline; throughput:
    /// contender / baseline, so > 1 is better there).
    ratio_p50: Option<f64>,
    ratio_cpu: Option<f64>,
    ratio_throughput: Option<f64>,
    note: String,
}

#[derive(Default)]
struct RoundFigures {
    p50: Vec<f64>,
    p99: Vec<f64>,
    cpu: Vec<f64>,
    rate: Vec<f64>,
}

impl RoundFigures {
    fn figure(&self, scenario: &str, contender: &str) -> Figure {
        Figure {
            scenario: scenario.to_owned(),
            contender: contender.to_owned(),
            p50_ns: median(&self.p50),
            p99_ns: median(&self.p99),
            cpu_ns_per_op: median(&self.cpu),
            ops_per_sec: median(&self.rate),
            ..Figure::default()
        }
    }
}

/// A boxed async operation on key `id`.
type Op = Arc<
    dyn Fn(u64) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> + Send + Sync,
>;

/// An `Op` that calls `$f(&cache, id)` on its own clone of `$cache`: `id` is the op's argument,
/// or, when given, what `$id` evaluates to in each call.
macro_rules! cache_op {
    ($cache:expr, $f:ident) => {
        cache_op!($cache, $f, |id| id)
    };
    ($cache:expr, $f:ident, |$arg:pat_param| $id:expr) => {{
        let cache = $cache.clone();
        let op: Op = Arc::new(move |$arg| {
            let cache = cache.clone();
            Box::pin(async move {
                let id = $id;
                let _ = black_box($f(&cache, id).await);
            })
        });
        op
    }};
}

#[path = "cluster.rs"]
mod cluster;

/// Sequential latency: `ops` calls one after another, ids from `ids`.
async fn sequential(op: &Op, ids: &[u64], figures: &mut RoundFigures) {
    let mut samples = Samples(Vec::with_capacity(ids.len()));
    let cpu0 = process_cpu_time();
    let t0 = Instant::now();
    for &id in ids {
        let t = Instant::now();
        op(id).await;
        samples.0.push(t.elapsed().as_nanos() as u64);
    }
    let wall = t0.elapsed();
    let cpu = process_cpu_time().saturating_sub(cpu0);
    let n = ids.len() as f64;
    figures.p50.push(samples.percentile(50.0) as f64);
    figures.p99.push(samples.percentile(99.0) as f64);
    figures.cpu.push(cpu.as_nanos() as f64 / n);
    figures.rate.push(n / wall.as_secs_f64());
}

/// Throughput: `tasks` concurrent tasks, each running its share of `ids`.
async fn concurrent(op: &Op, ids: &Arc<Vec<u64>>, tasks: usize, figures: &mut RoundFigures) {
    let cpu0 = process_cpu_time();
    let t0 = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    let per = ids.len() / tasks;
    for t in 0..tasks {
        let (op, ids) = (op.clone(), ids.clone());
        set.spawn(async move {
            let mut lat = Vec::with_capacity(per);
            for &id in &ids[t * per..(t + 1) * per] {
                let s = Instant::now();
                op(id).await;
                lat.push(s.elapsed().as_nanos() as u64);
            }
            lat
        });
    }
    let mut samples = Samples(Vec::with_capacity(per * tasks));
    while let Some(lat) = set.join_next().await {
        samples.0.extend(lat.expect("benchmark task"));
    }
    let wall = t0.elapsed();
    let cpu = process_cpu_time().saturating_sub(cpu0);
    let n = (per * tasks) as f64;
    figures.p50.push(samples.percentile(50.0) as f64);
    figures.p99.push(samples.percentile(99.0) as f64);
    figures.cpu.push(cpu.as_nanos() as f64 / n);
    figures.rate.push(n / wall.as_secs_f64());
}

/// Deterministic pseudo-random ids: `share` of them the hot key 0, the rest uniform in 1..keys.
fn ids(count: usize, keys: u64, share: f64, seed: u64) -> Vec<u64> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..count)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if (x % 10_000) as f64 / 10_000.0 < share {
                0
            } else {
                1 + x % keys.max(2).saturating_sub(1)
            }
        })
        .collect()
}

/// Zipf(`s`) ids over `0..keys` (rank 0 the most frequent), deterministic per seed.
fn zipf_ids(count: usize, keys: u64, s: f64, seed: u64) -> Vec<u64> {
    let mut cdf = Vec::with_capacity(keys as usize);
    let mut total = 0.0;
    for rank in 1..=keys {
        total += 1.0 / (rank as f64).powf(s);
        cdf.push(total);
    }
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..count)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let u = (x >> 11) as f64 / (1u64 << 53) as f64 * total;
            cdf.partition_point(|&c| c < u) as u64
        })
        .collect()
}

/// Calls `read` until the cache's in-process tier answers it (the tier is usable once its
/// subscription answered a heartbeat).
async fn until_l1(cache: &Cache, name: &str, read: impl AsyncFn()) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while cache.stats().function(name).map_or(0, |f| f.l1_hits) == 0 {
        read().await;
        if Instant::now() > deadline {
            return Err(format!(
                "the in-process tier never answered:\n{}",
                cache.stats()
            ));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// Counts the invalidation pushes a tracking client (BCAST, the namespace's value and tag key
/// prefixes) and a subscriber of the namespace's invalidation channel receive while one cache
/// makes 1 000 operations of each kind.
async fn coherence(url: &str, run_id: &str) -> Result<Vec<Figure>, String> {
    use futures_util::StreamExt as _;
    let ns = format!("cache-coherence:{run_id}");
    let cache = Cache::builder()
        .redis(url)
        .namespace(&ns)
        .build()
        .await
        .map_err(|e| e.to_string())?;
    let pushes = Arc::new(AtomicU64::new(0));
    let keys = Arc::new(AtomicU64::new(0));
    let sep = if url.contains('?') { '&' } else { '?' };
    let client =
        redis::Client::open(format!("{url}{sep}protocol=resp3")).map_err(|e| e.to_string())?;
    let (p, k) = (pushes.clone(), keys.clone());
    let config =
        redis::AsyncConnectionConfig::new().set_push_sender(move |info: redis::PushInfo| {
            if info.kind == redis::PushKind::Invalidate {
                p.fetch_add(1, Ordering::Relaxed);
                if let Some(redis::Value::Array(ks)) = info.data.first() {
                    k.fetch_add(ks.len() as u64, Ordering::Relaxed);
                }
            }
            Ok::<(), redis::aio::SendError>(())
        });
    let mut tracker = client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .map_err(|e| format!("RESP3 connection: {e}"))?;
    let _: () = redis::cmd("CLIENT")
        .arg("TRACKING")
        .arg("ON")
        .arg("BCAST")
        .arg("PREFIX")
        .arg(format!("{ns}:"))
        .arg("PREFIX")
        .arg(format!("__cr:tag:{{{ns}:"))
        .query_async(&mut tracker)
        .await
        .map_err(|e| format!("CLIENT TRACKING: {e}"))?;
    let messages = Arc::new(AtomicU64::new(0));
    let mut pubsub = redis::Client::open(url)
        .map_err(|e| e.to_string())?
        .get_async_pubsub()
        .await
        .map_err(|e| e.to_string())?;
    pubsub
        .subscribe(format!("__cr:inv:{ns}"))
        .await
        .map_err(|e| e.to_string())?;
    let m = messages.clone();
    let counter = tokio::spawn(async move {
        let mut stream = pubsub.into_on_message();
        while stream.next().await.is_some() {
            m.fetch_add(1, Ordering::Relaxed);
        }
    });
    const N: u64 = 1_000;
    let mut out = Vec::new();
    let phases: [(&str, u64); 5] = [
        ("miss + fill", 10_000_000),
        ("hit", 10_000_000),
        ("tagged miss + fill", 20_000_000),
        ("#[cache_put]", 30_000_000),
        ("#[cache_evict] of 3 keys", 40_000_000),
    ];
    for (phase, base) in phases {
        let (p0, k0, m0) = (
            pushes.load(Ordering::Relaxed),
            keys.load(Ordering::Relaxed),
            messages.load(Ordering::Relaxed),
        );
        for id in base..base + N {
            match phase {
                "miss + fill" | "hit" => {
                    let _ = ours(&cache, id - base + 10_000_000).await;
                }
                "tagged miss + fill" => {
                    let _ = ours_tagged(&cache, id).await;
                }
                "#[cache_put]" => {
                    let _ = ours_put(&cache, id).await;
                }
                _ => {
                    let _ = ours_evict(&cache, id).await;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let tracked = pushes.load(Ordering::Relaxed) - p0;
        let tracked_keys = keys.load(Ordering::Relaxed) - k0;
        let ours_msgs = messages.load(Ordering::Relaxed) - m0;
        out.push(Figure {
            scenario: "coherence: messages to one instance per 1 000 operations".to_owned(),
            contender: phase.to_owned(),
            note: format!(
                "CLIENT TRACKING BCAST: {tracked} pushes ({tracked_keys} keys); invalidation channel: {ours_msgs} messages"
            ),
            ..Figure::default()
        });
    }
    counter.abort();
    Ok(out)
}

/// `--contender`: run only contenders whose name contains this (for profiling).
static CONTENDER_FILTER: std::sync::OnceLock<String> = std::sync::OnceLock::new();
/// `--scenario`: run only scenarios whose label contains this (for profiling: the cluster's
/// hit and miss rows have the same contender names).
static SCENARIO_FILTER: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// A sequential scenario: every contender calls `ids(round)` one after another, in
/// interleaved rounds; figures with ratios to the first contender.
async fn sequential_scenario(
    label: &str,
    contenders: &[(&str, Op)],
    rounds: usize,
    ids: impl Fn(usize) -> Vec<u64>,
) -> Vec<Figure> {
    let figs = interleaved(label, contenders, rounds, |op, round| {
        let ids = ids(round);
        async move {
            let mut f = RoundFigures::default();
            sequential(&op, &ids, &mut f).await;
            f
        }
    })
    .await;
    with_ratios(
        contenders
            .iter()
            .zip(&figs)
            .map(|((name, _), f)| f.figure(label, name))
            .collect(),
    )
}

/// Whether `--scenario` (if given) asks for the scenario labelled `label`.
fn scenario_wanted(label: &str) -> bool {
    SCENARIO_FILTER
        .get()
        .is_none_or(|f| label.contains(f.as_str()))
}

/// Runs each contender once per round, rotating the order, and returns figures per contender.
async fn interleaved<F, Fut>(
    label: &str,
    contenders: &[(&str, Op)],
    rounds: usize,
    mut run: F,
) -> Vec<RoundFigures>
where
    F: FnMut(Op, usize) -> Fut,
    Fut: std::future::Future<Output = RoundFigures>,
{
    let mut all: Vec<RoundFigures> = contenders.iter().map(|_| RoundFigures::default()).collect();
    if !scenario_wanted(label) {
        return all;
    }
    for round in 0..rounds {
        for k in 0..contenders.len() {
            let i = (k + round) % contenders.len();
            if CONTENDER_FILTER
                .get()
                .is_some_and(|f| !contenders[i].0.contains(f.as_str()))
            {
                continue;
            }
            let f = run(contenders[i].1.clone(), round).await;
            all[i].p50.extend(f.p50);
            all[i].p99.extend(f.p99);
            all[i].cpu.extend(f.cpu);
            all[i].rate.extend(f.rate);
        }
    }
    all
}

fn out_stampede(
    report: &mut Vec<Figure>,
    opts: &cache_benches::stampede::Options,
    r: &cache_benches::stampede::Row,
    p50_ns: f64,
    p99_ns: f64,
) {
    report.push(Figure {
        scenario: format!(
            "stampede, {} processes x {} tasks, cold key (p50/p99: waiters' wake-up after the fill)",
            opts.processes, opts.tasks
        ),
        contender: r.contender.clone(),
        p50_ns,
        p99_ns,
        note: format!(
            "{} executions; {}/{} correct; {} waiters; all done after {:.0} ms",
            r.executions,
            r.correct,
            r.processes * r.tasks_per_process,
            r.waiters,
            r.total_ms
        ),
        ..Figure::default()
    });
}

fn with_ratios(mut figures: Vec<Figure>) -> Vec<Figure> {
    let Some(base) = figures.first().cloned() else {
        return figures;
    };
    for f in &mut figures {
        let r = |a: f64, b: f64| (b > 0.0).then(|| a / b);
        f.ratio_p50 = r(f.p50_ns, base.p50_ns);
        f.ratio_cpu = r(f.cpu_ns_per_op, base.cpu_ns_per_op);
        f.ratio_throughput = r(f.ops_per_sec, base.ops_per_sec);
    }
    figures
}

/// A figure, or `-` where the scenario does not measure it.
fn dash_or(v: f64, fmt: fn(f64) -> String) -> String {
    if v.is_finite() && v > 0.0 {
        fmt(v)
    } else {
        "-".to_owned()
    }
}

fn ratio(r: Option<f64>) -> String {
    r.map_or_else(|| "-".to_owned(), |r| format!("{r:.2}x"))
}

// ---- main --------------------------------------------------------------------------------

#[derive(Serialize)]
struct Report {
    machine: String,
    args: String,
    figures: Vec<Figure>,
}

/// Where the "Redis down" scenarios point.
struct Down {
    refused: String,
    hung: std::net::TcpListener,
}

fn main() {
    // `compare` re-executes itself as the stampede scenario's worker processes.
    cache_benches::stampede::worker_main_if_requested();
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("compare: {e}");
            std::process::exit(2);
        }
    };
    let refused = format!("redis://127.0.0.1:{}", cache_tests::free_port());
    let hung = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    let hung_url = format!("redis://{}", hung.local_addr().expect("local address"));
    // The cached crate reads its Redis from the environment. Set it now, while this process
    // has a single thread (no runtime yet), which is what makes `set_var` sound.
    #[allow(unsafe_code)]
    // SAFETY: no other thread exists yet, so nothing reads the environment concurrently.
    unsafe {
        std::env::set_var("CACHED_REDIS_CONNECTION_STRING", &args.redis_url);
        std::env::set_var("CACHE_BENCH_REFUSED_URL", &refused);
        std::env::set_var("CACHE_BENCH_HUNG_URL", &hung_url);
    }
    let down = Down { refused, hung };
    // The peer panics when Redis is down; say so in one line, not a backtrace.
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("?");
        eprintln!(
            "(a contender panicked: {})",
            msg.lines().next().unwrap_or("")
        );
    }));
    let rt = cache_benches::runtime();
    if let Err(e) = rt.block_on(run(args, down)) {
        eprintln!("compare: {e}");
        std::process::exit(1);
    }
}

async fn run(args: Args, down: Down) -> Result<(), String> {
    if let Some(c) = &args.contender {
        let _ = CONTENDER_FILTER.set(c.clone());
    }
    if let Some(s) = &args.scenario {
        let _ = SCENARIO_FILTER.set(s.clone());
    }
    let started = Instant::now();
    let client = redis::Client::open(args.redis_url.as_str()).map_err(|e| e.to_string())?;
    let conn = ConnectionManager::new(client)
        .await
        .map_err(|e| format!("cannot connect to {}: {e}", args.redis_url))?;
    let redis_version = cache_benches::redis_version(&mut conn.clone()).await?;

    let run_id = format!(
        "{:x}",
        std::process::id() as u64 ^ started.elapsed().as_nanos() as u64
    );
    let raw_prefix: Arc<str> = format!("cache-bench:{run_id}:raw:").into();
    let ours_redis = Cache::builder()
        .redis(&args.redis_url)
        .namespace(format!("cache-bench:{run_id}:ours"))
        .local(1_000_000)
        .build()
        .await
        .map_err(|e| e.to_string())?;
    let ours_memory = Cache::memory();
    let moka: moka::future::Cache<u64, User> = moka::future::Cache::builder()
        .max_capacity(1_000_000)
        .build();
    let moka_sync: moka::sync::Cache<u64, User> =
        moka::sync::Cache::builder().max_capacity(1_000_000).build();

    let scale = if args.quick { 1 } else { 5 };
    let seq_ops = 2_000 * scale;
    let mem_ops = 100_000 * scale;
    let conc_ops = 20_000 * scale;
    let miss_ops = 1_000 * scale;
    let keys = args.keys;

    // Warm every key every contender will read (not needed when only the scenarios that
    // bring their own keys run: down, stampede, write_behind, cluster).
    let warm = [
        "hit",
        "memory",
        "spread",
        "hot",
        "zipf",
        "invalidation",
        "coherence",
        "miss",
        "writes",
        "metrics",
    ]
    .iter()
    .any(|w| args.wants(w));
    if warm {
        eprintln!("warming {} keys ...", keys);
        until_l1(&ours_redis, "ours_local", async || {
            let _ = ours_local(&ours_redis, 0).await;
        })
        .await?;
        for id in 0..keys {
            let _ = ours_local(&ours_redis, id).await;
            moka_sync.insert(id, load(id));
            let _ = ours(&ours_redis, id).await;
            let _ = ours_tagged(&ours_redis, id).await;
            let _ = ours(&ours_memory, id).await;
            let _ = peer(id).await;
            moka.insert(id, load(id)).await;
            let mut c = conn.clone();
            let key = format!("{raw_prefix}user:{id}");
            let bytes = serde_json::to_vec(&load(id)).unwrap_or_default();
            let _: Result<(), _> = redis::cmd("SET")
                .arg(&key)
                .arg(bytes)
                .arg("EX")
                .arg(3600)
                .query_async(&mut c)
                .await;
        }
        if let Ok(Err(e)) = tokio::time::timeout(Duration::from_secs(5), peer(0)).await {
            return Err(format!(
                "the cached crate's redis store does not work here: {e}"
            ));
        }
    }

    let raw_op: Op = {
        let (conn, prefix) = (conn.clone(), raw_prefix.clone());
        Arc::new(move |id| {
            let (mut conn, prefix) = (conn.clone(), prefix.clone());
            Box::pin(async move {
                black_box(raw_get(&mut conn, &prefix, id).await);
            })
        })
    };
    let ours_op = cache_op!(ours_redis, ours);
    let ours_lock_op = cache_op!(ours_redis, ours_lock);
    let peer_op: Op = Arc::new(|id| {
        Box::pin(async move {
            let _ = black_box(peer(id).await);
        })
    });
    let ours_mem_op = cache_op!(ours_memory, ours);
    let moka_op: Op = {
        let moka = moka.clone();
        Arc::new(move |id| {
            let moka = moka.clone();
            Box::pin(async move {
                black_box(moka.get(&id).await);
            })
        })
    };

    let ours_local_op = cache_op!(ours_redis, ours_local);
    let moka_sync_op: Op = {
        let moka = moka_sync.clone();
        Arc::new(move |id| {
            let moka = moka.clone();
            Box::pin(async move {
                black_box(moka.get(&id));
            })
        })
    };

    let mut report: Vec<Figure> = Vec::new();

    // 1. Sequential hit latency, Redis.
    if args.wants("hit") {
        eprintln!("hit latency (redis, sequential) ...");
        let contenders = [
            ("raw redis-rs GET + serde_json", raw_op.clone()),
            ("#[cached] (this project)", ours_op.clone()),
            ("#[cached(lock)] (this project)", ours_lock_op.clone()),
            (
                "#[cached(tags)] (this project)",
                cache_op!(ours_redis, ours_tagged),
            ),
            ("cached crate #[concurrent_cached(redis)]", peer_op.clone()),
            (
                "#[cached(local)] L1 hit (this project)",
                ours_local_op.clone(),
            ),
        ];
        report.extend(
            sequential_scenario(
                "hit latency, redis, sequential",
                &contenders,
                args.rounds,
                |round| ids(seq_ops, keys, 0.0, round as u64 + 1),
            )
            .await,
        );
    }

    // 2. Sequential hit latency, in process.
    if args.wants("memory") {
        eprintln!("hit latency (in process, sequential) ...");
        let contenders = [
            ("moka get (bare)", moka_op.clone()),
            ("moka sync get (bare)", moka_sync_op.clone()),
            ("#[cached] memory backend", ours_mem_op.clone()),
            (
                "#[cached(local)] L1 hit, Redis behind",
                ours_local_op.clone(),
            ),
        ];
        report.extend(
            sequential_scenario(
                "hit latency, in process, sequential",
                &contenders,
                args.rounds,
                |round| ids(mem_ops, keys, 0.0, round as u64 + 11),
            )
            .await,
        );
    }

    // 3. Throughput, tasks on one connection: spread keys, then one hot key.
    for (label, share, word) in [
        (
            format!("throughput, {} tasks, {} keys", args.tasks, keys),
            0.0,
            "spread",
        ),
        (
            format!(
                "throughput, {} tasks, hot key ({:.0}% of calls)",
                args.tasks,
                args.hot_share * 100.0
            ),
            args.hot_share,
            "hot",
        ),
    ] {
        if !args.wants(word) {
            continue;
        }
        eprintln!("{label} ...");
        let contenders = [
            ("raw redis-rs GET + serde_json", raw_op.clone()),
            ("#[cached] (this project)", ours_op.clone()),
            ("cached crate #[concurrent_cached(redis)]", peer_op.clone()),
        ];
        let tasks = args.tasks;
        let figs = interleaved(&label, &contenders, args.rounds, |op, round| {
            let ids = Arc::new(ids(conc_ops, keys, share, round as u64 + 21));
            async move {
                let mut f = RoundFigures::default();
                concurrent(&op, &ids, tasks, &mut f).await;
                f
            }
        })
        .await;
        report.extend(with_ratios(
            contenders
                .iter()
                .zip(&figs)
                .map(|((name, _), f)| f.figure(&label, name))
                .collect(),
        ));
    }

    // 3b. The multi-level tier under a skewed workload: Zipf(1.1) over 100 000 keys, 64 tasks,
    //     Redis alone against L1 (10 000 entries, the default) in front of the same Redis.
    if args.wants("zipf") {
        eprintln!("zipf: warming 100 000 keys ...");
        const ZIPF_KEYS: u64 = 100_000;
        let zipf_cache = Cache::builder()
            .redis(&args.redis_url)
            .namespace(format!("cache-bench:{run_id}:zipf"))
            .build()
            .await
            .map_err(|e| e.to_string())?;
        let mut set = tokio::task::JoinSet::new();
        for t in 0..64u64 {
            let cache = zipf_cache.clone();
            set.spawn(async move {
                for id in (t..ZIPF_KEYS).step_by(64) {
                    let _ = zipf_redis(&cache, id).await;
                }
            });
        }
        while set.join_next().await.is_some() {}
        until_l1(&zipf_cache, "zipf_local", async || {
            let _ = zipf_local(&zipf_cache, 0).await;
        })
        .await?;
        let label = format!("zipf(1.1) over 100 000 keys, {} tasks", args.tasks);
        let contenders = [
            ("#[cached] Redis alone", cache_op!(zipf_cache, zipf_redis)),
            (
                "#[cached(local)] L1 (10 000 entries) + Redis",
                cache_op!(zipf_cache, zipf_local),
            ),
        ];
        let tasks = args.tasks;
        let before = zipf_cache.stats();
        let figs = interleaved(&label, &contenders, args.rounds, |op, round| {
            let ids = Arc::new(zipf_ids(conc_ops, ZIPF_KEYS, 1.1, round as u64 + 61));
            async move {
                let mut f = RoundFigures::default();
                concurrent(&op, &ids, tasks, &mut f).await;
                f
            }
        })
        .await;
        let after = zipf_cache.stats();
        let rate = |name: &str| {
            let (a, b) = (after.function(name), before.function(name));
            let d = |f: fn(&cache_runtime::FunctionStats) -> u64| a.map_or(0, f) - b.map_or(0, f);
            let calls = d(|f| f.hits + f.misses).max(1) as f64;
            format!(
                "hit rate {:.1}%, L1 {:.1}%",
                d(|f| f.hits) as f64 / calls * 100.0,
                d(|f| f.l1_hits) as f64 / calls * 100.0
            )
        };
        let mut figures = with_ratios(
            contenders
                .iter()
                .zip(&figs)
                .map(|((name, _), f)| f.figure(&label, name))
                .collect(),
        );
        figures[0].note = rate("zipf_redis");
        figures[1].note = rate("zipf_local");
        report.extend(figures);
    }

    // 3c. Invalidation to removal: another cache (its own connections and subscription) writes
    //     a key this one holds in its in-process tier; how long until a read here returns the
    //     new value (one Redis read included), from the write's return.
    if args.wants("invalidation") {
        eprintln!("invalidation to removal ...");
        let writer = Cache::builder()
            .redis(&args.redis_url)
            .namespace(format!("cache-bench:{run_id}:ours"))
            .build()
            .await
            .map_err(|e| e.to_string())?;
        let id = 4_000_000_000u64;
        let rounds = if args.quick { 300 } else { 1_000 };
        let mut samples = Samples(Vec::with_capacity(rounds));
        for n in 0..rounds as u64 {
            // Back in this tier first.
            let l1 = || {
                ours_redis
                    .stats()
                    .function("ours_local")
                    .map_or(0, |f| f.l1_hits)
            };
            let (held, deadline) = (l1(), Instant::now() + Duration::from_secs(5));
            while l1() == held && Instant::now() < deadline {
                let _ = ours_local(&ours_redis, id).await;
            }
            let user = User {
                name: format!("v{n}"),
                ..load(id)
            };
            writer
                .set(&format!("user:{id}"), &user, Duration::from_secs(3600))
                .await
                .map_err(|e| e.to_string())?;
            let t = Instant::now();
            loop {
                if matches!(ours_local(&ours_redis, id).await, Ok(u) if u.name == user.name) {
                    break;
                }
                if t.elapsed() > Duration::from_secs(5) {
                    return Err("a write was not seen within 5 s".into());
                }
            }
            samples.0.push(t.elapsed().as_nanos() as u64);
        }
        report.push(Figure {
            scenario: "invalidation to removal, another cache's write".to_owned(),
            contender: "#[cached(local)] (this project)".to_owned(),
            p50_ns: samples.percentile(50.0) as f64,
            p99_ns: samples.percentile(99.0) as f64,
            note: format!("{rounds} writes; from the write's return to a read of the new value"),
            ..Figure::default()
        });
    }

    // 3d. Coherence: what reaches one instance per 1 000 operations elsewhere, under Redis's
    //     server-assisted client tracking (RESP3, BCAST, prefixes of the value and tag keys)
    //     and under this project's invalidation channel (what `local` uses).
    if args.wants("coherence") {
        eprintln!("coherence messages ...");
        report.extend(coherence(&args.redis_url, &run_id).await?);
    }

    // 4. Miss cost: a miss plus the fill, on keys never read before.
    if args.wants("miss") {
        eprintln!("miss + fill ...");
        // Ids never used before, in this run or an earlier one (whose keys may still be in Redis).
        static NEXT_MISS: AtomicU64 = AtomicU64::new(0);
        let epoch_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        NEXT_MISS.store((1 << 62) | (epoch_ms << 16), Ordering::Relaxed);
        let raw_miss_op: Op = {
            let (conn, prefix) = (conn.clone(), raw_prefix.clone());
            Arc::new(move |_| {
                let (mut conn, prefix) = (conn.clone(), prefix.clone());
                Box::pin(async move {
                    let id = NEXT_MISS.fetch_add(1, Ordering::Relaxed);
                    black_box(raw_miss(&mut conn, &prefix, id).await);
                })
            })
        };
        let ours_miss_op = cache_op!(ours_redis, ours, |_| NEXT_MISS
            .fetch_add(1, Ordering::Relaxed));
        let ours_lock_miss_op = cache_op!(ours_redis, ours_lock, |_| NEXT_MISS
            .fetch_add(1, Ordering::Relaxed));
        let ours_tagged_miss_op = cache_op!(ours_redis, ours_tagged, |_| NEXT_MISS
            .fetch_add(1, Ordering::Relaxed));
        let peer_miss_op: Op = Arc::new(|_| {
            Box::pin(async move {
                let id = NEXT_MISS.fetch_add(1, Ordering::Relaxed);
                let _ = black_box(peer(id).await);
            })
        });
        let contenders = [
            ("raw redis-rs GET + SET EX", raw_miss_op),
            ("#[cached] (this project)", ours_miss_op),
            ("#[cached(lock)] (this project)", ours_lock_miss_op),
            ("#[cached(tags)] (this project)", ours_tagged_miss_op),
            ("cached crate #[concurrent_cached(redis)]", peer_miss_op),
        ];
        report.extend(
            sequential_scenario("miss + fill, sequential", &contenders, args.rounds, |_| {
                vec![0u64; miss_ops]
            })
            .await,
        );
    }

    // 5. Writes: write-through and event invalidation against their hand-written forms, and
    //    a tag invalidation with 10 and with 10 000 entries under the tag.
    if args.wants("writes") {
        eprintln!("writes ...");
        let raw_set_op: Op = {
            let (conn, prefix) = (conn.clone(), raw_prefix.clone());
            Arc::new(move |id| {
                let (mut conn, prefix) = (conn.clone(), prefix.clone());
                Box::pin(async move { raw_set(&mut conn, &prefix, id).await })
            })
        };
        let contenders = [
            ("raw redis-rs SET EX + serde_json", raw_set_op),
            (
                "#[cache_put] (this project)",
                cache_op!(ours_redis, ours_put),
            ),
        ];
        report.extend(
            sequential_scenario("put, sequential", &contenders, args.rounds, |round| {
                ids(seq_ops, keys, 0.0, round as u64 + 31)
            })
            .await,
        );
        let raw_del_op: Op = {
            let (conn, prefix) = (conn.clone(), raw_prefix.clone());
            Arc::new(move |id| {
                let (mut conn, prefix) = (conn.clone(), prefix.clone());
                Box::pin(async move { raw_del(&mut conn, &prefix, id).await })
            })
        };
        let contenders = [
            ("raw redis-rs DEL (3 keys)", raw_del_op.clone()),
            (
                "#[cache_evict] 3 keys (this project)",
                cache_op!(ours_redis, ours_evict),
            ),
        ];
        report.extend(
            sequential_scenario("evict, sequential", &contenders, args.rounds, |round| {
                ids(seq_ops, keys, 0.0, round as u64 + 41)
            })
            .await,
        );
        // Tags: org 1000 has 10 entries, org 1001 has 10 000 (filled once; an invalidation
        // does not remove them, so every round invalidates the same number).
        for id in 0..10_000u64 {
            if id < 10 {
                let _ = ours_tagged_in(&ours_redis, 1000, 1_000_000 + id).await;
            }
            let _ = ours_tagged_in(&ours_redis, 1001, 2_000_000 + id).await;
        }
        let tag_op = |tag: &'static str| -> Op {
            let cache = ours_redis.clone();
            Arc::new(move |_| {
                let cache = cache.clone();
                Box::pin(async move {
                    let _ = black_box(cache.invalidate_tag(tag).await);
                })
            })
        };
        let contenders = [
            ("raw redis-rs DEL (3 keys)", raw_del_op),
            ("invalidate_tag, 10 entries", tag_op("org:1000")),
            ("invalidate_tag, 10 000 entries", tag_op("org:1001")),
        ];
        report.extend(
            sequential_scenario(
                "tag invalidation, sequential",
                &contenders,
                args.rounds,
                |round| ids(seq_ops, keys, 0.0, round as u64 + 51),
            )
            .await,
        );
    }

    // 6. Redis down: refused (nothing listens), and hung (accepts, never answers).
    if args.wants("down") {
        eprintln!("redis down ...");
        report.extend(redis_down(args.quick, down).await);
    }

    // 7. Stampede: processes x tasks on one cold key (`lock`), executions and wake-up delay.
    if args.wants("stampede") {
        let opts = cache_benches::stampede::Options {
            processes: if args.quick { 2 } else { 4 },
            tasks: if args.quick { 50 } else { 250 },
            // Not a multiple of the retry loop's 100 ms sleep, which would flatter it.
            load_ms: if args.quick { 150 } else { 250 },
            redis_url: args.redis_url.clone(),
            cluster_urls: Vec::new(),
        };
        let rows = cache_benches::stampede::run(&opts).await?;
        for r in rows {
            let waited = |v: Option<f64>| v.map_or(f64::NAN, |us| us * 1e3);
            out_stampede(
                &mut report,
                &opts,
                &r,
                waited(r.wake_p50_us),
                waited(r.wake_p99_us),
            );
        }
    }

    // 8. Write-behind against a direct PostgreSQL UPDATE per call (`PG_URL`).
    if args.wants("write_behind") {
        eprintln!("write_behind ...");
        report.extend(wb::scenario(&args.redis_url, &run_id, args.quick, args.rounds).await?);
    }

    // 9. Redis Cluster: the same functions on a cluster, against raw cluster commands.
    let mut skipped = Vec::new();
    if args.wants("cluster") {
        if args.cluster_urls.is_empty() {
            skipped.push(
                "cluster rows skipped: no Redis Cluster given (--cluster-urls URL,URL,.. or REDIS_CLUSTER_URLS; scripts/redis-cluster run <cmd> starts one)",
            );
        } else {
            let single = cluster::Single {
                url: &args.redis_url,
                conn: &conn,
                raw_prefix: &raw_prefix,
                cache: &ours_redis,
            };
            report.extend(cluster::scenario(&args, &args.cluster_urls, &run_id, single).await?);
        }
    }

    // 10. The metrics feature with a Prometheus recorder installed. Last: the recorder is
    // global, and only what registers after it (this scenario's cache) reports to it; the
    // other caches registered their no-op handles before.
    #[cfg(feature = "metrics")]
    if args.wants("metrics") {
        eprintln!("hit latency with a Prometheus recorder (redis, sequential) ...");
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::set_global_recorder(recorder)
            .map_err(|e| format!("installing the Prometheus recorder: {e}"))?;
        let metered = Cache::builder()
            .redis(&args.redis_url)
            .namespace(format!("cache-bench:{run_id}:ours"))
            .local(1_000_000)
            .build()
            .await
            .map_err(|e| e.to_string())?;
        let contenders = [
            ("raw redis-rs GET + serde_json", raw_op.clone()),
            ("#[cached], metrics on, no recorder", ours_op.clone()),
            (
                "#[cached], metrics on, Prometheus recorder",
                cache_op!(metered, ours_metered),
            ),
        ];
        report.extend(
            sequential_scenario(
                "hit latency, redis, sequential, metrics",
                &contenders,
                args.rounds,
                |round| ids(seq_ops, keys, 0.0, round as u64 + 21),
            )
            .await,
        );
        // The recorder did count: the exposition has the metered function's hits.
        let text = handle.render();
        let hits = text
            .lines()
            .find(|l| {
                l.starts_with("cache_hits_total")
                    && l.contains("function=\"ours_metered\"")
                    && l.contains("level=\"l2\"")
            })
            .unwrap_or("(no cache_hits_total line for ours_metered)");
        eprintln!("Prometheus exposition: {hits}");
    }

    // The report.
    let machine = machine_description(&redis_version);
    let mut table = Table::new(&[
        "scenario",
        "contender",
        "p50",
        "p99",
        "CPU/op",
        "ops/s",
        "p50 ratio",
        "CPU ratio",
        "throughput ratio",
        "note",
    ]);
    for f in &report {
        table.row(vec![
            f.scenario.clone(),
            f.contender.clone(),
            dash_or(f.p50_ns, fmt_ns),
            dash_or(f.p99_ns, fmt_ns),
            dash_or(f.cpu_ns_per_op, fmt_ns),
            dash_or(f.ops_per_sec, fmt_rate),
            ratio(f.ratio_p50),
            ratio(f.ratio_cpu),
            ratio(f.ratio_throughput),
            f.note.clone(),
        ]);
    }
    let argline = format!(
        "{}keys={} hot-share={} tasks={} rounds={}",
        if args.quick { "--quick " } else { "" },
        args.keys,
        args.hot_share,
        args.tasks,
        args.rounds
    );
    println!("Machine: {machine}");
    println!("Run: {argline}; {:.0} s\n", started.elapsed().as_secs_f64());
    println!("{}", table.render());
    println!(
        "Ratios are to the first row of each scenario (the baseline), measured in the same run; medians of {} interleaved rounds.",
        args.rounds
    );
    for line in skipped {
        println!("{line}");
    }
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&Report {
            machine,
            args: argline,
            figures: report,
        })
        .map_err(|e| e.to_string())?;
        std::fs::write(path, json).map_err(|e| format!("writing {path}: {e}"))?;
        eprintln!("wrote {path}");
    }
    Ok(())
}

/// Calls with Redis unreachable: time per call, and whether the call returned the function's
/// result.
async fn redis_down(quick: bool, down: Down) -> Vec<Figure> {
    let refused = down.refused;
    // A "hung" Redis: accepts connections, never answers.
    let _ = down.hung.set_nonblocking(true);
    let listener = tokio::net::TcpListener::from_std(down.hung).expect("listener");
    let hung = format!("redis://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });

    let mut out = Vec::new();
    for (situation, url) in [("refused", refused.clone()), ("hung", hung.clone())] {
        let scenario = format!("redis down ({situation}), per call");
        // Ours: every call must return the function's result.
        let cache = Cache::builder()
            .redis(&url)
            .build()
            .await
            .expect("valid config");
        let calls = if quick { 200 } else { 1_000 };
        let mut samples = Samples::default();
        let mut correct = 0;
        for i in 0..calls {
            let t = Instant::now();
            if ours(&cache, i).await.is_ok_and(|u| u.id == i) {
                correct += 1;
            }
            samples.0.push(t.elapsed().as_nanos() as u64);
        }
        let first: u64 = samples.0.iter().take(5).sum();
        let steady = Samples(samples.0[samples.0.len() / 2..].to_vec());
        let mut steady = steady;
        out.push(Figure {
            scenario: scenario.clone(),
            contender: "#[cached] (this project)".to_owned(),
            p50_ns: steady.percentile(50.0) as f64,
            p99_ns: steady.percentile(99.0) as f64,
            note: format!(
                "{correct}/{calls} calls returned the function's result; first 5 calls took {} in total, then the breaker is open",
                fmt_ns(first as f64)
            ),
            ..Figure::default()
        });

        // The peer, with a generous deadline per call.
        let mut notes = Vec::new();
        let mut times = Vec::new();
        for i in 0..2u64 {
            let t = Instant::now();
            let handle = if situation == "refused" {
                tokio::spawn(async move { peer_refused(i).await })
            } else {
                tokio::spawn(async move { peer_hung(i).await })
            };
            let outcome = match tokio::time::timeout(Duration::from_secs(30), handle).await {
                Ok(Ok(Ok(u))) if u.id == i => "returned the result".to_owned(),
                Ok(Ok(Ok(_))) => "returned a wrong value".to_owned(),
                Ok(Ok(Err(e))) => format!(
                    "returned an error ({})",
                    e.0.chars().take(60).collect::<String>()
                ),
                Ok(Err(j)) if j.is_panic() => "panicked".to_owned(),
                Ok(Err(_)) => "was cancelled".to_owned(),
                Err(_) => "did not return within 30 s".to_owned(),
            };
            times.push(t.elapsed().as_nanos() as f64);
            notes.push(format!(
                "call {}: {outcome} after {}",
                i + 1,
                fmt_ns(t.elapsed().as_nanos() as f64)
            ));
        }
        out.push(Figure {
            scenario,
            contender: "cached crate #[concurrent_cached(redis)]".to_owned(),
            p50_ns: median(&times),
            p99_ns: times.iter().cloned().fold(0.0, f64::max),
            note: notes.join("; "),
            ..Figure::default()
        });
    }
    out
}
