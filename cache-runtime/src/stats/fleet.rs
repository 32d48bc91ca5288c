//! Fleet-wide stats: every instance publishes its [`Stats`] snapshot to Redis
//! ([`CacheBuilder::publish_stats`](crate::CacheBuilder::publish_stats)), and
//! [`Cache::fleet_stats`](crate::Cache::fleet_stats) sums the live ones, per function.
//!
//! A snapshot is a Redis hash (see `backend::redis::fleet` for the keys): the field `meta`
//! holds the instance's description, and one field `f:<function>` per function holds its
//! counters, as JSON objects whose every member is optional (a newer or older version's
//! snapshot decodes, its unknown members ignored and its missing ones zero). A snapshot
//! that does not decode at all (another program's hash, a corrupt one) is skipped and
//! counted in [`FleetStats::skipped`].

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{FunctionStats, LOW_HIT_RATE, Stats, fmt_duration};
use crate::cache::{Cache, WeakCache};
use crate::error::Result;

/// The version written in a snapshot's `meta`.
const WIRE_VERSION: u32 = 1;

/// A snapshot lives this many publish intervals after its publication.
const TTL_INTERVALS: u32 = 3;

/// The registry of instances lives at least this long after the last publish.
const REGISTRY_TTL: Duration = Duration::from_secs(3600);

/// Registry members whose snapshot expired longer ago than this are pruned by publishers
/// (a margin for clocks that disagree between hosts; a reader skips members whose
/// snapshot is gone anyway).
const PRUNE_MARGIN: Duration = Duration::from_secs(60);

/// The shortest publish interval [`CacheBuilder::publish_stats`](crate::CacheBuilder::publish_stats)
/// accepts.
pub(crate) const MIN_INTERVAL: Duration = Duration::from_millis(100);

/// The likely cause of a low hit rate, from the counters summed over the fleet.
///
/// Each hint is a heuristic over what the counters record, tried in this order; the first
/// that applies is given. The counters do not record which keys were looked up, nor
/// whether a miss found an expired entry or one that never existed, so the last hint
/// cannot tell a short TTL from a volatile key argument: it names both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Hint {
    /// Cache operations failed (`backend_errors + decode_errors` at least a quarter of the
    /// misses): Redis unreachable or slow, the breaker open, or values that do not decode
    /// (another program's data, a changed type without a new `version`). Each of these
    /// makes a lookup a miss.
    CacheErrors,
    /// At least half the loads' results were not stored (`not_stored`): the function
    /// returned errors, `None` without `cache_none`, or a value `unless` rejected, so the
    /// next call misses again.
    NotStored,
    /// At least a tenth of the loads were not stored because their key was written or
    /// invalidated while they ran (`stale_fills`): the keys change about as fast as they
    /// load.
    InvalidatedWhileLoading,
    /// Invalidations in the namespace (`#[cache_evict]` calls and tags invalidated, by every
    /// function of the fleet: the counters do not say which keys they hit) are at least
    /// half this function's misses: high eviction/invalidation.
    HighInvalidation,
    /// None of the above: results are stored and rarely invalidated, yet the keys miss.
    /// Entries expire before they are read again (the TTL is shorter than the re-access
    /// interval), or each call makes a new key (the key includes a volatile argument: a
    /// timestamp, a request id, a float), or the keys are read once each (a long tail).
    NotReread,
}

impl Hint {
    /// The hint as a short phrase (the table's `hint` column).
    pub fn as_str(self) -> &'static str {
        match self {
            Hint::CacheErrors => "cache errors (Redis down/slow or undecodable values)",
            Hint::NotStored => "results not stored (errors, None, unless)",
            Hint::InvalidatedWhileLoading => "keys invalidated while loading",
            Hint::HighInvalidation => "high eviction/invalidation",
            Hint::NotReread => "TTL shorter than re-access interval, or a volatile key argument",
        }
    }

    /// The hint for `f` (a low hit rate), given the fleet's invalidations in the namespace.
    fn of(f: &FunctionStats, invalidations: u64) -> Hint {
        if (f.backend_errors + f.decode_errors) * 4 >= f.misses {
            Hint::CacheErrors
        } else if f.loads > 0 && f.not_stored * 2 >= f.loads {
            Hint::NotStored
        } else if f.loads > 0 && f.stale_fills * 10 >= f.loads {
            Hint::InvalidatedWhileLoading
        } else if invalidations * 2 >= f.misses {
            Hint::HighInvalidation
        } else {
            Hint::NotReread
        }
    }
}

