//! [`Put`] and [`Evict`]: what `#[cache_put]` and `#[cache_evict]` drive from the function's
//! own body, like [`Fetch`](super::Fetch) for `#[cached]`. Non-generic except for the encoding
//! of the value (`Put::encode`, `Put::encode_result`: serde only).
//!
//! ```text
//! #[cache_put]:   Put::new ─ begin (tag versions) ─ [encode value] ─ body ─ succeeded ─ finish (write)
//! #[cache_evict]: Evict::new ─ key.. tags ─ [before: invalidate] ─ body ─ succeeded ─ finish (invalidate)
//! ```
//!
//! Both go through `Store::write` / `Store::invalidate` / `Store::invalidate_tags`, which
//! replace the keys' generations and detach in-process flights, so a `#[cached]` load that
//! started before the write or eviction never stores or serves its older value.

use std::time::Duration;

use serde::Serialize;

use crate::backend::{BackendError, Stored};
use crate::breaker::FailureKind;
use crate::cache::Cache;
use crate::engine::Call;
use crate::envelope;
use crate::key::CallKey;
use crate::mode::{Classified, Mode};
use crate::stats::{Site, SiteStats, StatsRef};
use crate::store::Store;
use crate::tags::{TagSet, Tags};

fn warn_key(store: &Store, site: &Site, self_type: Option<&'static str>, what: &str) {
    store.log().warn(
        FailureKind::Key,
        &format_args!(
            "a {what} of `{}` could not be rendered (an argument's Display or Serialize failed); it is skipped",
            site.label(self_type)
        ),
    );
}

fn count_failure(store: &Store, stats: &SiteStats, e: &BackendError) {
    stats.backend_failure(e);
    if let BackendError::Data(msg) = e {
        store.log().warn(
            FailureKind::Server,
            &format_args!("cache operation failed ({msg})"),
        );
    }
}

/// One call of a `#[cache_put]` function. Not public API.
#[doc(hidden)]
pub struct Put<'a> {
    store: &'a Store,
    site: &'static Site,
    self_type: Option<&'static str>,
    stats: StatsRef<'a>,
    /// `None`: nothing to write (`condition` false, the key did not render).
    key: Option<String>,
    /// The entry cannot be written under its tags (one did not render, their versions could
    /// not be read): the key is invalidated instead.
    invalidate_only: bool,
    tags: Option<TagSet>,
    value: Option<Stored>,
    ok: bool,
    /// From `begin` to `finish`: dropped in between (a panic, a cancelled call), the function
    /// may have written the database, so the key is invalidated in the background.
    armed: bool,
}

impl Drop for Put<'_> {
    fn drop(&mut self) {
        if let (true, Some(key)) = (self.armed, self.key.take()) {
            self.store.invalidate_in_background(vec![key], Vec::new());
        }
    }
}

impl<'a> Put<'a> {
    /// Starts a call.
    pub fn new(call: Call<'a>) -> Self {
        let cache: &'a Cache = call.cache;
        let store = cache.store();
        let stats = call.site.stats(cache.stats_registry(), call.self_type);
        let key = match call.key {
            CallKey::Key(key) => Some(key.into_string()),
            CallKey::Condition => None,
            CallKey::Unrenderable => {
                warn_key(store, call.site, call.self_type, "key");
                None
            }
        };
        Put {
            store,
            site: call.site,
            self_type: call.self_type,
            stats,
            key,
            tags: None,
            value: None,
            ok: true,
            armed: false,
            invalidate_only: false,
        }
    }

    /// The tags the written entry is recorded under.
    pub fn tags(&mut self, tags: Tags) {
        if tags.names.is_empty() && !tags.failed {
            return;
        }
        if tags.failed && self.key.is_some() {
            // An entry missing one of its tags would escape that tag's invalidation.
            warn_key(self.store, self.site, self.self_type, "tag");
            self.invalidate_only = true;
        }
        self.tags = Some(tags.into_set());
    }

