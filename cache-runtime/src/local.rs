//! The in-process tier (`local`): decoded values kept in front of a shared backend (Redis),
//! coherent with every other process.
//!
//! **Coherence.** Every write and invalidation, in any process, publishes the keys or tags it
//! touched on the cache's invalidation channel, atomically with the write (the backend's
//! business, see [`Invalidations`]). Each process removes its copies when the message
//! arrives, and removes them itself, synchronously, for its own writes.
//!
//! **Never insert what was read before an invalidation.** A load takes a [`Ticket`] *before*
//! it reads the shared backend: the sequence number of the key's stripe, the sequence
//! numbers of its tags' stripes, and the tier's epoch. A removal bumps the key's stripe under
//! its lock, an insert checks the ticket under the same lock. If a write W is applied in Redis
//! after the read, its message is published after the read, hence reaches this process after
//! the ticket was taken: applied before the insert, it makes the insert fail; applied after,
//! it removes what was inserted. If W was applied before the read, the read saw W's value.
//! Stripes are shared by many keys (1024 of them), so a removal may reject an unrelated
//! insert: that costs a miss of this tier, never a stale value.
//!
//! **Tags.** An entry records its tags' stripe sequence numbers from its ticket, and a hit
//! checks them (one atomic load per tag): a tag invalidation bumps the tag's stripe, which
//! hides every entry recorded under it without walking them.
//!
//! **When messages may have been missed** (the subscription dropped, Redis restarted, a
//! heartbeat went unanswered, the breaker opened: [`Invalidations::lost`]), the tier is
//! cleared (its epoch moves, so entries and tickets from before are dead) and is not used until
//! a heartbeat sent after the loss comes back ([`Invalidations::delivered`]). Each answered
//! heartbeat keeps the tier usable for `staleness` after the heartbeat was *sent*; so whatever
//! fails, no copy is served later than `staleness` after a write elsewhere returned (the
//! documented bound), and in the normal case it is gone within the message's delivery time.

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use moka::Expiry;

use crate::backend::{Invalidations, TypedValue};
use crate::envelope::Header;
use crate::tags::TagEpochs;

const KEY_STRIPES: usize = 1024;
const TAG_STRIPES: usize = 4096;

/// The default number of entries of the tier ([`CacheBuilder::local`](crate::CacheBuilder::local)).
pub(crate) const DEFAULT_CAPACITY: u64 = 10_000;

/// The default staleness bound ([`CacheBuilder::local_staleness`](crate::CacheBuilder::local_staleness)).
pub(crate) const DEFAULT_STALENESS: Duration = Duration::from_secs(1);

/// One value in the tier.
pub(crate) struct LocalEntry {
    /// The decoded value (a `Typed` wrap of the function's stored type).
    pub(crate) value: TypedValue,
    /// The tier's epoch at the ticket: a clear kills the entry even if it was inserted after.
    epoch: u64,
    /// Per tag of the entry, in the order of the call that made it: the tag's stripe, the
    /// stripe's sequence number at the ticket, and a hash of the tag's name (a hit must be for
    /// the same tags).
    tags: Box<[TagMark]>,
    /// How long it lives in the tier.
    ttl: Duration,
    /// The header of the envelope it was decoded from (created-at, compute time), for
    /// `refresh`; `None` if it had none.
    pub(crate) header: Option<Header>,
}

struct EntryTtl;

impl Expiry<String, Arc<LocalEntry>> for EntryTtl {
    fn expire_after_create(
        &self,
        _: &String,
        entry: &Arc<LocalEntry>,
        _: Instant,
    ) -> Option<Duration> {
        Some(entry.ttl)
    }

    fn expire_after_update(
        &self,
        _: &String,
        entry: &Arc<LocalEntry>,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(entry.ttl)
    }
}

/// One tag of an entry or ticket: its stripe, the stripe's sequence number, its name's hash.
#[derive(Debug, Clone, Copy)]
struct TagMark {
    stripe: u32,
    seq: u64,
    name: u64,
}

/// What a load took before it read the shared backend: an insert of its result is accepted
/// only if nothing touched its key, its tags or the tier since.
#[derive(Debug)]
pub(crate) struct Ticket {
    epoch: u64,
    stripe: u32,
    seq: u64,
    tags: Box<[TagMark]>,
}

/// Whether the tier may be used, and since when it may not.
struct Health {
    /// Until when (µs since `base`) hits may be served; 0: not usable.
    fresh_until: AtomicU64,
    /// When (µs since `base`) messages were last lost: an answer to a heartbeat sent before
    /// then does not make the tier usable again.
    lost_at: Mutex<u64>,
}

