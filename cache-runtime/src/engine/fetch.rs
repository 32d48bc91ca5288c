//! [`Fetch`]: one cached call's way through the cache, compiled once for every function.
//!
//! [`Fetch::find`] asks [`Fetch::lookup`] for a step and decodes what it found
//! ([`Fetch::hit`] or [`Fetch::unusable`]); the expansion runs the body between
//! [`Fetch::begin_load`] and [`Fetch::end_load`] and hands the result's [`Verdict`] to
//! [`Fetch::complete`]. A `Fetch` dropped on the way (a panic in the body, a cancelled
//! future) tells the key's followers to retry and gives its lease back: see the guards in
//! `flight` and `store`.

use std::time::{Duration, Instant};

use crate::backend::{BackendError, BackendResult, Gen, Read, Stored, TypedValue};
use crate::breaker::FailureKind;
use crate::cache::Cache;
use crate::engine::Call;
use crate::engine::refresh::{self, Refresher};
use crate::engine::trace::{Outcome as Traced, Trace};
use crate::envelope::{self, DecodeError, EncodeError};
use crate::flight::{Follower, LeaderGuard, Outcome, Role};
use crate::key::{CallKey, KeyBuf};
use crate::local::Ticket;
use crate::stats::{Bypass, Site, SiteStats, StatsRef};
use crate::store::{Lease, LeaseGuard, Store};
use crate::tags::{TagSet, Tags};

/// How long an in-process follower waits for its leader without `lock` before taking over.
const FOLLOWER_WAIT: Duration = Duration::from_secs(30);

/// What [`Fetch::find`] does next.
pub(crate) enum Step {
    /// Decode this value, then call [`Fetch::hit`] or [`Fetch::unusable`].
    Found(Stored),
    /// Run the function.
    Load,
}

/// What a load's result means for the cache, as [`Fetch::verdict`] classified and encoded it.
/// Opaque: the expansion only passes it on to [`Fetch::complete`].
#[doc(hidden)]
pub struct Verdict(pub(crate) Kind);

pub(crate) enum Kind {
    /// A value to store (and to share with the followers).
    Store(Stored),
    /// A `None`: stored only with `cache_none`, shared either way.
    StoreNone(Stored),
    /// Not to be stored (`unless`), but shared with the followers.
    Share(Stored),
    /// An error: neither stored nor shared.
    Error,
    /// Nobody wants the value (a bypass): not encoded.
    Skip,
    /// The value cannot be encoded (its `Serialize` failed, or JSON cannot represent it).
    Unencodable(EncodeError),
    /// The return type (named) is a `Result` or `Option` the expansion could not see.
    Refused(&'static str),
}

impl Verdict {
    pub(crate) fn new(stored: Stored, none: bool, rejected: bool) -> Verdict {
        Verdict(match (rejected, none) {
            (true, _) => Kind::Share(stored),
            (false, true) => Kind::StoreNone(stored),
            (false, false) => Kind::Store(stored),
        })
    }
}

enum State<'a> {
    /// Nothing yet, or finished.
    Idle,
    /// No key: the call bypasses the cache.
    Bypass,
    /// A value read without coalescing (memory), being decoded.
    Direct { key: KeyBuf },
    /// This call leads the key's flight: decoding what it found, or loading.
    Lead {
        guard: LeaderGuard<'a>,
        /// What to fill against (`None`: unknown because the backend failed; do not fill).
        generation: Option<Gen>,
        lease: Option<LeaseGuard>,
    },
    /// This call received its leader's value, being decoded.
    Follow,
    /// A load outside any flight; filled if the key and generation are known.
    Solo {
        key: Option<String>,
        generation: Option<Gen>,
    },
}

/// One cached call: see the module docs. Not public API: the attribute's expansion drives it.
#[doc(hidden)]
pub struct Fetch<'a> {
    store: &'a Store,
    site: &'static Site,
    self_type: Option<&'static str>,
    stats: StatsRef<'a>,
    key: Option<KeyBuf>,
    /// `tags = [..]`: the call's tags, and their versions once read.
    tags: Option<Box<TagSet>>,
    state: State<'a>,
    load_started: Option<Instant>,
    load_time: Duration,
    /// Between `begin_load` and `end_load`: a drop then is a panic or a cancellation.
    loading: bool,
    /// `local`: taken by the leader before it reads the backend; what it read or loaded is
    /// put in the in-process tier only if nothing touched the key since (see `local`).
    ticket: Option<Box<Ticket>>,
    /// `stale`: a value kept past its TTL, found after the load failed.
    stale: Option<Box<Stored>>,
    /// The plain read made before joining the key's flight (see [`Fetch::probes`]).
    probe: Probe,
    /// Why the call has no key, when it has none.
    bypass: Bypass,
    /// The call's `tracing` span (see `engine::trace`).
    trace: Trace,
}

