//! The [`Worker`]: applies the queued writes of `#[write_behind]` functions.
//!
//! ```text
//! supervisor (one task)        every lease/4: heartbeat in each queue's `workers`, renew the
//!                              leases held, take free partitions up to ceil(partitions / live
//!                              workers of the queue), and any left free for a tick; give back
//!                              extra ones while another worker is short; extend retention
//! partition task (one per      XGROUP CREATE; XAUTOCLAIM what others held; this consumer's
//!  owned partition)            pending entries; then XREADGROUP .. BLOCK on a connection of
//!                              its own; apply per key in id order (coalesce, retry, dead-letter,
//!                              leave unknown functions pending); re-assert; WB_ACK
//! ```

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio::task::JoinHandle;

mod partition;

use self::partition::run_partition;
use super::handler::{WbFunction, registered};
use super::{QueueDepth, check_queue, depth, streams};
use crate::backend::RedisBackend;
use crate::backend::wb::{PartitionKeys, dead_key, workers_key};
use crate::cache::Cache;
use crate::error::{Error, Result};

/// Entries a partition keeps in memory (pending and not yet applied) before it stops reading
/// new ones: this many batches.
const HELD_BATCHES: usize = 10;

/// The longest `backoff` and `lease` a worker takes.
const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);

/// The longest `poll` a worker takes.
const MAX_POLL: Duration = Duration::from_secs(60);

/// The largest `batch` a worker takes.
const MAX_BATCH: usize = 10_000;

#[derive(Debug, Clone)]
struct Config {
    batch: usize,
    max_attempts: u32,
    backoff_base: Duration,
    backoff_max: Duration,
    lease: Duration,
    poll: Duration,
}

impl Config {
    /// Refuses settings whose arithmetic could overflow (and that make no sense anyway).
    fn validate(&self) -> Result<()> {
        let fail = |what: String| Err(Error::config(format!("write-behind worker: {what}")));
        if self.batch > MAX_BATCH {
            return fail(format!(
                "`batch({})` is over {MAX_BATCH} entries",
                self.batch
            ));
        }
        if self.backoff_max > MAX_DURATION {
            return fail(format!(
                "`backoff(_, {:?})` is over a day",
                self.backoff_max
            ));
        }
        if self.lease > MAX_DURATION {
            return fail(format!("`lease({:?})` is over a day", self.lease));
        }
        if self.poll > MAX_POLL {
            return fail(format!("`poll({:?})` is over a minute", self.poll));
        }
        Ok(())
    }
}

/// Configures and starts a [`Worker`]. Start with [`Worker::builder`].
#[derive(Debug)]
#[must_use = "a builder does nothing until `start` is called"]
pub struct WorkerBuilder {
    cache: Cache,
    queues: Option<Vec<String>>,
    config: Config,
}

/// Applies the queued writes of `#[write_behind]` functions: the body runs with the recorded
/// arguments, in order per key, at least once, with retries and a dead-letter stream. See the
/// [module documentation](super) for the guarantees.
///
/// Any number of processes may run one: each queue is split into partitions, and a worker
/// holds a lease on each partition it applies, taking its fair share
/// (`ceil(partitions / live workers of the queue)`), and any partition nobody else took for a
/// supervisor tick (a quarter of the lease) whatever its share, so no partition stays without
/// an owner; it gives back partitions above its share while another worker of the queue has
/// less than its share. A worker that dies loses its leases when they expire (`lease`,
/// 10 s); another takes its partitions over with the entries it was applying.
///
/// Dropping a worker stops its tasks at once (its leases then expire); [`Worker::shutdown`]
/// finishes the entry being applied and gives them back.
///
/// ```no_run
/// use cache_runtime::write_behind::Worker;
/// use std::time::Duration;
///
/// # async fn demo(cache: cache_runtime::Cache) -> Result<(), cache_runtime::Error> {
/// let worker = Worker::builder(&cache)
///     .queues(["users"])
///     .max_attempts(5)
///     .backoff(Duration::from_millis(200), Duration::from_secs(60))
///     .start()?;
/// // on shutdown:
/// worker.flush_for(Duration::from_secs(10)).await;
/// println!("{}", worker.stats().await);
/// worker.shutdown().await;
/// # Ok(()) }
/// ```
pub struct Worker {
    shared: Arc<Shared>,
    supervisor: Option<JoinHandle<()>>,
}

