//! Call sites and the lookup of their counters: [`Site`], the static description of one
//! annotated function, and [`StatsRegistry`], one cache's counters with a lock-free index from
//! (site, `Self` type) pairs to them.

use std::collections::HashMap;
use std::ops::Deref;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use super::counters::SiteStats;
use super::{FunctionStats, Stats};

/// The static description of one annotated function, built by the attribute's expansion.
#[doc(hidden)]
#[derive(Debug)]
pub struct Site {
    pub(crate) module: &'static str,
    pub(crate) function: &'static str,
    pub(crate) name: Option<&'static str>,
    pub(crate) ttl: Option<Duration>,
    pub(crate) none_ttl: Option<Duration>,
    pub(crate) cache_none: bool,
    pub(crate) version: Option<u32>,
    pub(crate) lock: Option<Duration>,
    /// `local` / `local = ..`: how long a copy lives in the in-process tier (at most the
    /// entry's own TTL; `Duration::MAX`: as long as the entry).
    pub(crate) local: Option<Duration>,
    /// `stale = ..`: how long a value is kept past its TTL, to be served if a load fails.
    pub(crate) stale: Option<Duration>,
    /// `refresh` / `refresh = "80%"`: when a hit starts a background reload.
    pub(crate) refresh: Option<RefreshPolicy>,
    /// This site's identity in [`StatsRegistry`] lookups, assigned on first use (0: not yet).
    id: AtomicU64,
    /// The counters of the first (cache, `Self` type) pair this site was used with: the
    /// one-comparison fast path of programs with one cache. Set once, never replaced: it
    /// keeps at most one [`SiteStats`] per site alive after its cache is dropped.
    slot: OnceLock<SiteSlot>,
}

/// When a hit on an entry starts its early refresh (`refresh`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RefreshPolicy {
    /// `refresh = "80%"`: once the entry's age is this percentage of the TTL (1 to 99).
    Percent(u8),
    /// `refresh`: probabilistic early expiration (XFetch), from the entry's compute time.
    XFetch,
}

#[derive(Debug)]
struct SiteSlot {
    cache_id: u64,
    self_type: Option<&'static str>,
    stats: Arc<SiteStats>,
}

/// Whether two `type_name` results are the same string object (the same address and
/// length). Equal strings at different addresses compare unequal here; that costs at most
/// one extra index entry, since both resolve to the same label and so to the same counters.
#[inline]
fn same_type(a: Option<&'static str>, b: Option<&'static str>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => std::ptr::eq(a, b),
        _ => false,
    }
}

impl Site {
    /// A site for `module::function`.
    pub const fn new(module: &'static str, function: &'static str) -> Self {
        Site {
            module,
            function,
            name: None,
            ttl: None,
            none_ttl: None,
            cache_none: false,
            version: None,
            lock: None,
            local: None,
            stale: None,
            refresh: None,
            id: AtomicU64::new(0),
            slot: OnceLock::new(),
        }
    }

    /// The `lock` option: the lease length, in milliseconds.
    pub const fn lock_ms(mut self, ms: u64) -> Self {
        self.lock = Some(Duration::from_millis(ms));
        self
    }

    /// The `local` option: the in-process copy's TTL in milliseconds (`u64::MAX`: the
    /// entry's own).
    pub const fn local_ms(mut self, ms: u64) -> Self {
        self.local = Some(if ms == u64::MAX {
            Duration::MAX
        } else {
            Duration::from_millis(ms)
        });
        self
    }

    /// The `stale` option, in milliseconds.
    pub const fn stale_ms(mut self, ms: u64) -> Self {
        self.stale = Some(Duration::from_millis(ms));
        self
    }

    /// The `refresh = "<percent>%"` option (1 to 99; anything else is clamped there).
    pub const fn refresh_percent(mut self, percent: u8) -> Self {
        let percent = if percent == 0 {
            1
        } else if percent > 99 {
            99
        } else {
            percent
        };
        self.refresh = Some(RefreshPolicy::Percent(percent));
        self
    }