/// The in-process tier of one cache. See the module docs.
pub(crate) struct Local {
    entries: moka::sync::Cache<String, Arc<LocalEntry>, foldhash::fast::RandomState>,
    /// Per key stripe: its sequence number, bumped (under the lock) by every removal.
    stripes: Box<[Mutex<u64>]>,
    /// Per tag stripe: its sequence number, bumped by every tag invalidation.
    tag_seqs: Box<[AtomicU64]>,
    /// Bumped by every clear.
    epoch: AtomicU64,
    hasher: foldhash::fast::FixedState,
    base: Instant,
    health: Health,
    staleness: Duration,
    /// The store's in-process tag epochs, bumped by other processes' tag invalidations too
    /// (so that a load whose tag moved elsewhere does not share its value with callers that
    /// joined it after the invalidation).
    tag_epochs: Arc<TagEpochs>,
    clears: AtomicU64,
}

impl Local {
    pub(crate) fn new(capacity: u64, staleness: Duration, tag_epochs: Arc<TagEpochs>) -> Self {
        Local {
            entries: moka::sync::Cache::builder()
                .max_capacity(capacity)
                .expire_after(EntryTtl)
                .build_with_hasher(foldhash::fast::RandomState::default()),
            stripes: (0..KEY_STRIPES).map(|_| Mutex::new(0)).collect(),
            tag_seqs: (0..TAG_STRIPES).map(|_| AtomicU64::new(0)).collect(),
            epoch: AtomicU64::new(0),
            hasher: foldhash::fast::FixedState::default(),
            base: Instant::now(),
            health: Health {
                fresh_until: AtomicU64::new(0),
                lost_at: Mutex::new(0),
            },
            staleness,
            tag_epochs,
            clears: AtomicU64::new(0),
        }
    }

    /// Microseconds since `base`, at least 1 (integer arithmetic only: this is on every hit).
    #[inline]
    fn ticks(&self, at: Instant) -> u64 {
        let d = at.saturating_duration_since(self.base);
        d.as_secs() * 1_000_000 + u64::from(d.subsec_micros()) + 1
    }

    /// Whether the tier may be used now (the invalidation stream is known to be complete up
    /// to less than `staleness` ago).
    #[inline]
    pub(crate) fn usable(&self) -> bool {
        self.ticks(Instant::now()) < self.health.fresh_until.load(Ordering::Acquire)
    }

    fn stripe(&self, key: &str) -> u32 {
        (self.hasher.hash_one(key) % KEY_STRIPES as u64) as u32
    }

    fn tag_stripe(&self, tag: &str) -> u32 {
        (self.hasher.hash_one(tag) % TAG_STRIPES as u64) as u32
    }

    fn lock(&self, stripe: u32) -> std::sync::MutexGuard<'_, u64> {
        self.stripes[stripe as usize]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// The value under `key` for a call with `tags`, if the tier is usable and it holds a live
    /// one made under the same tags: none of them invalidated since, and no other (an entry
    /// made under other tags would escape this call's tag invalidations, as on a read of the
    /// backend).
    #[inline]
    pub(crate) fn get<S: AsRef<str>>(&self, key: &str, tags: &[S]) -> Option<Arc<LocalEntry>> {
        if !self.usable() {
            return None;
        }
        let entry = self.entries.get(key)?;
        let live = entry.epoch == self.epoch.load(Ordering::Acquire)
            && entry.tags.len() == tags.len()
            && entry.tags.iter().zip(tags).all(|(mark, name)| {
                mark.name == self.hasher.hash_one(name.as_ref())
                    && self.tag_seqs[mark.stripe as usize].load(Ordering::Acquire) == mark.seq
            });
        live.then_some(entry)
    }

    /// A ticket for a load of `key` under `tags` that is about to read the shared backend;
    /// `None` while the tier is not usable (nothing read now may be inserted).
    pub(crate) fn ticket<S: AsRef<str>>(&self, key: &str, tags: &[S]) -> Option<Ticket> {
        if !self.usable() {
            return None;
        }
        let stripe = self.stripe(key);
        let tags = tags
            .iter()
            .map(|t| {
                let stripe = self.tag_stripe(t.as_ref());
                TagMark {
                    stripe,
                    seq: self.tag_seqs[stripe as usize].load(Ordering::Acquire),
                    name: self.hasher.hash_one(t.as_ref()),
                }
            })
            .collect();
        let seq = *self.lock(stripe);
        Some(Ticket {
            epoch: self.epoch.load(Ordering::Acquire),
            stripe,
            seq,
            tags,
        })
    }