impl fmt::Debug for Worker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Worker")
            .field("name", &self.shared.name)
            .field("queues", &self.shared.queues)
            .finish_non_exhaustive()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // Aborting the supervisor drops its partition tasks' handles, which abort them.
        if let Some(task) = self.supervisor.take() {
            task.abort();
        }
    }
}

struct Shared {
    cache: Cache,
    config: Config,
    /// The consumer name in the groups and the member in `workers`.
    name: String,
    /// The partition leases' value.
    token: String,
    queues: Vec<String>,
    functions: HashMap<String, &'static WbFunction>,
    /// Set by `shutdown`: stop reading, finish the entry being applied, give back.
    stopping: AtomicBool,
    /// Wakes the supervisor (`notify_one`: a wake-up sent while it is busy is kept for its
    /// next wait, not lost).
    wake: Notify,
    /// Entries whose body is running now.
    in_flight: AtomicUsize,
    /// Entries dead-lettered because they could not be read.
    malformed: AtomicU64,
    started: Instant,
}

impl Shared {
    fn redis(&self) -> &RedisBackend {
        // `start` checked it.
        self.cache
            .store()
            .redis()
            .unwrap_or_else(|| unreachable!("a worker is only started on a Redis cache"))
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

/// What the supervisor and a partition task share about the partition.
struct PartitionState {
    /// Until when the lease is known to be held (ms since the worker started).
    lease_until: AtomicU64,
    /// Give the partition back (between entries).
    release: AtomicBool,
    /// The lease was lost: stop without acknowledging more.
    lost: AtomicBool,
    /// The partition holds entries of functions this binary does not have.
    unknown: AtomicBool,
    /// Wakes the partition task (its only waiter) after a flag changed: `notify_one`, so a
    /// wake-up sent while it is busy is kept for its next wait.
    wake: Notify,
}

/// A partition task, aborted when dropped (the supervisor was aborted: the worker dropped).
struct PartitionTask {
    queue: usize,
    partition: u16,
    taken_at: Instant,
    state: Arc<PartitionState>,
    join: JoinHandle<()>,
}

impl Drop for PartitionTask {
    fn drop(&mut self) {
        self.join.abort();
    }
}

impl Worker {
    /// A builder for a worker on `cache` (which must use Redis).
    pub fn builder(cache: &Cache) -> WorkerBuilder {
        WorkerBuilder {
            cache: cache.clone(),
            queues: None,
            config: Config {
                batch: 100,
                max_attempts: 20,
                backoff_base: Duration::from_millis(100),
                backoff_max: Duration::from_secs(30),
                lease: Duration::from_secs(10),
                poll: Duration::from_millis(500),
            },
        }
    }

    /// The queues this worker applies.
    pub fn queues(&self) -> &[String] {
        &self.shared.queues
    }

    /// Waits until every partition of the worker's queues is empty (every entry applied and
    /// acknowledged, or dead-lettered) and no body is running. Dead letters do not count. An
    /// entry of a function no running worker knows keeps it waiting: see
    /// [`Worker::flush_for`].
    pub async fn flush(&self) {
        while !self.drained().await {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// [`Worker::flush`] for at most `limit`: whether the queues were drained.
    pub async fn flush_for(&self, limit: Duration) -> bool {
        tokio::time::timeout(limit, self.flush()).await.is_ok()
    }

    async fn drained(&self) -> bool {
        let streams: Vec<String> = self
            .shared
            .queues
            .iter()
            .flat_map(|q| streams(&self.shared.cache, q))
            .map(|p| p.stream)
            .collect();
        match self.shared.redis().wb_len(&streams).await {
            Ok(0) => self.shared.in_flight.load(SeqCst) == 0,
            _ => false,
        }
    }

    /// Stops: no new entries are read, the entry being applied finishes and is acknowledged,
    /// the partitions are given back (another worker takes them at once) and the worker leaves
    /// the live set.
    pub async fn shutdown(mut self) {
        self.shared.stopping.store(true, SeqCst);
        self.shared.wake.notify_one();
        if let Some(task) = self.supervisor.take() {
            let _ = task.await;
        }
    }

    /// This worker's counters (in this process) for the functions of its queues, and the
    /// depth of its queues (a read of Redis; a queue whose depth cannot be read is left out).
    pub async fn stats(&self) -> WorkerStats {
        let snapshot = self.shared.cache.stats();
        let mut functions: Vec<WorkerFunctionStats> = self
            .shared
            .functions
            .values()
            .filter(|f| self.shared.queues.iter().any(|q| q == f.queue()))
            .map(|f| {
                let s = snapshot.function(f.id());
                WorkerFunctionStats {
                    name: f.id().to_owned(),
                    queue: f.queue().to_owned(),
                    applied: s.map_or(0, |s| s.applied),
                    retried: s.map_or(0, |s| s.retried),
                    dead_lettered: s.map_or(0, |s| s.dead_lettered),
                }
            })
            .collect();
        functions.sort_by(|a, b| a.name.cmp(&b.name));
        let mut queues = Vec::new();
        for q in &self.shared.queues {
            if let Ok(d) = depth(&self.shared.cache, q).await {
                queues.push(d);
            }
        }
        WorkerStats {
            functions,
            queues,
            malformed: self.shared.malformed.load(SeqCst),
        }
    }
}

impl WorkerBuilder {
    /// The queues to apply (default: every queue of every `#[write_behind]` function linked
    /// into the binary).
    pub fn queues<I, S>(mut self, queues: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.queues = Some(queues.into_iter().map(Into::into).collect());
        self
    }

    /// At most this many entries read per partition at once (default 100; at most 10 000).
    pub fn batch(mut self, entries: usize) -> Self {
        self.config.batch = entries.max(1);
        self
    }

    /// After this many failed attempts an entry is dead-lettered (default 20: with the default
    /// backoff, at least about 3 minutes of failures, typically 4 to 5).
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.config.max_attempts = attempts.max(1);
        self
    }

    /// The retry delay after the n-th failure: with `d = min(max, base * 2^(n-1))`, a
    /// delay of `d/2 + random(0..d/2)` (equal jitter: at least half of `d`; default
    /// 100 ms, 30 s; each at most a day).
    pub fn backoff(mut self, base: Duration, max: Duration) -> Self {
        self.config.backoff_base = base;
        self.config.backoff_max = max.max(base);
        self
    }

    /// The partition lease (default 10 s; 100 ms to a day): how long a dead worker's
    /// partitions wait before another worker takes them over. Renewed every quarter of it.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.config.lease = lease.max(Duration::from_millis(100));
        self
    }

    /// How long one blocking read waits for new entries (default 500 ms; at most a minute).
    pub fn poll(mut self, poll: Duration) -> Self {
        self.config.poll = poll.max(Duration::from_millis(1));
        self
    }

    /// Starts the worker's tasks in the current Tokio runtime.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`](crate::ErrorKind::Config): the cache does not use Redis (there is
    /// nothing to apply: memory-backed calls run inline), no Tokio runtime, an invalid queue
    /// name, no queue at all, two `#[write_behind]` functions of its queues with the same
    /// id (give one a `name`), or a setting out of its range (`batch` over 10 000, `backoff`
    /// over a day, `lease` over a day, `poll` over a minute).
    pub fn start(self) -> Result<Worker> {
        if self.cache.store().redis().is_none() {
            return Err(Error::config(
                "a write-behind worker needs a Redis cache (on the memory backend, calls run inline)",
            ));
        }
        self.config.validate()?;
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| Error::config("a write-behind worker starts inside a Tokio runtime"))?;
        let mut queues = match self.queues {
            Some(q) => q,
            None => registered().map(|f| f.queue().to_owned()).collect(),
        };
        queues.sort();
        queues.dedup();
        if queues.is_empty() {
            return Err(Error::config(
                "no write-behind queue: no #[write_behind] function is linked in and none was given",
            ));
        }
        for q in &queues {
            check_queue(q)?;
        }
        let mut functions: HashMap<String, &'static WbFunction> = HashMap::new();
        for f in registered() {
            if let Some(other) = functions.insert(f.id().to_owned(), f) {
                if !std::ptr::eq(other, f)
                    && queues.iter().any(|q| q == f.queue() || q == other.queue())
                {
                    return Err(Error::config(format!(
                        "two #[write_behind] functions have the id `{}`: give one a `name`",
                        f.id()
                    )));
                }
            }
        }
        let token = crate::store::new_token();
        let shared = Arc::new(Shared {
            name: format!("w-{}", &token[..16]),
            token,
            cache: self.cache,
            config: self.config,
            queues,
            functions,
            stopping: AtomicBool::new(false),
            wake: Notify::new(),
            in_flight: AtomicUsize::new(0),
            malformed: AtomicU64::new(0),
            started: Instant::now(),
        });
        let supervisor = runtime.spawn(supervise(shared.clone()));
        Ok(Worker {
            shared,
            supervisor: Some(supervisor),
        })
    }
}

/// A uniformly distributed number in `0..1`.
fn random_unit() -> f64 {
    use std::hash::{BuildHasher, RandomState};
    let bits = RandomState::new().hash_one(Instant::now()) >> 11;
    bits as f64 / (1u64 << 53) as f64
}

/// The delay before retrying after the `failures`-th failure: exponential, equal jitter
/// (`d/2 + random(0..d/2)` with `d = min(max, base * 2^(failures-1))`).
fn backoff(config: &Config, failures: u32) -> Duration {
    let exp = 1u32 << failures.saturating_sub(1).min(20);
    let d = config
        .backoff_base
        .saturating_mul(exp)
        .min(config.backoff_max);
    let half = d / 2;
    half.saturating_add(half.mul_f64(random_unit()))
}

/// How many ticks a partition given back because of unknown functions is not taken again by
/// this worker (another worker, perhaps a newer binary, takes it meanwhile).
const COOLDOWN_TICKS: u64 = 4;

/// A partition with entries of unknown functions is given back (to let a newer binary have
/// it) after being held this many leases, when other workers serve its queue.
const UNKNOWN_RELEASE_LEASES: u32 = 3;

async fn supervise(shared: Arc<Shared>) {
    let redis = shared.redis();
    let config = shared.config.clone();
    let namespace = shared.cache.namespace().to_owned();
    let workers: Vec<String> = shared
        .queues
        .iter()
        .map(|q| workers_key(&namespace, q))
        .collect();
    let partitions = shared.cache.store().wb_config().partitions;
    let retention = shared.cache.store().wb_config().retention;
    let tick = config.lease / 4;
    let mut owned: Vec<PartitionTask> = Vec::new();
    let mut live = vec![1usize; shared.queues.len()];
    let mut ticks = 0u64;
    // (queue, partition) -> the tick it was first seen free.
    let mut free_since: HashMap<(usize, u16), u64> = HashMap::new();
    // (queue, partition) -> the tick until which this worker does not take it.
    let mut cooldown: HashMap<(usize, u16), u64> = HashMap::new();
    while !shared.stopping.load(SeqCst) {
        ticks += 1;
        match redis
            .wb_heartbeat(&workers, &shared.name, config.lease, retention)
            .await
        {
            Ok(n) if n.len() == live.len() => live = n,
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(target: "cache_runtime", "write-behind heartbeat failed: {e}")
            }
        }
        // Tasks that ended (lease lost, given back) are forgotten.
        owned.retain(|t| !t.join.is_finished());
        // Renew what is held.
        let owners: Vec<String> = owned
            .iter()
            .map(|t| PartitionKeys::new(&namespace, &shared.queues[t.queue], t.partition).owner)
            .collect();
        let owner_refs: Vec<&str> = owners.iter().map(String::as_str).collect();
        let asked = shared.now_ms();
        match redis
            .wb_renew(&owner_refs, &shared.token, config.lease)
            .await
        {
            Ok(held) => {
                for (t, held) in owned.iter().zip(held) {
                    if held {
                        t.state
                            .lease_until
                            .store(asked.saturating_add(millis(config.lease)), SeqCst);
                    } else {
                        t.state.lost.store(true, SeqCst);
                        t.state.wake.notify_one();
                    }
                }
            }
            Err(e) => {
                tracing::debug!(target: "cache_runtime", "write-behind lease renewal failed: {e}")
            }
        }
        // Keep the queues alive while a worker polls them.
        let mut touch: Vec<String> = shared
            .queues
            .iter()
            .map(|q| dead_key(&namespace, q))
            .collect();
        for t in &owned {
            let keys = PartitionKeys::new(&namespace, &shared.queues[t.queue], t.partition);
            touch.push(keys.stream);
            touch.push(keys.tries);
        }
        if let Err(e) = redis.wb_touch(&touch, retention).await {
            tracing::debug!(target: "cache_runtime", "write-behind retention renewal failed: {e}");
        }
        for (qi, queue) in shared.queues.iter().enumerate() {
            balance(
                &shared,
                &mut owned,
                Queue {
                    index: qi,
                    name: queue,
                    live: live[qi],
                    partitions,
                    ticks,
                },
                &mut free_since,
                &mut cooldown,
            )
            .await;
        }
        cooldown.retain(|_, until| *until > ticks);
        tokio::select! {
            () = tokio::time::sleep(tick) => {}
            () = shared.wake.notified() => {}
        }
    }
    // Shutdown: every partition finishes its entry, acknowledges and gives its lease back.
    for t in &owned {
        t.state.release.store(true, SeqCst);
        t.state.wake.notify_one();
    }
    for t in &mut owned {
        let _ = (&mut t.join).await;
    }
    if let Err(e) = redis.wb_leave(&workers, &shared.name).await {
        tracing::debug!(target: "cache_runtime", "write-behind leave failed: {e}");
    }
}