/// The read a function whose lookups mostly hit makes before joining the key's flight.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Probe {
    /// None made (yet), or the function does not probe.
    None,
    /// None made: a read or load of the key (or of one sharing its slot, see
    /// [`Flights::probe`](crate::flight::Flights::probe)) was under way, so the call joined the
    /// flight at once; its leader reads with a plain `GET` first, as a probe would.
    Busy,
    /// It found nothing this call can serve: the flight's leader reads again, with its marker.
    Missed,
    /// It failed (counted): the flight's leader loads without reading again, and without a
    /// fill (it has nothing to fill against), as a leader whose read failed does.
    Failed,
}

impl Drop for Fetch<'_> {
    fn drop(&mut self) {
        if self.loading && std::thread::panicking() {
            // The function ran, and panicked: a load, and an error.
            self.stats
                .record_load(self.load_started.map_or(Duration::ZERO, |t| t.elapsed()));
            SiteStats::inc(&self.stats.load_errors);
        }
    }
}

impl<'a> Fetch<'a> {
    /// Starts a call.
    pub fn new(call: Call<'a>) -> Self {
        let cache: &'a Cache = call.cache;
        let stats = call.site.stats(cache.stats_registry(), call.self_type);
        let (key, bypass) = match call.key {
            CallKey::Key(key) => (Some(key), Bypass::Condition),
            CallKey::Condition => (None, Bypass::Condition),
            CallKey::Unrenderable => {
                cache.store().log().warn(
                    FailureKind::Key,
                    &format_args!(
                        "the cache key of `{}` could not be rendered (an argument's Display or Serialize failed); the call runs uncached",
                        call.site.label(call.self_type)
                    ),
                );
                (None, Bypass::Key)
            }
        };
        let trace = Trace::start(&stats, cache.stats_registry().trace_keys());
        Fetch {
            store: cache.store(),
            site: call.site,
            self_type: call.self_type,
            stats,
            key,
            tags: None,
            state: State::Idle,
            load_started: None,
            load_time: Duration::ZERO,
            loading: false,
            ticket: None,
            stale: None,
            probe: Probe::None,
            bypass,
            trace,
        }
    }

    /// The call's body, in the call's span (see `engine::trace`): events and spans of the
    /// body are the call's children.
    #[inline]
    pub fn traced<F>(&self, body: F) -> tracing::instrument::Instrumented<F> {
        tracing::Instrument::instrument(body, self.trace.span().clone())
    }

    /// Whether the value found or loaded goes into the in-process tier (so the verdict keeps
    /// it decoded).
    pub(crate) fn wants_local(&self) -> bool {
        self.ticket.is_some()
    }

    /// How long an in-process copy of an entry created at `created_ms` (Unix ms; `None`:
    /// now) may live: the `local` option, within what is left of the entry's TTL.
    fn local_ttl(&self, entry_ttl: Duration, created_ms: Option<u64>) -> Duration {
        let left = match created_ms {
            Some(created) => {
                let age = Duration::from_millis(envelope::now_ms().saturating_sub(created));
                entry_ttl.saturating_sub(age)
            }
            None => entry_ttl,
        };
        self.site.local.unwrap_or(Duration::ZERO).min(left)
    }

    /// `local`: puts a value read from the backend in the in-process tier (with the ticket
    /// taken before the read), if the entry records exactly this call's tags (an entry
    /// written under other tags needs their versions checked on every read).
    pub(crate) fn keep_found(&mut self, stored: &Stored, value: TypedValue) {
        let Some(ticket) = self.ticket.take() else {
            return;
        };
        let key = match &self.state {
            State::Lead { guard, .. } => guard.flight().key(),
            State::Direct { key } => key.as_str(),
            _ => return,
        };
        let recorded = if envelope::is_tagged(&stored.bytes) {
            envelope::recorded_tags(&stored.bytes).count()
        } else {
            0
        };
        if recorded != self.tags.as_ref().map_or(0, |t| t.names.len()) {
            return;
        }
        let mut entry_ttl = self.entry_ttl();
        if self.site.cache_none {
            // The entry may be a `None`, stored for its own TTL.
            entry_ttl = entry_ttl.min(self.site.none_ttl.unwrap_or(entry_ttl));
        }
        let ttl = self.local_ttl(entry_ttl, envelope::created_at_ms(&stored.bytes));
        if let Some(local) = self.store.local() {
            let header = envelope::header_of(&stored.bytes);
            local.insert(key, *ticket, value, ttl, header);
        }
    }

    /// `local`: puts a value this call loaded and stored in the in-process tier.
    fn keep_filled(&mut self, key: &str, stored: &Stored, ttl: Duration) {
        let (Some(ticket), Some(value)) = (self.ticket.take(), &stored.typed) else {
            return;
        };
        if let Some(local) = self.store.local() {
            let header = envelope::header_of(&stored.bytes);
            local.insert(
                key,
                *ticket,
                value.clone(),
                self.local_ttl(ttl, None),
                header,
            );
        }
    }

