//! The in-process backend, on moka with a TTL per entry.
//!
//! Generations: every write or invalidation gives its key a number from a process-wide
//! counter, so numbers only grow. A read for a fill returns a *ticket*: the counter's value at
//! the read, taken under the key's stripe lock. A fill is stored only if the key's generation
//! is still below its ticket, i.e. nothing wrote or invalidated the key since the read.
//!
//! Generations live in 64 striped maps next to the stripe locks, bounded together by the
//! cache's capacity (at least 64 per stripe): over capacity, a stripe drops its oldest
//! generation and remembers the highest one it dropped as its *floor*, which is the
//! generation of every key it does not keep. A load that read before an invalidation of its
//! key sees, at its fill, that generation or a floor at least as high: rejected. A load whose
//! key was not touched is rejected only if its stripe dropped a generation *newer* than its
//! read, that is, if the stripe cycled through its whole capacity while the function ran.
//!
//! A fill compares and inserts under the key's stripe lock, and writes and invalidations
//! replace the generation under the same lock, so "check, then store" is atomic against them.
//! Hits take no lock.

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use moka::Expiry;

use super::{Backend, BackendResult, Gen, LeaseReply, Leased, OnWait, Read, Stored, Token};

const STRIPES: usize = 64;
/// The least number of generations a stripe keeps, whatever the capacity.
const MIN_PER_STRIPE: usize = 64;

struct Entry {
    value: Stored,
    ttl: Duration,
}

struct PerEntryTtl;

impl Expiry<String, Arc<Entry>> for PerEntryTtl {
    fn expire_after_create(&self, _: &String, value: &Arc<Entry>, _: Instant) -> Option<Duration> {
        Some(value.ttl)
    }

    fn expire_after_update(
        &self,
        _: &String,
        value: &Arc<Entry>,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.ttl)
    }
}

type Hasher = foldhash::fast::RandomState;

/// The generations of the keys of one stripe.
struct Generations {
    current: HashMap<Arc<str>, u64, Hasher>,
    /// Replacements in the order they happened; an entry whose key was replaced again since
    /// is skipped when it reaches the front.
    order: VecDeque<(u64, Arc<str>)>,
    /// The highest generation dropped from this stripe: the generation of every key it does
    /// not keep.
    floor: u64,
    capacity: usize,
}

impl Generations {
    fn new(capacity: usize) -> Self {
        Generations {
            current: HashMap::with_hasher(Hasher::default()),
            order: VecDeque::new(),
            floor: 0,
            capacity,
        }
    }

    fn get(&self, key: &str) -> u64 {
        self.current.get(key).copied().unwrap_or(self.floor)
    }

    /// Gives `key` a generation never used before, dropping the oldest ones over capacity.
    fn bump(&mut self, key: &str) {
        let next = NEXT.fetch_add(1, Ordering::Relaxed);
        let key: Arc<str> = match self.current.get_key_value(key) {
            Some((k, _)) => k.clone(),
            None => Arc::from(key),
        };
        self.current.insert(key.clone(), next);
        self.order.push_back((next, key));
        while self.current.len() > self.capacity {
            let Some((generation, key)) = self.order.pop_front() else {
                break;
            };
            if self.current.get(&*key) == Some(&generation) {
                self.current.remove(&*key);
                self.floor = self.floor.max(generation);
            }
        }
        // Superseded entries: keep the queue within a constant factor of the map.
        if self.order.len() > 2 * self.capacity {
            let current = &self.current;
            self.order.retain(|(g, k)| current.get(&**k) == Some(g));
        }
    }
}

/// The next generation number: every number below it has been handed out.
static NEXT: AtomicU64 = AtomicU64::new(1);

fn ticket(n: u64) -> Gen {
    Gen(Bytes::copy_from_slice(&n.to_le_bytes()))
}

fn ticket_of(generation: &Gen) -> Option<u64> {
    let bytes: [u8; 8] = generation.0.as_ref().try_into().ok()?;
    Some(u64::from_le_bytes(bytes))
}

/// A tag's version and when it expires (it lives as long as its longest-lived entry).
#[derive(Clone, Copy)]
struct TagEntry {
    version: u64,
    expires: Instant,
}

struct TagTtl;

