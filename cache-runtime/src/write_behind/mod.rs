//! Durable write-behind: `#[write_behind]` functions, and the [`Worker`] that applies their
//! queued writes.
//!
//! A call of a `#[write_behind]` function stores its value in the cache (as `#[cache_put]`
//! does: readers see it at once) and appends its arguments to a Redis Stream, in one atomic
//! step, then returns `Ok(())` without running the body. A [`Worker`], in any number of
//! processes, runs the body later with the recorded arguments.
//!
//! ```no_run
//! # async fn demo(cache: cache_runtime::Cache) -> Result<(), cache_runtime::Error> {
//! use cache_runtime::write_behind::Worker;
//!
//! // In every process that should apply queued writes:
//! let worker = Worker::builder(&cache).start()?;
//! // ...
//! worker.flush().await; // until every queue is drained (tests, shutdown hooks)
//! worker.shutdown().await; // finishes the entry being applied, releases its partitions
//! # Ok(()) }
//! ```
//!
//! # Guarantees
//!
//! * **Nothing accepted is lost.** A write is accepted once the enqueue script ran on Redis;
//!   it stays in its partition's stream until a worker applied it (the body returned `Ok`)
//!   and acknowledged it, or moved it to the queue's dead-letter stream after its last
//!   attempt failed. A worker that dies (or is killed) mid-batch loses its partition leases
//!   when they expire; the next owner claims its pending entries (`XAUTOCLAIM`) and applies
//!   them.
//! * **At least once.** An entry may be applied twice: its worker died after the body ran but
//!   before the acknowledgement, or lost its lease, or an enqueue timed out and the caller
//!   ran the body inline. [`current_id`] gives the body the write's id, the same on every
//!   attempt: make the database write idempotent with it (e.g. record the id in the row,
//!   `UPDATE .. WHERE last_write_id IS DISTINCT FROM $id`, or an audit table keyed by it).
//! * **In order per key.** The writes of one key land in one partition (the CRC16 of the
//!   key), and one worker at a time applies a partition (a lease), in stream order; a key's
//!   later entries wait while an earlier one is retried.
//! * **Coalescing** (unless the function says `coalesce = false`): of consecutive queued
//!   writes of one key by one function that a worker finds waiting together, only the last is
//!   applied (the others are acknowledged with it).
//! * **Retries**: an `Err` or a panic is retried after `d/2 + random(0..d/2)` with
//!   `d = min(max, base * 2^(n-1))` (equal jitter; defaults 100 ms, 30 s); after
//!   `max_attempts` (default 20: at least about 3 minutes of failures, typically 4 to 5) the
//!   entry moves to the queue's dead-letter stream (logged at `warn`, counted in
//!   `dead_lettered`, visible in [`depth`]; [`retry_dead`] moves dead letters back). If the
//!   cache still holds the dead write's value (no later write-behind write of the key was
//!   accepted), the key is invalidated: the cache never keeps a value the database did not
//!   get. Other keys of the partition go on meanwhile.
//! * **Unknown functions**: an entry of a function this binary does not have (an older or
//!   newer binary queued it) stays pending, with one warning per partition and function; its
//!   key's later entries wait behind it; other keys go on. A binary that knows the function
//!   applies it.
//! * **Undecodable entries** (arguments that do not decode into the function's parameters, a
//!   damaged entry): moved to the dead-letter stream at once, with the decoding error
//!   (entries that cannot be read at all are also counted in [`WorkerStats::malformed`]).
//!   A call checks that its arguments decode back before queuing them: ones that serialize
//!   but do not decode (an `f64` NaN becomes `null`) run inline instead.
//! * **Redis down** (the enqueue fails: error, timeout, breaker open): the call runs its body
//!   inline (write-through) and returns its result; counted as `write_through`. Nothing is
//!   queued in memory. So do calls whose arguments do not serialize (or decode back), and
//!   calls with `condition` false or a key that does not render (see
//!   [Ordering](#ordering-versioned-bodies)).
//! * **A value that does not encode** (or whose tags do not render, or whose tag versions
//!   cannot be read): the write is queued all the same, without a value, and the same step
//!   invalidates the key instead of writing it.
//! * **A lease lost while a body runs**: the body is cancelled (its future dropped), nothing
//!   is acknowledged, and the next owner applies the entry again.
//! * **Memory backend**: always write-through inline (there is no durability to promise).
//! * **Read your writes**: the value is in the cache as soon as the call returns; after the
//!   worker applied the write it re-asserts it (puts it back if it was evicted, or replaced by
//!   a fill from a database that did not have the write yet), unless a later write-behind
//!   write of the key was accepted since (on Redis Cluster: stored since, later by queue
//!   position; see [its known limits](#on-redis-cluster)). The key's last write id (`wbl`) lives as long as
//!   the value but at least an hour, so a write that waits in its queue longer than its
//!   value's TTL (up to an hour) is re-asserted too.
//!
//! # Ordering: versioned bodies
//!
//! The worker applies a key's writes in the order they were accepted. A body can still run
//! after a newer write of its key was applied, in these cases:
//!
//! * **replays**: a worker died (or lost its lease) after the body ran but before the
//!   acknowledgement; the next owner applies the entry again, and the entries after it;
//! * **takeovers**: a worker whose lease was lost while a body ran cancels the body (drops
//!   its future) at once, but a statement it already sent may still land after the new
//!   owner's;
//! * **[`retry_dead`]**: a dead letter moved back is applied after the writes of its key that
//!   were accepted after it (they were applied meanwhile);
//! * **fallbacks**: a call whose enqueue failed runs inline, perhaps alongside a queued
//!   write of the same key that a worker applies; and an enqueue that timed out may have
//!   queued the write too.
//!
//! [`WriteId::position`] is THE way to make a body safe against all of them: the entry's
//! stream id at its first `XADD`, increasing per key in acceptance order and the same on
//! every replay, takeover and retry of the dead letter. Store it with the row and never go
//! back:
//!
//! ```text
//! UPDATE users SET name = $3, ver_ms = $1, ver_seq = $2
//!  WHERE id = $4 AND (ver_ms, ver_seq) < ($1, $2)
//! ```
//!
//! An inline run (fallback, memory backend, `condition` false) has no position (`None`):
//! decide for it what your data needs (e.g. write unconditionally, or only when the row has
//! no version).
//!
//! `condition` false and a key that does not render run the body inline, at once, while
//! earlier queued writes of the same key may still wait: do not mix calls with `condition`
//! true and false on one key unless the bodies are versioned.
//!
//! # What you must configure
//!
//! * **Redis persistence**: `appendonly yes` with `appendfsync always` loses nothing accepted
//!   when Redis crashes; `everysec` loses at most the last second. Without AOF, a Redis
//!   restart loses every queued write.
//! * **No eviction of the queues**: `maxmemory-policy noeviction`, or a Redis of their own.
//!   `allkeys-*` and `volatile-*` policies may evict a stream (every key has a TTL).
//! * **Idempotent, versioned bodies** through [`current_id`] and [`WriteId::position`] (see
//!   above).
//! * **Retention** ([`CacheBuilder::write_behind_retention`](crate::CacheBuilder::write_behind_retention),
//!   30 days): a queue that no process writes to or polls for that long is removed. Run a
//!   worker.
//! * **Partitions** ([`CacheBuilder::write_behind_partitions`](crate::CacheBuilder::write_behind_partitions),
//!   16): the same in every process; change only with drained queues (on Redis Cluster a
//!   key's writes in two partitions can also keep a stale value cached: see
//!   [its known limits](#on-redis-cluster)).
//! * A function's identity in the queue is its `name` option, else its path: renaming or
//!   moving it without `name` strands its queued entries (pending, with a warning) until a
//!   binary that knows the old name applies them.
//! * **Renaming a queue** strands its entries too: a worker reads only the queues of the
//!   functions linked into it, or those named in [`WorkerBuilder::queues`]. Keep a worker
//!   on the old queue name (`.queues(["old", "new"])`) until [`depth`] shows it drained.
//! * **Link the functions into the worker binary**: a worker finds the `#[write_behind]`
//!   functions through `inventory` registration, which only sees crates the binary links.
//!   If nothing in the worker's code references the crate that defines them, add
//!   `use that_crate as _;` to the binary; otherwise its queues are not served (or, with
//!   `queues`, their entries stay pending as of unknown functions).
//! * A worker gives a partition stuck on entries of unknown functions back every few leases
//!   when other workers serve its queue, so a newer binary gets to apply them; a key stuck
//!   that way (or waiting for a retry) keeps only a few entries in memory, and other keys
//!   never stop.
//!
//! # On Redis Cluster
//!
//! The value and the queue live in different hash slots, so an accepted call costs three round
//! trips instead of one script: the key's write-behind record is made to exist, the entry is
//! appended (the call has succeeded from here), then the value is stored unless a write queued
//! after it stored its own. The record holds the queue position of the stored value: the
//! worker re-asserts a write after applying it only while no later write of the key was
//! stored, so a crash between the steps leaves at worst the older value until the worker
//! applies the write, not a value the database will not get. Redis replicates
//! asynchronously: a write a failed master acknowledged but had not replicated is lost.
//!
//! Known limits of the cluster path (the single-Redis path, one atomic script whose record
//! names the last accepted write, has neither):
//!
//! * **One key, one stream.** "Later" is decided by comparing queue positions, which are
//!   ordered only within one stream. Two `#[write_behind]` functions with different queues
//!   writing one key, or a change of
//!   [`write_behind_partitions`](crate::CacheBuilder::write_behind_partitions) while old and
//!   new processes run side by side (a rolling deploy), put one key's writes in two streams:
//!   a write accepted later may carry a smaller position and then is neither stored by its
//!   call nor re-asserted by the worker, so the cache keeps the other write's value until the
//!   record expires (the value's TTL, at least an hour) or a write with a greater position
//!   comes. Give a key one queue, and change the partition count only with drained queues.
//! * **Other writers between the steps.** A `#[cache_put]`, `Cache::set`, `#[cache_evict]` or
//!   invalidation of the key that lands after the entry is appended (step 2) and before the
//!   value is stored (step 3) is overwritten by step 3: the cache holds the write-behind
//!   value although the put or eviction came later (if the eviction deleted the row, the
//!   database may never get that value). Mixing `#[write_behind]` and other writers on one
//!   key is not supported on either path (see the re-assert in *Read your writes*); on a
//!   cluster this window comes on top of it.