    /// The `refresh` flag: probabilistic early expiration (XFetch).
    pub const fn refresh_xfetch(mut self) -> Self {
        self.refresh = Some(RefreshPolicy::XFetch);
        self
    }

    /// The `name` option.
    pub const fn name(mut self, name: &'static str) -> Self {
        self.name = Some(name);
        self
    }

    /// The `ttl` option, in milliseconds.
    pub const fn ttl_ms(mut self, ms: u64) -> Self {
        self.ttl = Some(Duration::from_millis(ms));
        self
    }

    /// The `cache_none` option, with its own TTL in milliseconds if given.
    pub const fn cache_none(mut self, ttl_ms: Option<u64>) -> Self {
        self.cache_none = true;
        if let Some(ms) = ttl_ms {
            self.none_ttl = Some(Duration::from_millis(ms));
        }
        self
    }

    /// The `version` option.
    pub const fn version(mut self, version: u32) -> Self {
        self.version = Some(version);
        self
    }

    pub(crate) fn label(&self, self_type: Option<&str>) -> String {
        match (self.name, self_type) {
            (Some(name), _) => name.to_owned(),
            (None, Some(ty)) => format!("{ty}::{}", self.function),
            (None, None) => format!("{}::{}", self.module, self.function),
        }
    }

    /// This site's registry identity, unique in the process, assigned on first use.
    fn id(&self) -> u64 {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        match self.id.load(Relaxed) {
            0 => {
                let new = NEXT.fetch_add(1, Relaxed);
                match self.id.compare_exchange(0, new, Relaxed, Relaxed) {
                    Ok(_) => new,
                    Err(current) => current,
                }
            }
            id => id,
        }
    }

    /// The counters of this site on `registry`'s cache, for methods of `self_type`.
    ///
    /// Lock-free and allocation-free after the first call with a given (cache, `Self` type)
    /// pair: the first pair the site ever sees is kept in the site itself, every pair is
    /// indexed in the cache's registry (see [`StatsRegistry::site`]). Only a pair's first
    /// call builds its label and takes the registry's mutex.
    pub(crate) fn stats<'a>(
        &'a self,
        registry: &'a StatsRegistry,
        self_type: Option<&'static str>,
    ) -> StatsRef<'a> {
        if let Some(slot) = self.slot.get() {
            if slot.cache_id == registry.cache_id && same_type(slot.self_type, self_type) {
                return StatsRef(&slot.stats);
            }
        }
        let stats = registry.site(self, self_type);
        if self.slot.get().is_none() {
            let _ = self.slot.set(SiteSlot {
                cache_id: registry.cache_id,
                self_type,
                stats: stats.clone(),
            });
        }
        StatsRef(stats)
    }
}

/// The counters of one site on one cache, borrowed from the site or the cache's registry.
pub(crate) struct StatsRef<'a>(&'a SiteStats);

impl Deref for StatsRef<'_> {
    type Target = SiteStats;
    #[inline]
    fn deref(&self) -> &SiteStats {
        self.0
    }
}

/// Buckets of a registry's site index (a power of two).
const INDEX_BUCKETS: usize = 64;

/// One entry of a registry's site index: a (site, `Self` type) pair and its counters.
#[derive(Debug)]
struct IndexNode {
    site_id: u64,
    self_type: Option<&'static str>,
    stats: Arc<SiteStats>,
    /// The next entry of the same bucket: append-only, so readers never lock.
    next: OnceLock<Box<IndexNode>>,
}

