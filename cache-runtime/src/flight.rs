//! In-process request coalescing ("single flight").
//!
//! Concurrent lookups of one key in one process share one flight: the first caller (the
//! leader) reads the backend and, on a miss, runs its function and stores the result; the
//! others (followers) wait for the leader's outcome instead of doing the same work.
//!
//! The leader's outcome reaches the followers through a guard, whatever happens to the leader:
//!
//! * it completed with a storable value: followers decode that value;
//! * its result is not stored (an `Err`, a `None`, `unless`), or it panicked: followers are
//!   released and run their own function;
//! * its future was dropped (the caller timed out or was cancelled): followers elect a new
//!   leader among themselves.
//!
//! A write or invalidation of a key through this process's cache detaches the key's flight,
//! so a lookup that starts after the write completed never joins a flight that started
//! before it (read-your-writes), and marks the flight stale so its fill is not stored.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::watch;

const SHARDS: usize = 64;

/// What followers receive from their leader.
#[derive(Clone, Debug)]
pub(crate) enum Outcome {
    /// An envelope holding the value.
    Value(Bytes),
    /// The leader's result is not shared; run the function yourself.
    Released,
    /// The leader went away; try again (one of the followers becomes the leader).
    Abandoned,
}

#[derive(Debug)]
pub(crate) struct Flight {
    tx: watch::Sender<Option<Outcome>>,
    stale: AtomicBool,
}

impl Flight {
    /// Whether a write or invalidation of the key happened since the flight started.
    pub(crate) fn is_stale(&self) -> bool {
        self.stale.load(Ordering::Acquire)
    }
}

type Shard = Mutex<HashMap<String, Arc<Flight>>>;

/// The in-flight lookups of one cache.
#[derive(Debug)]
pub(crate) struct Flights {
    shards: Box<[Shard]>,
    hasher: RandomState,
}

pub(crate) enum Role {
    Leader(LeaderGuard),
    Follower(Follower),
}

impl Flights {
    pub(crate) fn new() -> Self {
        Flights {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
        }
    }

    fn shard(&self, key: &str) -> &Shard {
        let i = (self.hasher.hash_one(key) as usize) % SHARDS;
        &self.shards[i]
    }

    /// Joins the flight for `key`, or starts one.
    pub(crate) fn join(self: &Arc<Self>, key: &str) -> Role {
        let mut map = self.shard(key).lock().unwrap_or_else(|e| e.into_inner());
        if let Some(flight) = map.get(key) {
            return Role::Follower(Follower {
                rx: flight.tx.subscribe(),
            });
        }
        let (tx, _) = watch::channel(None);
        let flight = Arc::new(Flight {
            tx,
            stale: AtomicBool::new(false),
        });
        map.insert(key.to_owned(), flight.clone());
        drop(map);
        Role::Leader(LeaderGuard {
            flights: self.clone(),
            key: key.to_owned(),
            flight,
            sent: false,
        })
    }

    /// Detaches the flight of `key`, if any, and marks it stale: later lookups start afresh
    /// and the detached flight's fill is not stored.
    pub(crate) fn invalidate(&self, key: &str) {
        let removed = self
            .shard(key)
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
        if let Some(flight) = removed {
            flight.stale.store(true, Ordering::Release);
        }
    }

    fn remove_if(&self, key: &str, flight: &Arc<Flight>) {
        let mut map = self.shard(key).lock().unwrap_or_else(|e| e.into_inner());
        if map.get(key).is_some_and(|f| Arc::ptr_eq(f, flight)) {
            map.remove(key);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }
}

/// Held by the leader of a flight. Dropping it without [`LeaderGuard::publish`] tells the
/// followers what happened: `Released` when unwinding from a panic, `Abandoned` otherwise.
pub(crate) struct LeaderGuard {
    flights: Arc<Flights>,
    key: String,
    flight: Arc<Flight>,
    sent: bool,
}

impl LeaderGuard {
    pub(crate) fn flight(&self) -> &Flight {
        &self.flight
    }

    /// Hands `outcome` to the current and future followers of this flight. The flight stays
    /// joinable until the guard is dropped, so lookups arriving meanwhile get the outcome at
    /// once.
    pub(crate) fn publish(&mut self, outcome: Outcome) {
        self.sent = true;
        self.flight.tx.send_replace(Some(outcome));
    }
}

impl Drop for LeaderGuard {
    fn drop(&mut self) {
        self.flights.remove_if(&self.key, &self.flight);
        if !self.sent {
            let outcome = if std::thread::panicking() {
                Outcome::Released
            } else {
                Outcome::Abandoned
            };
            self.flight.tx.send_replace(Some(outcome));
        }
    }
}

pub(crate) struct Follower {
    rx: watch::Receiver<Option<Outcome>>,
}

impl Follower {
    /// Waits for the leader's outcome.
    pub(crate) async fn wait(mut self) -> Outcome {
        match self.rx.wait_for(Option::is_some).await {
            Ok(v) => v.clone().unwrap_or(Outcome::Abandoned),
            // The sender lives in the flight, which we hold; this cannot happen, but if it did
            // the leader is gone.
            Err(_) => Outcome::Abandoned,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn followers_get_the_leaders_value() {
        let flights = Arc::new(Flights::new());
        let Role::Leader(mut leader) = flights.join("k") else {
            panic!("first caller leads")
        };
        let Role::Follower(f) = flights.join("k") else {
            panic!("second caller follows")
        };
        leader.publish(Outcome::Value(Bytes::from_static(b"v")));
        // A late joiner still gets the published value while the guard is alive.
        let Role::Follower(late) = flights.join("k") else {
            panic!("third caller follows")
        };
        drop(leader);
        assert!(matches!(f.wait().await, Outcome::Value(b) if &b[..] == b"v"));
        assert!(matches!(late.wait().await, Outcome::Value(_)));
        assert_eq!(flights.len(), 0);
    }

    #[tokio::test]
    async fn dropped_leader_abandons() {
        let flights = Arc::new(Flights::new());
        let leader = flights.join("k");
        let Role::Follower(f) = flights.join("k") else {
            panic!()
        };
        drop(leader);
        assert!(matches!(f.wait().await, Outcome::Abandoned));
        assert!(matches!(flights.join("k"), Role::Leader(_)));
    }

    #[tokio::test]
    async fn invalidation_detaches_and_marks_stale() {
        let flights = Arc::new(Flights::new());
        let Role::Leader(leader) = flights.join("k") else {
            panic!()
        };
        flights.invalidate("k");
        assert!(leader.flight().is_stale());
        // A new lookup does not join the stale flight.
        let Role::Leader(second) = flights.join("k") else {
            panic!("a lookup after the invalidation must not join the old flight")
        };
        // The old leader finishing must not remove the new flight.
        drop(leader);
        assert_eq!(flights.len(), 1);
        drop(second);
        assert_eq!(flights.len(), 0);
    }
}
