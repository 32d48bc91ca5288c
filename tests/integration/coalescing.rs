//! In-process coalescing: concurrent misses of one key run the function once, and a leader
//! that fails, panics or is cancelled never strands or misleads its followers, nor releases
//! them all onto the database at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use cache_runtime::{Cache, cached};
use tokio::task::JoinSet;

use crate::support::{Calls, Gate, User, on_both_backends};

const CALLERS: usize = 100;
/// Generous: a hang, not slowness, is what these tests look for.
const NO_HANG: Duration = Duration::from_secs(20);

#[cached(cache = cache, key = "user:{id}", name = "slow_user")]
async fn slow_user(cache: &Cache, calls: &Calls, id: u64) -> Result<User, String> {
    calls.hit();
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(User::new(id))
}

/// How the first call behaves; later calls succeed at once.
#[derive(Clone, Copy)]
enum First {
    Fails,
    Panics,
    Hangs,
}

#[cached(cache = cache, key = "gated:{id}", name = "gated")]
async fn gated(
    cache: &Cache,
    calls: &Calls,
    gate: &Gate,
    first: First,
    id: u64,
) -> Result<User, String> {
    if calls.hit() == 1 {
        gate.pass().await;
        match first {
            First::Fails => return Err("first call fails".to_owned()),
            First::Panics => panic!("first call panics"),
            First::Hangs => std::future::pending::<()>().await,
        }
    }
    Ok(User::new(id))
}

/// Counts the loads running at once, and the most that ever did.
#[derive(Default)]
struct InFlight {
    now: AtomicUsize,
    max: AtomicUsize,
    total: AtomicUsize,
}

impl InFlight {
    async fn run<T>(&self, f: impl std::future::Future<Output = T>) -> T {
        let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.max.fetch_max(n, Ordering::SeqCst);
        self.total.fetch_add(1, Ordering::SeqCst);
        let out = f.await;
        self.now.fetch_sub(1, Ordering::SeqCst);
        out
    }
}

/// A database that is down: every query fails after a while.
#[cached(cache = cache, key = "down:{id}", name = "always_fails")]
async fn always_fails(cache: &Cache, db: &InFlight, id: u64) -> Result<User, String> {
    db.run(tokio::time::sleep(Duration::from_millis(5))).await;
    Err(format!("user {id}: database down"))
}

/// The same with `lock`.
#[cached(cache = cache, key = "down_locked:{id}", name = "always_fails_locked", lock = 5)]
async fn always_fails_locked(cache: &Cache, db: &InFlight, id: u64) -> Result<User, String> {
    db.run(tokio::time::sleep(Duration::from_millis(5))).await;
    Err(format!("user {id}: database down"))
}

/// A lookup of a user that does not exist (`None` is not cached).
#[cached(cache = cache, key = "missing:{id}", name = "missing")]
async fn missing(cache: &Cache, db: &InFlight, id: u64) -> Option<User> {
    db.run(tokio::time::sleep(Duration::from_millis(100))).await;
    let _ = id;
    None
}

/// A result that `unless` keeps out of the cache.
#[cached(cache = cache, key = "rejected:{id}", name = "rejected", unless = result.id == 0)]
async fn rejected(cache: &Cache, db: &InFlight, id: u64) -> User {
    db.run(tokio::time::sleep(Duration::from_millis(100))).await;
    let _ = id;
    User::new(0)
}

async fn join_all<T: 'static>(set: &mut JoinSet<T>) -> Vec<T> {
    let mut out = Vec::new();
    while let Some(r) = tokio::time::timeout(NO_HANG, set.join_next())
        .await
        .expect("no caller may hang")
    {
        out.push(r.expect("caller task"));
    }
    out
}

/// Starts the first (leading) call, waits until it is inside the function, then starts the
/// followers, who find its flight and wait on it.
async fn leader_then_followers(
    fx: &crate::support::Fx,
    first: First,
) -> (
    tokio::task::JoinHandle<Result<User, String>>,
    JoinSet<Result<User, String>>,
    Arc<Calls>,
    Arc<Gate>,
) {
    let calls = Arc::new(Calls::default());
    let gate = Gate::new();
    let leader = {
        let (cache, calls, gate) = (fx.cache.clone(), calls.clone(), gate.clone());
        tokio::spawn(async move { gated(&cache, &calls, &gate, first, 9).await })
    };
    gate.entered.notified().await;
    let mut followers = JoinSet::new();
    for _ in 1..CALLERS {
        let (cache, calls, gate) = (fx.cache.clone(), calls.clone(), gate.clone());
        followers.spawn(async move { gated(&cache, &calls, &gate, first, 9).await });
    }
    // Let the followers reach the flight before the leader finishes.
    tokio::time::sleep(Duration::from_millis(200)).await;
    (leader, followers, calls, gate)
}

