//! Fleet-wide stats: every instance publishes its [`Stats`] snapshot to Redis
//! ([`CacheBuilder::publish_stats`](crate::CacheBuilder::publish_stats)), and
//! [`Cache::fleet_stats`](crate::Cache::fleet_stats) sums the live ones, per function.
//!
//! A snapshot is a Redis hash (see `backend::redis::fleet` for the keys): the field `meta`
//! holds the instance's description and the wire version (`v`, now 1), and one field
//! `f:<function>` per function holds its counters, as JSON objects whose every member is
//! optional: a snapshot of the same wire version from a newer or older build decodes, its
//! unknown members ignored and its missing ones zero. A snapshot of another wire version
//! (changed meanings: summing them would mislead), one that does not decode at all (another
//! program's hash, a corrupt one) or a registry member that is not a hash is skipped and
//! counted in [`FleetStats::skipped`]. Counters are summed saturating: a snapshot is whatever
//! Redis holds.

mod publish;
mod wire;

use std::fmt;
use std::time::Duration;

use self::wire::Sum;
use super::{FunctionStats, LOW_HIT_RATE, fmt_duration, rate_cell};
use crate::backend::fleet::RawSnapshot;
use crate::cache::Cache;
use crate::error::Result;

pub(crate) use self::publish::Publisher;
pub use self::publish::publish_now;

/// A snapshot lives this many publish intervals after its publication.
const TTL_INTERVALS: u32 = 3;

/// The registry of instances lives at least this long after the last publish.
const REGISTRY_TTL: Duration = Duration::from_secs(3600);

/// Registry members whose snapshot expired longer ago than this are pruned by publishers,
/// and readers look at members scored this far in the past: a margin for clocks that
/// disagree between hosts. Whether a member is live is decided by Redis (its snapshot
/// hash's TTL), not by its score.
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
    pub(super) fn of(f: &FunctionStats, invalidations: u64) -> Hint {
        // Wide arithmetic: the counters come from Redis and may be anything.
        let w = u128::from;
        if (w(f.backend_errors) + w(f.decode_errors)) * 4 >= w(f.misses) {
            Hint::CacheErrors
        } else if f.loads > 0 && w(f.not_stored) * 2 >= w(f.loads) {
            Hint::NotStored
        } else if f.loads > 0 && w(f.stale_fills) * 10 >= w(f.loads) {
            Hint::InvalidatedWhileLoading
        } else if w(invalidations) * 2 >= w(f.misses) {
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
    pub(crate) queues: Vec<String>,
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

    /// The in-process tiers' clears (see [`Stats::l1_clears`](crate::Stats::l1_clears)), summed.
    pub fn l1_clears(&self) -> u64 {
        self.l1_clears
    }

    /// The write-behind queues of the `#[write_behind]` functions linked into the live
    /// instances' programs (whether or not they were called), sorted: what `cachectl
    /// queue` shows without a queue name.
    pub fn queues(&self) -> &[String] {
        &self.queues
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
            write!(
                f,
                " ({} undecodable snapshot entries skipped)",
                self.skipped
            )?;
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
            let rate = rate_cell(s.hit_rate(), &mut any_low);
            writeln!(
                f,
                "{:<width$}  {:>4}  {:>8}  {:>8}  {:>8}  {:>9}  {:>8}  {:>6}  {:>9}  {:>10}  {:>6}  {:>9}  {}",
                s.name,
                row.instances,
                s.hits.saturating_add(s.misses).saturating_add(s.bypassed),
                s.hits,
                s.misses,
                rate,
                s.loads,
                s.load_errors.saturating_add(s.refresh_errors),
                fmt_duration(s.load_time_mean()),
                s.lock_waits,
                s.evictions,
                s.backend_errors.saturating_add(s.decode_errors),
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

/// The fleet's stats as `cache` sees them (see [`Cache::fleet_stats`]).
pub(crate) async fn read(cache: &Cache) -> Result<FleetStats> {
    let mut sum = Sum::default();
    match cache.store().redis() {
        None => sum.add_stats(&cache.stats()),
        Some(redis) => {
            // The registry's scores are the publishers' clocks: a member is read if its
            // score is within the prune margin of the reader's clock, and the snapshot's
            // Redis TTL decides whether it is live (no hash: gone). A publisher whose clock
            // is behind the reader's by more than three intervals still counts.
            let candidates_after = now_ms().saturating_sub(millis(PRUNE_MARGIN));
            let snapshots = redis
                .fleet_read(cache.namespace(), candidates_after)
                .await?;
            for snapshot in snapshots {
                match snapshot {
                    RawSnapshot::Hash(hash, bad_fields) => {
                        sum.skip(bad_fields);
                        sum.add(&hash);
                    }
                    RawSnapshot::Gone => {}
                    RawSnapshot::Foreign => sum.skip(1),
                }
            }
        }
    }
    Ok(sum.finish())
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