impl Expiry<String, TagEntry> for TagTtl {
    fn expire_after_create(&self, _: &String, tag: &TagEntry, now: Instant) -> Option<Duration> {
        Some(tag.expires.saturating_duration_since(now))
    }

    fn expire_after_update(
        &self,
        _: &String,
        tag: &TagEntry,
        now: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(tag.expires.saturating_duration_since(now))
    }
}

fn tag_version(n: u64) -> Bytes {
    Bytes::copy_from_slice(&n.to_le_bytes())
}

/// Entries live in this process only, up to `max_entries` (moka's TinyLFU eviction), each for
/// its own TTL.
pub(crate) struct MemoryBackend {
    entries: moka::sync::Cache<String, Arc<Entry>, Hasher>,
    /// `stale`: copies of filled values that outlive their entries, dropped with them by
    /// writes and invalidations.
    stale: moka::sync::Cache<String, Arc<Entry>, Hasher>,
    /// Tag versions, bounded like the entries: a tag evicted early gets a new version, so its
    /// entries read as misses.
    tags: moka::sync::Cache<String, TagEntry, Hasher>,
    stripes: Box<[Mutex<Generations>]>,
    hasher: Hasher,
}

impl MemoryBackend {
    pub(crate) fn new(max_entries: u64) -> Self {
        let per_stripe = usize::try_from(max_entries.div_ceil(STRIPES as u64))
            .unwrap_or(usize::MAX)
            .max(MIN_PER_STRIPE);
        MemoryBackend {
            entries: moka::sync::Cache::builder()
                .max_capacity(max_entries)
                .expire_after(PerEntryTtl)
                .build_with_hasher(Hasher::default()),
            stale: moka::sync::Cache::builder()
                .max_capacity(max_entries)
                .expire_after(PerEntryTtl)
                .build_with_hasher(Hasher::default()),
            tags: moka::sync::Cache::builder()
                .max_capacity(max_entries)
                .expire_after(TagTtl)
                .build_with_hasher(Hasher::default()),
            stripes: (0..STRIPES)
                .map(|_| Mutex::new(Generations::new(per_stripe)))
                .collect(),
            hasher: Hasher::default(),
        }
    }

    fn stripe(&self, key: &str) -> MutexGuard<'_, Generations> {
        let i = (self.hasher.hash_one(key) as usize) % STRIPES;
        self.stripes[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A ticket for a load of `key`: taken under the key's stripe lock, so every write or
    /// invalidation of the key is either below it (before) or at or above it (after).
    fn ticket(&self, key: &str) -> Gen {
        let _stripe = self.stripe(key);
        ticket(NEXT.load(Ordering::Relaxed))
    }

    #[cfg(test)]
    fn kept_generations(&self) -> usize {
        self.stripes
            .iter()
            .map(|s| {
                let s = s.lock().unwrap_or_else(|e| e.into_inner());
                s.current.len().max(s.order.len())
            })
            .sum()
    }
}

impl Backend for MemoryBackend {
    async fn read(&self, key: &str) -> BackendResult<Option<Stored>> {
        Ok(self.entries.get(key).map(|e| e.value.clone()))
    }

    async fn read_for_fill(&self, key: &str, _token: &Token) -> BackendResult<Read> {
        Ok(match self.entries.get(key) {
            Some(e) => Read::Hit(e.value.clone()),
            None => Read::Miss(self.ticket(key)),
        })
    }

    async fn replace(&self, key: &str, _token: &Token) -> BackendResult<Gen> {
        Ok(self.ticket(key))
    }

    async fn lease(
        &self,
        key: &str,
        _token: &Token,
        _lease: Duration,
        _on_wait: &OnWait<'_>,
    ) -> BackendResult<LeaseReply> {
        // One process: its coalescing already lets one caller load, and the others wait for
        // it there. The lease is granted at once.
        let answer = match self.read_for_fill(key, &Token::default()).await? {
            Read::Hit(v) => Leased::Hit(v),
            Read::Miss(generation) => Leased::Acquired(generation),
        };
        Ok(LeaseReply {
            answer,
            waited: None,
        })
    }

    async fn release(&self, _key: &str, _token: &str) -> BackendResult<()> {
        // Nothing to give back: no other process waits on a memory lease.
        Ok(())
    }