impl fmt::Display for Hint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One function's counters summed over the live instances of a fleet.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct FleetFunction {
    /// The summed counters (`load_time_max` and `lock_wait_max`: the largest of the
    /// instances').
    pub stats: FunctionStats,
    /// How many instances reported this function.
    pub instances: usize,
    /// For a hit rate under [`LOW_HIT_RATE`], the likely cause; `None` otherwise.
    pub hint: Option<Hint>,
}

impl FleetFunction {
    /// The function's label.
    pub fn name(&self) -> &str {
        &self.stats.name
    }

    /// The fleet's hit rate for this function: `hits / (hits + misses)`, or `None` before
    /// the first lookup.
    pub fn hit_rate(&self) -> Option<f64> {
        self.stats.hit_rate()
    }

    /// Whether the fleet's hit rate is under [`LOW_HIT_RATE`] (80%).
    pub fn is_low(&self) -> bool {
        self.stats.is_low()
    }
}

/// The per-function counters of every live instance sharing a namespace, summed, from
/// [`Cache::fleet_stats`](crate::Cache::fleet_stats).
///
/// `Display` prints a table, one row per function, flagging hit rates under 80% with a
/// hint of the likely cause (see [`Hint`]):
///
/// ```text
/// 3 instances
/// function        inst     calls      hits    misses   hit rate     loads  errors   load avg  lock waits  evicts  cache err  hint
/// app::get_user      3      3000      2900       100      96.7%       100       0     1.20ms           2       0          0  -
/// app::search        3       300        60       240    ! 20.0%       240       0    15.00ms           0       0          0  TTL shorter than re-access interval, or a volatile key argument
/// ! hit rate under 80%
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FleetStats {
    pub(crate) functions: Vec<FleetFunction>,
    pub(crate) instances: usize,
    pub(crate) skipped: usize,
    pub(crate) l1_clears: u64,
}

impl FleetStats {
    /// The functions, sorted by name.
    pub fn functions(&self) -> &[FleetFunction] {
        &self.functions
    }

    /// The function labelled `name`.
    pub fn function(&self, name: &str) -> Option<&FleetFunction> {
        self.functions.iter().find(|f| f.stats.name == name)
    }

    /// How many live instances' snapshots were summed.
    pub fn instances(&self) -> usize {
        self.instances
    }

    /// How many snapshots were skipped because they did not decode (another program's
    /// data under the fleet's keys, a corrupt hash), or function entries within a snapshot
    /// that did not.
    pub fn skipped(&self) -> usize {
        self.skipped
    }

    /// The in-process tiers' clears (see [`Stats::l1_clears`]), summed.
    pub fn l1_clears(&self) -> u64 {
        self.l1_clears
    }

    /// The functions whose fleet hit rate is under 80%.
    pub fn low_hit_rate(&self) -> impl Iterator<Item = &FleetFunction> {
        self.functions.iter().filter(|f| f.is_low())
    }
}

impl fmt::Display for FleetStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = if self.instances == 1 { "" } else { "s" };
        write!(f, "{} instance{s}", self.instances)?;
        if self.skipped > 0 {
            write!(f, " ({} undecodable snapshot entries skipped)", self.skipped)?;
        }
        writeln!(f)?;
        let width = self
            .functions
            .iter()
            .map(|s| s.stats.name.chars().count())
            .max()
            .unwrap_or(0)
            .max("function".len());
        writeln!(
            f,
            "{:<width$}  {:>4}  {:>8}  {:>8}  {:>8}  {:>9}  {:>8}  {:>6}  {:>9}  {:>10}  {:>6}  {:>9}  hint",
            "function",
            "inst",
            "calls",
            "hits",
            "misses",
            "hit rate",
            "loads",
            "errors",
            "load avg",
            "lock waits",
            "evicts",
            "cache err",
        )?;
        let mut any_low = false;
        for row in &self.functions {
            let s = &row.stats;
            let rate = match s.hit_rate() {
                None => "-".to_owned(),
                Some(r) if r < LOW_HIT_RATE => {
                    any_low = true;
                    format!("! {:.1}%", r * 100.0)
                }
                Some(r) => format!("{:.1}%", r * 100.0),
            };
            writeln!(
                f,
                "{:<width$}  {:>4}  {:>8}  {:>8}  {:>8}  {:>9}  {:>8}  {:>6}  {:>9}  {:>10}  {:>6}  {:>9}  {}",
                s.name,
                row.instances,
                s.hits + s.misses + s.bypassed,
                s.hits,
                s.misses,
                rate,
                s.loads,
                s.load_errors + s.refresh_errors,
                fmt_duration(s.load_time_mean()),
                s.lock_waits,
                s.evictions,
                s.backend_errors + s.decode_errors,
                row.hint.map_or("-", Hint::as_str),
            )?;
        }
        if any_low {
            writeln!(f, "! hit rate under {:.0}%", LOW_HIT_RATE * 100.0)?;
        }
        if self.l1_clears > 0 {
            writeln!(
                f,
                "L1 cleared {} times in all (invalidations may have been missed)",
                self.l1_clears
            )?;
        }
        Ok(())
    }
}

