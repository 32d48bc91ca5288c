//! Per-function statistics: the public [`Stats`] snapshot and its table.
//!
//! This module holds the snapshot types users see ([`Stats`], [`FunctionStats`]) and the
//! `Display` table. The live counters the engine increments are in [`counters`]; call sites
//! ([`Site`]) and each cache's lock-free index from (site, `Self` type) to counters
//! ([`StatsRegistry`]) are in [`site`].

mod counters;
pub(crate) mod fleet;
#[cfg(feature = "metrics")]
pub(crate) mod metrics;
mod site;

use std::fmt;
use std::time::Duration;

pub(crate) use self::counters::{Bypass, SiteStats};
pub use self::site::Site;
pub(crate) use self::site::{RefreshPolicy, StatsRef, StatsRegistry};

/// Hit rates under this are flagged in [`Stats`]'s table and by [`FunctionStats::is_low`].
pub const LOW_HIT_RATE: f64 = 0.80;

/// A table's hit-rate cell: `-` without calls, `! 42.0%` under [`LOW_HIT_RATE`] (which sets
/// `any_low`, for the table's footnote), else `97.5%`.
fn rate_cell(rate: Option<f64>, any_low: &mut bool) -> String {
    match rate {
        None => "-".to_owned(),
        Some(r) if r < LOW_HIT_RATE => {
            *any_low = true;
            format!("! {:.1}%", r * 100.0)
        }
        Some(r) => format!("{:.1}%", r * 100.0),
    }
}

/// One function's counters at the time of [`Cache::stats`](crate::Cache::stats).
///
/// Every call of a cached function is exactly one of: a hit (answered from the cache, including
/// `coalesced` calls that waited for another call's load), a miss (the function ran because
/// nothing usable was cached), or a bypass (`condition` was false).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct FunctionStats {
    /// The function's label: its `name` option, else its path (`crate::module::function` or
    /// `crate::module::Type::method`).
    pub name: String,
    /// Calls answered from the cache: `l1_hits` + [`l2_hits`](FunctionStats::l2_hits) +
    /// `coalesced`.
    pub hits: u64,
    /// Of the hits, calls answered from the in-process tier (`local`), without a round trip.
    pub l1_hits: u64,
    /// Of the hits, calls that waited for a concurrent call's load in this process instead of
    /// running the function.
    pub coalesced: u64,
    /// Calls that ran the function because nothing usable was cached.
    pub misses: u64,
    /// Calls that skipped the cache: `condition` was false, or an argument could not be
    /// rendered into the key (its `Display` or `Serialize` failed).
    pub bypassed: u64,
    /// Times the function ran for a caller (misses and bypasses; background refreshes are
    /// counted in [`refreshes`](FunctionStats::refreshes)).
    pub loads: u64,
    /// Loads that returned `Err` or panicked.
    pub load_errors: u64,
    /// Loads whose result was not stored: an error, a `None` without `cache_none`, `unless`,
    /// or a value that cannot be encoded (its `Serialize` failed, or it holds a NaN or
    /// infinite float).
    pub not_stored: u64,
    /// Total time spent in loads.
    pub load_time_total: Duration,
    /// The slowest load.
    pub load_time_max: Duration,
    /// Cache operations that failed (backend down, timed out, breaker open, write failed).
    pub backend_errors: u64,
    /// Cached values that could not be decoded and were treated as misses.
    pub decode_errors: u64,
    /// Fills that were not stored because the key was written or invalidated while the
    /// function ran (the stale-set race, caught).
    pub stale_fills: u64,
    /// `lock`: times this process took a key's lease and loaded it.
    pub lock_acquired: u64,
    /// `lock`: times this process waited for another process's load of a key (callers
    /// waiting for a load in their own process are `coalesced`).
    pub lock_waits: u64,
    /// `lock`: total time spent waiting.
    pub lock_wait_total: Duration,
    /// `lock`: the longest wait.
    pub lock_wait_max: Duration,
    /// Loads taken over from a holder that did not fill: with `lock`, leases taken after
    /// waiting for another process's holder (its function failed, or it died, hung, or
    /// outlived its lease); with or without `lock`, an in-process load detached after its
    /// callers waited their maximum for it (one per stuck load).
    pub takeovers: u64,
    /// Waits that reached their maximum: with `lock`, a wait for another process's holder
    /// (twice the lease), after which the caller loads without the lease; and any caller's
    /// wait for a stuck load in its own process (three leases with `lock` on Redis, one on
    /// memory, 30 s without `lock`), after which one of them loads again.
    pub wait_timeouts: u64,
    /// `#[cache_put]`: entries written (calls that succeeded and stored their value).
    pub puts: u64,
    /// `#[cache_evict]`: calls that invalidated their keys (counted once per call, `before`
    /// included).
    pub evictions: u64,
    /// `#[cache_evict]`: tags invalidated (one per tag per call).
    pub tag_invalidations: u64,
    /// `stale`: calls whose load failed (an error or a panic) and that returned the value kept
    /// past its TTL instead (the callers that waited for that load got it too, counted as
    /// `coalesced`).
    pub stale_served: u64,
    /// `refresh`: background reloads this process ran (it won the key's refresh, in every
    /// process, and the function started). Not counted in `loads`.
    pub refreshes: u64,
    /// `refresh`: background reloads whose function returned an error or panicked (nothing
    /// was stored, callers kept getting the current value).
    pub refresh_errors: u64,
    /// `#[write_behind]`: calls whose write was accepted (stored in the cache and queued in
    /// Redis; the body runs later, in a worker).
    pub accepted: u64,
    /// `#[write_behind]`: calls that ran their body inline instead (Redis failed, the memory
    /// backend, a `condition` that was false, a key that did not render).
    pub write_through: u64,
    /// `#[write_behind]`: queued writes this process's worker applied (the body succeeded);
    /// every entry of a coalesced run counts (the body ran once, with the last).
    pub applied: u64,
    /// `#[write_behind]`: failed attempts (an `Err` or a panic) this process's worker will
    /// retry.
    pub retried: u64,
    /// `#[write_behind]`: queued writes this process's worker moved to the dead-letter
    /// stream after their last attempt failed (every entry of a coalesced run counts).
    pub dead_lettered: u64,
}

