//! `#[write_behind]` into a real PostgreSQL (`PG_URL`, default the local `test` database):
//! writes from several processes applied by several worker processes, one of them killed
//! mid-batch; read-your-writes before the database has the write; Redis killed during writes
//! (calls fall back to write-through); Redis killed and restarted with AOF (`appendfsync
//! always`): nothing accepted is lost.
//!
//! Each test works in tables of its own (`wb<random>_users`, `wb<random>_audit`, dropped at
//! the end) and a namespace of its own. The body of every write records itself in the audit
//! table (key, writer, sequence number, write id) and upserts the row, in one statement.

use std::collections::{HashMap, HashSet};
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cache_runtime::write_behind::Worker;
use cache_runtime::{Cache, cached, write_behind};
use cache_tests::{RedisServer, pg_url, raw_connection, redis_url, spawn_test_worker};
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use tokio_postgres::{Client, NoTls};

/// What a write stores: who wrote it, its place in that writer's sequence, a name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Row {
    writer: i32,
    seq: i32,
    name: String,
}

impl Row {
    fn new(writer: i32, seq: i32) -> Row {
        Row {
            writer,
            seq,
            name: format!("w{writer}s{seq}"),
        }
    }
}

/// The caches of this process, by run. The functions' arguments must be serializable, so
/// their `cache = ..` looks the run's cache up by name.
static CACHES: Mutex<Vec<(String, &'static Cache)>> = Mutex::new(Vec::new());

fn cache_of(run: &str) -> &'static Cache {
    CACHES
        .lock()
        .unwrap()
        .iter()
        .find(|(r, _)| r == run)
        .map(|(_, c)| *c)
        .unwrap_or_else(|| panic!("no cache registered for run {run}"))
}

/// Builds the run's cache on `url` (namespace `test:<run>`) and registers it.
async fn register(run: &str, url: &str) -> &'static Cache {
    let cache = Cache::builder()
        .redis(url)
        .namespace(format!("test:{run}"))
        .operation_timeout(Duration::from_secs(1))
        .circuit_breaker(3, Duration::from_millis(200))
        .build()
        .await
        .unwrap();
    let cache: &'static Cache = Box::leak(Box::new(cache));
    CACHES.lock().unwrap().push((run.to_owned(), cache));
    cache
}

/// A PostgreSQL connection per Tokio runtime (a connection's driver task dies with its
/// runtime, and the tests run several).
static PG: Mutex<Vec<(tokio::runtime::Id, Arc<Client>)>> = Mutex::new(Vec::new());

async fn pg() -> Result<Arc<Client>, String> {
    let rt = tokio::runtime::Handle::current().id();
    {
        let mut all = PG.lock().unwrap();
        all.retain(|(_, c)| !c.is_closed());
        if let Some((_, c)) = all.iter().find(|(id, _)| *id == rt) {
            return Ok(c.clone());
        }
    }
    let (client, conn) = tokio_postgres::connect(&pg_url(), NoTls)
        .await
        .map_err(|e| format!("connect to PostgreSQL at {}: {e}", pg_url()))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let client = Arc::new(client);
    PG.lock().unwrap().push((rt, client.clone()));
    Ok(client)
}

/// A new run: its name (also its tables' prefix) and its tables.
async fn new_run(what: &str) -> String {
    let run = format!(
        "wb{what}{:012x}",
        std::hash::BuildHasher::hash_one(
            &std::collections::hash_map::RandomState::new(),
            (std::process::id(), Instant::now())
        ) & 0xffff_ffff_ffff
    );
    let client = pg().await.unwrap();
    client
        .batch_execute(&format!(
            "CREATE TABLE {run}_users (id bigint PRIMARY KEY, writer int NOT NULL, seq int NOT NULL, name text NOT NULL);
             CREATE TABLE {run}_audit (n bigserial PRIMARY KEY, key bigint NOT NULL, writer int NOT NULL, seq int NOT NULL, write_id text NOT NULL, pos_ms bigint, pos_seq bigint);"
        ))
        .await
        .unwrap();
    run
}