/// A function's counters as published: every member optional, durations in nanoseconds.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default)]
struct Wire {
    hits: u64,
    l1_hits: u64,
    coalesced: u64,
    misses: u64,
    bypassed: u64,
    loads: u64,
    load_errors: u64,
    not_stored: u64,
    load_ns: u64,
    load_max_ns: u64,
    backend_errors: u64,
    decode_errors: u64,
    stale_fills: u64,
    lock_acquired: u64,
    lock_waits: u64,
    lock_wait_ns: u64,
    lock_wait_max_ns: u64,
    takeovers: u64,
    wait_timeouts: u64,
    puts: u64,
    evictions: u64,
    tag_invalidations: u64,
    stale_served: u64,
    refreshes: u64,
    refresh_errors: u64,
    accepted: u64,
    write_through: u64,
    applied: u64,
    retried: u64,
    dead_lettered: u64,
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl Wire {
    fn of(s: &FunctionStats) -> Wire {
        Wire {
            hits: s.hits,
            l1_hits: s.l1_hits,
            coalesced: s.coalesced,
            misses: s.misses,
            bypassed: s.bypassed,
            loads: s.loads,
            load_errors: s.load_errors,
            not_stored: s.not_stored,
            load_ns: nanos(s.load_time_total),
            load_max_ns: nanos(s.load_time_max),
            backend_errors: s.backend_errors,
            decode_errors: s.decode_errors,
            stale_fills: s.stale_fills,
            lock_acquired: s.lock_acquired,
            lock_waits: s.lock_waits,
            lock_wait_ns: nanos(s.lock_wait_total),
            lock_wait_max_ns: nanos(s.lock_wait_max),
            takeovers: s.takeovers,
            wait_timeouts: s.wait_timeouts,
            puts: s.puts,
            evictions: s.evictions,
            tag_invalidations: s.tag_invalidations,
            stale_served: s.stale_served,
            refreshes: s.refreshes,
            refresh_errors: s.refresh_errors,
            accepted: s.accepted,
            write_through: s.write_through,
            applied: s.applied,
            retried: s.retried,
            dead_lettered: s.dead_lettered,
        }
    }

    fn into_stats(self, name: &str) -> FunctionStats {
        FunctionStats {
            name: name.to_owned(),
            hits: self.hits,
            l1_hits: self.l1_hits,
            coalesced: self.coalesced,
            misses: self.misses,
            bypassed: self.bypassed,
            loads: self.loads,
            load_errors: self.load_errors,
            not_stored: self.not_stored,
            load_time_total: Duration::from_nanos(self.load_ns),
            load_time_max: Duration::from_nanos(self.load_max_ns),
            backend_errors: self.backend_errors,
            decode_errors: self.decode_errors,
            stale_fills: self.stale_fills,
            lock_acquired: self.lock_acquired,
            lock_waits: self.lock_waits,
            lock_wait_total: Duration::from_nanos(self.lock_wait_ns),
            lock_wait_max: Duration::from_nanos(self.lock_wait_max_ns),
            takeovers: self.takeovers,
            wait_timeouts: self.wait_timeouts,
            puts: self.puts,
            evictions: self.evictions,
            tag_invalidations: self.tag_invalidations,
            stale_served: self.stale_served,
            refreshes: self.refreshes,
            refresh_errors: self.refresh_errors,
            accepted: self.accepted,
            write_through: self.write_through,
            applied: self.applied,
            retried: self.retried,
            dead_lettered: self.dead_lettered,
        }
    }
}

/// A snapshot's `meta` field.
#[derive(Debug, Serialize, Deserialize)]
struct Meta {
    /// [`WIRE_VERSION`].
    v: u32,
    #[serde(default)]
    host: String,
    #[serde(default)]
    pid: u32,
    #[serde(default)]
    interval_ms: u64,
    #[serde(default)]
    l1_clears: u64,
}

const META: &str = "meta";
const FUNCTION_PREFIX: &str = "f:";

/// The hash fields of `stats`'s snapshot.
fn encode(stats: &Stats, interval: Duration) -> Vec<(String, Vec<u8>)> {
    let meta = Meta {
        v: WIRE_VERSION,
        host: hostname(),
        pid: std::process::id(),
        interval_ms: u64::try_from(interval.as_millis()).unwrap_or(u64::MAX),
        l1_clears: stats.l1_clears,
    };
    let mut fields = Vec::with_capacity(stats.functions.len() + 1);
    // Serializing plain structs of numbers and strings to JSON cannot fail.
    if let Ok(meta) = serde_json::to_vec(&meta) {
        fields.push((META.to_owned(), meta));
    }
    for f in &stats.functions {
        if let Ok(counters) = serde_json::to_vec(&Wire::of(f)) {
            fields.push((format!("{FUNCTION_PREFIX}{}", f.name), counters));
        }
    }
    fields
}

/// Sums decoded snapshots.
#[derive(Default)]
struct Sum {
    functions: BTreeMap<String, (FunctionStats, usize)>,
    instances: usize,
    skipped: usize,
    l1_clears: u64,
}

impl Sum {
    /// Adds one instance's snapshot hash; a hash without a decodable `meta` of a known
    /// version is skipped whole, a function field that does not decode alone.
    fn add(&mut self, hash: &HashMap<String, Vec<u8>>) {
        let meta = hash
            .get(META)
            .and_then(|m| serde_json::from_slice::<Meta>(m).ok())
            .filter(|m| m.v == WIRE_VERSION);
        let Some(meta) = meta else {
            self.skipped += 1;
            return;
        };
        self.instances += 1;
        self.l1_clears += meta.l1_clears;
        for (field, value) in hash {
            let Some(name) = field.strip_prefix(FUNCTION_PREFIX) else {
                continue;
            };
            match serde_json::from_slice::<Wire>(value) {
                Ok(wire) => self.add_function(wire.into_stats(name)),
                Err(_) => self.skipped += 1,
            }
        }
    }