impl FunctionStats {
    /// `hits / (hits + misses)`, or `None` before the first lookup.
    pub fn hit_rate(&self) -> Option<f64> {
        let lookups = u128::from(self.hits) + u128::from(self.misses);
        (lookups > 0).then(|| self.hits as f64 / lookups as f64)
    }

    /// Of the hits, calls answered by a read of the backend (Redis, or the memory backend):
    /// neither from the in-process tier nor from another call's load.
    pub fn l2_hits(&self) -> u64 {
        self.hits
            .saturating_sub(self.l1_hits.saturating_add(self.coalesced))
    }

    /// Mean load time, or `None` before the first load.
    pub fn load_time_mean(&self) -> Option<Duration> {
        (self.loads > 0).then(|| {
            Duration::from_nanos(
                u64::try_from(self.load_time_total.as_nanos() / u128::from(self.loads))
                    .unwrap_or(u64::MAX),
            )
        })
    }

    /// Whether any write-behind counter is non-zero.
    pub fn has_write_behind(&self) -> bool {
        [
            self.accepted,
            self.write_through,
            self.applied,
            self.retried,
            self.dead_lettered,
        ]
        .iter()
        .any(|&n| n > 0)
    }

    /// Whether the hit rate is under [`LOW_HIT_RATE`] (80%).
    pub fn is_low(&self) -> bool {
        self.hit_rate().is_some_and(|r| r < LOW_HIT_RATE)
    }
}

/// A snapshot of every cached function's counters on one [`Cache`](crate::Cache).
///
/// `Display` prints a table, one row per function, flagging hit rates under 80%:
///
/// ```text
/// function              calls     hits  L1 hits  L2 hits   misses   hit rate    loads  errors  stale  refresh   load avg   load max  lock waits    puts  evicts  tag inv  cache err
/// app::get_user             100       90       80       10       10      90.0%       10       0      0        4     1.20ms     2.31ms           3       0       0        0          0
/// app::search                10        2        0        2        8    ! 20.0%        8       3      3        0    15.00ms    19.00ms           0       0       0        0          0
/// app::save_user              0        0        0        0        0          -        0       0      0        0          -          -           0       4       0        0          0
/// app::on_user_updated        0        0        0        0        0          -        0       0      0        0          -          -           0       0       2        2          0
/// ! hit rate under 80%
/// L1 cleared 1 time (invalidations may have been missed)
/// ```
///
/// When a function has write-behind counts, a second table follows:
///
/// ```text
/// write-behind     accepted  write-through   applied   retried      dead
/// app::save_user        100              2        98         3         0
/// ```
///
/// `errors` counts failed loads and failed background refreshes (`load_errors +
/// refresh_errors`); `refresh` counts the background refreshes run (`refreshes`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub(crate) functions: Vec<FunctionStats>,
    pub(crate) l1_clears: u64,
}

impl Stats {
    /// The functions, sorted by name.
    pub fn functions(&self) -> &[FunctionStats] {
        &self.functions
    }

    /// The counters of the function labelled `name`.
    pub fn function(&self, name: &str) -> Option<&FunctionStats> {
        self.functions.iter().find(|f| f.name == name)
    }

    /// How many times the in-process tier (`local`) was cleared because invalidations from
    /// other processes may have been missed (Redis unreachable, the subscription dropped, a
    /// heartbeat unanswered).
    pub fn l1_clears(&self) -> u64 {
        self.l1_clears
    }

    pub(crate) fn with_l1_clears(mut self, clears: u64) -> Self {
        self.l1_clears = clears;
        self
    }

    /// The functions whose hit rate is under 80%.
    pub fn low_hit_rate(&self) -> impl Iterator<Item = &FunctionStats> {
        self.functions.iter().filter(|f| f.is_low())
    }
}