fn bucket(site_id: u64, self_type: Option<&'static str>) -> usize {
    let ty = self_type.map_or(0, |t| t.as_ptr() as u64);
    let h = (site_id ^ ty.rotate_left(32)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (h >> (64 - INDEX_BUCKETS.trailing_zeros())) as usize
}

/// The counters of every site used with one cache.
///
/// Counters are keyed by label (the rows of [`Stats`]); `index` maps (site, `Self` type)
/// pairs to them without a lock. The index is a fixed array of buckets, each an append-only
/// chain of `OnceLock`-linked nodes: a reader walks the chain comparing the site's id and the
/// `type_name` pointer, and only a pair's first call appends (building the label and taking
/// `sites`' mutex once). Its size is bounded by the (site, `Self` type) pairs the program
/// uses with this cache, a property of the code, not of the call count, and it is freed
/// with the cache: creating caches in a loop leaks nothing.
#[derive(Debug)]
pub(crate) struct StatsRegistry {
    pub(crate) cache_id: u64,
    /// The cache's namespace: the `cache` label of its metrics.
    namespace: String,
    /// Whether calls' spans carry their key (`CacheBuilder::trace_keys`).
    trace_keys: bool,
    sites: Mutex<HashMap<String, Arc<SiteStats>>>,
    index: Box<[OnceLock<Box<IndexNode>>; INDEX_BUCKETS]>,
    /// Calls of `register`, to check that warm lookups do not take the mutex.
    #[cfg(test)]
    registrations: std::sync::atomic::AtomicUsize,
}

impl StatsRegistry {
    pub(crate) fn new(cache_id: u64) -> Self {
        StatsRegistry {
            cache_id,
            namespace: String::new(),
            trace_keys: false,
            sites: Mutex::new(HashMap::new()),
            index: Box::new(std::array::from_fn(|_| OnceLock::new())),
            #[cfg(test)]
            registrations: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// The registry of the cache with this namespace (the `cache` label of its metrics).
    pub(crate) fn named(mut self, namespace: &str) -> Self {
        namespace.clone_into(&mut self.namespace);
        self
    }

    /// Calls' spans carry their key (`CacheBuilder::trace_keys`).
    pub(crate) fn with_trace_keys(mut self, on: bool) -> Self {
        self.trace_keys = on;
        self
    }

    /// Whether calls' spans carry their key.
    #[inline]
    pub(crate) fn trace_keys(&self) -> bool {
        self.trace_keys
    }

    /// The counters of `site` for methods of `self_type`: lock-free once the pair is indexed.
    fn site(&self, site: &Site, self_type: Option<&'static str>) -> &Arc<SiteStats> {
        let site_id = site.id();
        let mut link = &self.index[bucket(site_id, self_type)];
        loop {
            // Appending blocks only the callers racing to append to the same link, once.
            let node = link.get_or_init(|| {
                Box::new(IndexNode {
                    site_id,
                    self_type,
                    stats: self.register(&site.label(self_type)),
                    next: OnceLock::new(),
                })
            });
            if node.site_id == site_id && same_type(node.self_type, self_type) {
                return &node.stats;
            }
            link = &node.next;
        }
    }

    pub(crate) fn register(&self, label: &str) -> Arc<SiteStats> {
        #[cfg(test)]
        self.registrations.fetch_add(1, Relaxed);
        let mut sites = self.sites.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = sites.get(label) {
            return s.clone();
        }
        let s = Arc::new(SiteStats::new(label, &self.namespace));
        sites.insert(label.to_owned(), s.clone());
        s
    }

    pub(crate) fn snapshot(&self) -> Stats {
        let sites = self.sites.lock().unwrap_or_else(|e| e.into_inner());
        let mut functions: Vec<FunctionStats> =
            sites.iter().map(|(name, s)| s.snapshot(name)).collect();
        functions.sort_by(|a, b| a.name.cmp(&b.name));
        Stats {
            functions,
            l1_clears: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Alpha;
    struct Beta;

    fn registrations(reg: &StatsRegistry) -> usize {
        reg.registrations.load(Relaxed)
    }

    #[test]
    fn site_stats_two_caches_two_self_types_land_in_their_rows() {
        static SITE: Site = Site::new("app", "get");
        let caches = [StatsRegistry::new(101), StatsRegistry::new(102)];
        let types = [
            Some(std::any::type_name::<Alpha>()),
            Some(std::any::type_name::<Beta>()),
            None,
        ];
        // Interleaved: every call switches the cache or the type.
        for round in 0..10u64 {
            for (c, reg) in caches.iter().enumerate() {
                for (t, ty) in types.iter().enumerate() {
                    let stats = SITE.stats(reg, *ty);
                    // A distinct count per (cache, type): 1 + c * 3 + t per round.
                    stats.hits.add(1 + (c * 3 + t) as u64);
                    if round == 0 {
                        SiteStats::inc(&stats.misses);
                    }
                }
            }
        }
        for (c, reg) in caches.iter().enumerate() {
            let snap = reg.snapshot();
            assert_eq!(snap.functions().len(), 3, "{snap}");
            let rows = [
                format!("{}::get", std::any::type_name::<Alpha>()),
                format!("{}::get", std::any::type_name::<Beta>()),
                "app::get".to_owned(),
            ];
            for (t, row) in rows.iter().enumerate() {
                let f = snap
                    .function(row)
                    .unwrap_or_else(|| panic!("{row} in {snap}"));
                assert_eq!(f.hits, 10 * (1 + (c * 3 + t) as u64), "cache {c}, {row}");
                assert_eq!(f.misses, 1, "cache {c}, {row}");
            }
        }
    }

    #[test]
    fn site_stats_warm_lookups_take_no_lock() {
        static SITE: Site = Site::new("app", "warm");
        let caches = [StatsRegistry::new(201), StatsRegistry::new(202)];
        let types = [
            Some(std::any::type_name::<Alpha>()),
            Some(std::any::type_name::<Beta>()),
        ];
        // Warm-up: each pair registers its label once.
        for reg in &caches {
            for ty in types {
                SITE.stats(reg, ty);
            }
        }
        let warm: Vec<usize> = caches.iter().map(registrations).collect();
        assert_eq!(warm, [2, 2]);
        for _ in 0..1000 {
            for reg in &caches {
                for ty in types {
                    SiteStats::inc(&SITE.stats(reg, ty).hits);
                }
            }
        }
        let after: Vec<usize> = caches.iter().map(registrations).collect();
        assert_eq!(after, warm, "a warm lookup went to the registry's mutex");
        assert_eq!(caches[1].snapshot().functions()[0].hits, 1000);
    }

    #[test]
    fn site_stats_index_chains_many_sites_on_one_cache() {
        // More pairs than buckets, so chains are walked and appended to.
        static SITES: [Site; 300] = [const { Site::new("app", "many") }; 300];
        let reg = StatsRegistry::new(301);
        let ty = Some(std::any::type_name::<Alpha>());
        for round in 0..3 {
            for (i, site) in SITES.iter().enumerate() {
                SiteStats::inc(&site.stats(&reg, if i % 2 == 0 { ty } else { None }).hits);
            }
            assert_eq!(registrations(&reg), 300, "round {round}");
        }
        let snap = reg.snapshot();
        // Same label for every site: two rows, all counts in them.
        assert_eq!(snap.functions().len(), 2, "{snap}");
        assert_eq!(snap.functions().iter().map(|f| f.hits).sum::<u64>(), 900);
    }

    #[test]
    fn site_stats_concurrent_first_use_counts_once_per_row() {
        static SITE: Site = Site::new("app", "race");
        let reg = StatsRegistry::new(401);
        let types = [
            Some(std::any::type_name::<Alpha>()),
            Some(std::any::type_name::<Beta>()),
        ];
        std::thread::scope(|s| {
            for t in 0..4 {
                let reg = &reg;
                s.spawn(move || {
                    for i in 0..500 {
                        SiteStats::inc(&SITE.stats(reg, types[(i + t) % 2]).hits);
                    }
                });
            }
        });
        let snap = reg.snapshot();
        assert_eq!(snap.functions().len(), 2, "{snap}");
        assert!(snap.functions().iter().all(|f| f.hits == 1000), "{snap}");
        assert_eq!(registrations(&reg), 2);
    }
}
