//! In-process request coalescing ("single flight").
//!
//! Concurrent lookups of one key in one process share one flight: the first caller (the
//! leader) reads the backend and, on a miss, runs its function and stores the result; the
//! others (followers) wait for the leader's outcome instead of doing the same work.
//!
//! The leader's outcome reaches the followers through a guard, whatever happens to the leader:
//!
//! * it found a value, or loaded one (stored or not: a `None` without `cache_none`, a result
//!   `unless` rejected): followers decode that value;
//! * its function returned an error or panicked, its future was dropped (the caller timed out
//!   or was cancelled), or its fill was rejected as stale: followers join again, so that *one*
//!   of them leads the next attempt. However many callers wait, at most one load of a key runs
//!   at a time in this process, also while the function keeps failing.
//!
//! A write or invalidation of a key through this process's cache detaches the key's flight,
//! so a lookup that starts after the write completed never joins a flight that started
//! before it (read-your-writes), and marks the flight stale so its fill is not stored.
//!
//! Cost when nobody else is waiting (the common case): one short critical section to insert
//! the flight, one to remove it, and no allocation: a finished flight that nobody else holds
//! goes back to its shard's pool and is reused (the key is copied into it, inline up to 128
//! bytes). Followers already waiting are woken by `publish` when they can be seen, and in any
//! case by the leader's guard when it is dropped (right after `publish` in the engine).
//! The map is keyed by the key's 64-bit hash; two keys with the same hash (practically never)
//! simply do not coalesce with each other.

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use tokio::sync::Notify;

use crate::backend::Stored;
use crate::key::KeyBuf;

const SHARDS: usize = 64;

/// Slots of the busy table (see [`Flights::probe`]): with 64 calls under way, a key shares its
/// slot with another's about 6% of the time.
const BUSY: usize = 1024;

/// Finished flights a shard keeps for reuse.
const POOL: usize = 8;

/// What followers receive from their leader.
#[derive(Clone, Debug)]
pub(crate) enum Outcome {
    /// The value the leader found or loaded.
    Value(Stored),
    /// No value to share: join again (one of the followers becomes the leader).
    Retry,
}

#[derive(Debug)]
pub(crate) struct Flight {
    key: KeyBuf,
    hash: u64,
    outcome: OnceLock<Outcome>,
    notify: Notify,
    stale: AtomicBool,
}

impl Flight {
    /// The key this flight reads and fills.
    pub(crate) fn key(&self) -> &str {
        self.key.as_str()
    }

    /// Whether a write or invalidation of the key happened since the flight started.
    pub(crate) fn is_stale(&self) -> bool {
        self.stale.load(Ordering::Acquire)
    }

    fn new(key: KeyBuf, hash: u64) -> Self {
        Flight {
            key,
            hash,
            outcome: OnceLock::new(),
            notify: Notify::new(),
            stale: AtomicBool::new(false),
        }
    }
}

/// The map's keys are already hashes.
#[derive(Default)]
struct IdentityHasher(u64);

impl Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// The flights of the keys whose hashes fall in one shard, and finished flights to reuse.
#[derive(Default, Debug)]
struct ShardInner {
    map: HashMap<u64, Arc<Flight>, BuildHasherDefault<IdentityHasher>>,
    /// Flights nobody holds any more, reset: a new flight takes one instead of allocating.
    pool: Vec<Arc<Flight>>,
}

type Shard = Mutex<ShardInner>;

/// The in-flight lookups of one cache.
#[derive(Debug)]
pub(crate) struct Flights {
    shards: Box<[Shard]>,
    /// Per slot of key hashes: how many probes and flight leaders are under way (see
    /// [`Flights::probe`]).
    busy: Box<[AtomicU32]>,
    hasher: foldhash::fast::RandomState,
}

impl std::fmt::Debug for IdentityHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IdentityHasher")
    }
}

pub(crate) enum Role<'a> {
    Leader(LeaderGuard<'a>),
    Follower(Follower),
}

impl Flights {
    pub(crate) fn new() -> Self {
        Flights {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            busy: (0..BUSY).map(|_| AtomicU32::new(0)).collect(),
            hasher: Default::default(),
        }
    }

    fn shard(&self, hash: u64) -> &Shard {
        // Bits the map's own probing does not use (it takes the low bits and the top seven).
        &self.shards[((hash >> 32) as usize) % SHARDS]
    }

    fn busy(&self, hash: u64) -> &AtomicU32 {
        &self.busy[((hash >> 16) as usize) % BUSY]
    }