fn fmt_duration(d: Option<Duration>) -> String {
    match d {
        None => "-".to_owned(),
        Some(d) if d < Duration::from_millis(1) => format!("{}µs", d.as_micros()),
        Some(d) if d < Duration::from_secs(10) => format!("{:.2}ms", d.as_secs_f64() * 1e3),
        Some(d) => format!("{:.1}s", d.as_secs_f64()),
    }
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let width = self
            .functions
            .iter()
            .map(|s| s.name.chars().count())
            .max()
            .unwrap_or(0)
            .max("function".len());
        writeln!(
            f,
            "{:<width$}  {:>7}  {:>7}  {:>7}  {:>7}  {:>7}  {:>9}  {:>7}  {:>6}  {:>5}  {:>7}  {:>9}  {:>9}  {:>10}  {:>6}  {:>6}  {:>7}  {:>9}",
            "function",
            "calls",
            "hits",
            "L1 hits",
            "L2 hits",
            "misses",
            "hit rate",
            "loads",
            "errors",
            "stale",
            "refresh",
            "load avg",
            "load max",
            "lock waits",
            "puts",
            "evicts",
            "tag inv",
            "cache err",
        )?;
        let mut any_low = false;
        for s in &self.functions {
            let rate = rate_cell(s.hit_rate(), &mut any_low);
            writeln!(
                f,
                "{:<width$}  {:>7}  {:>7}  {:>7}  {:>7}  {:>7}  {:>9}  {:>7}  {:>6}  {:>5}  {:>7}  {:>9}  {:>9}  {:>10}  {:>6}  {:>6}  {:>7}  {:>9}",
                s.name,
                s.hits.saturating_add(s.misses).saturating_add(s.bypassed),
                s.hits,
                s.l1_hits,
                s.l2_hits(),
                s.misses,
                rate,
                s.loads,
                s.load_errors.saturating_add(s.refresh_errors),
                s.stale_served,
                s.refreshes,
                fmt_duration(s.load_time_mean()),
                fmt_duration((s.loads > 0).then_some(s.load_time_max)),
                s.lock_waits,
                s.puts,
                s.evictions,
                s.tag_invalidations,
                s.backend_errors.saturating_add(s.decode_errors),
            )?;
        }
        if any_low {
            writeln!(f, "! hit rate under {:.0}%", LOW_HIT_RATE * 100.0)?;
        }
        if self.functions.iter().any(FunctionStats::has_write_behind) {
            let width = width.max("write-behind".len());
            writeln!(
                f,
                "{:<width$}  {:>8}  {:>13}  {:>8}  {:>8}  {:>8}",
                "write-behind", "accepted", "write-through", "applied", "retried", "dead"
            )?;
            for s in self.functions.iter().filter(|s| s.has_write_behind()) {
                writeln!(
                    f,
                    "{:<width$}  {:>8}  {:>13}  {:>8}  {:>8}  {:>8}",
                    s.name, s.accepted, s.write_through, s.applied, s.retried, s.dead_lettered
                )?;
            }
        }
        if self.l1_clears > 0 {
            let times = if self.l1_clears == 1 { "time" } else { "times" };
            writeln!(
                f,
                "L1 cleared {} {times} (invalidations may have been missed)",
                self.l1_clears
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_flags_low_hit_rates() {
        let reg = StatsRegistry::new(1);
        let good = reg.register("app::good");
        for _ in 0..9 {
            SiteStats::inc(&good.hits);
        }
        SiteStats::inc(&good.misses);
        good.record_load(Duration::from_millis(2));
        let bad = reg.register("app::bad");
        SiteStats::inc(&bad.hits);
        SiteStats::inc(&bad.misses);
        let stats = reg.snapshot();
        assert_eq!(stats.function("app::good").unwrap().hit_rate(), Some(0.9));
        assert!(stats.function("app::bad").unwrap().is_low());
        let table = stats.to_string();
        assert!(table.contains("90.0%"), "{table}");
        assert!(table.contains("! 50.0%"), "{table}");
        assert!(table.contains("hit rate under 80%"), "{table}");
        assert_eq!(stats.low_hit_rate().count(), 1);
        assert!(
            !table.contains("write-behind"),
            "no write-behind counts: {table}"
        );
    }

    #[test]
    fn table_adds_write_behind_counts_when_there_are_some() {
        let reg = StatsRegistry::new(1);
        let save = reg.register("app::save_user");
        save.wb_accepted.add(100);
        save.wb_write_through.add(2);
        save.wb_applied.add(98);
        save.wb_retried.add(3);
        save.wb_dead_lettered.add(1);
        reg.register("app::get_user");
        let stats = reg.snapshot();
        let f = stats.function("app::save_user").unwrap();
        assert_eq!(
            (
                f.accepted,
                f.write_through,
                f.applied,
                f.retried,
                f.dead_lettered
            ),
            (100, 2, 98, 3, 1)
        );
        assert!(!stats.function("app::get_user").unwrap().has_write_behind());
        let table = stats.to_string();
        let rows: Vec<&str> = table
            .lines()
            .skip_while(|l| !l.starts_with("write-behind"))
            .collect();
        assert_eq!(rows.len(), 2, "{table}");
        let cells: Vec<&str> = rows[1].split_whitespace().collect();
        assert_eq!(
            cells,
            ["app::save_user", "100", "2", "98", "3", "1"],
            "{table}"
        );
    }
}