mod call;
mod handler;
mod worker;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

pub use self::call::{Inline, WriteBehind};
pub use self::handler::{
    Applied, ApplyFn, Applying, ArgsError, ViaDebug, ViaDisplay, ViaName, WbFunction, WbHandler,
    WbOutcome, WbResult, wb_decode,
};
pub use self::worker::{Worker, WorkerBuilder, WorkerFunctionStats, WorkerStats};

use crate::backend::wb::{PartitionKeys, dead_key, now_ms, partition_of};
use crate::cache::Cache;
use crate::error::{Error, Result};

tokio::task_local! {
    pub(crate) static CURRENT: WriteId;
}

/// The id of one write-behind write: `<ms since epoch>-<16 hex random>-<process counter>`,
/// made by the caller, recorded in the queued entry, and the same on every attempt to apply
/// it (see [`current_id`]); with the entry's [`Position`] in its queue when a worker applies
/// it. Two ids are equal when their text is (whatever their positions).
#[derive(Clone)]
pub struct WriteId {
    id: Arc<str>,
    position: Option<Position>,
}

impl WriteId {
    pub(crate) fn generate() -> WriteId {
        use std::sync::atomic::{AtomicU64, Ordering};
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let random = &crate::store::new_token()[..16];
        WriteId {
            id: format!("{}-{random}-{n}", now_ms()).into(),
            position: None,
        }
    }