on_both_backends! {
    async fn concurrent_misses_run_the_function_once(fx: Fx) {
        let calls = Arc::new(Calls::default());
        let mut set = JoinSet::new();
        for _ in 0..CALLERS {
            let (cache, calls) = (fx.cache.clone(), calls.clone());
            set.spawn(async move { slow_user(&cache, &calls, 1).await });
        }
        let results = join_all(&mut set).await;
        assert_eq!(results.len(), CALLERS);
        assert!(results.iter().all(|r| r == &Ok(User::new(1))));
        assert_eq!(calls.get(), 1, "{CALLERS} concurrent misses, one load");
        let s = fx.cache.stats().function("slow_user").cloned().unwrap();
        assert_eq!(s.misses, 1);
        assert_eq!(s.hits, CALLERS as u64 - 1);
    }

    async fn a_failing_leader_hands_over_to_one_follower(fx: Fx) {
        let (leader, mut followers, calls, gate) = leader_then_followers(&fx, First::Fails).await;
        gate.release.notify_one();
        assert_eq!(leader.await.unwrap(), Err("first call fails".to_owned()));
        let results = join_all(&mut followers).await;
        assert_eq!(results.len(), CALLERS - 1);
        assert!(results.iter().all(|r| r == &Ok(User::new(9))));
        assert_eq!(calls.get(), 2, "one follower loaded for the rest, not {CALLERS} at once");
    }

    async fn a_function_that_keeps_failing_runs_one_load_at_a_time(fx: Fx) {
        // Regression: a failing leader released every waiting caller at once: 100 callers, 100
        // concurrent queries, at the moment the database is failing.
        for locked in [false, true] {
            let db = Arc::new(InFlight::default());
            let mut set = JoinSet::new();
            for _ in 0..CALLERS {
                let (cache, db) = (fx.cache.clone(), db.clone());
                set.spawn(async move {
                    if locked {
                        always_fails_locked(&cache, &db, 3).await
                    } else {
                        always_fails(&cache, &db, 3).await
                    }
                });
            }
            let results = join_all(&mut set).await;
            assert!(results.iter().all(|r| r == &Err("user 3: database down".to_owned())));
            assert_eq!(
                db.max.load(Ordering::SeqCst),
                1,
                "never more than one load of the key in flight (lock: {locked})"
            );
            // Errors are not shared: each caller gets its own attempt, one after the other.
            assert_eq!(db.total.load(Ordering::SeqCst), CALLERS);
        }
    }

    async fn results_that_are_not_stored_are_shared_with_the_waiting_callers(fx: Fx) {
        let db = Arc::new(InFlight::default());
        let mut set = JoinSet::new();
        for _ in 0..CALLERS {
            let (cache, db) = (fx.cache.clone(), db.clone());
            set.spawn(async move { missing(&cache, &db, 4).await });
        }
        let results = join_all(&mut set).await;
        assert!(results.iter().all(Option::is_none));
        assert_eq!(db.total.load(Ordering::SeqCst), 1, "one query for {CALLERS} callers of a missing user");
        // Not cached: the next call queries again.
        assert_eq!(missing(&fx.cache, &db, 4).await, None);
        assert_eq!(db.total.load(Ordering::SeqCst), 2);

        let db = Arc::new(InFlight::default());
        let mut set = JoinSet::new();
        for _ in 0..CALLERS {
            let (cache, db) = (fx.cache.clone(), db.clone());
            set.spawn(async move { rejected(&cache, &db, 5).await });
        }
        let results = join_all(&mut set).await;
        assert!(results.iter().all(|u| u == &User::new(0)));
        assert_eq!(db.total.load(Ordering::SeqCst), 1, "`unless` results are shared too");
        assert_eq!(rejected(&fx.cache, &db, 5).await, User::new(0));
        assert_eq!(db.total.load(Ordering::SeqCst), 2, "and not stored");
    }

    async fn a_panicking_leader_hands_over_to_one_follower(fx: Fx) {
        let (leader, mut followers, calls, gate) = leader_then_followers(&fx, First::Panics).await;
        gate.release.notify_one();
        assert!(leader.await.unwrap_err().is_panic(), "the panic reaches the leader's caller");
        let results = join_all(&mut followers).await;
        assert!(results.iter().all(|r| r == &Ok(User::new(9))));
        assert_eq!(calls.get(), 2, "one follower loaded for the rest, not {CALLERS} at once");
        let s = fx.cache.stats().function("gated").cloned().unwrap();
        assert_eq!((s.load_errors, s.loads, s.misses), (1, 2, 2), "{s:?}");
    }

    async fn a_cancelled_leader_hands_over(fx: Fx) {
        let (leader, mut followers, calls, _gate) = leader_then_followers(&fx, First::Hangs).await;
        // The leader's caller gives up (a timeout, a dropped request).
        leader.abort();
        assert!(leader.await.unwrap_err().is_cancelled());
        let results = join_all(&mut followers).await;
        assert!(results.iter().all(|r| r == &Ok(User::new(9))));
        assert_eq!(calls.get(), 2, "one follower took over and loaded for the rest");
        // The value it loaded is cached.
        let calls_before = calls.get();
        let gate = Gate::new();
        assert_eq!(gated(&fx.cache, &calls, &gate, First::Fails, 9).await, Ok(User::new(9)));
        assert_eq!(calls.get(), calls_before);
    }
}