    /// The `tags` option: the entry is recorded under these tags, and served only while none
    /// of them was invalidated.
    pub fn tags(&mut self, tags: Tags) {
        if tags.failed && self.key.is_some() {
            self.store.log().warn(
                FailureKind::Key,
                &format_args!(
                    "a tag of `{}` could not be rendered (an argument's Display or Serialize failed); the call runs uncached",
                    self.site.label(self.self_type)
                ),
            );
            self.key = None;
            self.bypass = Bypass::Key;
        }
        if !tags.names.is_empty() {
            self.tags = Some(Box::new(tags.into_set()));
        }
    }

    /// The tags and the versions read, to record in the envelope (`None`: untagged).
    pub(crate) fn tag_set(&self) -> Option<&TagSet> {
        self.tags.as_deref().filter(|t| t.has_versions())
    }

    fn entry_ttl(&self) -> Duration {
        self.site.ttl.unwrap_or(self.store.default_ttl())
    }

    /// Reads the versions of this call's tags, if it has tags and they were not read yet.
    async fn read_tag_versions(&mut self) {
        let ttl = self.entry_ttl();
        let Some(tags) = self.tags.as_deref_mut() else {
            return;
        };
        if tags.has_versions() {
            return;
        }
        tags.epoch = self.store.tag_epoch(&tags.names);
        match self.store.tag_versions(&tags.names(), ttl).await {
            Ok(versions) => tags.versions = versions,
            Err(e) => self.backend_failure(&e),
        }
    }

    /// Whether a value found may be served: every tag it records still has the version it
    /// recorded, and it records every tag of this call.
    async fn tags_current(&self, stored: &Stored) -> bool {
        let mine = self.tags.as_deref();
        if !envelope::is_tagged(&stored.bytes) {
            // An entry written without tags would escape this call's tag invalidations.
            return mine.is_none();
        }
        let recorded: Vec<(&[u8], &[u8])> = envelope::recorded_tags(&stored.bytes).collect();
        if let Some(mine) = mine {
            if !mine
                .names
                .iter()
                .all(|n| recorded.iter().any(|(r, _)| *r == n.as_bytes()))
            {
                return false;
            }
        }
        let mut unknown: Vec<(&str, &[u8])> = Vec::new();
        for (name, version) in &recorded {
            match mine.and_then(|t| t.version_of(name)) {
                Some(current) => {
                    if current[..] != **version {
                        return false;
                    }
                }
                None => match std::str::from_utf8(name) {
                    Ok(name) => unknown.push((name, version)),
                    Err(_) => return false,
                },
            }
        }
        if unknown.is_empty() {
            return true;
        }
        // Written under tags this call does not have (another function's entry): one more
        // round trip for their versions.
        let names: Vec<&str> = unknown.iter().map(|(n, _)| *n).collect();
        match Box::pin(self.store.current_tags(&names, None)).await {
            Ok(current) => current
                .iter()
                .zip(&unknown)
                .all(|(c, (_, v))| c.as_deref() == Some(*v)),
            Err(e) => {
                self.backend_failure(&e);
                false
            }
        }
    }

    /// [`Fetch::lookup`], inside the call's span when a subscriber wants it (a disabled span
    /// is neither cloned nor entered: the hit path with no subscriber stays as it was).
    pub(crate) async fn traced_lookup(&mut self) -> Step {
        if self.trace.span().is_disabled() {
            self.lookup().await
        } else {
            let span = self.trace.span().clone();
            tracing::Instrument::instrument(self.lookup(), span).await
        }
    }

    /// Finds the value, or decides that this call loads it.
    pub(crate) async fn lookup(&mut self) -> Step {
        let Some(mut key) = self.key.take() else {
            self.stats.bypass(self.bypass);
            self.trace.set(Traced::Bypass);
            self.state = State::Bypass;
            return Step::Load;
        };
        self.trace.key(key.as_str());
        let store = self.store;
        if !store.coalesce_reads() {
            // Memory: a read costs less than joining a flight (and tag versions are as cheap).
            // The tag paths are boxed: every lookup's future would carry their futures.
            if self.tags.is_some() {
                Box::pin(self.read_tag_versions()).await;
            }
            match store.read(key.as_str()).await {
                Ok(Some(stored))
                    if (self.tags.is_none() && !envelope::is_tagged(&stored.bytes))
                        || Box::pin(self.tags_current(&stored)).await =>
                {
                    self.state = State::Direct { key };
                    return Step::Found(stored);
                }
                // Invalidated by a tag: a miss, loaded through the flight like any other.
                Ok(Some(_)) | Ok(None) => {}
                Err(e) => self.backend_failure(&e),
            }
        } else if self.probes() {
            // A function whose lookups mostly hit: a plain read first. A hit needs nothing
            // from the flight (it coalesces loads, and the reads that would wait for one); a
            // miss joins it, and the leader reads again, leaving its marker (a miss costs a
            // round trip more, a hit exactly a `GET`).
            // While the key is being read or loaded by another call of this process, joining
            // its flight costs less than a read (and, under a load, always misses).
            match store.flights().probe(key.as_str()) {
                None => self.probe = Probe::Busy,
                Some(probing) => {
                    if self.site.local.is_some() {
                        // Before the read: an invalidation after it makes the insert fail.
                        self.ticket = store
                            .local_tier()
                            .and_then(|l| l.ticket(key.as_str(), &[] as &[&str]))
                            .map(Box::new);
                    }
                    self.probe = Probe::Missed;
                    let read = store.read(key.as_str()).await;
                    drop(probing);
                    match read {
                        // An entry recorded under tags needs their versions checked: the
                        // flight's read does that.
                        Ok(Some(stored)) if !envelope::is_tagged(&stored.bytes) => {
                            self.state = State::Direct { key };
                            return Step::Found(stored);
                        }
                        Ok(_) => {}
                        // The key holds another Redis type, or the like: the leader's read
                        // handles it.
                        Err(BackendError::Data(_)) => {}
                        Err(e) => {
                            self.backend_failure(&e);
                            self.probe = Probe::Failed;
                        }
                    }
                }
            }
        }
        loop {
            match store.join(key) {
                // Boxed: a hit found by the probe, which never gets here, then needs a small
                // future (a call's future holds the largest of its paths').
                Role::Leader(guard) => return Box::pin(self.lead(guard)).await,
                // Boxed: the wait's timer would make every lookup's future larger.
                Role::Follower(follower) => match Box::pin(self.follow(follower)).await {
                    Ok(stored) => {
                        self.state = State::Follow;
                        return Step::Found(stored);
                    }
                    Err(again) => {
                        // The leader's value is not for this call: read the tags again too
                        // (one may have been invalidated since this call read them).
                        if let Some(tags) = self.tags.as_deref_mut() {
                            tags.versions.clear();
                        }
                        key = again;
                    }
                },
            }
        }
    }

