//! Cache-aside behaviour, identical on both backends.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use cache_runtime::{Cache, cached};

use crate::support::{Calls, Gate, User, on_both_backends};

#[cached(cache = cache, key = "user:{id}", ttl = 60, name = "get_user")]
async fn get_user(cache: &Cache, calls: &Calls, id: u64) -> Result<User, String> {
    calls.hit();
    Ok(User::new(id))
}

#[cached(cache = cache, key = "flaky:{id}", name = "flaky")]
async fn flaky(cache: &Cache, calls: &Calls, fail: &AtomicBool, id: u64) -> Result<User, String> {
    calls.hit();
    if fail.load(Ordering::SeqCst) {
        Err("database unavailable".to_owned())
    } else {
        Ok(User::new(id))
    }
}

#[cached(cache = cache, key = "short:{id}", ttl = "1s")]
async fn short_lived(cache: &Cache, calls: &Calls, id: u64) -> u64 {
    calls.hit();
    id * 2
}

#[cached(cache = cache, key = "plain:{id}")]
async fn default_ttl(cache: &Cache, calls: &Calls, id: u64) -> u64 {
    calls.hit();
    id
}

#[cached(cache = cache, key = "find:{id}")]
async fn find(cache: &Cache, calls: &Calls, id: u64) -> Option<User> {
    calls.hit();
    (id != 0).then(|| User::new(id))
}

#[cached(cache = cache, key = "find_neg:{id}", ttl = 60, cache_none = 1)]
async fn find_negative(cache: &Cache, calls: &Calls, id: u64) -> Option<User> {
    calls.hit();
    (id != 0).then(|| User::new(id))
}

#[cached(cache = cache, key = "find_res:{id}", cache_none)]
async fn find_result(cache: &Cache, calls: &Calls, id: u64) -> Result<Option<User>, String> {
    calls.hit();
    Ok((id != 0).then(|| User::new(id)))
}

#[cached(cache = cache, key = "cond:{id}", condition = id % 2 == 0, name = "conditional")]
async fn conditional(cache: &Cache, calls: &Calls, id: u64) -> u64 {
    calls.hit();
    id
}

#[cached(cache = cache, key = "list:{id}", unless = result.is_empty())]
async fn list(cache: &Cache, calls: &Calls, id: u64) -> Vec<u64> {
    calls.hit();
    (0..id).collect()
}

#[cached(cache = cache, key = "ver:{id}", version = 1)]
async fn versioned_v1(cache: &Cache, calls: &Calls, id: u64) -> u64 {
    calls.hit();
    id
}

#[cached(cache = cache, key = "ver:{id}", version = 2)]
async fn versioned_v2(cache: &Cache, calls: &Calls, id: u64) -> String {
    calls.hit();
    format!("v2 of {id}")
}

#[cached(cache = cache, key = "slow:{id}", name = "slow")]
async fn slow(cache: &Cache, calls: &Calls, gate: &Gate, id: u64) -> u64 {
    calls.hit();
    gate.pass().await;
    id + 1000
}