/// A function whose lookups mostly hit reads the key before joining its flight (a hit needs
/// none); concurrent calls of a hot key still share reads, and the probe's misses keep every
/// rule of the flight's path.
mod mostly_hits {
    use super::*;
    use crate::support::Fx;

    #[cached(cache = cache, key = "probed:{id}", name = "probed")]
    async fn probed(cache: &Cache, calls: &Calls, id: u64) -> Result<User, String> {
        calls.hit();
        tokio::time::sleep(Duration::from_millis(100)).await;
        Ok(User::new(id))
    }

    /// Makes `probed` a function that mostly hits (one miss, then hits).
    async fn warm(fx: &Fx, calls: &Calls) {
        for _ in 0..40 {
            assert_eq!(probed(&fx.cache, calls, 0).await, Ok(User::new(0)));
        }
    }

    fn stats(fx: &Fx) -> cache_runtime::FunctionStats {
        fx.cache.stats().function("probed").cloned().unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_hot_key_is_still_read_once_for_many_callers() {
        let fx = Fx::redis("probe_hot").await;
        let calls = Arc::new(Calls::default());
        warm(&fx, &calls).await;
        let before = stats(&fx);
        let mut set = JoinSet::new();
        for _ in 0..CALLERS {
            let (cache, calls) = (fx.cache.clone(), calls.clone());
            set.spawn(async move { probed(&cache, &calls, 0).await });
        }
        let results = join_all(&mut set).await;
        assert!(results.iter().all(|r| r == &Ok(User::new(0))));
        let after = stats(&fx);
        assert_eq!(after.hits - before.hits, CALLERS as u64);
        assert!(
            after.coalesced - before.coalesced >= CALLERS as u64 / 2,
            "callers of a key being read join its flight: {} of {CALLERS} coalesced",
            after.coalesced - before.coalesced
        );
        assert_eq!(calls.get(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_misses_after_the_probe_run_the_function_once() {
        let fx = Fx::redis("probe_misses").await;
        let calls = Arc::new(Calls::default());
        warm(&fx, &calls).await;
        let mut set = JoinSet::new();
        for _ in 0..CALLERS {
            let (cache, calls) = (fx.cache.clone(), calls.clone());
            set.spawn(async move { probed(&cache, &calls, 1).await });
        }
        let results = join_all(&mut set).await;
        assert!(results.iter().all(|r| r == &Ok(User::new(1))));
        assert_eq!(calls.get(), 2, "one load for key 0, one for key 1");
        assert!(
            fx.raw_get("probed:1").await.is_some(),
            "the load was stored"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn an_invalidation_during_a_load_after_the_probe_rejects_its_fill() {
        let fx = Fx::redis("probe_stale").await;
        let calls = Arc::new(Calls::default());
        warm(&fx, &calls).await;
        let (cache, c) = (fx.cache.clone(), calls.clone());
        let load = tokio::spawn(async move { probed(&cache, &c, 2).await });
        // The load is running (100 ms), with its marker in the key.
        tokio::time::sleep(Duration::from_millis(50)).await;
        fx.cache.invalidate("probed:2").await.unwrap();
        assert_eq!(load.await.unwrap(), Ok(User::new(2)));
        assert_eq!(stats(&fx).stale_fills, 1);
        assert_eq!(
            fx.raw_get("probed:2").await,
            None,
            "the stale load was not stored"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn an_unusable_value_found_by_the_probe_is_replaced_and_counted_once() {
        let fx = Fx::redis("probe_garbage").await;
        let calls = Arc::new(Calls::default());
        warm(&fx, &calls).await;
        fx.plant_garbage("probed:3").await;
        assert_eq!(probed(&fx.cache, &calls, 3).await, Ok(User::new(3)));
        assert_eq!(stats(&fx).decode_errors, 1);
        let loads = calls.get();
        assert_eq!(probed(&fx.cache, &calls, 3).await, Ok(User::new(3)));
        assert_eq!(calls.get(), loads, "the load's fill replaced it: a hit");
    }
}