async fn drop_run(run: &str) {
    let client = pg().await.unwrap();
    client
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS {run}_users; DROP TABLE IF EXISTS {run}_audit;"
        ))
        .await
        .unwrap();
}

/// The body of the writes: records itself in the audit table (with its write id and queue
/// position) and upserts the row, in one statement (one transaction). With `versioned`, the
/// row is only replaced by a later sequence number of its writer (each key of the tests
/// that use it has one writer): what the README recommends where a fallback to
/// write-through may overtake queued writes.
async fn apply(run: &str, id: i64, row: &Row, versioned: bool) -> Result<(), String> {
    let write = write_behind::current_id().ok_or("no write id while the body runs")?;
    let (pos_ms, pos_seq) = match write.position() {
        Some(p) => (Some(p.ms() as i64), Some(p.seq() as i64)),
        None => (None, None),
    };
    let guard = if versioned {
        format!("WHERE {run}_users.seq < excluded.seq")
    } else {
        String::new()
    };
    let sql = format!(
        "WITH audit AS (INSERT INTO {run}_audit (key, writer, seq, write_id, pos_ms, pos_seq) VALUES ($1, $2, $3, $4, $6, $7))
         INSERT INTO {run}_users (id, writer, seq, name) VALUES ($1, $2, $3, $5)
         ON CONFLICT (id) DO UPDATE SET writer = excluded.writer, seq = excluded.seq, name = excluded.name {guard}"
    );
    pg().await?
        .execute(
            &sql,
            &[
                &id,
                &row.writer,
                &row.seq,
                &write.to_string(),
                &row.name,
                &pos_ms,
                &pos_seq,
            ],
        )
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}

#[write_behind(cache = cache_of(&run), key = "user:{id}", ttl = 600, value = row, queue = "pg", coalesce = false, name = "wb_pg_save")]
async fn pg_save(run: String, id: i64, row: Row) -> Result<(), String> {
    apply(&run, id, &row, false).await
}

/// As `pg_save`, with coalescing (the default): a worker applies only the last of a key's
/// consecutive writes it finds together.
#[write_behind(cache = cache_of(&run), key = "user:{id}", ttl = 600, value = row, queue = "pg", name = "wb_pg_save_coalesced")]
async fn pg_save_coalesced(run: String, id: i64, row: Row) -> Result<(), String> {
    apply(&run, id, &row, false).await
}

#[write_behind(cache = cache_of(&run), key = "user:{id}", ttl = 600, value = row, queue = "pg", coalesce = false, name = "wb_pg_save_versioned")]
async fn pg_save_versioned(run: String, id: i64, row: Row) -> Result<(), String> {
    apply(&run, id, &row, true).await
}

/// The reader of the same key: from the database on a miss.
#[cached(cache = cache_of(run), key = "user:{id}", ttl = 600, name = "wb_pg_read")]
async fn pg_read(run: &str, id: i64) -> Result<Option<Row>, String> {
    let rows = pg()
        .await?
        .query(
            &format!("SELECT writer, seq, name FROM {run}_users WHERE id = $1"),
            &[&id],
        )
        .await
        .map_err(|e| e.to_string())?;
    Ok(rows.first().map(|r| Row {
        writer: r.get(0),
        seq: r.get(1),
        name: r.get(2),
    }))
}

/// Every key the cache still holds holds the database's row (by writer and sequence).
async fn cache_agrees(cache: &Cache, rows: &HashMap<i64, (i32, i32)>) {
    for (key, row) in rows {
        let cached: Option<Row> = cache.get(&format!("user:{key}")).await.unwrap();
        if let Some(c) = cached {
            assert_eq!(
                (c.writer, c.seq),
                *row,
                "key {key}: the cache and the database disagree"
            );
        }
    }
}