    pub(crate) fn from_entry(id: &str, position: Option<Position>) -> WriteId {
        WriteId {
            id: id.into(),
            position,
        }
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.id
    }

    /// The write's position in its queue: the stream id its entry got when it was queued
    /// (`XADD`). `Some` when a worker applies the write, the same on every attempt, replay,
    /// takeover and [`retry_dead`]; `None` when the body runs inline (write-through
    /// fallback, memory backend, no key), where the write has no place in the queue.
    ///
    /// Positions increase per key in the order the writes were accepted (a key's writes go
    /// to one partition stream, whose ids increase): a body that stores the position with
    /// the row and refuses to go back (`UPDATE .. WHERE (ver_ms, ver_seq) < ($1, $2)`) is
    /// order-safe against every way an older write can run after a newer one. See the
    /// [module documentation](self#ordering-versioned-bodies).
    pub fn position(&self) -> Option<Position> {
        self.position
    }
}

impl PartialEq for WriteId {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
    }
}

impl Eq for WriteId {}

impl std::hash::Hash for WriteId {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.id.hash(state);
    }
}

impl fmt::Display for WriteId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

impl fmt::Debug for WriteId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.position {
            Some(p) => write!(f, "WriteId({} at {p})", self.id),
            None => write!(f, "WriteId({})", self.id),
        }
    }
}