    /// Whether a tag was invalidated through this store since this call read its versions:
    /// then its value may be stale for callers that joined it after the invalidation.
    fn tags_moved(&self) -> bool {
        self.tags
            .as_deref()
            .is_some_and(|t| self.store.tag_epoch(&t.names) != t.epoch)
    }

    /// What the followers get: not a value computed under tag versions that moved since.
    fn vet(&self, outcome: Outcome) -> Outcome {
        match outcome {
            Outcome::Value(_) if self.tags_moved() => Outcome::Retry,
            other => other,
        }
    }

    /// Replaces a value this call cannot use with its marker: what to fill against, and the
    /// marker's guard if it is this call's.
    async fn replaced(&self, key: &str) -> (Option<Gen>, Option<LeaseGuard>) {
        // Rare: boxed, so that the futures that may call this stay small.
        match Box::pin(self.store.replace(key)).await {
            Ok((generation, guard)) => (Some(generation), guard),
            Err(e) => {
                self.backend_failure(&e);
                (None, None)
            }
        }
    }

    /// `stale`: the copy of the key's last filled value, if the load failed and one may be
    /// served (no write or invalidation of the key, or of its tags, since).
    async fn find_stale(&self) -> Option<Stored> {
        let key = match &self.state {
            State::Lead { guard, .. } => guard.flight().key(),
            State::Solo { key: Some(key), .. } => key.as_str(),
            State::Direct { key } => key.as_str(),
            _ => return None,
        };
        match self.store.read_stale(key).await {
            Ok(Some(stored)) if self.tags_current(&stored).await => Some(stored),
            Ok(_) => None,
            Err(e) => {
                self.backend_failure(&e);
                None
            }
        }
    }

    /// The key this call leads or loads, if any.
    fn state_key(&self) -> Option<&str> {
        match &self.state {
            State::Lead { guard, .. } => Some(guard.flight().key()),
            State::Solo { key: Some(key), .. } => Some(key.as_str()),
            State::Direct { key } => Some(key.as_str()),
            _ => None,
        }
    }

    /// `stale`: whether this call skips its load because the key's load failed moments ago
    /// in this process (see [`Store::mark_failing`]) and its stale copy is still there: the
    /// copy is then the call's answer (and its waiting callers'), taken by
    /// [`Finish::stale`](crate::engine::Finish::stale). During an outage a key's load runs
    /// at most once per second per process; the other calls do not wait for it to fail.
    pub async fn skip_load(&mut self) -> bool {
        if self.site.stale.is_none() || !self.state_key().is_some_and(|k| self.store.failing(k)) {
            return false;
        }
        let Some(stale) = self.find_stale().await else {
            return false;
        };
        self.loading = false;
        self.stale = Some(Box::new(stale.clone()));
        // `stale` is recorded where the copy is served (`Fetch::served_stale`), once decoded.
        self.share(stale).await;
        true
    }

    /// `stale`: the value found by a failed load's [`Fetch::find_stale`], for the caller.
    pub(crate) fn take_stale(&mut self) -> Option<Stored> {
        self.stale.take().map(|s| *s)
    }

    /// Counts a stale value served.
    pub(crate) fn served_stale(&self) {
        SiteStats::inc(&self.stats.stale_served);
        self.trace.set(Traced::Stale);
    }