/// The database's rows: id → (writer, seq).
async fn db_rows(run: &str) -> HashMap<i64, (i32, i32)> {
    pg().await
        .unwrap()
        .query(&format!("SELECT id, writer, seq FROM {run}_users"), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect()
}

/// One application of a write, from the audit table.
#[derive(Debug, Clone)]
struct Applied {
    key: i64,
    writer: i32,
    seq: i32,
    write_id: String,
    /// The write's queue position; `None` for a write the call ran itself (write-through).
    position: Option<(i64, i64)>,
}

/// The audit table in application order.
async fn audit(run: &str) -> Vec<Applied> {
    pg().await
        .unwrap()
        .query(
            &format!(
                "SELECT key, writer, seq, write_id, pos_ms, pos_seq FROM {run}_audit ORDER BY n"
            ),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| Applied {
            key: r.get(0),
            writer: r.get(1),
            seq: r.get(2),
            write_id: r.get(3),
            position: r.get::<_, Option<i64>>(4).zip(r.get::<_, Option<i64>>(5)),
        })
        .collect()
}

async fn audit_count(run: &str) -> i64 {
    pg().await
        .unwrap()
        .query_one(&format!("SELECT count(*) FROM {run}_audit"), &[])
        .await
        .unwrap()
        .get(0)
}

/// Checks what the write-behind tests promise, given each writer's accepted writes in the
/// order its calls returned (`accepted[writer]` = [(key, seq)]):
/// - every accepted write of a key in `all_applied` was applied at least once (other keys
///   use coalescing, which skips a write followed by a later one of its key);
/// - per key, queued writes were first applied in queue order (their positions: the order
///   the queue accepted them, across writers), and a writer's writes in its call order;
///   with `ordered` false, writes the call ran itself (Redis down) may come in between;
/// - the database holds, per key, the last write the queue accepted (the greatest
///   position), or with `expected_last`, that write.
///
/// Returns the number of accepted writes.
fn check_applied(
    audit: &[Applied],
    accepted: &HashMap<i32, Vec<(i64, i32)>>,
    rows: &HashMap<i64, (i32, i32)>,
    all_applied: impl Fn(i64) -> bool,
    expected_last: Option<&HashMap<i64, (i32, i32)>>,
    ordered: bool,
) -> usize {
    let applied: HashSet<(i32, i32)> = audit.iter().map(|a| (a.writer, a.seq)).collect();
    let mut total = 0;
    for (writer, writes) in accepted {
        for (key, seq) in writes {
            total += 1;
            assert!(
                !all_applied(*key) || applied.contains(&(*writer, *seq)),
                "writer {writer}'s write {seq} (key {key}) was accepted but never applied"
            );
        }
    }
    // First applications per key: positions increasing; per writer: sequence increasing.
    let mut seen: HashSet<(i32, i32)> = HashSet::new();
    let mut last_position: HashMap<i64, (i64, i64)> = HashMap::new();
    let mut last_seq: HashMap<(i64, i32), i32> = HashMap::new();
    // Per key: the greatest position applied, and its (writer, seq).
    type Greatest = ((i64, i64), (i32, i32));
    let mut greatest: HashMap<i64, Greatest> = HashMap::new();
    for a in audit {
        if !seen.insert((a.writer, a.seq)) {
            continue; // a replay (at least once)
        }
        if let Some(pos) = a.position {
            if let Some(prev) = last_position.insert(a.key, pos) {
                assert!(
                    !ordered || prev < pos,
                    "key {}: the write at {pos:?} was first applied after the one at {prev:?}",
                    a.key
                );
            }
            let g = greatest.entry(a.key).or_insert((pos, (a.writer, a.seq)));
            if pos > g.0 {
                *g = (pos, (a.writer, a.seq));
            }
        }
        if let Some(prev) = last_seq.insert((a.key, a.writer), a.seq) {
            assert!(
                !ordered || prev < a.seq,
                "key {}: writer {}'s write {} was first applied after its later write {prev}",
                a.key,
                a.writer,
                a.seq
            );
        }
        assert!(!a.write_id.is_empty(), "a body without its write id");
    }
    let want: HashMap<i64, (i32, i32)> = match expected_last {
        Some(e) => e.clone(),
        None => greatest.into_iter().map(|(k, (_, w))| (k, w)).collect(),
    };
    for (key, want) in &want {
        assert_eq!(
            rows.get(key),
            Some(want),
            "key {key}: the database does not hold the last accepted write"
        );
    }
    let replays = audit.len() - applied.len();
    println!(
        "{total} writes accepted, {} applications ({replays} replays)",
        audit.len()
    );
    total
}

/// Waits until `cond` holds, checking every 20 ms; panics with `what` after `within`.
async fn until<F, Fut>(within: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A write-behind worker process when `CACHE_TEST_WB_WORKER` names a run (a no-op
/// otherwise): applies the run's queue until the run's stop key appears, then drains and
/// shuts down.
#[test]
fn wb_pg_worker_process() {
    let Ok(run) = std::env::var("CACHE_TEST_WB_WORKER") else {
        return;
    };
    runtime().block_on(async move {
        let cache = register(&run, &redis_url()).await;
        let worker = Worker::builder(cache)
            .queues(["pg"])
            .lease(Duration::from_secs(2))
            .start()
            .expect("start the worker");
        let mut control = raw_connection(&redis_url()).await;
        let stop = cache.full_key("stop");
        loop {
            let stopping: bool = control.exists(&stop).await.unwrap_or(false);
            if stopping {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            worker.flush_for(Duration::from_secs(60)).await,
            "the queue did not drain"
        );
        worker.shutdown().await;
        println!("WORKER DONE\n{}", cache.stats());
    });
}

/// A producer process when `CACHE_TEST_WB_PRODUCER` names a run (a no-op otherwise):
/// `CACHE_TEST_WB_WRITES` writes over `CACHE_TEST_WB_KEYS` keys as writer
/// `CACHE_TEST_WB_WRITER`; prints each accepted write (`ACCEPTED key seq`).
#[test]
fn wb_pg_producer_process() {
    let Ok(run) = std::env::var("CACHE_TEST_WB_PRODUCER") else {
        return;
    };
    let var = |name: &str| -> i64 { std::env::var(name).unwrap().parse().unwrap() };
    let (writer, writes, keys) = (
        var("CACHE_TEST_WB_WRITER") as i32,
        var("CACHE_TEST_WB_WRITES") as i32,
        var("CACHE_TEST_WB_KEYS"),
    );
    runtime().block_on(async move {
        register(&run, &redis_url()).await;
        let mut rng = 0x9e37_79b9_7f4a_7c15_u64 ^ (writer as u64 + 1).wrapping_mul(0xbf58_476d);
        let mut out = String::new();
        for seq in 1..=writes {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let id = (rng % keys as u64) as i64;
            // The lower half of the keys without coalescing (every write is applied), the
            // upper half with it.
            let call = if id < keys / 2 {
                pg_save(run.clone(), id, Row::new(writer, seq)).await
            } else {
                pg_save_coalesced(run.clone(), id, Row::new(writer, seq)).await
            };
            call.expect("a write-behind call returns Ok");
            out.push_str(&format!("ACCEPTED {id} {seq}\n"));
            if seq % 5 == 0 {
                // Spread the writes over a few seconds, so workers are killed while
                // writes still arrive.
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        // On a line of its own: the test harness may have left its own line open.
        print!("\n{out}");
        let stats = cache_of(&run).stats();
        let accepted: u64 = ["wb_pg_save", "wb_pg_save_coalesced"]
            .iter()
            .filter_map(|f| stats.function(f))
            .map(|f| f.accepted)
            .sum();
        assert_eq!(accepted, writes as u64, "every call queued: {stats}");
        println!("PRODUCER DONE");
    });
}

fn spawn_worker(run: &str) -> Child {
    spawn_test_worker(
        "write_behind_pg::wb_pg_worker_process",
        &[("CACHE_TEST_WB_WORKER", run.to_owned())],
    )
}

/// The acceptance test of the issue: 10 000 writes over 500 keys from 4 processes while 2
/// worker processes apply them; one worker is SIGKILLed twice mid-batch and restarted.
/// Every accepted write is applied at least once, in order per key, and every key ends on
/// its last accepted write (the value the cache holds: the cache write and the append are
/// one step).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_4_writers_2_workers_one_killed_twice_nothing_lost() {
    const WRITERS: i32 = 4;
    const WRITES: i32 = 2_500;
    const KEYS: i64 = 500;
    let run = new_run("stress").await;
    let cache = register(&run, &redis_url()).await;
    let mut workers = [spawn_worker(&run), spawn_worker(&run)];
    let producers: Vec<(i32, Child)> = (0..WRITERS)
        .map(|w| {
            let child = spawn_test_worker(
                "write_behind_pg::wb_pg_producer_process",
                &[
                    ("CACHE_TEST_WB_PRODUCER", run.clone()),
                    ("CACHE_TEST_WB_WRITER", w.to_string()),
                    ("CACHE_TEST_WB_WRITES", WRITES.to_string()),
                    ("CACHE_TEST_WB_KEYS", KEYS.to_string()),
                ],
            );
            (w, child)
        })
        .collect();
    let total = i64::from(WRITERS * WRITES);
    for at in [total / 6, total / 2] {
        until(Duration::from_secs(180), "the workers apply writes", || {
            let run = run.clone();
            async move { audit_count(&run).await >= at }
        })
        .await;
        let applied = audit_count(&run).await;
        workers[0].kill().unwrap();
        workers[0].wait().unwrap();
        assert!(
            applied < total,
            "the worker was killed only after everything was applied"
        );
        println!("killed a worker after {applied} applications");
        workers[0] = spawn_worker(&run);
    }
    let mut accepted: HashMap<i32, Vec<(i64, i32)>> = HashMap::new();
    for (writer, child) in producers {
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("PRODUCER DONE"),
            "producer {writer} failed: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let writes: Vec<(i64, i32)> = stdout
            .lines()
            .filter_map(|l| l.strip_prefix("ACCEPTED "))
            .map(|l| {
                let (k, s) = l.split_once(' ').unwrap();
                (k.parse().unwrap(), s.parse().unwrap())
            })
            .collect();
        assert_eq!(writes.len(), WRITES as usize, "producer {writer}");
        accepted.insert(writer, writes);
    }
    let mut control = raw_connection(&redis_url()).await;
    let _: () = control
        .set_ex(cache.full_key("stop"), 1, 600)
        .await
        .unwrap();
    for mut w in workers {
        let out = tokio::task::spawn_blocking(move || {
            let status = w.wait().unwrap();
            let mut stdout = String::new();
            if let Some(mut s) = w.stdout.take() {
                std::io::Read::read_to_string(&mut s, &mut stdout).unwrap();
            }
            (status, stdout)
        })
        .await
        .unwrap();
        assert!(
            out.0.success() && out.1.contains("WORKER DONE"),
            "{}",
            out.1
        );
    }
    let (audit, rows) = (audit(&run).await, db_rows(&run).await);
    assert_eq!(
        check_applied(&audit, &accepted, &rows, |key| key < KEYS / 2, None, true),
        total as usize
    );
    // The coalesced keys: fewer applications than writes.
    let coalesced_writes = accepted
        .values()
        .flatten()
        .filter(|(k, _)| *k >= KEYS / 2)
        .count();
    let coalesced_applied: HashSet<(i32, i32)> = audit
        .iter()
        .filter(|a| a.key >= KEYS / 2)
        .map(|a| (a.writer, a.seq))
        .collect();
    println!(
        "coalescing: {} of {coalesced_writes} writes applied",
        coalesced_applied.len()
    );
    // The cache agrees with the database (or no longer holds the key).
    cache_agrees(cache, &rows).await;
    let depth = write_behind::depth(cache, "pg").await.unwrap();
    assert_eq!(depth.pending, 0, "{depth}");
    assert_eq!(depth.dead, 0, "{depth}");
    drop_run(&run).await;
}

/// A `#[cached]` read right after a `#[write_behind]` call returns the new value, before the
/// database has it; a worker then applies it, with its write id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_after_a_write_sees_it_before_the_database() {
    let run = new_run("ryw").await;
    let cache = register(&run, &redis_url()).await;
    assert_eq!(pg_read(&run, 1).await.unwrap(), None, "no row yet");
    let row = Row::new(0, 1);
    pg_save(run.clone(), 1, row.clone()).await.unwrap();
    assert_eq!(pg_read(&run, 1).await.unwrap(), Some(row.clone()));
    assert!(db_rows(&run).await.is_empty(), "the body has not run yet");
    let f = cache.stats().function("wb_pg_save").cloned().unwrap();
    assert_eq!((f.accepted, f.write_through), (1, 0), "{}", cache.stats());

    let worker = Worker::builder(cache).queues(["pg"]).start().unwrap();
    assert!(worker.flush_for(Duration::from_secs(20)).await);
    worker.shutdown().await;
    assert_eq!(db_rows(&run).await.get(&1), Some(&(0, 1)));
    let audit = audit(&run).await;
    assert_eq!(audit.len(), 1);
    assert!(!audit[0].write_id.is_empty(), "the body saw its write id");
    assert!(audit[0].position.is_some(), "a queued write has a position");
    assert_eq!(pg_read(&run, 1).await.unwrap(), Some(row));
    drop_run(&run).await;
}

/// Writes from 4 tasks while Redis is killed and, later, restarted (with its AOF): calls
/// made while it is down run the body inline (write-through) and return its result; after
/// the restart, the writes queued before the kill are still there and applied. Nothing
/// accepted is lost, and (with the versioned update the README recommends) every key ends
/// on its last write.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_killed_during_writes_falls_back_to_write_through_nothing_lost() {
    let mut server = RedisServer::start_durable();
    let run = new_run("kill").await;
    let cache = register(&run, &server.url()).await;
    let worker = Worker::builder(cache)
        .queues(["pg"])
        .lease(Duration::from_secs(1))
        .start()
        .unwrap();
    let done = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let tasks: Vec<_> = (0..4)
        .map(|writer: i32| {
            let (run, done) = (run.clone(), done.clone());
            tokio::spawn(async move {
                let mut writes = Vec::new();
                for seq in 1..=150 {
                    // Each writer has keys of its own: its writes to one key are sequential.
                    let id = i64::from(writer * 10 + seq % 10);
                    pg_save_versioned(run.clone(), id, Row::new(writer, seq))
                        .await
                        .expect("the call succeeds, queued or inline");
                    writes.push((id, seq));
                    done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(3)).await;
                }
                (writer, writes)
            })
        })
        .collect();
    until(Duration::from_secs(60), "150 writes", || {
        let d = done.clone();
        async move { d.load(std::sync::atomic::Ordering::Relaxed) >= 150 }
    })
    .await;
    server.kill();
    let killed_at = done.load(std::sync::atomic::Ordering::Relaxed);
    until(Duration::from_secs(60), "150 more writes", || {
        let d = done.clone();
        async move { d.load(std::sync::atomic::Ordering::Relaxed) >= killed_at + 150 }
    })
    .await;
    server.restart();
    let mut accepted = HashMap::new();
    for t in tasks {
        let (writer, writes) = t.await.unwrap();
        accepted.insert(writer, writes);
    }
    assert!(
        worker.flush_for(Duration::from_secs(60)).await,
        "the queue did not drain after the restart"
    );
    worker.shutdown().await;
    let f = cache
        .stats()
        .function("wb_pg_save_versioned")
        .cloned()
        .unwrap();
    assert!(
        f.write_through > 0,
        "no call fell back while Redis was down: {}",
        cache.stats()
    );
    assert!(f.accepted > 0, "{}", cache.stats());
    let expected_last: HashMap<i64, (i32, i32)> = accepted
        .iter()
        .flat_map(|(w, writes)| writes.iter().map(move |(k, s)| (*k, (*w, *s))))
        .fold(HashMap::new(), |mut m, (k, v)| {
            let e = m.entry(k).or_insert(v);
            if v.1 > e.1 {
                *e = v;
            }
            m
        });
    let (audit, rows) = (audit(&run).await, db_rows(&run).await);
    // Not in order: a call that fell back to write-through while an older write of its key
    // was still queued overtakes it (documented); the versioned update keeps the last one.
    check_applied(
        &audit,
        &accepted,
        &rows,
        |_| true,
        Some(&expected_last),
        false,
    );
    // The cache agrees with the database (or no longer holds the key): the worker's
    // application of an older queued write did not put its value back over the newer one.
    cache_agrees(cache, &rows).await;
    drop_run(&run).await;
}

/// 500 writes accepted while no worker runs; Redis (AOF, `appendfsync always`) is
/// SIGKILLed and restarted; a worker started afterwards applies all 500, in order. (The
/// test above kills and restarts it mid-run, with a worker applying and callers writing.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_accepted_before_a_redis_crash_are_applied_after_its_restart() {
    let mut server = RedisServer::start_durable();
    let run = new_run("aof").await;
    let cache = register(&run, &server.url()).await;
    let mut writes = Vec::new();
    for seq in 1..=500 {
        let id = i64::from(seq % 50);
        pg_save(run.clone(), id, Row::new(0, seq)).await.unwrap();
        writes.push((id, seq));
    }
    let f = cache.stats().function("wb_pg_save").cloned().unwrap();
    assert_eq!((f.accepted, f.write_through), (500, 0), "{}", cache.stats());
    assert!(db_rows(&run).await.is_empty(), "nothing applied yet");
    server.kill();
    server.restart();
    let worker = Worker::builder(cache).queues(["pg"]).start().unwrap();
    assert!(worker.flush_for(Duration::from_secs(60)).await);
    worker.shutdown().await;
    let expected_last: HashMap<i64, (i32, i32)> =
        writes.iter().map(|(k, s)| (*k, (0, *s))).collect();
    let accepted = HashMap::from([(0, writes)]);
    let (audit, rows) = (audit(&run).await, db_rows(&run).await);
    assert_eq!(
        check_applied(
            &audit,
            &accepted,
            &rows,
            |_| true,
            Some(&expected_last),
            true
        ),
        500
    );
    drop_run(&run).await;
}

/// A write queued before Redis went down, then a newer write of the same key made while it
/// is down (run inline, into the database), then Redis back with its AOF (still holding the
/// older value and its queued write): the older write, applied afterwards, is refused by the
/// versioned body, and the cache ends on the database's newer row, not on the older value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inline_write_during_an_outage_is_not_undone_by_the_cache() {
    let mut server = RedisServer::start_durable();
    let run = new_run("outage").await;
    let cache = register(&run, &server.url()).await;
    pg_save_versioned(run.clone(), 1, Row::new(0, 1))
        .await
        .unwrap();
    server.kill();
    pg_save_versioned(run.clone(), 1, Row::new(0, 2))
        .await
        .unwrap();
    assert_eq!(db_rows(&run).await.get(&1), Some(&(0, 2)), "ran inline");
    server.restart();
    // Once Redis answers, the call's process removes what it still holds for the key.
    until(
        Duration::from_secs(20),
        "the older value is removed",
        || async { matches!(cache.get::<Row>("user:1").await, Ok(None)) },
    )
    .await;
    let worker = Worker::builder(cache).queues(["pg"]).start().unwrap();
    assert!(worker.flush_for(Duration::from_secs(30)).await);
    worker.shutdown().await;
    assert_eq!(
        db_rows(&run).await.get(&1),
        Some(&(0, 2)),
        "the versioned body kept the newer row"
    );
    assert_eq!(
        pg_read(&run, 1).await.unwrap().map(|r| r.seq),
        Some(2),
        "the cache serves the database's row"
    );
    drop_run(&run).await;
}