    /// Reads the tags' versions before the function runs: the value is computed after them,
    /// so an invalidation of a tag after this point is never lost.
    pub async fn begin(&mut self) {
        self.armed = self.key.is_some();
        let (Some(_), Some(tags)) = (&self.key, &mut self.tags) else {
            return;
        };
        let ttl = self
            .site
            .ttl
            .unwrap_or(self.store.default_ttl())
            .max(Duration::from_millis(1));
        match self.store.tag_versions(&tags.names(), ttl).await {
            Ok(versions) => tags.versions = versions,
            Err(e) => {
                // Without the versions the entry cannot be recorded under its tags.
                count_failure(self.store, &self.stats, &e);
                self.invalidate_only = true;
            }
        }
    }

    /// Whether a value is still wanted (the call has a key and has not failed).
    pub fn wants_value(&self) -> bool {
        self.ok && self.key.is_some() && !self.invalidate_only
    }

    /// Encodes `value` (the `value = ..` option) as the entry to write.
    pub fn encode<V: Serialize + ?Sized>(&mut self, value: &V) {
        if !self.wants_value() {
            return;
        }
        let encoded = envelope::encode(value, Duration::ZERO, self.tags.as_ref());
        self.encoded(encoded);
    }

    /// Classifies the function's result (as `#[cached]` does) and encodes what a reader of
    /// the key stores: `T` of `Ok(T)` or `Some(T)`, or the value itself.
    pub fn encode_result<R, M: Mode<R>>(&mut self, mode: &M, result: &R) {
        let value = match mode.classify(result) {
            Classified::Store(v) => v,
            Classified::StoreNone(v) if self.site.cache_none => v,
            Classified::StoreNone(_) | Classified::Error => {
                self.ok = false;
                return;
            }
            Classified::Refused => {
                self.ok = false;
                self.refused(std::any::type_name::<R>());
                return;
            }
        };
        self.encode(value);
    }

    /// Whether the function succeeded (`Ok`, `Some`, any other value): only then is anything
    /// written.
    pub fn succeeded(&mut self, ok: bool) {
        self.ok &= ok;
    }

    /// The `unless` option held: nothing is written.
    pub fn unless(&mut self, rejected: bool) {
        if rejected {
            self.ok = false;
        }
    }

    fn encoded(&mut self, encoded: Result<bytes::Bytes, envelope::EncodeError>) {
        match encoded {
            Ok(bytes) => self.value = Some(Stored::bytes(bytes)),
            Err(e) => {
                self.store.log().warn(
                    FailureKind::Encode,
                    &format_args!(
                        "the value of `{}` could not be encoded, not written: {e}",
                        self.site.label(self.self_type)
                    ),
                );
                self.ok = false;
                SiteStats::inc(&self.stats.not_stored);
            }
        }
    }

    fn refused(&self, ty: &str) {
        SiteStats::inc(&self.stats.not_stored);
        self.store.log().warn(
            FailureKind::Encode,
            &format_args!(
                "`{}` returns `{ty}` through a type parameter, so `#[cache_put]` cannot tell its errors or `None`s from values: nothing is written; write the return type's shape, or give a `value = ..`",
                self.site.label(self.self_type)
            ),
        );
    }

    /// Writes the entry if the function succeeded.
    pub async fn finish(mut self) {
        self.finish_inner().await;
        // Only now: a call dropped during the write above still invalidates.
        self.armed = false;
    }

    async fn finish_inner(&mut self) {
        let Some(key) = self.key.as_deref() else {
            return;
        };
        if self.invalidate_only && self.ok {
            if let Err(e) = self.store.invalidate(&[key]).await {
                count_failure(self.store, &self.stats, &e);
            }
            return;
        }
        let (true, Some(value)) = (self.ok, self.value.take()) else {
            if !self.ok {
                SiteStats::inc(&self.stats.not_stored);
            }
            return;
        };
        let ttl = self.site.ttl.unwrap_or(self.store.default_ttl());
        match self.store.write(key, value, ttl, self.tags.as_ref()).await {
            Ok(()) => SiteStats::inc(&self.stats.puts),
            Err(e) => {
                // The entry may still hold the old value: drop it rather than leave it.
                count_failure(self.store, &self.stats, &e);
                if let Err(e) = self.store.invalidate(&[key]).await {
                    count_failure(self.store, &self.stats, &e);
                }
            }
        }
    }
}