    /// Waits for the leader: its value, or the key to join again.
    async fn follow(&self, follower: Follower) -> Result<Stored, KeyBuf> {
        let max_wait = match self.site.lock {
            // The leader may wait up to twice the lease for another process's holder, then
            // load for up to one lease itself.
            Some(lease) if self.store.is_shared() => lease * 3,
            // In-process only: the leader loads at once.
            Some(lease) => lease,
            None => FOLLOWER_WAIT,
        };
        match tokio::time::timeout(max_wait, follower.wait()).await {
            Ok(Outcome::Value(stored)) => Ok(stored),
            Ok(Outcome::Retry) => Err(follower.into_key()),
            Err(_elapsed) => {
                // The leader is stuck (a hung query, a lost wake-up). The first follower whose
                // wait ends detaches its flight and joins again, leading a new one; the others
                // join that new flight as their own waits end, so exactly one load runs.
                SiteStats::inc(&self.stats.wait_timeouts);
                if self.store.flights().detach(follower.flight()) {
                    SiteStats::inc(&self.stats.takeovers);
                }
                Err(follower.into_key())
            }
        }
    }

    /// Leads the flight of `guard`: reads, or leases, the key (and reads its tags' versions at
    /// the same time).
    async fn lead(&mut self, guard: LeaderGuard<'a>) -> Step {
        let store = self.store;
        let key = guard.flight().key();
        let ttl = self.entry_ttl();
        if self.site.local.is_some() {
            // Before the read: an invalidation after it makes the insert fail.
            let tags = self.tags.as_deref().map_or(&[][..], |t| &t.names[..]);
            self.ticket = store
                .local_tier()
                .and_then(|l| l.ticket(key, tags))
                .map(Box::new);
        }
        let names = self
            .tags
            .as_deref()
            .filter(|t| !t.has_versions())
            .map(TagSet::names);
        // Before the read (recorded in the tags once `names` is done with them).
        let epoch = names.as_deref().map(|names| store.tag_epoch(names));
        // The tagged paths are boxed: every lookup's future would carry their futures.
        let ((mut found, mut generation, mut lease), versions) = match (&names, self.site.lock) {
            (None, _) => (self.read(key).await, None),
            // The value and the tags' versions in one request.
            (Some(names), None) => {
                let (read, versions) = Box::pin(store.read_for_fill_tagged(key, names, ttl)).await;
                (self.read_done(key, read).await, Some(versions))
            }
            (Some(names), Some(_)) => {
                tokio::join!(self.read(key), async {
                    Some(Box::pin(store.tag_versions(names, ttl)).await)
                })
            }
        };
        drop(names);
        if let (Some(epoch), Some(tags)) = (epoch, self.tags.as_deref_mut()) {
            tags.epoch = epoch;
        }
        match versions {
            Some(Ok(versions)) => {
                if let Some(tags) = self.tags.as_deref_mut() {
                    tags.versions = versions;
                }
            }
            Some(Err(e)) => {
                // Without the versions nothing can be served or recorded under the tags.
                self.backend_failure(&e);
                found = None;
                generation = None;
            }
            None => {}
        }
        if let Some(stored) = &found {
            if (self.tags.is_some() || envelope::is_tagged(&stored.bytes))
                && !Box::pin(self.tags_current(stored)).await
            {
                // Invalidated by a tag: load, and fill over it.
                found = None;
                (generation, lease) = self.replaced(key).await;
                if lease.is_none()
                    && generation.is_some()
                    && self.site.lock.is_some()
                    && store.is_shared()
                {
                    // With `lock`, another process replaced it first and loads: wait for its
                    // fill as any lock waiter does.
                    match Box::pin(self.read(key)).await {
                        (Some(fresh), ..) if Box::pin(self.tags_current(&fresh)).await => {
                            found = Some(fresh);
                            generation = None;
                        }
                        (Some(_), ..) => (generation, lease) = self.replaced(key).await,
                        (None, g, l) => (generation, lease) = (g, l),
                    }
                }
            }
        }
        self.state = State::Lead {
            guard,
            generation,
            lease,
        };
        match found {
            Some(stored) => Step::Found(stored),
            None => Step::Load,
        }
    }