/// Where a queued write stands in its queue: the Redis Stream id (`<ms>-<seq>`) its entry got
/// when it was first queued. Ordered as the stream is: for one key, a write accepted later
/// has a greater position. See [`WriteId::position`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    ms: u64,
    seq: u64,
}

impl Position {
    /// The position of stream id `<ms>-<seq>`.
    pub const fn new(ms: u64, seq: u64) -> Position {
        Position { ms, seq }
    }

    /// The stream id's milliseconds part (Redis's clock when the write was queued).
    pub const fn ms(&self) -> u64 {
        self.ms
    }

    /// The stream id's sequence part (orders the writes queued in one millisecond).
    pub const fn seq(&self) -> u64 {
        self.seq
    }

    /// Parses `<ms>-<seq>`.
    pub(crate) fn parse(id: &str) -> Option<Position> {
        let (ms, seq) = id.split_once('-')?;
        Some(Position {
            ms: ms.parse().ok()?,
            seq: seq.parse().ok()?,
        })
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// The id of the write whose body is running: inside a `#[write_behind]` body applied by a
/// [`Worker`], or run inline (write-through); `None` elsewhere. The same for every attempt of
/// one write: use it to make the database write idempotent, and its
/// [`position`](WriteId::position) to make it order-safe.
///
/// ```no_run
/// # #[derive(serde::Serialize, serde::Deserialize)] struct User;
/// # async fn update(_: &User, _: &str, _: Option<(u64, u64)>) {}
/// // inside a #[write_behind] function's body:
/// # async fn body(user: User) {
/// let id = cache_runtime::write_behind::current_id().expect("inside a write-behind body");
/// let version = id.position().map(|p| (p.ms(), p.seq())); // None: run inline
/// update(&user, id.as_str(), version).await; // `.. WHERE (ver_ms, ver_seq) < ($2, $3)`
/// # }
/// ```
pub fn current_id() -> Option<WriteId> {
    CURRENT.try_with(Clone::clone).ok()
}

/// How much of a queue is waiting, from [`depth`] (a read of Redis).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueueDepth {
    /// The queue's name.
    pub queue: String,
    /// Entries in its partitions: queued and not yet applied and acknowledged.
    pub pending: u64,
    /// The age of the oldest of them.
    pub oldest: Option<Duration>,
    /// Entries in its dead-letter stream.
    pub dead: u64,
}

impl fmt::Display for QueueDepth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let oldest = match self.oldest {
            None => "-".to_owned(),
            Some(d) => format!("{:.1}s", d.as_secs_f64()),
        };
        write!(
            f,
            "queue {}: {} pending (oldest {oldest}), {} dead",
            self.queue, self.pending, self.dead
        )
    }
}