    /// Inserts `value` (decoded from the envelope of `header`) under `key` for `ttl` if
    /// nothing touched the key, its tags or the tier since `ticket` was taken, and the tier
    /// is usable. Returns whether it did.
    pub(crate) fn insert(
        &self,
        key: &str,
        ticket: Ticket,
        value: TypedValue,
        ttl: Duration,
        header: Option<Header>,
    ) -> bool {
        if ttl.is_zero() {
            return false;
        }
        let guard = self.lock(ticket.stripe);
        let current = *guard == ticket.seq
            && self.epoch.load(Ordering::Acquire) == ticket.epoch
            && self.usable()
            && ticket
                .tags
                .iter()
                .all(|m| self.tag_seqs[m.stripe as usize].load(Ordering::Acquire) == m.seq);
        if current {
            self.entries.insert(
                key.to_owned(),
                Arc::new(LocalEntry {
                    value,
                    epoch: ticket.epoch,
                    tags: ticket.tags,
                    ttl,
                    header,
                }),
            );
        }
        drop(guard);
        current
    }

    /// Removes `key`'s copy, and makes inserts of loads that read before now fail.
    pub(crate) fn remove(&self, key: &str) {
        let mut guard = self.lock(self.stripe(key));
        *guard += 1;
        self.entries.invalidate(key);
    }