/// What the `#[cache_evict]` expansion describes. Not public API.
#[doc(hidden)]
pub struct EvictCall<'a> {
    /// The cache to use.
    pub cache: &'a Cache,
    /// The function's static description.
    pub site: &'static Site,
    /// `type_name::<Self>()` for methods.
    pub self_type: Option<&'static str>,
    /// `condition` (true without one).
    pub active: bool,
}

/// One call of a `#[cache_evict]` function. Not public API.
#[doc(hidden)]
pub struct Evict<'a> {
    store: &'a Store,
    site: &'static Site,
    self_type: Option<&'static str>,
    stats: StatsRef<'a>,
    active: bool,
    keys: Vec<String>,
    tags: Vec<String>,
    ok: bool,
    /// The call's eviction was counted (`before`, then `finish`: one call, counted once).
    counted: bool,
    /// Until `finish`: dropped before (a panic, a cancelled call), the function may have
    /// written the database, so the keys and tags are invalidated in the background.
    armed: bool,
}

impl Drop for Evict<'_> {
    fn drop(&mut self) {
        if self.armed && self.active {
            self.store.invalidate_in_background(
                std::mem::take(&mut self.keys),
                std::mem::take(&mut self.tags),
            );
        }
    }
}

impl<'a> Evict<'a> {
    /// Starts a call.
    pub fn new(call: EvictCall<'a>) -> Self {
        let cache: &'a Cache = call.cache;
        Evict {
            store: cache.store(),
            site: call.site,
            self_type: call.self_type,
            stats: call.site.stats(cache.stats_registry(), call.self_type),
            active: call.active,
            keys: Vec::new(),
            tags: Vec::new(),
            ok: true,
            counted: false,
            armed: false,
        }
    }

    /// The function is about to run: from now until `finish`, a dropped call (a panic, a
    /// cancellation) may have written the database, and invalidates in the background.
    pub fn start(&mut self) {
        self.armed = true;
    }

    /// A key to invalidate.
    pub fn key(&mut self, key: CallKey) {
        match key {
            CallKey::Key(key) => {
                let key = key.into_string();
                if !self.keys.contains(&key) {
                    self.keys.push(key);
                }
            }
            CallKey::Condition => {}
            CallKey::Unrenderable => warn_key(self.store, self.site, self.self_type, "key"),
        }
    }

    /// Tags to invalidate.
    pub fn tags(&mut self, tags: Tags) {
        if tags.failed {
            warn_key(self.store, self.site, self.self_type, "tag");
        }
        for name in tags.names {
            if !self.tags.contains(&name) {
                self.tags.push(name);
            }
        }
    }

    /// The `before` option: invalidates now, before the function runs (and again after it,
    /// if it succeeds).
    pub async fn before(&mut self) {
        if self.active {
            self.run().await;
        }
    }

    /// Whether the function succeeded.
    pub fn succeeded(&mut self, ok: bool) {
        self.ok &= ok;
    }

    /// Invalidates the keys and tags if the function succeeded.
    pub async fn finish(mut self) {
        if self.active && self.ok {
            self.run().await;
        }
        // Only now: a call dropped during the invalidation above still invalidates.
        self.armed = false;
    }

    async fn run(&mut self) {
        let keys: Vec<&str> = self.keys.iter().map(String::as_str).collect();
        let tags: Vec<&str> = self.tags.iter().map(String::as_str).collect();
        let (k, t) = tokio::join!(
            async {
                if keys.is_empty() {
                    Ok(())
                } else {
                    self.store.invalidate(&keys).await
                }
            },
            async {
                if tags.is_empty() {
                    Ok(())
                } else {
                    self.store.invalidate_tags(&tags).await
                }
            }
        );
        let first = !self.counted;
        let ok = k.is_ok() && t.is_ok();
        match k {
            Ok(()) if !keys.is_empty() && first => SiteStats::inc(&self.stats.evictions),
            Ok(()) => {}
            Err(e) => count_failure(self.store, &self.stats, &e),
        }
        match t {
            Ok(()) if first => self.stats.tag_invalidations.add(tags.len() as u64),
            Ok(()) => {}
            Err(e) => count_failure(self.store, &self.stats, &e),
        }
        self.counted |= ok;
    }
}