/// One queue, as the supervisor balances it.
struct Queue<'a> {
    index: usize,
    name: &'a str,
    /// Live workers serving it (this one included).
    live: usize,
    partitions: u16,
    ticks: u64,
}

/// Fair share, work-conserving: takes free partitions up to `ceil(partitions / live)`, and
/// any partition that stayed free for a whole tick whatever the share (nobody else took it:
/// a partition is never left without an owner because of the share); gives back partitions
/// above the share (held for at least a lease) only while some live worker of the queue
/// holds less than `floor(partitions / live)`; gives back a partition stuck on unknown
/// functions every few leases when other workers serve the queue.
async fn balance(
    shared: &Arc<Shared>,
    owned: &mut Vec<PartitionTask>,
    q: Queue<'_>,
    free_since: &mut HashMap<(usize, u16), u64>,
    cooldown: &mut HashMap<(usize, u16), u64>,
) {
    let redis = shared.redis();
    let config = &shared.config;
    let namespace = shared.cache.namespace();
    let keys: Vec<PartitionKeys> = (0..q.partitions)
        .map(|p| PartitionKeys::new(namespace, q.name, p))
        .collect();
    let owner_keys: Vec<String> = keys.iter().map(|k| k.owner.clone()).collect();
    let holders = match redis.wb_owners(&owner_keys).await {
        Ok(h) if h.len() == keys.len() => h,
        Ok(_) => return,
        Err(e) => {
            tracing::debug!(target: "cache_runtime", "write-behind lease read failed: {e}");
            return;
        }
    };
    let share = usize::from(q.partitions).div_ceil(q.live);
    let floor = usize::from(q.partitions) / q.live;
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for h in holders.iter().flatten() {
        *counts.entry(h.as_str()).or_default() += 1;
    }
    let starved = q.live > counts.len() || counts.values().any(|&n| n < floor);
    let held_long = |t: &PartitionTask, leases: u32| {
        t.taken_at.elapsed() >= config.lease.saturating_mul(leases)
    };
    // Unknown functions: let another worker (a newer binary) have the partition.
    if q.live > 1 {
        for t in owned.iter() {
            if t.queue == q.index
                && t.state.unknown.load(SeqCst)
                && !t.state.release.load(SeqCst)
                && held_long(t, UNKNOWN_RELEASE_LEASES)
            {
                t.state.release.store(true, SeqCst);
                t.state.wake.notify_one();
                cooldown.insert((q.index, t.partition), q.ticks + COOLDOWN_TICKS);
            }
        }
    }
    let mine: Vec<usize> = owned
        .iter()
        .enumerate()
        .filter(|(_, t)| t.queue == q.index && !t.state.release.load(SeqCst))
        .map(|(i, _)| i)
        .collect();
    if mine.len() > share && starved {
        let extra = mine.len() - share;
        for &i in mine
            .iter()
            .filter(|&&i| held_long(&owned[i], 1))
            .take(extra)
        {
            owned[i].state.release.store(true, SeqCst);
            owned[i].state.wake.notify_one();
        }
    }
    let mut want = share.saturating_sub(mine.len());
    let start = (random_unit() * f64::from(q.partitions)) as u16 % q.partitions;
    for i in 0..q.partitions {
        let p = (start + i) % q.partitions;
        let at = (q.index, p);
        if owned.iter().any(|t| t.queue == q.index && t.partition == p) {
            free_since.remove(&at);
            continue;
        }
        let free = match &holders[usize::from(p)] {
            None => true,
            // Ours without a task (it stopped while a renewal failed).
            Some(h) => *h == shared.token,
        };
        if !free {
            free_since.remove(&at);
            continue;
        }
        let since = *free_since.entry(at).or_insert(q.ticks);
        let orphaned = since < q.ticks;
        if cooldown.contains_key(&at) || (want == 0 && !orphaned) {
            continue;
        }
        let asked = shared.now_ms();
        match redis
            .wb_take(&keys[usize::from(p)].owner, &shared.token, config.lease)
            .await
        {
            Ok(true) => {
                free_since.remove(&at);
                want = want.saturating_sub(1);
                let state = Arc::new(PartitionState {
                    lease_until: AtomicU64::new(asked.saturating_add(millis(config.lease))),
                    release: AtomicBool::new(false),
                    lost: AtomicBool::new(false),
                    unknown: AtomicBool::new(false),
                    wake: Notify::new(),
                });
                let join = tokio::spawn(run_partition(
                    shared.clone(),
                    q.name.to_owned(),
                    keys[usize::from(p)].clone(),
                    state.clone(),
                ));
                owned.push(PartitionTask {
                    queue: q.index,
                    partition: p,
                    taken_at: Instant::now(),
                    state,
                    join,
                });
            }
            Ok(false) => {
                free_since.remove(&at);
            }
            Err(e) => {
                tracing::debug!(target: "cache_runtime", "write-behind lease failed: {e}");
                return;
            }
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A worker's counters and the depth of its queues: [`Worker::stats`]. `Display` prints a
/// table:
///
/// ```text
/// write-behind worker      queue   applied  retried     dead
/// app::save_user           users        98        3        0
/// queue users: 2 pending (oldest 0.1s), 0 dead
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkerStats {
    /// The functions of the worker's queues, by name.
    pub functions: Vec<WorkerFunctionStats>,
    /// The depth of each of the worker's queues.
    pub queues: Vec<QueueDepth>,
    /// Entries this worker moved to the dead letters because they could not be read (fields
    /// that do not parse, no function or key, no arguments or write id), whatever their
    /// function (those of a known function are also in its `dead_lettered`).
    pub malformed: u64,
}

/// One function's counters in [`WorkerStats`] (this process's).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkerFunctionStats {
    /// The function's id (its `name`, else its path).
    pub name: String,
    /// Its queue.
    pub queue: String,
    /// Entries applied.
    pub applied: u64,
    /// Failed attempts retried.
    pub retried: u64,
    /// Entries moved to the dead letters.
    pub dead_lettered: u64,
}

impl fmt::Display for WorkerStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let width = self
            .functions
            .iter()
            .map(|s| s.name.chars().count())
            .max()
            .unwrap_or(0)
            .max("write-behind worker".len());
        let qw = self
            .functions
            .iter()
            .map(|s| s.queue.len())
            .max()
            .unwrap_or(0)
            .max("queue".len());
        writeln!(
            f,
            "{:<width$}  {:<qw$}  {:>8}  {:>8}  {:>8}",
            "write-behind worker", "queue", "applied", "retried", "dead"
        )?;
        for s in &self.functions {
            writeln!(
                f,
                "{:<width$}  {:<qw$}  {:>8}  {:>8}  {:>8}",
                s.name, s.queue, s.applied, s.retried, s.dead_lettered
            )?;
        }
        for q in &self.queues {
            writeln!(f, "{q}")?;
        }
        if self.malformed > 0 {
            writeln!(f, "malformed entries dead-lettered: {}", self.malformed)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_capped_and_jittered() {
        let config = Config {
            batch: 1,
            max_attempts: 3,
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(1),
            lease: Duration::from_secs(1),
            poll: Duration::from_millis(10),
        };
        for n in 1..40 {
            let d = backoff(&config, n);
            let full =
                (Duration::from_millis(100) * (1 << (n - 1).min(20))).min(Duration::from_secs(1));
            assert!(d <= full, "{n}: {d:?}");
            assert!(d >= full / 2, "equal jitter: at least half: {n}: {d:?}");
        }
        let defaults = Worker::builder(&crate::Cache::memory()).config;
        assert_eq!(defaults.max_attempts, 20);
        assert_eq!(
            (defaults.backoff_base, defaults.backoff_max),
            (Duration::from_millis(100), Duration::from_secs(30))
        );
        // The default budget rides out an outage of a few minutes.
        let least: Duration = (1..defaults.max_attempts)
            .map(|n| (defaults.backoff_base * (1 << (n - 1).min(20))).min(defaults.backoff_max) / 2)
            .sum();
        assert!(least > Duration::from_secs(170), "{least:?}");
        let distinct: std::collections::HashSet<Duration> =
            (0..20).map(|_| backoff(&config, 5)).collect();
        assert!(distinct.len() > 1, "jittered");
    }
}
