//! The in-process backend, on moka with a TTL per entry.
//!
//! Generations live in a second moka cache, bounded by time only (entries expire
//! `GENERATION_TTL` after their last bump; a size bound would let an eviction forget a bump).
//! A bump takes a number from a process-wide counter, so a generation never repeats. A fill
//! compares the generation and inserts under one of 64 striped locks, and writes and
//! invalidations bump it under the same lock, so "check, then store" is atomic against them.
//! Reads take no lock.

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use moka::Expiry;

use super::{Backend, BackendResult, GENERATION_TTL, Gen, LeaseReply, Read, Stored};

const STRIPES: usize = 64;

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

/// Entries live in this process only, up to `max_entries` (moka's TinyLFU eviction), each for
/// its own TTL.
pub(crate) struct MemoryBackend {
    entries: moka::sync::Cache<String, Arc<Entry>, Hasher>,
    generations: moka::sync::Cache<String, u64, Hasher>,
    stripes: Box<[Mutex<()>]>,
    hasher: Hasher,
}

impl MemoryBackend {
    pub(crate) fn new(max_entries: u64) -> Self {
        MemoryBackend {
            entries: moka::sync::Cache::builder()
                .max_capacity(max_entries)
                .expire_after(PerEntryTtl)
                .build_with_hasher(Hasher::default()),
            generations: moka::sync::Cache::builder()
                .time_to_live(GENERATION_TTL)
                .build_with_hasher(Hasher::default()),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            hasher: Hasher::default(),
        }
    }

    fn stripe(&self, key: &str) -> std::sync::MutexGuard<'_, ()> {
        let i = (self.hasher.hash_one(key) as usize) % STRIPES;
        self.stripes[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    fn current_generation(&self, key: &str) -> Gen {
        match self.generations.get(key) {
            Some(g) => Gen(Bytes::from(g.to_string())),
            None => Gen::default(),
        }
    }

    /// Bumps the generation to a value never used before; the caller holds the key's stripe.
    fn bump(&self, key: &str) {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let next = NEXT.fetch_add(1, Ordering::Relaxed);
        self.generations.insert(key.to_owned(), next);
    }
}

impl Backend for MemoryBackend {
    async fn read(&self, key: &str) -> BackendResult<Read> {
        if let Some(e) = self.entries.get(key) {
            return Ok(Read {
                value: Some(e.value.clone()),
                generation: Gen::default(),
            });
        }
        Ok(Read {
            value: None,
            generation: self.current_generation(key),
        })
    }

    async fn generation(&self, key: &str) -> BackendResult<Gen> {
        Ok(self.current_generation(key))
    }

    async fn fill(
        &self,
        key: &str,
        value: Stored,
        ttl: Duration,
        generation: &Gen,
        _token: Option<&str>,
    ) -> BackendResult<bool> {
        let _stripe = self.stripe(key);
        if self.current_generation(key) != *generation {
            return Ok(false);
        }
        self.entries
            .insert(key.to_owned(), Arc::new(Entry { value, ttl }));
        Ok(true)
    }

    async fn lease(&self, key: &str, _token: &str, _lease: Duration) -> BackendResult<LeaseReply> {
        // One process: its own coalescing already lets one caller load. Everyone "holds" it.
        let read = self.read(key).await?;
        Ok(match read.value {
            Some(v) => LeaseReply::Hit(v),
            None => LeaseReply::Acquired(read.generation),
        })
    }

    async fn release(&self, _key: &str, _token: &str) -> BackendResult<()> {
        Ok(())
    }

    async fn write(&self, key: &str, value: Stored, ttl: Duration) -> BackendResult<()> {
        let _stripe = self.stripe(key);
        self.bump(key);
        self.entries
            .insert(key.to_owned(), Arc::new(Entry { value, ttl }));
        Ok(())
    }

    async fn invalidate(&self, keys: &[&str]) -> BackendResult<()> {
        for key in keys {
            let _stripe = self.stripe(key);
            self.bump(key);
            self.entries.invalidate(*key);
        }
        Ok(())
    }

    fn coalesce_reads(&self) -> bool {
        false
    }

    fn keeps_typed(&self) -> bool {
        true
    }

    fn shares_leases(&self) -> bool {
        false
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
        let read = m.read("k").await.unwrap();
        assert!(read.value.is_none());
        // The key is invalidated while the load runs.
        m.invalidate(&["k"]).await.unwrap();
        let ttl = Duration::from_secs(60);
        assert!(
            !m.fill("k", stored("stale"), ttl, &read.generation, None)
                .await
                .unwrap()
        );
        assert!(m.read("k").await.unwrap().value.is_none());
        // A load that read after the invalidation fills.
        let read = m.read("k").await.unwrap();
        assert!(
            m.fill("k", stored("fresh"), ttl, &read.generation, None)
                .await
                .unwrap()
        );
        let v = m.read("k").await.unwrap().value.unwrap();
        assert_eq!(&v.bytes[..], b"fresh");
    }

    #[tokio::test]
    async fn a_fill_after_a_write_is_rejected() {
        let m = MemoryBackend::new(100);
        let ttl = Duration::from_secs(60);
        let read = m.read("k").await.unwrap();
        m.write("k", stored("written"), ttl).await.unwrap();
        assert!(
            !m.fill("k", stored("stale"), ttl, &read.generation, None)
                .await
                .unwrap()
        );
        let v = m.read("k").await.unwrap().value.unwrap();
        assert_eq!(&v.bytes[..], b"written");
    }
}
