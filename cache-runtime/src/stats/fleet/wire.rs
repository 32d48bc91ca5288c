//! A snapshot's wire format (the fields of its Redis hash) and the sum of decoded snapshots.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{FleetFunction, FleetStats, Hint, hostname};
use crate::stats::{FunctionStats, Stats};

/// The version written in a snapshot's `meta`.
const WIRE_VERSION: u32 = 1;

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
    /// The write-behind queues of the functions linked into the program.
    #[serde(default)]
    queues: Vec<String>,
}

const META: &str = "meta";
const FUNCTION_PREFIX: &str = "f:";

/// The hash fields of `stats`'s snapshot.
pub(super) fn encode(stats: &Stats, interval: Duration) -> Vec<(String, Vec<u8>)> {
    let meta = Meta {
        v: WIRE_VERSION,
        host: hostname(),
        pid: std::process::id(),
        interval_ms: u64::try_from(interval.as_millis()).unwrap_or(u64::MAX),
        l1_clears: stats.l1_clears,
        queues: crate::write_behind::linked_queues(),
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
pub(super) struct Sum {
    functions: BTreeMap<String, (FunctionStats, usize)>,
    instances: usize,
    skipped: usize,
    l1_clears: u64,
    queues: BTreeSet<String>,
}

impl Sum {
    /// Counts `n` snapshots or fields that could not be read (see [`FleetStats::skipped`]).
    pub(super) fn skip(&mut self, n: usize) {
        self.skipped = self.skipped.saturating_add(n);
    }

    /// Adds one instance's snapshot hash; a hash without a decodable `meta` of a known
    /// version is skipped whole, a function field that does not decode alone.
    pub(super) fn add(&mut self, hash: &HashMap<String, Vec<u8>>) {
        let meta = hash
            .get(META)
            .and_then(|m| serde_json::from_slice::<Meta>(m).ok())
            .filter(|m| m.v == WIRE_VERSION);
        let Some(meta) = meta else {
            self.skip(1);
            return;
        };
        self.instances = self.instances.saturating_add(1);
        self.l1_clears = self.l1_clears.saturating_add(meta.l1_clears);
        self.queues.extend(meta.queues);
        for (field, value) in hash {
            let Some(name) = field.strip_prefix(FUNCTION_PREFIX) else {
                continue;
            };
            match serde_json::from_slice::<Wire>(value) {
                Ok(wire) => self.add_function(wire.into_stats(name)),
                Err(_) => self.skip(1),
            }
        }
    }

    pub(super) fn add_stats(&mut self, stats: &Stats) {
        self.instances = self.instances.saturating_add(1);
        self.l1_clears += stats.l1_clears;
        self.queues.extend(crate::write_behind::linked_queues());
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
                *n = n.saturating_add(1);
            }
        }
    }

    pub(super) fn finish(self) -> FleetStats {
        let invalidations: u64 = self
            .functions
            .values()
            .map(|(f, _)| f.evictions.saturating_add(f.tag_invalidations))
            .fold(0u64, u64::saturating_add);
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
            queues: self.queues.into_iter().collect(),
        }
    }
}

/// Adds `b`'s counters to `a` (maxima: the larger), saturating: snapshots come from Redis,
/// where anything may have written them.
fn add(a: &mut FunctionStats, b: &FunctionStats) {
    a.hits = a.hits.saturating_add(b.hits);
    a.l1_hits = a.l1_hits.saturating_add(b.l1_hits);
    a.coalesced = a.coalesced.saturating_add(b.coalesced);
    a.misses = a.misses.saturating_add(b.misses);
    a.bypassed = a.bypassed.saturating_add(b.bypassed);
    a.loads = a.loads.saturating_add(b.loads);
    a.load_errors = a.load_errors.saturating_add(b.load_errors);
    a.not_stored = a.not_stored.saturating_add(b.not_stored);
    a.load_time_total = a.load_time_total.saturating_add(b.load_time_total);
    a.load_time_max = a.load_time_max.max(b.load_time_max);
    a.backend_errors = a.backend_errors.saturating_add(b.backend_errors);
    a.decode_errors = a.decode_errors.saturating_add(b.decode_errors);
    a.stale_fills = a.stale_fills.saturating_add(b.stale_fills);
    a.lock_acquired = a.lock_acquired.saturating_add(b.lock_acquired);
    a.lock_waits = a.lock_waits.saturating_add(b.lock_waits);
    a.lock_wait_total = a.lock_wait_total.saturating_add(b.lock_wait_total);
    a.lock_wait_max = a.lock_wait_max.max(b.lock_wait_max);
    a.takeovers = a.takeovers.saturating_add(b.takeovers);
    a.wait_timeouts = a.wait_timeouts.saturating_add(b.wait_timeouts);
    a.puts = a.puts.saturating_add(b.puts);
    a.evictions = a.evictions.saturating_add(b.evictions);
    a.tag_invalidations = a.tag_invalidations.saturating_add(b.tag_invalidations);
    a.stale_served = a.stale_served.saturating_add(b.stale_served);
    a.refreshes = a.refreshes.saturating_add(b.refreshes);
    a.refresh_errors = a.refresh_errors.saturating_add(b.refresh_errors);
    a.accepted = a.accepted.saturating_add(b.accepted);
    a.write_through = a.write_through.saturating_add(b.write_through);
    a.applied = a.applied.saturating_add(b.applied);
    a.retried = a.retried.saturating_add(b.retried);
    a.dead_lettered = a.dead_lettered.saturating_add(b.dead_lettered);
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

    /// Two snapshots whose every counter is `u64::MAX` (anything can be written to Redis):
    /// the sum saturates, the table and the hint are computed, nothing panics.
    #[test]
    fn huge_counters_saturate() {
        let max = u64::MAX;
        let counters: serde_json::Map<String, serde_json::Value> =
            serde_json::to_value(Wire::default())
                .unwrap()
                .as_object()
                .unwrap()
                .keys()
                .map(|k| (k.clone(), serde_json::json!(max)))
                .collect();
        let hash = HashMap::from([
            (
                "meta".to_owned(),
                br#"{"v":1,"l1_clears":18446744073709551615}"#.to_vec(),
            ),
            (
                "f:app::get".to_owned(),
                serde_json::to_vec(&counters).unwrap(),
            ),
        ]);
        let mut sum = Sum::default();
        sum.add(&hash);
        sum.add(&hash);
        let fleet = sum.finish();
        assert_eq!((fleet.instances(), fleet.skipped()), (2, 0));
        assert_eq!(fleet.l1_clears(), max);
        let f = fleet.function("app::get").unwrap();
        assert_eq!((f.stats.hits, f.stats.misses, f.instances), (max, max, 2));
        assert_eq!(f.stats.load_time_total, Duration::from_nanos(max) * 2);
        assert_eq!(f.hit_rate(), Some(0.5));
        assert_eq!(f.hint, Some(Hint::CacheErrors));
        assert_eq!(f.stats.l2_hits(), 0);
        assert!(f.stats.load_time_mean().is_some());
        let table = fleet.to_string();
        assert!(table.contains(&max.to_string()), "{table}");
        let mut stats = crate::Stats::default();
        stats.functions.push(f.stats.clone());
        assert!(stats.to_string().contains(&max.to_string()));
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
