//! [`WriteBehind`]: one call of a `#[write_behind]` function, driven from the function's own
//! body like `Put`. It renders and encodes what the call writes, then either queues it
//! (Redis: `WB_ENQUEUE` stores the value, or invalidates the key when there is no value to
//! store, and appends the entry in one step, and the call returns without running the body)
//! or hands back an [`Inline`] that runs the body now and writes the value as `#[cache_put]`
//! would (memory backend, Redis failed, nothing to key, arguments that cannot be queued).
//!
//! ```text
//! WriteBehind::new ─ tags ─ begin (tag versions) ─ encode ─ args ─ enqueue ─┬ None: accepted (queued)
//!                                                                           └ Some(Inline) ─ run(body)
//! ```

use std::future::Future;
use std::time::Duration;

use serde::Serialize;

use super::handler::{WbFunction, WbResult};
use super::{CURRENT, WriteId};
use crate::backend::{BackendError, Stored};
use crate::breaker::FailureKind;
use crate::cache::Cache;
use crate::engine::Call;
use crate::envelope;
use crate::key::CallKey;
use crate::stats::{SiteStats, StatsRef};
use crate::store::{Store, WbWrite};
use crate::tags::{TagSet, Tags};

/// One call of a `#[write_behind]` function. Not public API.
#[doc(hidden)]
pub struct WriteBehind<'a> {
    store: &'a Store,
    function: &'static WbFunction,
    self_type: Option<&'static str>,
    stats: StatsRef<'a>,
    /// `None`: nothing to write (`condition` false, the key did not render).
    key: Option<String>,
    /// A tag did not render, its version could not be read, or the value did not encode: the
    /// key is invalidated instead of written (the write is queued all the same).
    invalidate_only: bool,
    tags: Option<TagSet>,
    value: Option<Stored>,
    /// The arguments as a JSON array (`None`: not given, or they did not serialize).
    args: Option<Vec<u8>>,
}

fn count_failure(store: &Store, stats: &SiteStats, e: &BackendError) {
    stats.backend_failure(e);
    if let BackendError::Data(msg) = e {
        store.log().warn(
            FailureKind::Server,
            &format_args!("write-behind enqueue failed ({msg}); the call runs inline"),
        );
    }
}

impl<'a> WriteBehind<'a> {
    /// Starts a call of `function`.
    pub fn new(call: Call<'a>, function: &'static WbFunction) -> Self {
        let cache: &'a Cache = call.cache;
        let store = cache.store();
        let stats = call.site.stats(cache.stats_registry(), call.self_type);
        let key = match call.key {
            CallKey::Key(key) => Some(key.into_string()),
            CallKey::Condition => None,
            CallKey::Unrenderable => {
                store.log().warn(
                    FailureKind::Key,
                    &format_args!(
                        "a key of `{}` could not be rendered (an argument's Display or Serialize failed); the call runs inline, uncached",
                        call.site.label(call.self_type)
                    ),
                );
                None
            }
        };
        WriteBehind {
            store,
            function,
            self_type: call.self_type,
            stats,
            key,
            invalidate_only: false,
            tags: None,
            value: None,
            args: None,
        }
    }

    /// The tags the written entry is recorded under.
    pub fn tags(&mut self, tags: Tags) {
        if tags.names.is_empty() && !tags.failed {
            return;
        }
        if tags.failed && self.key.is_some() {
            self.store.log().warn(
                FailureKind::Key,
                &format_args!(
                    "a tag of `{}` could not be rendered; its key is invalidated instead of written",
                    self.function.site.label(self.self_type)
                ),
            );
            self.invalidate_only = true;
        }
        self.tags = Some(tags.into_set());
    }

    /// Reads the tags' versions (as `Put::begin`).
    pub async fn begin(&mut self) {
        let ttl = self.ttl();
        let (Some(_), Some(tags)) = (&self.key, &mut self.tags) else {
            return;
        };
        if self.invalidate_only {
            return;
        }
        match self.store.tag_versions(&tags.names(), ttl).await {
            Ok(versions) => tags.versions = versions,
            Err(e) => {
                count_failure(self.store, &self.stats, &e);
                self.invalidate_only = true;
            }
        }
    }

    fn ttl(&self) -> Duration {
        self.function
            .site
            .ttl
            .unwrap_or(self.store.default_ttl())
            .max(Duration::from_millis(1))
    }

    /// Whether a value is still wanted (the call has a key to write).
    pub fn wants_value(&self) -> bool {
        self.key.is_some() && !self.invalidate_only && self.value.is_none()
    }

    /// Encodes `value` (the `value = ..` option) as the entry to write.
    pub fn encode<V: Serialize + ?Sized>(&mut self, value: &V) {
        if !self.wants_value() {
            return;
        }
        match envelope::encode(value, Duration::ZERO, self.tags.as_ref()) {
            Ok(bytes) => self.value = Some(Stored::bytes(bytes)),
            Err(e) => {
                self.store.log().warn(
                    FailureKind::Encode,
                    &format_args!(
                        "the value of `{}` could not be encoded: its key is invalidated instead of written: {e}",
                        self.function.site.label(self.self_type)
                    ),
                );
                SiteStats::inc(&self.stats.not_stored);
                self.invalidate_only = true;
            }
        }
    }