/// The queues of the `#[write_behind]` functions linked into this program, sorted, each once
/// (published with the fleet stats: see [`FleetStats::queues`](crate::FleetStats::queues)).
pub(crate) fn linked_queues() -> Vec<String> {
    let mut queues: Vec<String> = handler::registered()
        .map(|f| f.queue().to_owned())
        .collect();
    queues.sort_unstable();
    queues.dedup();
    queues
}

/// Whether `queue` is a valid queue name: `[A-Za-z0-9_.-]{1,64}`.
pub(crate) fn valid_queue(queue: &str) -> bool {
    (1..=64).contains(&queue.len())
        && queue
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

fn redis_of(cache: &Cache) -> Result<&crate::backend::RedisBackend> {
    cache
        .store()
        .redis()
        .ok_or_else(|| Error::config("write-behind queues live in Redis: this cache has none"))
}

fn check_queue(queue: &str) -> Result<()> {
    if valid_queue(queue) {
        Ok(())
    } else {
        Err(Error::config(format!(
            "invalid queue name {queue:?}: 1 to 64 of A-Z a-z 0-9 _ . -"
        )))
    }
}

/// The partition streams of `queue` in `cache`'s namespace.
pub(crate) fn streams(cache: &Cache, queue: &str) -> Vec<PartitionKeys> {
    let store = cache.store();
    (0..store.wb_config().partitions)
        .map(|p| PartitionKeys::new(store.namespace(), queue, p))
        .collect()
}

/// How many writes of `queue` wait in Redis, the age of the oldest, and how many are dead
/// letters.
///
/// ```no_run
/// # async fn demo(cache: &cache_runtime::Cache) -> Result<(), cache_runtime::Error> {
/// let depth = cache_runtime::write_behind::depth(cache, "users").await?;
/// println!("{depth}"); // queue users: 12 pending (oldest 0.3s), 0 dead
/// # Ok(()) }
/// ```
///
/// # Errors
///
/// A cache without Redis, an invalid queue name ([`ErrorKind::Config`](crate::ErrorKind)),
/// or Redis failed.
pub async fn depth(cache: &Cache, queue: &str) -> Result<QueueDepth> {
    check_queue(queue)?;
    let redis = redis_of(cache)?;
    let streams: Vec<String> = streams(cache, queue)
        .into_iter()
        .map(|p| p.stream)
        .collect();
    let dead = dead_key(cache.namespace(), queue);
    let (pending, oldest, dead) = redis.wb_depth(&streams, &dead).await?;
    let now = now_ms();
    Ok(QueueDepth {
        queue: queue.to_owned(),
        pending,
        oldest: oldest.map(|ms| Duration::from_millis(now.saturating_sub(ms))),
        dead,
    })
}

/// Moves every dead letter of `queue` back to its partition, with its attempts reset (after
/// the cause was fixed: the database is back, a bug is fixed). Returns how many were moved.
///
/// **Order**: a dead letter goes to the end of its partition: it is applied after every
/// write of its key that was queued meanwhile, including those accepted after it. It keeps
/// its first [`Position`] (recorded in the moved entry), so a versioned body (see
/// [Ordering](self#ordering-versioned-bodies)) refuses it when a newer write of its key was
/// applied; an unversioned body writes the older value over the newer one. Its value is not
/// put back into the cache.
///
/// ```no_run
/// # async fn demo(cache: &cache_runtime::Cache) -> Result<(), cache_runtime::Error> {
/// let moved = cache_runtime::write_behind::retry_dead(cache, "users").await?;
/// # Ok(()) }
/// ```
///
/// # Errors
///
/// A cache without Redis, an invalid queue name, or Redis failed (the dead letters moved
/// until then stay moved).
pub async fn retry_dead(cache: &Cache, queue: &str) -> Result<usize> {
    check_queue(queue)?;
    let redis = redis_of(cache)?;
    let store = cache.store();
    let config = store.wb_config();
    let dead = dead_key(cache.namespace(), queue);
    let mut after = "0-0".to_owned();
    let mut moved = 0;
    loop {
        let letters = redis.wb_dead_letters(&dead, &after, 100).await?;
        let Some(last) = letters.last() else {
            return Ok(moved);
        };
        after = last.id.clone();
        for letter in &letters {
            let Some(key) = letter.field_str("k") else {
                tracing::warn!(
                    target: "cache_runtime",
                    "dead letter {} of queue {queue} has no key; left in place",
                    letter.id
                );
                continue;
            };
            let p = partition_of(key, config.partitions);
            let stream = PartitionKeys::new(store.namespace(), queue, p).stream;
            if redis
                .wb_retry(&dead, &stream, letter, config.retention)
                .await?
            {
                moved += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::__private::{self, Call, CallKey, Site};

    /// The shape of the `#[write_behind]` expansion (docs/design-write-behind.md), on the
    /// memory backend: the body runs inline, with `current_id`, and the value is written.
    #[tokio::test]
    async fn the_expansion_shape_runs_inline_on_memory() {
        async fn save(cache: &Cache, id: u64, name: String) -> Result<(), String> {
            async fn __cache_body(id: u64, name: String) -> Result<(), String> {
                assert!(current_id().is_some());
                if name == "bad" {
                    return Err(format!("refused {id}"));
                }
                Ok(())
            }
            static __CACHE_SITE: Site = Site::new(module_path!(), "save").ttl_ms(60_000);
            fn __cache_apply(args: &[u8]) -> std::result::Result<Applying, ArgsError> {
                let (__a0, __a1): (u64, String) = __private::wb_decode(args)?;
                Ok(Applying::new(async move {
                    __private::wb_outcome!(__cache_body(__a0, __a1).await)
                }))
            }
            static __CACHE_WB: WbFunction =
                WbFunction::new(&__CACHE_SITE, "tests", __cache_apply).coalesce(true);
            __private::inventory::submit! { __private::WbHandler(&__CACHE_WB) }

            let key = format!("user:{id}");
            let mut wb = WriteBehind::new(
                Call {
                    cache,
                    site: &__CACHE_SITE,
                    self_type: None,
                    key: CallKey::Key(cache.full_key(&key).into()),
                },
                &__CACHE_WB,
            );
            wb.begin().await;
            if wb.wants_value() {
                wb.encode(&name);
            }
            wb.args(&(&id, &name));
            match wb.enqueue().await {
                None => Ok(()),
                Some(inline) => inline.run(__cache_body(id, name)).await,
            }
        }
        let cache = Cache::memory();
        save(&cache, 1, "ann".into()).await.unwrap();
        assert_eq!(
            cache.get::<String>("user:1").await.unwrap().as_deref(),
            Some("ann")
        );
        assert_eq!(save(&cache, 2, "bad".into()).await, Err("refused 2".into()));
        assert_eq!(cache.get::<String>("user:2").await.unwrap(), None);
        let stats = cache.stats();
        let f = &stats.functions()[0];
        assert_eq!((f.accepted, f.write_through), (0, 2));
        assert!(current_id().is_none());
        assert!(handler::registered().any(|f| f.id().ends_with("::save") && f.queue() == "tests"));
    }

    #[test]
    fn queue_names_are_checked() {
        assert!(valid_queue("users.v2_a-b"));
        assert!(!valid_queue(""));
        assert!(!valid_queue("a b"));
        assert!(!valid_queue(&"x".repeat(65)));
    }
}