    /// Hides every entry recorded under `tags`, and makes inserts of loads that read before
    /// now fail.
    pub(crate) fn bump_tags<S: AsRef<str>>(&self, tags: &[S]) {
        for tag in tags {
            self.tag_seqs[self.tag_stripe(tag.as_ref()) as usize].fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Drops every entry, and every ticket taken before.
    #[cfg(test)]
    fn clear(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.entries.invalidate_all();
    }

    /// How many times the tier was cleared because invalidations may have been missed.
    pub(crate) fn clears(&self) -> u64 {
        self.clears.load(Ordering::Relaxed)
    }

    /// The staleness bound.
    pub(crate) fn staleness(&self) -> Duration {
        self.staleness
    }

    /// The sequence number of `key`'s stripe (it moves with every removal there).
    #[cfg(test)]
    pub(crate) fn seq_of(&self, key: &str) -> u64 {
        *self.lock(self.stripe(key))
    }

    #[cfg(test)]
    fn make_usable(&self) {
        self.delivered(Instant::now());
    }
}

impl Invalidations for Local {
    fn keys(&self, keys: &mut dyn Iterator<Item = &str>) {
        for key in keys {
            self.remove(key);
        }
    }

    fn tags(&self, tags: &mut dyn Iterator<Item = &str>) {
        let tags: Vec<&str> = tags.collect();
        self.bump_tags(&tags);
        self.tag_epochs.bump(&tags);
    }

    fn lost(&self) {
        let mut lost_at = self
            .health
            .lost_at
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        *lost_at = self.ticks(Instant::now());
        let was_usable = self.health.fresh_until.swap(0, Ordering::AcqRel) != 0;
        drop(lost_at);
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.entries.invalidate_all();
        // Counted when the tier had been in use (not for the loss every new subscription
        // starts with).
        if was_usable {
            self.clears.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn delivered(&self, sent: Instant) {
        let lost_at = self
            .health
            .lost_at
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let sent = self.ticks(sent);
        if sent <= *lost_at {
            // Sent before messages were lost: it says nothing about those.
            return;
        }
        let until = sent.saturating_add(u64::try_from(self.staleness.as_micros()).unwrap_or(0));
        self.health.fresh_until.fetch_max(until, Ordering::AcqRel);
        drop(lost_at);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(n: u32) -> TypedValue {
        Arc::new(n)
    }

    fn read(local: &Local, key: &str) -> Option<u32> {
        read_tagged(local, key, &[])
    }

    fn read_tagged(local: &Local, key: &str, tags: &[&str]) -> Option<u32> {
        local
            .get(key, tags)
            .and_then(|e| e.value.downcast_ref::<u32>().copied())
    }

    fn tier() -> Local {
        let local = Local::new(100, Duration::from_secs(60), Arc::new(TagEpochs::new()));
        local.make_usable();
        local
    }

    #[test]
    fn an_insert_after_a_removal_of_its_key_is_rejected() {
        let local = tier();
        let t = local.ticket("k", &[] as &[&str]).unwrap();
        local.remove("k");
        assert!(!local.insert("k", t, value(1), Duration::from_secs(60), None));
        assert_eq!(read(&local, "k"), None);
        let t = local.ticket("k", &[] as &[&str]).unwrap();
        assert!(local.insert("k", t, value(2), Duration::from_secs(60), None));
        assert_eq!(read(&local, "k"), Some(2));
        local.remove("k");
        assert_eq!(read(&local, "k"), None);
    }

    #[test]
    fn a_clear_rejects_earlier_tickets_and_kills_entries() {
        let local = tier();
        let t = local.ticket("k", &[] as &[&str]).unwrap();
        let t2 = local.ticket("j", &[] as &[&str]).unwrap();
        assert!(local.insert("j", t2, value(1), Duration::from_secs(60), None));
        local.clear();
        assert!(!local.insert("k", t, value(1), Duration::from_secs(60), None));
        assert_eq!(read(&local, "j"), None);
    }

    #[test]
    fn a_tag_bump_hides_entries_and_rejects_inserts() {
        let local = tier();
        let t = local.ticket("k", &["org:1"]).unwrap();
        assert!(local.insert("k", t, value(1), Duration::from_secs(60), None));
        assert_eq!(read_tagged(&local, "k", &["org:1"]), Some(1));
        let t = local.ticket("j", &["org:1", "org:2"]).unwrap();
        local.bump_tags(&["org:1"]);
        assert!(!local.insert("j", t, value(1), Duration::from_secs(60), None));
        assert_eq!(read_tagged(&local, "k", &["org:1"]), None);
        let t = local.ticket("k", &["org:1"]).unwrap();
        assert!(local.insert("k", t, value(3), Duration::from_secs(60), None));
        assert_eq!(read_tagged(&local, "k", &["org:1"]), Some(3));
    }

    #[test]
    fn a_hit_is_for_the_tags_the_entry_was_made_under() {
        let local = tier();
        let t = local.ticket("k", &["org:1"]).unwrap();
        assert!(local.insert("k", t, value(1), Duration::from_secs(60), None));
        assert_eq!(read_tagged(&local, "k", &["org:1"]), Some(1));
        assert_eq!(read_tagged(&local, "k", &["org:2"]), None, "other tags");
        assert_eq!(read(&local, "k"), None, "an untagged call");
        assert_eq!(read_tagged(&local, "k", &["org:1", "x"]), None, "more tags");
        let t = local.ticket("u", &[] as &[&str]).unwrap();
        assert!(local.insert("u", t, value(2), Duration::from_secs(60), None));
        assert_eq!(read_tagged(&local, "u", &["org:1"]), None, "a tagged call");
    }

    #[test]
    fn lost_messages_make_it_unusable_until_a_later_heartbeat() {
        let local = tier();
        let t = local.ticket("k", &[] as &[&str]).unwrap();
        assert!(local.insert("k", t, value(1), Duration::from_secs(60), None));
        let before = Instant::now();
        std::thread::sleep(Duration::from_millis(2));
        local.lost();
        assert!(!local.usable());
        assert_eq!(read(&local, "k"), None);
        assert!(local.ticket("k", &[] as &[&str]).is_none());
        // An answer to a heartbeat sent before the loss says nothing.
        local.delivered(before);
        assert!(!local.usable());
        local.delivered(Instant::now());
        assert!(local.usable());
        assert_eq!(read(&local, "k"), None, "cleared");
        assert_eq!(local.clears(), 1);
    }

    #[test]
    fn the_tier_expires_without_heartbeats() {
        let local = Local::new(100, Duration::from_millis(30), Arc::new(TagEpochs::new()));
        assert!(!local.usable(), "unusable until the first heartbeat");
        local.make_usable();
        let t = local.ticket("k", &[] as &[&str]).unwrap();
        assert!(local.insert("k", t, value(1), Duration::from_secs(60), None));
        assert_eq!(read(&local, "k"), Some(1));
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(read(&local, "k"), None);
    }

    #[test]
    fn entries_live_their_ttl() {
        let local = tier();
        let t = local.ticket("k", &[] as &[&str]).unwrap();
        assert!(local.insert("k", t, value(1), Duration::from_millis(20), None));
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(read(&local, "k"), None);
        let t = local.ticket("k", &[] as &[&str]).unwrap();
        assert!(!local.insert("k", t, value(1), Duration::ZERO, None));
    }
}