    /// The call's arguments, a tuple in parameter order (serialized as a JSON array). They are
    /// decoded back with the function's own decoder at once (the body's future is made and
    /// dropped unpolled): arguments that serialize but do not decode (an `f64` NaN becomes
    /// `null`, an asymmetric `Serialize`/`Deserialize`) would only be dead-lettered by the
    /// worker, so the call runs inline instead.
    pub fn args<A: Serialize + ?Sized>(&mut self, args: &A) {
        match serde_json::to_vec(args) {
            Ok(json) => match (self.function.apply)(&json) {
                Ok(applying) => {
                    drop(applying);
                    self.args = Some(json);
                }
                Err(e) => {
                    self.store.log().warn(
                        FailureKind::Encode,
                        &format_args!(
                            "the arguments of `{}` serialize but do not decode back, so they cannot be queued: the call runs inline: {e}",
                            self.function.site.label(self.self_type)
                        ),
                    );
                    self.args = None;
                }
            },
            Err(e) => {
                self.store.log().warn(
                    FailureKind::Encode,
                    &format_args!(
                        "the arguments of `{}` could not be serialized: the call runs inline: {e}",
                        self.function.site.label(self.self_type)
                    ),
                );
                self.args = None;
            }
        }
    }

    /// Queues the write: `None` once it is accepted (stored in the cache and appended to its
    /// queue, durable in Redis; the body runs later, in a worker), or the [`Inline`] that
    /// runs the body now (memory backend, Redis failed, no key, arguments that could not be
    /// serialized or do not decode). A value that could not be encoded, or whose tags could
    /// not be rendered or read, is not written: the entry is queued all the same, and the
    /// same step invalidates the key (a queued write is never overtaken by an inline one).
    pub async fn enqueue(mut self) -> Option<Inline<'a>> {
        let id = WriteId::generate();
        let ttl = self.ttl();
        let value = if self.invalidate_only {
            None
        } else {
            self.value.as_ref()
        };
        if let (true, Some(key), Some(args)) = (self.store.is_shared(), &self.key, &self.args) {
            let write = WbWrite {
                key,
                value,
                ttl,
                tags: value.and(self.tags.as_ref()),
                queue: self.function.queue(),
                function: self.function.id(),
                id: id.as_str(),
                args,
            };
            match self.store.wb_enqueue(&write).await {
                Ok(()) => {
                    SiteStats::inc(&self.stats.wb_accepted);
                    return None;
                }
                Err(e) => count_failure(self.store, &self.stats, &e),
            }
        }
        SiteStats::inc(&self.stats.wb_write_through);
        let invalidate_only = self.invalidate_only || (self.key.is_some() && self.value.is_none());
        Some(Inline {
            store: self.store,
            stats: self.stats,
            key: self.key.take(),
            value: self.value.take(),
            tags: self.tags.take(),
            ttl,
            id,
            invalidate_only,
            armed: false,
        })
    }
}

/// A `#[write_behind]` call that runs its body now (write-through). Not public API.
#[doc(hidden)]
pub struct Inline<'a> {
    store: &'a Store,
    stats: StatsRef<'a>,
    key: Option<String>,
    value: Option<Stored>,
    tags: Option<TagSet>,
    ttl: Duration,
    id: WriteId,
    invalidate_only: bool,
    /// While the body runs: dropped then (a panic, a cancelled call), the body may have
    /// written the database, so the key is invalidated in the background.
    armed: bool,
}

impl Drop for Inline<'_> {
    fn drop(&mut self) {
        if let (true, Some(key)) = (self.armed, self.key.take()) {
            self.store.invalidate_in_background(vec![key], Vec::new());
        }
    }
}

impl Inline<'_> {
    /// The write's id, as [`current_id`](super::current_id) returns it inside the body.
    pub fn id(&self) -> &WriteId {
        &self.id
    }

    /// Runs the body (`fut`) with [`current_id`](super::current_id) set to the write's id;
    /// if it succeeds, writes the value to the cache as `#[cache_put]` would. Returns the
    /// body's result unchanged.
    pub async fn run<R: WbResult, F: Future<Output = R>>(mut self, fut: F) -> R {
        self.armed = self.key.is_some();
        let result = CURRENT.scope(self.id.clone(), fut).await;
        if result.wb_ok() {
            self.write().await;
        }
        self.armed = false;
        result
    }

    async fn write(&mut self) {
        let Some(key) = self.key.as_deref() else {
            return;
        };
        // First: an older queued write of the key, applied after this one, must not be
        // re-asserted over it.
        if let Err(e) = self.store.wb_forget_last(key).await {
            count_failure(self.store, &self.stats, &e);
            // Redis is unreachable: whatever it still holds for the key (it may come back
            // with it) is removed once it answers again.
            self.store.wb_invalidate_when_back(key);
            return;
        }
        let value = match self.value.take() {
            Some(value) if !self.invalidate_only => value,
            _ => {
                if let Err(e) = self.store.invalidate(&[key]).await {
                    count_failure(self.store, &self.stats, &e);
                }
                return;
            }
        };
        match self
            .store
            .write(key, value, self.ttl, self.tags.as_ref())
            .await
        {
            Ok(()) => SiteStats::inc(&self.stats.puts),
            Err(e) => {
                count_failure(self.store, &self.stats, &e);
                if let Err(e) = self.store.invalidate(&[key]).await {
                    count_failure(self.store, &self.stats, &e);
                    self.store.wb_invalidate_when_back(key);
                }
            }
        }
    }
}