    /// A read of `key` outside any flight (a hit needs none), unless a probe or a flight of
    /// `key`, or of a key sharing its slot, is under way in this process: then the caller
    /// joins the key's flight instead, so that concurrent lookups of a hot key still share
    /// one read, and lookups during a load wait for it. A hint, not a lock: two probes of one
    /// key may start together, and then make two reads.
    pub(crate) fn probe(&self, key: &str) -> Option<Probing<'_>> {
        let busy = self.busy(self.hasher.hash_one(key));
        if busy.load(Ordering::Relaxed) != 0 {
            return None;
        }
        busy.fetch_add(1, Ordering::Relaxed);
        Some(Probing { busy })
    }

    /// Joins the flight for `key`, or starts one (taking over the key).
    pub(crate) fn join(&self, key: KeyBuf) -> Role<'_> {
        let hash = self.hasher.hash_one(key.as_str());
        let mut shard = self.shard(hash).lock().unwrap_or_else(|e| e.into_inner());
        let registered = match shard.map.get(&hash) {
            Some(flight) if flight.key == key => {
                return Role::Follower(Follower {
                    flight: flight.clone(),
                });
            }
            // Another key with the same hash is in flight: lead without coalescing.
            Some(_) => false,
            None => true,
        };
        let flight = match shard.pool.pop() {
            Some(mut flight) => {
                match Arc::get_mut(&mut flight) {
                    Some(f) => {
                        f.key = key;
                        f.hash = hash;
                    }
                    // Pooled flights are held by the pool only.
                    None => flight = Arc::new(Flight::new(key, hash)),
                }
                flight
            }
            None => Arc::new(Flight::new(key, hash)),
        };
        if registered {
            shard.map.insert(hash, flight.clone());
        }
        drop(shard);
        self.busy(hash).fetch_add(1, Ordering::Relaxed);
        Role::Leader(LeaderGuard {
            flights: self,
            flight,
            sent: AtomicBool::new(false),
        })
    }

    /// Detaches the flight of `key`, if any, and marks it stale: later lookups start afresh
    /// and the detached flight's fill is not stored.
    pub(crate) fn invalidate(&self, key: &str) {
        let hash = self.hasher.hash_one(key);
        let mut shard = self.shard(hash).lock().unwrap_or_else(|e| e.into_inner());
        if shard.map.get(&hash).is_some_and(|f| f.key == key) {
            if let Some(flight) = shard.map.remove(&hash) {
                flight.stale.store(true, Ordering::Release);
            }
        }
    }

    /// Removes `flight` from the map if it is still there (a finished leader's flight, or a
    /// stuck one whose leader outlived the wait: later lookups then start a new one). Returns
    /// whether it was there.
    pub(crate) fn detach(&self, flight: &Arc<Flight>) -> bool {
        let mut shard = self
            .shard(flight.hash)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        Self::detach_locked(&mut shard, flight)
    }

    fn detach_locked(shard: &mut ShardInner, flight: &Arc<Flight>) -> bool {
        if shard
            .map
            .get(&flight.hash)
            .is_some_and(|f| Arc::ptr_eq(f, flight))
        {
            shard.map.remove(&flight.hash);
            return true;
        }
        false
    }

    /// A leader is done with `flight`: detaches it, and wakes its followers if it has any
    /// (they get its outcome, set before); otherwise nobody can reach it any more, and it is
    /// reset and pooled for reuse.
    fn finish(&self, flight: &mut Arc<Flight>) {
        let mut shard = self
            .shard(flight.hash)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        Self::detach_locked(&mut shard, flight);
        // Followers get their clones from the map, under this lock: none can appear now.
        let mut outcome = None;
        let followers = match Arc::get_mut(flight) {
            Some(f) if shard.pool.len() < POOL => {
                outcome = f.outcome.take();
                *f.stale.get_mut() = false;
                shard.pool.push(flight.clone());
                false
            }
            Some(_) => false,
            None => true,
        };
        drop(shard);
        // Dropped outside the lock (it may free the value).
        drop(outcome);
        if followers {
            flight.notify.notify_waiters();
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).map.len())
            .sum()
    }
}

/// Held by the leader of a flight. Dropping it without [`LeaderGuard::publish`] (a panic, a
/// cancelled future) tells the followers to join again.
pub(crate) struct LeaderGuard<'a> {
    flights: &'a Flights,
    flight: Arc<Flight>,
    sent: AtomicBool,
}

impl LeaderGuard<'_> {
    pub(crate) fn flight(&self) -> &Flight {
        &self.flight
    }

    /// Hands `outcome` to the current and future followers of this flight. The flight stays
    /// joinable until the guard is dropped, so lookups arriving meanwhile get the outcome at
    /// once. Followers already waiting are woken now if this guard sees them (more holders
    /// than itself and the map), and in any case when the guard is dropped.
    pub(crate) fn publish(&self, outcome: Outcome) {
        self.sent.store(true, Ordering::Relaxed);
        let _ = self.flight.outcome.set(outcome);
        if Arc::strong_count(&self.flight) > 2 {
            self.flight.notify.notify_waiters();
        }
    }
}

