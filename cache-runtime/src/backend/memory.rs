//! The in-process backend, on moka with a TTL per entry.

use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::Expiry;

use super::{Backend, BackendResult, Stored};

#[derive(Clone)]
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

/// Entries live in this process only, up to `max_entries` (least recently used evicted first,
/// by moka's TinyLFU policy), each for its own TTL.
pub(crate) struct MemoryBackend {
    entries: moka::future::Cache<String, Arc<Entry>, foldhash::fast::RandomState>,
}

impl MemoryBackend {
    pub(crate) fn new(max_entries: u64) -> Self {
        MemoryBackend {
            entries: moka::future::Cache::builder()
                .max_capacity(max_entries)
                .expire_after(PerEntryTtl)
                .build_with_hasher(foldhash::fast::RandomState::default()),
        }
    }
}

impl Backend for MemoryBackend {
    async fn get(&self, key: &str) -> BackendResult<Option<Stored>> {
        Ok(self.entries.get(key).await.map(|e| e.value.clone()))
    }

    async fn set(&self, key: &str, value: Stored, ttl: Duration) -> BackendResult<()> {
        self.entries
            .insert(key.to_owned(), Arc::new(Entry { value, ttl }))
            .await;
        Ok(())
    }

    async fn delete(&self, keys: &[&str]) -> BackendResult<()> {
        for key in keys {
            self.entries.invalidate(*key).await;
        }
        Ok(())
    }

    fn coalesce_reads(&self) -> bool {
        false
    }

    fn keeps_typed(&self) -> bool {
        true
    }
}