    async fn fill(
        &self,
        key: &str,
        value: Stored,
        ttl: Duration,
        generation: &Gen,
        _token: Option<&str>,
        keep: Option<Duration>,
    ) -> BackendResult<bool> {
        let stripe = self.stripe(key);
        match ticket_of(generation) {
            Some(ticket) if stripe.get(key) < ticket => {}
            _ => return Ok(false),
        }
        if let Some(keep) = keep {
            self.stale.insert(
                key.to_owned(),
                Arc::new(Entry {
                    value: value.clone(),
                    ttl: keep,
                }),
            );
        }
        self.entries
            .insert(key.to_owned(), Arc::new(Entry { value, ttl }));
        drop(stripe);
        Ok(true)
    }

    async fn read_stale(&self, key: &str) -> BackendResult<Option<Stored>> {
        Ok(self.stale.get(key).map(|e| e.value.clone()))
    }

    async fn write(&self, key: &str, value: Stored, ttl: Duration) -> BackendResult<()> {
        let mut stripe = self.stripe(key);
        stripe.bump(key);
        self.stale.invalidate(key);
        self.entries
            .insert(key.to_owned(), Arc::new(Entry { value, ttl }));
        drop(stripe);
        Ok(())
    }

    async fn invalidate(&self, keys: &[&str]) -> BackendResult<()> {
        for key in keys {
            let mut stripe = self.stripe(key);
            stripe.bump(key);
            self.stale.invalidate(*key);
            self.entries.invalidate(*key);
        }
        Ok(())
    }

    async fn tag_versions(&self, tags: &[&str], ttl: Duration) -> BackendResult<Vec<Bytes>> {
        use moka::ops::compute::Op;
        Ok(tags
            .iter()
            .map(|tag| {
                let entry =
                    self.tags
                        .entry_by_ref(*tag)
                        .and_compute_with(|current| match current {
                            Some(_) => Op::Nop,
                            None => Op::Put(TagEntry {
                                version: NEXT.fetch_add(1, Ordering::Relaxed),
                                expires: Instant::now() + ttl,
                            }),
                        });
                let version = match entry {
                    moka::ops::compute::CompResult::Inserted(e)
                    | moka::ops::compute::CompResult::Unchanged(e)
                    | moka::ops::compute::CompResult::ReplacedWith(e) => e.into_value().version,
                    // Not produced by the closure above; a fresh version is always safe.
                    _ => NEXT.fetch_add(1, Ordering::Relaxed),
                };
                tag_version(version)
            })
            .collect())
    }

    async fn current_tags(
        &self,
        tags: &[&str],
        extend: Option<Duration>,
    ) -> BackendResult<Vec<Option<Bytes>>> {
        use moka::ops::compute::Op;
        Ok(tags
            .iter()
            .map(|tag| match extend {
                None => self.tags.get(*tag).map(|e| tag_version(e.version)),
                Some(ttl) => {
                    let mut version = None;
                    self.tags
                        .entry_by_ref(*tag)
                        .and_compute_with(|current| match current {
                            None => Op::Nop,
                            Some(e) => {
                                let e = *e.value();
                                version = Some(tag_version(e.version));
                                let expires = Instant::now() + ttl;
                                if expires > e.expires {
                                    Op::Put(TagEntry { expires, ..e })
                                } else {
                                    Op::Nop
                                }
                            }
                        });
                    version
                }
            })
            .collect())
    }

    async fn invalidate_tags(&self, tags: &[&str]) -> BackendResult<()> {
        use moka::ops::compute::Op;
        for tag in tags {
            self.tags
                .entry_by_ref(*tag)
                .and_compute_with(|current| match current {
                    None => Op::Nop,
                    Some(e) => Op::Put(TagEntry {
                        version: NEXT.fetch_add(1, Ordering::Relaxed),
                        ..*e.value()
                    }),
                });
        }
        Ok(())
    }

    fn coalesce_reads(&self) -> bool {
        false
    }

    fn shared(&self) -> bool {
        false
    }