    fn add_stats(&mut self, stats: &Stats) {
        self.instances += 1;
        self.l1_clears += stats.l1_clears;
        for f in &stats.functions {
            self.add_function(f.clone());
        }
    }

    fn add_function(&mut self, f: FunctionStats) {
        match self.functions.get_mut(&f.name) {
            None => {
                self.functions.insert(f.name.clone(), (f, 1));
            }
            Some((sum, n)) => {
                add(sum, &f);
                *n += 1;
            }
        }
    }

    fn finish(self) -> FleetStats {
        let invalidations: u64 = self
            .functions
            .values()
            .map(|(f, _)| f.evictions + f.tag_invalidations)
            .sum();
        let functions = self
            .functions
            .into_values()
            .map(|(stats, instances)| FleetFunction {
                hint: stats.is_low().then(|| Hint::of(&stats, invalidations)),
                stats,
                instances,
            })
            .collect();
        FleetStats {
            functions,
            instances: self.instances,
            skipped: self.skipped,
            l1_clears: self.l1_clears,
        }
    }
}

/// Adds `b`'s counters to `a` (maxima: the larger).
fn add(a: &mut FunctionStats, b: &FunctionStats) {
    a.hits += b.hits;
    a.l1_hits += b.l1_hits;
    a.coalesced += b.coalesced;
    a.misses += b.misses;
    a.bypassed += b.bypassed;
    a.loads += b.loads;
    a.load_errors += b.load_errors;
    a.not_stored += b.not_stored;
    a.load_time_total += b.load_time_total;
    a.load_time_max = a.load_time_max.max(b.load_time_max);
    a.backend_errors += b.backend_errors;
    a.decode_errors += b.decode_errors;
    a.stale_fills += b.stale_fills;
    a.lock_acquired += b.lock_acquired;
    a.lock_waits += b.lock_waits;
    a.lock_wait_total += b.lock_wait_total;
    a.lock_wait_max = a.lock_wait_max.max(b.lock_wait_max);
    a.takeovers += b.takeovers;
    a.wait_timeouts += b.wait_timeouts;
    a.puts += b.puts;
    a.evictions += b.evictions;
    a.tag_invalidations += b.tag_invalidations;
    a.stale_served += b.stale_served;
    a.refreshes += b.refreshes;
    a.refresh_errors += b.refresh_errors;
    a.accepted += b.accepted;
    a.write_through += b.write_through;
    a.applied += b.applied;
    a.retried += b.retried;
    a.dead_lettered += b.dead_lettered;
}

/// This host's name (Linux: `/proc/sys/kernel/hostname`; else `$HOSTNAME`), or `unknown`.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// Milliseconds since the Unix epoch.
fn now_ms() -> u64 {
    crate::envelope::now_ms()
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The fleet's stats as `cache` sees them (see [`Cache::fleet_stats`]).
pub(crate) async fn read(cache: &Cache) -> Result<FleetStats> {
    let mut sum = Sum::default();
    match cache.store().redis() {
        None => sum.add_stats(&cache.stats()),
        Some(redis) => {
            let live_after = now_ms();
            let snapshots = redis.fleet_read(cache.namespace(), live_after).await?;
            for (_, hash) in snapshots {
                if let Some(hash) = hash {
                    sum.add(&hash);
                }
            }
        }
    }
    Ok(sum.finish())
}

/// The stats publisher of one cache (see
/// [`CacheBuilder::publish_stats`](crate::CacheBuilder::publish_stats)): a task in the Tokio
/// runtime of the cache's first use, restarted in the runtime of a later use if that one
/// shut down.
pub(crate) struct Publisher {
    interval: Duration,
    /// This instance's id in the fleet: `<host>:<pid>:<random>`.
    id: String,
    /// Whether the task runs (cleared when it ends, however it ends).
    running: Arc<AtomicBool>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl fmt::Debug for Publisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Publisher")
            .field("interval", &self.interval)
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// Clears `running` when the publisher's task ends (its runtime shut down, its cache was
/// dropped).
struct Running(Arc<AtomicBool>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl Publisher {
    pub(crate) fn new(interval: Duration) -> Self {
        Publisher {
            interval,
            id: format!(
                "{}:{}:{}",
                hostname(),
                std::process::id(),
                &crate::store::new_token()[..12]
            ),
            running: Arc::new(AtomicBool::new(false)),
            task: Mutex::new(None),
        }
    }

    /// This instance's id in the fleet.
    pub(crate) fn id(&self) -> &str {
        &self.id
    }

    /// Makes sure the task runs (one atomic load when it does).
    #[inline]
    pub(crate) fn ensure(&self, cache: &Cache) {
        if !self.running.load(Ordering::Acquire) {
            self.start(cache);
        }
    }

    #[cold]
    fn start(&self, cache: &Cache) {
        let mut task = self.task.lock().unwrap_or_else(|e| e.into_inner());
        if self.running.load(Ordering::Acquire) {
            return;
        }
        // A cache used outside a runtime (the memory backend allows it) publishes from the
        // first use inside one.
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if cache.store().redis().is_none() {
            // Nothing to publish to: the memory backend's fleet is this process.
            self.running.store(true, Ordering::Release);
            return;
        }
        self.running.store(true, Ordering::Release);
        let running = Running(self.running.clone());
        *task = Some(handle.spawn(publish_forever(
            cache.downgrade(),
            self.id.clone(),
            self.interval,
            running,
        )));
    }
}

/// Publishes the snapshot of the cache behind `cache` every `interval`, until the cache is
/// dropped or the runtime shuts down. A failed publish is logged (the backend's failure log,
/// at most once per 10 s per kind) and retried at the next tick; it never touches calls.
async fn publish_forever(cache: WeakCache, id: String, interval: Duration, _running: Running) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let ttl = interval * TTL_INTERVALS;
    loop {
        ticks.tick().await;
        let Some(cache) = cache.upgrade() else {
            return;
        };
        let Some(redis) = cache.store().redis() else {
            return;
        };
        let fields = encode(&cache.stats(), interval);
        let now = now_ms();
        let result = redis
            .fleet_publish(
                cache.namespace(),
                &id,
                &fields,
                ttl,
                now.saturating_add(millis(ttl)),
                REGISTRY_TTL.max(ttl),
                now.saturating_sub(millis(PRUNE_MARGIN)),
            )
            .await;
        if let Err(e) = result {
            tracing::debug!(target: "cache_runtime", "fleet stats not published: {e}");
        }
    }
}

/// Publishes `cache`'s snapshot now (tests).
#[doc(hidden)]
pub async fn publish_now(cache: &Cache) -> Result<()> {
    let Some(publisher) = cache.publisher() else {
        return Err(crate::error::Error::config("publish_stats is not set"));
    };
    let Some(redis) = cache.store().redis() else {
        return Ok(());
    };
    let ttl = publisher.interval * TTL_INTERVALS;
    let now = now_ms();
    redis
        .fleet_publish(
            cache.namespace(),
            publisher.id(),
            &encode(&cache.stats(), publisher.interval),
            ttl,
            now.saturating_add(millis(ttl)),
            REGISTRY_TTL.max(ttl),
            now.saturating_sub(millis(PRUNE_MARGIN)),
        )
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::{SiteStats, StatsRegistry};

    fn instance(hits: u64, misses: u64) -> HashMap<String, Vec<u8>> {
        let reg = StatsRegistry::new(1);
        let f = reg.register("app::get");
        f.hits.add(hits);
        f.misses.add(misses);
        f.record_load(Duration::from_millis(3));
        SiteStats::inc(&f.not_stored);
        encode(&reg.snapshot(), Duration::from_secs(5))
            .into_iter()
            .collect()
    }

    #[test]
    fn snapshots_sum_per_function() {
        let mut sum = Sum::default();
        sum.add(&instance(90, 10));
        sum.add(&instance(5, 15));
        let fleet = sum.finish();
        assert_eq!(fleet.instances(), 2);
        let f = fleet.function("app::get").unwrap();
        assert_eq!((f.stats.hits, f.stats.misses, f.instances), (95, 25, 2));
        assert_eq!(f.stats.loads, 2);
        assert_eq!(f.stats.load_time_max, Duration::from_millis(3));
        assert!(f.is_low());
        assert_eq!(f.hint, Some(Hint::NotStored));
        let table = fleet.to_string();
        assert!(table.starts_with("2 instances\n"), "{table}");
        assert!(table.contains("! 79.2%"), "{table}");
        assert!(table.contains(Hint::NotStored.as_str()), "{table}");
    }

    #[test]
    fn undecodable_snapshots_are_skipped_and_counted() {
        let mut sum = Sum::default();
        sum.add(&HashMap::from([("meta".to_owned(), b"{not json".to_vec())]));
        sum.add(&HashMap::from([("x".to_owned(), b"1".to_vec())]));
        let mut partly = instance(1, 0);
        partly.insert("f:app::broken".to_owned(), b"\"x\"".to_vec());
        sum.add(&partly);
        let fleet = sum.finish();
        assert_eq!((fleet.instances(), fleet.skipped()), (1, 3));
        assert!(fleet.function("app::broken").is_none());
        assert_eq!(fleet.function("app::get").unwrap().stats.hits, 1);
    }

    #[test]
    fn hints_follow_the_counters() {
        let low = |f: &mut FunctionStats| {
            f.hits = 10;
            f.misses = 90;
            f.loads = 90;
        };
        let mut f = StatsRegistry::new(1).snapshot().functions.pop();
        assert!(f.is_none());
        let reg = StatsRegistry::new(1);
        reg.register("a");
        f = reg.snapshot().functions.pop();
        let mut f = f.unwrap();
        low(&mut f);
        assert_eq!(Hint::of(&f, 0), Hint::NotReread);
        assert_eq!(Hint::of(&f, 45), Hint::HighInvalidation);
        f.stale_fills = 9;
        assert_eq!(Hint::of(&f, 0), Hint::InvalidatedWhileLoading);
        f.not_stored = 45;
        assert_eq!(Hint::of(&f, 0), Hint::NotStored);
        f.backend_errors = 30;
        assert_eq!(Hint::of(&f, 0), Hint::CacheErrors);
    }
}