impl Drop for LeaderGuard<'_> {
    fn drop(&mut self) {
        if !self.sent.load(Ordering::Relaxed) {
            let _ = self.flight.outcome.set(Outcome::Retry);
        }
        self.flights
            .busy(self.flight.hash)
            .fetch_sub(1, Ordering::Relaxed);
        self.flights.finish(&mut self.flight);
    }
}

/// A probe under way (see [`Flights::probe`]): its slot is busy until it is dropped.
pub(crate) struct Probing<'a> {
    busy: &'a AtomicU32,
}

impl Drop for Probing<'_> {
    fn drop(&mut self) {
        self.busy.fetch_sub(1, Ordering::Relaxed);
    }
}

pub(crate) struct Follower {
    flight: Arc<Flight>,
}

impl Follower {
    /// The flight this follower waits on.
    pub(crate) fn flight(&self) -> &Arc<Flight> {
        &self.flight
    }

    /// The key of the flight (to join again after `Retry`).
    pub(crate) fn into_key(self) -> KeyBuf {
        self.flight.key.clone()
    }

    /// Waits for the leader's outcome.
    pub(crate) async fn wait(&self) -> Outcome {
        loop {
            let notified = self.flight.notify.notified();
            tokio::pin!(notified);
            // Register before checking, so a publish between the check and the await is not
            // missed.
            notified.as_mut().enable();
            if let Some(outcome) = self.flight.outcome.get() {
                return outcome.clone();
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn followers_get_the_leaders_value() {
        let flights = Flights::new();
        let Role::Leader(leader) = flights.join(KeyBuf::from("k")) else {
            panic!("first caller leads")
        };
        let Role::Follower(f) = flights.join(KeyBuf::from("k")) else {
            panic!("second caller follows")
        };
        let waiting = tokio::spawn(async move { f.wait().await });
        tokio::task::yield_now().await;
        leader.publish(Outcome::Value(Stored::bytes(bytes::Bytes::from_static(
            b"v",
        ))));
        // A late joiner still gets the published value while the guard is alive.
        let Role::Follower(late) = flights.join(KeyBuf::from("k")) else {
            panic!("third caller follows")
        };
        drop(leader);
        assert!(matches!(waiting.await.unwrap(), Outcome::Value(s) if &s.bytes[..] == b"v"));
        assert!(matches!(late.wait().await, Outcome::Value(_)));
        assert_eq!(flights.len(), 0);
    }

    #[tokio::test]
    async fn dropped_leader_makes_followers_retry() {
        let flights = Flights::new();
        let leader = flights.join(KeyBuf::from("k"));
        let Role::Follower(f) = flights.join(KeyBuf::from("k")) else {
            panic!()
        };
        drop(leader);
        assert!(matches!(f.wait().await, Outcome::Retry));
        assert!(matches!(flights.join(KeyBuf::from("k")), Role::Leader(_)));
    }

    #[tokio::test]
    async fn invalidation_detaches_and_marks_stale() {
        let flights = Flights::new();
        let Role::Leader(leader) = flights.join(KeyBuf::from("k")) else {
            panic!()
        };
        flights.invalidate("k");
        assert!(leader.flight().is_stale());
        // A new lookup does not join the stale flight.
        let Role::Leader(second) = flights.join(KeyBuf::from("k")) else {
            panic!("a lookup after the invalidation must not join the old flight")
        };
        // The old leader finishing must not remove the new flight.
        drop(leader);
        assert_eq!(flights.len(), 1);
        drop(second);
        assert_eq!(flights.len(), 0);
    }

    #[tokio::test]
    async fn reused_flights_start_fresh() {
        let flights = Flights::new();
        // A flight that published a value, and one that was invalidated, both go back to the
        // pool when their leaders finish.
        let Role::Leader(a) = flights.join(KeyBuf::from("a")) else {
            panic!()
        };
        a.publish(Outcome::Value(Stored::bytes(bytes::Bytes::from_static(
            b"old",
        ))));
        let Role::Leader(b) = flights.join(KeyBuf::from("b")) else {
            panic!()
        };
        flights.invalidate("b");
        assert!(b.flight().is_stale());
        drop(a);
        drop(b);
        // Whichever pooled flight they get, new leaders start with no outcome, not stale.
        for key in ["c", "d"] {
            let Role::Leader(leader) = flights.join(KeyBuf::from(key)) else {
                panic!("{key} leads")
            };
            assert_eq!(leader.flight().key(), key);
            assert!(!leader.flight().is_stale());
            let Role::Follower(f) = flights.join(KeyBuf::from(key)) else {
                panic!("{key} is followed")
            };
            drop(leader);
            assert!(matches!(f.wait().await, Outcome::Retry), "{key}");
        }
        assert_eq!(flights.len(), 0);
    }
}
