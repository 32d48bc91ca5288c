//! The worker (being built).

use std::time::Duration;

use crate::cache::Cache;
use crate::error::{Error, Result};

/// Applies queued write-behind writes.
#[derive(Debug)]
pub struct Worker {
    _cache: Cache,
}

/// Configures a [`Worker`].
#[derive(Debug)]
#[must_use = "a builder does nothing until `start` is called"]
pub struct WorkerBuilder {
    cache: Cache,
}

/// A worker's counters and queue depths.
#[derive(Debug, Clone)]
pub struct WorkerStats {}

impl std::fmt::Display for WorkerStats {
    fn fmt(&self, _f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        Ok(())
    }
}

impl Worker {
    /// A builder.
    pub fn builder(cache: &Cache) -> WorkerBuilder {
        WorkerBuilder {
            cache: cache.clone(),
        }
    }

    /// Waits until the queues are drained.
    pub async fn flush(&self) {}

    /// As `flush`, for at most `limit`.
    pub async fn flush_for(&self, _limit: Duration) -> bool {
        true
    }

    /// Stops.
    pub async fn shutdown(self) {}

    /// Counters and depths.
    pub async fn stats(&self) -> WorkerStats {
        WorkerStats {}
    }
}

impl WorkerBuilder {
    /// Queues.
    pub fn queues<I: IntoIterator<Item = S>, S: Into<String>>(self, _queues: I) -> Self {
        self
    }
    /// Batch.
    pub fn batch(self, _n: usize) -> Self {
        self
    }
    /// Max attempts.
    pub fn max_attempts(self, _n: u32) -> Self {
        self
    }
    /// Backoff.
    pub fn backoff(self, _base: Duration, _max: Duration) -> Self {
        self
    }
    /// Lease.
    pub fn lease(self, _d: Duration) -> Self {
        self
    }
    /// Poll.
    pub fn poll(self, _d: Duration) -> Self {
        self
    }
    /// Starts.
    ///
    /// # Errors
    ///
    /// Not built yet.
    pub fn start(self) -> Result<Worker> {
        let _ = &self.cache;
        Err(Error::config("the write-behind worker is not built yet"))
    }
}