    fn keeps_typed(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(s: &'static str) -> Stored {
        Stored::bytes(Bytes::from_static(s.as_bytes()))
    }

    #[tokio::test]
    async fn a_fill_after_an_invalidation_is_rejected() {
        let m = MemoryBackend::new(100);
        let Read::Miss(generation) = m.read_for_fill("k", &Token::default()).await.unwrap() else {
            panic!("empty cache")
        };
        // The key is invalidated while the load runs.
        m.invalidate(&["k"]).await.unwrap();
        let ttl = Duration::from_secs(60);
        assert!(
            !m.fill("k", stored("stale"), ttl, &generation, None, None)
                .await
                .unwrap()
        );
        assert!(m.read("k").await.unwrap().is_none());
        // A load that read after the invalidation fills.
        let Read::Miss(generation) = m.read_for_fill("k", &Token::default()).await.unwrap() else {
            panic!("invalidated")
        };
        assert!(
            m.fill("k", stored("fresh"), ttl, &generation, None, None)
                .await
                .unwrap()
        );
        let v = m.read("k").await.unwrap().unwrap();
        assert_eq!(&v.bytes[..], b"fresh");
    }

    #[tokio::test]
    async fn a_fill_after_a_write_is_rejected() {
        let m = MemoryBackend::new(100);
        let ttl = Duration::from_secs(60);
        let Read::Miss(generation) = m.read_for_fill("k", &Token::default()).await.unwrap() else {
            panic!("empty cache")
        };
        m.write("k", stored("written"), ttl).await.unwrap();
        assert!(
            !m.fill("k", stored("stale"), ttl, &generation, None, None)
                .await
                .unwrap()
        );
        let v = m.read("k").await.unwrap().unwrap();
        assert_eq!(&v.bytes[..], b"written");
    }

    #[tokio::test]
    async fn generations_are_bounded_by_the_capacity() {
        // Regression: one generation per key written or invalidated was kept for 24 h,
        // whatever the capacity (a million invalidations of distinct keys: 355 MiB).
        let m = MemoryBackend::new(1000);
        for i in 0..50_000 {
            m.invalidate(&[&format!("key:{i}")]).await.unwrap();
        }
        let kept = m.kept_generations();
        assert!(
            kept <= 2 * 1000 + STRIPES * MIN_PER_STRIPE * 2,
            "{kept} generations kept"
        );
    }

    #[tokio::test]
    async fn a_dropped_generation_still_rejects_old_fills() {
        let m = MemoryBackend::new(1); // 16 generations per stripe
        let ttl = Duration::from_secs(60);
        let Read::Miss(before) = m.read_for_fill("victim", &Token::default()).await.unwrap() else {
            panic!("empty cache")
        };
        m.invalidate(&["victim"]).await.unwrap();
        // Push the victim's generation out of its stripe (and every other stripe).
        for i in 0..20_000 {
            m.invalidate(&[&format!("other:{i}")]).await.unwrap();
        }
        assert!(
            !m.fill("victim", stored("stale"), ttl, &before, None, None)
                .await
                .unwrap(),
            "a load that read before the invalidation must not fill"
        );
        // A load that starts now fills.
        let Read::Miss(now) = m.read_for_fill("victim", &Token::default()).await.unwrap() else {
            panic!("invalidated")
        };
        assert!(
            m.fill("victim", stored("fresh"), ttl, &now, None, None)
                .await
                .unwrap()
        );
    }

    #[tokio::test]
    async fn writes_to_other_keys_do_not_reject_a_fill() {
        // Regression: a stripe's floor rose whenever it dropped any generation, and a key
        // without a kept generation reads as the floor: every fill of an untouched key failed
        // while other keys were being written.
        let m = MemoryBackend::new(64 * 100); // 100 generations per stripe
        let ttl = Duration::from_secs(60);
        for i in 0..20_000 {
            m.invalidate(&[&format!("old:{i}")]).await.unwrap(); // every stripe full
        }
        let Read::Miss(generation) = m
            .read_for_fill("untouched", &Token::default())
            .await
            .unwrap()
        else {
            panic!("empty cache")
        };
        // While the load runs: far fewer writes per stripe than its capacity.
        for i in 0..1_000 {
            m.invalidate(&[&format!("new:{i}")]).await.unwrap();
        }
        assert!(
            m.fill("untouched", stored("v"), ttl, &generation, None, None)
                .await
                .unwrap(),
            "nothing wrote the key: the fill is stored"
        );
    }
}
