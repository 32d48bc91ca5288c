//! The fill notifications of one Redis cache: one pub/sub connection per `Cache`, fanned out
//! in-process to the callers waiting for a key's fill.
//!
//! A fill (or a released lease, a write, an invalidation) publishes the key on the cache's
//! channel, but only when someone waits for it (the lease script sets a "waiters" flag). The
//! subscriber task receives the key and wakes that key's waiters. Pub/sub delivery is at most
//! once (a dropped subscription loses messages), so waiters also re-check on a bounded,
//! jittered timer; and when the subscription comes back after a drop, every waiter is woken to
//! re-check at once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::Notify;

use crate::breaker::{FailureKind, FailureLog};

struct Shared {
    /// Per key: the notification, and how many registrations hold it.
    waiters: Mutex<HashMap<String, (Arc<Notify>, usize)>>,
    subscribed: AtomicBool,
    /// Woken whenever `subscribed` becomes true.
    ready: Notify,
}

impl Shared {
    fn wake(&self, key: &str) {
        let notify = self
            .waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .map(|(n, _)| n.clone());
        if let Some(n) = notify {
            n.notify_waiters();
        }
    }

    fn wake_all(&self) {
        let all: Vec<Arc<Notify>> = self
            .waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|(n, _)| n.clone())
            .collect();
        for n in all {
            n.notify_waiters();
        }
    }
}

pub(crate) struct Bus {
    client: redis::Client,
    channel: &'static str,
    connect_timeout: Duration,
    log: Arc<FailureLog>,
    shared: Arc<Shared>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Drop for Bus {
    fn drop(&mut self) {
        if let Some(task) = self.task.lock().unwrap_or_else(|e| e.into_inner()).take() {
            task.abort();
        }
    }
}

/// A caller's interest in one key's fill. Dropping it unregisters (when it is the last).
pub(crate) struct Registration<'a> {
    bus: &'a Bus,
    key: String,
    notify: Arc<Notify>,
}

impl Registration<'_> {
    /// The notification to await; enable it before re-checking, so that a wake-up between the
    /// check and the await is not lost.
    pub(crate) fn notify(&self) -> &Notify {
        &self.notify
    }
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        let mut map = self
            .bus
            .shared
            .waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some((_, count)) = map.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                map.remove(&self.key);
            }
        }
    }
}

impl Bus {
    pub(crate) fn new(
        client: redis::Client,
        channel: &'static str,
        connect_timeout: Duration,
        log: Arc<FailureLog>,
    ) -> Bus {
        Bus {
            client,
            channel,
            connect_timeout,
            log,
            shared: Arc::new(Shared {
                waiters: Mutex::new(HashMap::new()),
                subscribed: AtomicBool::new(false),
                ready: Notify::new(),
            }),
            task: Mutex::new(None),
        }
    }

    /// Registers interest in `key`'s fill.
    pub(crate) fn register(&self, key: &str) -> Registration<'_> {
        let mut map = self
            .shared
            .waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let entry = map
            .entry(key.to_owned())
            .or_insert_with(|| (Arc::new(Notify::new()), 0));
        entry.1 += 1;
        let notify = entry.0.clone();
        drop(map);
        Registration {
            bus: self,
            key: key.to_owned(),
            notify,
        }
    }

    /// Starts the subscriber if needed and waits (at most `timeout`) until it is subscribed.
    /// Returns whether it is: if not, waiters rely on their re-checks.
    pub(crate) async fn ready(&self, timeout: Duration) -> bool {
        if self.shared.subscribed.load(Ordering::Acquire) && self.running() {
            return true;
        }
        self.start();
        let ready = self.shared.ready.notified();
        tokio::pin!(ready);
        ready.as_mut().enable();
        if self.shared.subscribed.load(Ordering::Acquire) {
            return true;
        }
        let _ = tokio::time::timeout(timeout, ready).await;
        self.shared.subscribed.load(Ordering::Acquire)
    }

    /// Whether the subscription is up.
    pub(crate) fn is_subscribed(&self) -> bool {
        self.shared.subscribed.load(Ordering::Acquire) && self.running()
    }

    /// Whether the subscriber task is alive (it dies with the runtime that spawned it).
    fn running(&self) -> bool {
        self.task
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|t| !t.is_finished())
    }

    pub(super) fn start(&self) {
        let mut task = self.task.lock().unwrap_or_else(|e| e.into_inner());
        if task.as_ref().is_some_and(|t| !t.is_finished()) {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (client, channel, timeout) = (self.client.clone(), self.channel, self.connect_timeout);
        let (shared, log) = (self.shared.clone(), self.log.clone());
        *task = Some(handle.spawn(subscribe_forever(client, channel, timeout, shared, log)));
    }
}

/// Clears `subscribed` when the subscriber task ends, however it ends (its runtime shut down,
/// say), so that the next waiter starts a new one.
struct Unsubscribed(Arc<Shared>);

impl Drop for Unsubscribed {
    fn drop(&mut self) {
        self.0.subscribed.store(false, Ordering::Release);
    }
}

async fn subscribe_forever(
    client: redis::Client,
    channel: &'static str,
    connect_timeout: Duration,
    shared: Arc<Shared>,
    log: Arc<FailureLog>,
) {
    let _unsubscribed = Unsubscribed(shared.clone());
    let mut backoff = Duration::from_millis(50);
    loop {
        let connected = tokio::time::timeout(connect_timeout, async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        })
        .await;
        match connected {
            Ok(Ok(pubsub)) => {
                backoff = Duration::from_millis(50);
                shared.subscribed.store(true, Ordering::Release);
                shared.ready.notify_waiters();
                // Fills published while we were not subscribed are lost: re-check now.
                shared.wake_all();
                let mut messages = pubsub.into_on_message();
                while let Some(msg) = messages.next().await {
                    if let Ok(key) = std::str::from_utf8(msg.get_payload_bytes()) {
                        shared.wake(key);
                    }
                }
                shared.subscribed.store(false, Ordering::Release);
                log.warn(
                    FailureKind::Unavailable,
                    &format_args!(
                        "the fill-notification subscription to redis dropped; waiters re-check until it is back"
                    ),
                );
            }
            Ok(Err(e)) => log.warn(
                FailureKind::Unavailable,
                &format_args!(
                    "cannot subscribe to fill notifications ({e}); waiters re-check instead"
                ),
            ),
            Err(_) => log.warn(
                FailureKind::Timeout,
                &format_args!(
                    "subscribing to fill notifications timed out; waiters re-check instead"
                ),
            ),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}