on_both_backends! {
    async fn hit_after_miss(fx: Fx) {
        let calls = Calls::default();
        assert_eq!(get_user(&fx.cache, &calls, 1).await, Ok(User::new(1)));
        assert_eq!(calls.get(), 1);
        assert_eq!(get_user(&fx.cache, &calls, 1).await, Ok(User::new(1)));
        assert_eq!(calls.get(), 1, "second call is a hit");
        assert_eq!(get_user(&fx.cache, &calls, 2).await, Ok(User::new(2)));
        assert_eq!(calls.get(), 2, "another argument is another key");

        let stats = fx.cache.stats();
        let s = stats.function("get_user").expect("stats row");
        assert_eq!((s.hits, s.misses, s.loads), (1, 2, 2));
        assert_eq!(s.hit_rate(), Some(1.0 / 3.0));
        let table = stats.to_string();
        assert!(table.contains("get_user") && table.contains("! 33.3%"), "{table}");
    }

    async fn ttl_is_written_and_expires(fx: Fx) {
        let calls = Calls::default();
        get_user(&fx.cache, &calls, 1).await.unwrap();
        if let Some(ms) = fx.pttl("user:1").await {
            assert!((55_000..=60_000).contains(&ms), "ttl = 60 gives PTTL {ms}");
        }
        default_ttl(&fx.cache, &calls, 1).await;
        if let Some(ms) = fx.pttl("plain:1").await {
            let default = fx.cache.default_ttl().as_millis() as i64;
            assert!(ms > default - 10_000 && ms <= default, "default TTL {default} gives PTTL {ms}");
        }

        let calls = Calls::default();
        assert_eq!(short_lived(&fx.cache, &calls, 4).await, 8);
        if let Some(ms) = fx.pttl("short:4").await {
            assert!((1..=1000).contains(&ms), "ttl = \"1s\" gives PTTL {ms}");
        }
        assert_eq!(short_lived(&fx.cache, &calls, 4).await, 8);
        assert_eq!(calls.get(), 1);
        tokio::time::sleep(Duration::from_millis(1300)).await;
        assert_eq!(short_lived(&fx.cache, &calls, 4).await, 8);
        assert_eq!(calls.get(), 2, "expired after its TTL");
    }

    async fn errors_are_never_cached(fx: Fx) {
        let calls = Calls::default();
        let fail = AtomicBool::new(true);
        assert!(flaky(&fx.cache, &calls, &fail, 1).await.is_err());
        assert!(flaky(&fx.cache, &calls, &fail, 1).await.is_err());
        assert_eq!(calls.get(), 2, "an Err is returned, not cached");
        if fx.is_redis() {
            assert_eq!(fx.raw_get("flaky:1").await, None, "nothing written for an Err");
        }
        fail.store(false, Ordering::SeqCst);
        assert_eq!(flaky(&fx.cache, &calls, &fail, 1).await, Ok(User::new(1)));
        fail.store(true, Ordering::SeqCst);
        assert_eq!(flaky(&fx.cache, &calls, &fail, 1).await, Ok(User::new(1)), "Ok was cached");
        assert_eq!(calls.get(), 3);
        let s = fx.cache.stats().function("flaky").cloned().unwrap();
        assert_eq!(s.load_errors, 2);
        assert_eq!(s.not_stored, 2);
    }

    async fn none_is_cached_only_when_asked(fx: Fx) {
        let calls = Calls::default();
        assert_eq!(find(&fx.cache, &calls, 0).await, None);
        assert_eq!(find(&fx.cache, &calls, 0).await, None);
        assert_eq!(calls.get(), 2, "None is not cached by default");
        assert_eq!(find(&fx.cache, &calls, 3).await, Some(User::new(3)));
        assert_eq!(find(&fx.cache, &calls, 3).await, Some(User::new(3)));
        assert_eq!(calls.get(), 3, "Some is cached");

        let calls = Calls::default();
        assert_eq!(find_negative(&fx.cache, &calls, 0).await, None);
        assert_eq!(find_negative(&fx.cache, &calls, 0).await, None);
        assert_eq!(calls.get(), 1, "cache_none caches None");
        if let Some(ms) = fx.pttl("find_neg:0").await {
            assert!((1..=1000).contains(&ms), "cache_none = 1 gives PTTL {ms}");
        }
        find_negative(&fx.cache, &calls, 5).await;
        if let Some(ms) = fx.pttl("find_neg:5").await {
            assert!(ms > 55_000, "Some keeps the function's ttl, PTTL {ms}");
        }
        tokio::time::sleep(Duration::from_millis(1300)).await;
        assert_eq!(find_negative(&fx.cache, &calls, 0).await, None);
        assert_eq!(calls.get(), 3, "the None expired after its own TTL");

        let calls = Calls::default();
        assert_eq!(find_result(&fx.cache, &calls, 0).await, Ok(None));
        assert_eq!(find_result(&fx.cache, &calls, 0).await, Ok(None));
        assert_eq!(calls.get(), 1, "Ok(None) cached with cache_none");
    }

    async fn condition_bypasses_and_unless_skips_storing(fx: Fx) {
        let calls = Calls::default();
        conditional(&fx.cache, &calls, 1).await;
        conditional(&fx.cache, &calls, 1).await;
        assert_eq!(calls.get(), 2, "condition false: no caching");
        conditional(&fx.cache, &calls, 2).await;
        conditional(&fx.cache, &calls, 2).await;
        assert_eq!(calls.get(), 3, "condition true: cached");
        let s = fx.cache.stats().function("conditional").cloned().unwrap();
        assert_eq!((s.bypassed, s.hits, s.misses), (2, 1, 1));

        let calls = Calls::default();
        assert!(list(&fx.cache, &calls, 0).await.is_empty());
        assert!(list(&fx.cache, &calls, 0).await.is_empty());
        assert_eq!(calls.get(), 2, "unless true: not stored");
        assert_eq!(list(&fx.cache, &calls, 3).await, vec![0, 1, 2]);
        assert_eq!(list(&fx.cache, &calls, 3).await, vec![0, 1, 2]);
        assert_eq!(calls.get(), 3);
    }

    async fn version_changes_the_key(fx: Fx) {
        let calls = Calls::default();
        assert_eq!(versioned_v1(&fx.cache, &calls, 1).await, 1);
        assert_eq!(versioned_v2(&fx.cache, &calls, 1).await, "v2 of 1");
        assert_eq!(calls.get(), 2, "version 2 does not see version 1's entry");
        assert_eq!(versioned_v2(&fx.cache, &calls, 1).await, "v2 of 1");
        assert_eq!(versioned_v1(&fx.cache, &calls, 1).await, 1);
        assert_eq!(calls.get(), 2);
        if fx.is_redis() {
            assert!(fx.raw_get("ver:1:v1").await.is_some());
            assert!(fx.raw_get("ver:1:v2").await.is_some());
        }
    }

    async fn garbage_is_a_miss_and_is_overwritten(fx: Fx) {
        let calls = Calls::default();
        fx.plant_garbage("user:5").await;
        assert_eq!(get_user(&fx.cache, &calls, 5).await, Ok(User::new(5)));
        assert_eq!(calls.get(), 1, "garbage is a miss");
        assert_eq!(get_user(&fx.cache, &calls, 5).await, Ok(User::new(5)));
        assert_eq!(calls.get(), 1, "and was overwritten by the fill");
        if let Some(raw) = fx.raw_get("user:5").await {
            assert_eq!(raw[0], 1, "a format-1 envelope now");
        }
        assert_eq!(fx.cache.stats().function("get_user").unwrap().decode_errors, 1);
    }

    async fn manual_api_shares_the_attribute_keys(fx: Fx) {
        let calls = Calls::default();
        let manual = User { id: 7, name: "set by hand".to_owned() };
        fx.cache.set("user:7", &manual, Duration::from_secs(60)).await.unwrap();
        assert_eq!(get_user(&fx.cache, &calls, 7).await, Ok(manual));
        assert_eq!(calls.get(), 0);

        get_user(&fx.cache, &calls, 8).await.unwrap();
        assert_eq!(fx.cache.get::<User>("user:8").await.unwrap(), Some(User::new(8)));

        fx.cache.invalidate("user:7").await.unwrap();
        assert_eq!(get_user(&fx.cache, &calls, 7).await, Ok(User::new(7)));
        assert_eq!(calls.get(), 2, "invalidated: loaded again");
        assert_eq!(fx.cache.get::<String>("user:7").await.unwrap(), None, "wrong type: a miss");
    }

    async fn invalidation_during_a_load_wins(fx: Fx) {
        let calls = Arc::new(Calls::default());
        let gate = Gate::new();
        let load = {
            let (cache, calls, gate) = (fx.cache.clone(), calls.clone(), gate.clone());
            tokio::spawn(async move { slow(&cache, &calls, &gate, 1).await })
        };
        gate.entered.notified().await;
        // The row changes while the slow read is in flight; the writer invalidates.
        fx.cache.invalidate("slow:1").await.unwrap();
        gate.release.notify_one();
        assert_eq!(load.await.unwrap(), 1001, "the caller still gets its result");
        assert_eq!(fx.cache.get::<u64>("slow:1").await.unwrap(), None, "the stale fill was not stored");
        assert_eq!(fx.cache.stats().function("slow").unwrap().stale_fills, 1);

        // And a write during a load: the write stays.
        let load = {
            let (cache, calls, gate) = (fx.cache.clone(), calls.clone(), gate.clone());
            tokio::spawn(async move { slow(&cache, &calls, &gate, 2).await })
        };
        gate.entered.notified().await;
        fx.cache.set("slow:2", &7u64, Duration::from_secs(60)).await.unwrap();
        gate.release.notify_one();
        assert_eq!(load.await.unwrap(), 1002);
        assert_eq!(slow(&fx.cache, &calls, &gate, 2).await, 7, "read-your-writes");
        assert_eq!(calls.get(), 2);
    }
}