    /// The leader's read: the value, or what to fill against (and the lease, with `lock`).
    async fn read(&self, key: &str) -> (Option<Stored>, Option<Gen>, Option<LeaseGuard>) {
        let store = self.store;
        if self.probe == Probe::Failed {
            // This call's read before the flight failed (and was counted): load, unfilled.
            return (None, None, None);
        }
        match self.site.lock {
            // Boxed: the lease's future is large, and every lookup's future would carry it.
            Some(lease_len) => match Box::pin(
                store.lease(key, lease_len, &|| SiteStats::inc(&self.stats.lock_waits)),
            )
            .await
            {
                Ok((answer, waited)) => {
                    if let Some(waited) = waited {
                        self.stats.record_wait(waited);
                    }
                    match answer {
                        Lease::Hit(stored) => {
                            if waited.is_some() {
                                self.trace.set(Traced::LockWait);
                            }
                            (Some(stored), None, None)
                        }
                        Lease::Acquired(generation, lease) => {
                            SiteStats::inc(&self.stats.lock_acquired);
                            if waited.is_some() {
                                SiteStats::inc(&self.stats.takeovers);
                            }
                            (None, Some(generation), Some(lease))
                        }
                        // The server refuses writes: no lease, and nothing to fill.
                        Lease::WaitedOut(generation) if generation.0.is_empty() => {
                            (None, None, None)
                        }
                        Lease::WaitedOut(generation) => {
                            SiteStats::inc(&self.stats.wait_timeouts);
                            (None, Some(generation), None)
                        }
                    }
                }
                Err(e) => {
                    let (generation, marker) = self.failed_read(key, &e).await;
                    (None, generation, marker)
                }
            },
            // The marker this call may leave in the key is held like a lease: filling
            // replaces it, a result not stored removes it (in the background).
            // The read a probe would have made, and the marker only on a miss.
            None if self.probe == Probe::Busy => match store.read(key).await {
                Ok(Some(stored)) => (Some(stored), None, None),
                Ok(None) | Err(BackendError::Data(_)) => {
                    let read = store.read_for_fill(key).await;
                    self.read_done(key, read).await
                }
                Err(e) => {
                    self.backend_failure(&e);
                    (None, None, None)
                }
            },
            None => {
                let read = store.read_for_fill(key).await;
                self.read_done(key, read).await
            }
        }
    }

    /// Whether this lookup reads the key before joining its flight: on a shared backend, for
    /// a function without `tags` whose lookups mostly hit (over 80%, after 32 lookups). Such
    /// a read leaves no pending-load marker and asks for no lease; a miss then joins the
    /// flight, whose leader reads with its marker, or asks for the lease (see
    /// [`Fetch::lookup`]).
    fn probes(&self) -> bool {
        if self.probe != Probe::None || self.tags.is_some() {
            return false;
        }
        let (hits, misses) = (self.stats.hits.get(), self.stats.misses.get());
        hits + misses >= 32 && hits >= 4 * misses
    }

    /// What a read without `lock` found.
    async fn read_done(
        &self,
        key: &str,
        read: BackendResult<(Read, Option<LeaseGuard>)>,
    ) -> (Option<Stored>, Option<Gen>, Option<LeaseGuard>) {
        match read {
            Ok((Read::Hit(stored), _)) => (Some(stored), None, None),
            // The server refuses writes: nothing to fill against.
            Ok((Read::Miss(generation), _)) if generation.0.is_empty() => (None, None, None),
            Ok((Read::Miss(generation), marker)) => (None, Some(generation), marker),
            Err(e) => {
                let (generation, marker) = self.failed_read(key, &e).await;
                (None, generation, marker)
            }
        }
    }

    /// A read failed: count it; what to fill against, if it can be had.
    async fn failed_read(&self, key: &str, e: &BackendError) -> (Option<Gen>, Option<LeaseGuard>) {
        match e {
            // The key holds another Redis type: a miss, and the fill overwrites it.
            BackendError::Data(msg) if msg.contains("WRONGTYPE") => {
                self.decode_failure(msg);
                self.replaced(key).await
            }
            // Without the generation a fill could be stale: it is skipped.
            _ => {
                self.backend_failure(e);
                (None, None)
            }
        }
    }

    /// `refresh`: the value found decoded, and the call will return it. If this call read
    /// it (not a follower) and its entry is due, starts a background refresh (see
    /// `engine::refresh`).
    pub(crate) fn refresh_if_due(&self, stored: &Stored, refresher: &Refresher<'_>) {
        let Some(policy) = self.site.refresh else {
            return;
        };
        let key = match &self.state {
            State::Lead { guard, .. } => guard.flight().key(),
            State::Direct { key } => key.as_str(),
            _ => return,
        };
        let Some(header) = envelope::header_of(&stored.bytes) else {
            return;
        };
        let tags = self.tags.as_deref().map_or(&[][..], |t| &t.names[..]);
        refresh::start_if_due(
            self.store,
            self.site,
            self.self_type,
            policy,
            key,
            tags,
            &header,
            refresher,
            self.trace.span(),
        );
    }

    /// The value found decoded: the call returns it.
    pub(crate) fn hit(&mut self, stored: Stored) {
        SiteStats::inc(&self.stats.hits);
        match std::mem::replace(&mut self.state, State::Idle) {
            State::Lead { guard, .. } => {
                self.trace.set(Traced::Hit);
                guard.publish(self.vet(Outcome::Value(stored)));
            }
            State::Follow => {
                self.trace.set(Traced::Coalesced);
                SiteStats::inc(&self.stats.coalesced);
            }
            _ => self.trace.set(Traced::Hit),
        }
    }

