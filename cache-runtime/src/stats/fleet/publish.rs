//! The publishing task of [`CacheBuilder::publish_stats`](crate::CacheBuilder::publish_stats).

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::wire::encode;
use super::{PRUNE_MARGIN, REGISTRY_TTL, TTL_INTERVALS, hostname, millis, now_ms};
use crate::backend::fleet::Snapshot;
use crate::cache::{Cache, WeakCache};
use crate::error::Result;

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
        if cache.store().redis().is_none() {
            // Nothing to publish to: the memory backend's fleet is this process.
            self.running.store(true, Ordering::Release);
            return;
        }
        // Outside a runtime: the first use inside one starts the task.
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
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
/// dropped or the runtime shuts down. A failed publish is logged (at `debug` here, and by the
/// backend's failure log, at most once per 10 s per kind) and retried at the next tick; it
/// never touches calls.
async fn publish_forever(cache: WeakCache, id: String, interval: Duration, _running: Running) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(cache) = cache.upgrade() else {
            return;
        };
        if let Err(e) = publish(&cache, &id, interval).await {
            tracing::debug!(target: "cache_runtime", "fleet stats not published: {e}");
        }
    }
}

/// Publishes `cache`'s snapshot as instance `id`, publishing every `interval`.
async fn publish(cache: &Cache, id: &str, interval: Duration) -> Result<()> {
    let Some(redis) = cache.store().redis() else {
        return Ok(());
    };
    let ttl = interval * TTL_INTERVALS;
    let now = now_ms();
    let fields = encode(&cache.stats(), interval);
    redis
        .fleet_publish(&Snapshot {
            namespace: cache.namespace(),
            id,
            fields: &fields,
            ttl,
            expires_ms: now.saturating_add(millis(ttl)),
            registry_ttl: REGISTRY_TTL.max(ttl),
            prune_before_ms: now.saturating_sub(millis(PRUNE_MARGIN)),
        })
        .await?;
    Ok(())
}

/// Publishes `cache`'s snapshot now (tests: the sums they check do not wait for a tick).
#[doc(hidden)]
pub async fn publish_now(cache: &Cache) -> Result<()> {
    let Some(publisher) = cache.publisher() else {
        return Err(crate::error::Error::config("publish_stats is not set"));
    };
    publish(cache, publisher.id(), publisher.interval).await
}