    /// The value found does not decode (another program's data, an older layout): a miss,
    /// and the load's fill overwrites it. `true`: look the key up again, through its flight
    /// (the value came from a read before the flight, see [`Fetch::probes`]: the flight's
    /// leader reads it again and replaces it with its marker; counted then).
    pub(crate) async fn unusable(&mut self, e: &DecodeError) -> bool {
        if self.probe != Probe::None && matches!(self.state, State::Direct { .. }) {
            if let State::Direct { key } = std::mem::replace(&mut self.state, State::Idle) {
                self.key = Some(key);
            }
            return true;
        }
        self.decode_failure(e);
        self.state = match std::mem::replace(&mut self.state, State::Idle) {
            State::Lead { guard, lease, .. } => {
                let (generation, marker) = self.replaced(guard.flight().key()).await;
                State::Lead {
                    guard,
                    generation,
                    lease: lease.or(marker),
                }
            }
            State::Direct { key } => {
                // Memory: no marker to guard.
                let (generation, _) = self.replaced(key.as_str()).await;
                State::Solo {
                    key: Some(key.into_string()),
                    generation,
                }
            }
            // The leader decoded what this call could not: load, and leave the entry alone.
            _ => State::Solo {
                key: None,
                generation: None,
            },
        };
        false
    }

    /// The function starts running.
    pub(crate) fn begin_load(&mut self) {
        if !matches!(self.state, State::Bypass) {
            SiteStats::inc(&self.stats.misses);
            self.trace.set(Traced::Miss);
        }
        self.loading = true;
        self.load_started = Some(Instant::now());
    }

    /// The function returned.
    pub(crate) fn end_load(&mut self) {
        self.loading = false;
        self.load_time = self.load_started.map_or(Duration::ZERO, |t| t.elapsed());
        self.stats.record_load(self.load_time);
    }

    /// How long the function ran.
    pub(crate) fn load_time(&self) -> Duration {
        self.load_time
    }

    /// Whether the result will be stored or shared (otherwise it need not be encoded).
    pub(crate) fn wants_value(&self) -> bool {
        match &self.state {
            State::Lead { .. } => true,
            State::Solo { key, generation } => key.is_some() && generation.is_some(),
            _ => false,
        }
    }

    /// Whether stored values may carry their decoded form.
    pub(crate) fn keeps_typed(&self) -> bool {
        self.store.keeps_typed()
    }

    /// Stores and shares the load's result as its verdict says.
    pub async fn complete(&mut self, verdict: Verdict) {
        // Boxed: the call's future holds the largest of its paths', and a hit's is small.
        if self.trace.span().is_disabled() {
            Box::pin(self.complete_boxed(verdict)).await;
        } else {
            let span = self.trace.span().clone();
            tracing::Instrument::instrument(Box::pin(self.complete_boxed(verdict)), span).await;
        }
    }

    async fn complete_boxed(&mut self, verdict: Verdict) {
        let (stored, none) = match verdict.0 {
            Kind::Store(stored) => (stored, false),
            Kind::StoreNone(stored) => (stored, true),
            Kind::Share(stored) => {
                SiteStats::inc(&self.stats.not_stored);
                self.share(stored).await;
                return;
            }
            Kind::Error => {
                SiteStats::inc(&self.stats.load_errors);
                if !matches!(self.state, State::Bypass) {
                    SiteStats::inc(&self.stats.not_stored);
                }
                if self.site.stale.is_some() {
                    if let Some(stale) = Box::pin(self.find_stale()).await {
                        // The callers waiting for this load get the stale value too, and the
                        // key's next calls for a moment (see `Fetch::skip_load`).
                        if let Some(key) = self.state_key() {
                            self.store.mark_failing(key);
                        }
                        self.stale = Some(Box::new(stale.clone()));
                        self.share(stale).await;
                        return;
                    }
                }
                self.retry().await;
                return;
            }
            Kind::Skip => {
                self.retry().await;
                return;
            }
            Kind::Unencodable(e) => {
                SiteStats::inc(&self.stats.not_stored);
                self.store.log().warn(
                    FailureKind::Encode,
                    &format_args!(
                        "result of `{}` could not be encoded, not cached: {e}",
                        self.site.label(self.self_type)
                    ),
                );
                self.retry().await;
                return;
            }
            Kind::Refused(ty) => {
                SiteStats::inc(&self.stats.not_stored);
                self.store.log().warn(
                    FailureKind::Encode,
                    &format_args!(
                        "`{}` returns `{ty}` through a type parameter, so `#[cached]` cannot tell its errors or `None`s from values: nothing is cached; write the return type's shape (`Result<T, E>`, `Option<T>`)",
                        self.site.label(self.self_type)
                    ),
                );
                self.retry().await;
                return;
            }
        };
        if none && !self.site.cache_none {
            SiteStats::inc(&self.stats.not_stored);
            self.share(stored).await;
            return;
        }
        let ttl = self.site.ttl.unwrap_or(self.store.default_ttl());
        // `stale`: a copy of the value outlives the entry by that much, served only if a load
        // fails (a `None` gets none).
        let (ttl, keep) = if none {
            (self.site.none_ttl.unwrap_or(ttl), None)
        } else {
            (ttl, self.site.stale.map(|stale| ttl.saturating_add(stale)))
        };
        match std::mem::replace(&mut self.state, State::Idle) {
            State::Lead {
                guard,
                generation,
                lease,
            } => {
                let key = guard.flight().key();
                // The followers hear the outcome only after the fill's verdict: a fill
                // rejected as stale means a write or invalidation happened during the load
                // (possibly in another process), and a caller that joined after it must not
                // get this value.
                let outcome = match generation {
                    // Written or invalidated through this process while the function ran.
                    Some(_) if guard.flight().is_stale() => {
                        SiteStats::inc(&self.stats.stale_fills);
                        self.release(lease).await;
                        Outcome::Retry
                    }
                    Some(generation) => {
                        let (filled, tags_kept) = self
                            .fill(key, stored.clone(), ttl, &generation, lease, keep)
                            .await;
                        match filled {
                            // A tag was invalidated while the function ran: the entry records
                            // the old version (it is never served), and a caller that joined
                            // after the invalidation must not get this value either.
                            Ok(true) if !tags_kept => {
                                SiteStats::inc(&self.stats.stale_fills);
                                Outcome::Retry
                            }
                            Ok(true) => {
                                self.keep_filled(key, &stored, ttl);
                                Outcome::Value(stored)
                            }
                            // Written or invalidated (in any process) while the function
                            // ran: storing would have put back a value older than the write.
                            Ok(false) => {
                                SiteStats::inc(&self.stats.stale_fills);
                                Outcome::Retry
                            }
                            // The lease (if any) is released in the background.
                            Err(e) => {
                                self.backend_failure(&e);
                                Outcome::Value(stored)
                            }
                        }
                    }
                    // The read failed: without the generation a fill could be stale.
                    None => {
                        self.release(lease).await;
                        Outcome::Value(stored)
                    }
                };
                guard.publish(self.vet(outcome));
            }
            State::Solo {
                key: Some(key),
                generation: Some(generation),
            } => match self
                .fill(&key, stored, ttl, &generation, None, keep)
                .await
                .0
            {
                Ok(true) => {}
                Ok(false) => SiteStats::inc(&self.stats.stale_fills),
                Err(e) => self.backend_failure(&e),
            },
            _ => {}
        }
    }

    /// Fills, and with tags, at the same time extends the tags' lives to the entry's and
    /// checks that none was invalidated during the load (`false` if one was).
    async fn fill(
        &self,
        key: &str,
        stored: Stored,
        ttl: Duration,
        generation: &Gen,
        lease: Option<LeaseGuard>,
        keep: Option<Duration>,
    ) -> (Result<bool, BackendError>, bool) {
        // Boxed: the call's future (which holds this one's) stays small for hits.
        let fill = Box::pin(self.store.fill(key, stored, ttl, generation, lease, keep));
        let Some(tags) = self.tag_set() else {
            return (fill.await, true);
        };
        let names = tags.names();
        // The tags live as long as the entry, or its stale copy.
        let life = keep.unwrap_or(ttl);
        let (filled, current) =
            tokio::join!(fill, Box::pin(self.store.current_tags(&names, Some(life))));
        let kept = match current {
            Ok(current) => current
                .iter()
                .zip(&tags.versions)
                .all(|(c, v)| c.as_ref() == Some(v)),
            Err(e) => {
                self.backend_failure(&e);
                false
            }
        };
        (filled, kept)
    }

    /// The result is not stored, but the followers may have it.
    async fn share(&mut self, stored: Stored) {
        if let State::Lead { guard, lease, .. } = std::mem::replace(&mut self.state, State::Idle) {
            self.release(lease).await;
            guard.publish(self.vet(Outcome::Value(stored)));
        }
    }

    /// Nothing to share: the lease goes back, and one follower leads the next attempt.
    async fn retry(&mut self) {
        if let State::Lead { guard, lease, .. } = std::mem::replace(&mut self.state, State::Idle) {
            self.release(lease).await;
            guard.publish(Outcome::Retry);
        }
    }

    /// Gives the lease back (with `lock`). A pending-load marker, not a lease, is only
    /// dropped: nobody waits on it, so the call does not wait for its removal either (the
    /// guard removes it in the background).
    async fn release(&self, lease: Option<LeaseGuard>) {
        // Boxed, and only with a lease: the futures holding this one stay small.
        if let Some(lease) = lease.filter(|_| self.site.lock.is_some()) {
            if let Err(e) = Box::pin(self.store.release(lease)).await {
                self.backend_failure(&e);
            }
        }
    }

    fn decode_failure(&self, e: &dyn std::fmt::Display) {
        SiteStats::inc(&self.stats.decode_errors);
        self.trace.set(Traced::FailOpen);
        self.store.log().warn(
            FailureKind::Decode,
            &format_args!(
                "cached value of `{}` is unusable ({e}); treated as a miss and overwritten",
                self.site.label(self.self_type)
            ),
        );
    }

    fn backend_failure(&self, e: &BackendError) {
        self.stats.backend_failure(e);
        self.trace.set(Traced::FailOpen);
        // The backend logs connectivity failures itself (it knows about the breaker).
        if let BackendError::Data(msg) = e {
            self.store.log().warn(
                FailureKind::Server,
                &format_args!("cache operation failed ({msg}); the result is returned uncached"),
            );
        }
    }
}
