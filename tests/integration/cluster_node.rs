//! Keys of every shape on a real Redis Cluster node: a private `redis-server --cluster-enabled
//! yes` owning all 16384 slots, used through a plain (non-cluster) connection. One node still
//! enforces the cluster's rule that a script's keys share one hash slot (`CROSSSLOT`), so a
//! lease, generation or waiter key named into another slot than its value key fails here.

use std::time::Duration;

use cache_runtime::__private::{aux_key, key_slot};
use cache_runtime::{Cache, cached};
use cache_tests::{RedisServer, raw_connection, unique_namespace};

use crate::support::{Calls, User};

/// The auxiliary key prefixes of the Redis backend.
const AUX_PREFIXES: [&str; 3] = ["__cr:wait:", "__cr:tag:", "__cr:refresh:"];

async fn cluster_cache(node: &RedisServer, name: &str) -> Cache {
    Cache::builder()
        .redis(node.url())
        .namespace(unique_namespace(name))
        .operation_timeout(Duration::from_secs(2))
        .build()
        .await
        .unwrap()
}

fn user(tenant: &str, region: &str, id: u64) -> User {
    User {
        id,
        name: format!("{tenant}/{region}"),
    }
}

/// For each key template, a cached function without and one with `lock` (the locked one
/// sleeps long enough for a concurrent caller to find the lease taken).
///
/// The parameters the template names (`(tenant, region, id)`) are passed in from where the
/// template is written: `#[cached]` resolves the template's placeholders at the template's
/// own site, so, through a `macro_rules`, they must be spelled there too (hygiene).
macro_rules! fixtures {
    (@fn ($tenant:ident, $region:ident, $id:ident) $name:ident, $key:tt, [$($lock:tt)*], {$($pause:tt)*}) => {
        #[cached(cache = cache, key = $key, ttl = 60 $($lock)*)]
        async fn $name(
            cache: &Cache,
            calls: &Calls,
            $tenant: &str,
            $region: &str,
            $id: u64,
        ) -> Result<User, String> {
            calls.hit();
            $($pause)*
            Ok(user($tenant, $region, $id))
        }
    };
    ($params:tt $plain:ident, $locked:ident, $key:tt) => {
        fixtures!(@fn $params $plain, $key, [], {});
        fixtures!(@fn $params $locked, $key, [, lock = 5], {
            tokio::time::sleep(Duration::from_millis(100)).await;
        });
    };
}

/// The `Shape`s, their fixtures (see `fixtures!`), and `call`, which calls a shape's fixture
/// (with `lock` or without) for id 7.
macro_rules! shapes {
    ($params:tt $($shape:ident => $plain:ident, $locked:ident, $key:tt;)*) => {
        $(fixtures!($params $plain, $locked, $key);)*

        #[derive(Debug, Clone, Copy)]
        enum Shape {
            $($shape,)*
        }

        async fn call(
            shape: Shape,
            locked: bool,
            cache: &Cache,
            calls: &Calls,
            tenant: &str,
            region: &str,
        ) -> Result<User, String> {
            let id = 7;
            match (shape, locked) {
                $(
                    (Shape::$shape, false) => $plain(cache, calls, tenant, region, id).await,
                    (Shape::$shape, true) => $locked(cache, calls, tenant, region, id).await,
                )*
            }
        }
    };
}

shapes! {
    (tenant, region, id)
    Plain => plain, plain_locked, "user:{id}";
    Tagged => tagged, tagged_locked, "{{{tenant}}}:x:{id}";
    // With an empty tenant: `{}:user:7`, an empty tag, so Redis hashes the whole key.
    EmptyTag => empty_tag, empty_tag_locked, "{{{tenant}}}:user:{id}";
    OpenBrace => open_brace, open_brace_locked, "open{{:{id}";
    // With an empty tenant: `{}:stray}:7`, an empty tag and a `}` that closes nothing.
    Stray => stray, stray_locked, "{{{tenant}}}:stray}}:{id}";
    SeveralTags => several_tags, several_tags_locked, "{{{tenant}}}:{{{region}}}:{id}";
    // A tag made of placeholders only.
    PlaceholderTag => placeholder_tag, placeholder_tag_locked, "{{{tenant}-{region}}}:{id}";
}

// Long keys: stored in digest form, which keeps a short hash tag.
fixtures!((tenant, region, id) long, long_locked, "{{{tenant}}}:long:{region}:{id}");

/// Every shape, with its arguments and the key (without the namespace) it renders for id 7.
const CASES: &[(Shape, &str, &str, &str)] = &[
    (Shape::Plain, "", "", "user:7"),
    (Shape::Tagged, "acme", "", "{acme}:x:7"),
    (Shape::EmptyTag, "", "", "{}:user:7"),
    (Shape::EmptyTag, "acme", "", "{acme}:user:7"),
    (Shape::OpenBrace, "", "", "open{:7"),
    (Shape::Stray, "", "", "{}:stray}:7"),
    (Shape::Stray, "acme", "", "{acme}:stray}:7"),
    (Shape::SeveralTags, "acme", "eu", "{acme}:{eu}:7"),
    (Shape::SeveralTags, "", "eu", "{}:{eu}:7"),
    (Shape::PlaceholderTag, "acme", "eu", "{acme-eu}:7"),
    (Shape::PlaceholderTag, "", "", "{-}:7"),
    (Shape::PlaceholderTag, "a-b", "c", "{a%2Db-c}:7"),
];

/// No function of `cache` saw a backend or decode error.
fn assert_no_backend_errors(cache: &Cache) {
    let stats = cache.stats();
    assert!(!stats.functions().is_empty());
    for f in stats.functions() {
        assert_eq!(f.backend_errors, 0, "{f:?}");
        assert_eq!(f.decode_errors, 0, "{f:?}");
    }
}

/// `CLUSTER KEYSLOT key` on `conn`.
async fn cluster_keyslot(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> u16 {
    redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(key)
        .query_async(conn)
        .await
        .unwrap()
}

/// `EXISTS key` on `conn`.
async fn exists(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> bool {
    redis::cmd("EXISTS")
        .arg(key)
        .query_async(conn)
        .await
        .unwrap()
}

/// Runs every case twice (the second call must be a hit) with or without `lock`.
async fn every_shape(locked: bool) {
    let node = RedisServer::start_cluster_node();
    let cache = cluster_cache(&node, "cluster_shapes").await;
    let mut conn = raw_connection(&node.url()).await;
    for &(shape, tenant, region, key) in CASES {
        let calls = Calls::new();
        let expected = Ok(user(tenant, region, 7));
        let case = format!("{shape:?} {tenant:?} {region:?} (lock: {locked})");
        assert_eq!(
            call(shape, locked, &cache, &calls, tenant, region).await,
            expected,
            "{case}"
        );
        assert_eq!(
            call(shape, locked, &cache, &calls, tenant, region).await,
            expected,
            "{case}"
        );
        assert_eq!(calls.get(), 1, "{case}: the second call is a hit");
        // The value is where the manual API looks for it.
        assert_eq!(
            cache.get::<User>(key).await.unwrap(),
            Some(user(tenant, region, 7)),
            "{case}: rendered {key:?}"
        );
        let full = cache.full_key(key);
        assert!(
            exists(&mut conn, &full).await,
            "{case}: {full:?} was written"
        );
        assert_no_backend_errors(&cache);
        // The invalidation script touches the value, generation, lease and waiter keys.
        cache.invalidate(key).await.unwrap();
        assert_eq!(
            call(shape, locked, &cache, &calls, tenant, region).await,
            expected
        );
        assert_eq!(calls.get(), 2, "{case}: invalidated, then loaded again");
        assert_no_backend_errors(&cache);
    }
    if locked {
        let stats = cache.stats();
        let acquired: u64 = stats.functions().iter().map(|f| f.lock_acquired).sum();
        assert!(acquired >= 2 * CASES.len() as u64, "{stats}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_functions_on_every_key_shape() {
    every_shape(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locked_functions_on_every_key_shape() {
    every_shape(true).await;
}

/// Two caches on the same namespace stand for two processes: one takes the lease, the other
/// waits for its fill (the waiter key and the fill's notification), and the function runs
/// once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lease_waiters_on_every_key_shape() {
    let node = RedisServer::start_cluster_node();
    let namespace = unique_namespace("cluster_waiters");
    let build = || {
        Cache::builder()
            .redis(node.url())
            .namespace(namespace.clone())
            .operation_timeout(Duration::from_secs(2))
            .build()
    };
    let (a, b) = (build().await.unwrap(), build().await.unwrap());
    for &(shape, tenant, region, _) in CASES {
        let calls = Calls::new();
        let expected = Ok(user(tenant, region, 7));
        let (x, y) = tokio::join!(
            call(shape, true, &a, &calls, tenant, region),
            call(shape, true, &b, &calls, tenant, region),
        );
        assert_eq!(x, expected);
        assert_eq!(y, expected);
        assert_eq!(calls.get(), 1, "{shape:?} {tenant:?} {region:?}");
    }
    assert_no_backend_errors(&a);
    assert_no_backend_errors(&b);
}

// A hash tag and a stray `}`: the refresh lease `__cr:refresh:{K}` must share K's slot.
#[cached(cache = cache, key = "{{{tenant}}}:fresh}}:{id}", ttl = 1, refresh = "50%", name = "fresh")]
async fn fresh(cache: &Cache, calls: &std::sync::Arc<Calls>, tenant: &str, id: u64) -> u32 {
    calls.hit()
}

/// A refresh (its lease and its fill, two scripts on K and `__cr:refresh:{K}`) on the cluster
/// node, with and without a hash tag in the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_on_a_cluster_node() {
    let node = RedisServer::start_cluster_node();
    let cache = cluster_cache(&node, "cluster_refresh").await;
    for tenant in ["acme", ""] {
        let calls = std::sync::Arc::new(Calls::new());
        assert_eq!(fresh(&cache, &calls, tenant, 7).await, 1);
        tokio::time::sleep(Duration::from_millis(600)).await;
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        while fresh(&cache, &calls, tenant, 7).await != 2 {
            assert!(
                std::time::Instant::now() < deadline,
                "{tenant:?}: never refreshed"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        cache
            .invalidate(&format!("{{{tenant}}}:fresh}}:7"))
            .await
            .unwrap();
    }
    let f = cache.stats().function("fresh").unwrap().clone();
    assert_eq!((f.refreshes, f.misses), (2, 2), "{f:?}");
    assert_no_backend_errors(&cache);
}

/// Manual keys of every shape, including those no template can render (a `}` before any `{`).
const MANUAL_KEYS: &[&str] = &[
    "plain",
    "{tag}:x",
    "{}:user:7",
    "open{:x",
    "stray}:x",
    "}{",
    "a}b{c}",
    "{a}:{b}:{c}",
    "{}:{a}:{b}",
    "{{}}",
    "",
    "zoë{}",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_api_on_every_key_shape() {
    let node = RedisServer::start_cluster_node();
    let cache = cluster_cache(&node, "cluster_manual").await;
    let mut conn = raw_connection(&node.url()).await;
    for (i, &key) in MANUAL_KEYS.iter().enumerate() {
        let value = format!("value {i}");
        cache
            .set(key, &value, Duration::from_secs(60))
            .await
            .unwrap_or_else(|e| panic!("set {key:?}: {e}"));
        assert_eq!(cache.get::<String>(key).await.unwrap(), Some(value));
        // The waiters key a write clears is in the value key's slot.
        let full = cache.full_key(key);
        let slot = cluster_keyslot(&mut conn, &full).await;
        let waiters = aux_key("__cr:wait:", &full);
        assert_eq!(cluster_keyslot(&mut conn, &waiters).await, slot, "{key:?}");
        assert!(exists(&mut conn, &full).await, "{full:?}");
        cache
            .invalidate(key)
            .await
            .unwrap_or_else(|e| panic!("invalidate {key:?}: {e}"));
        assert_eq!(cache.get::<String>(key).await.unwrap(), None, "{key:?}");
    }
}

/// The slot the runtime computes is the node's, and every auxiliary key name lands in its value
/// key's slot, for keys with braces in odd places.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aux_keys_share_the_value_keys_slot_on_a_real_node() {
    let node = RedisServer::start_cluster_node();
    let mut conn = raw_connection(&node.url()).await;
    let mut keys: Vec<String> = MANUAL_KEYS.iter().map(|k| format!("ns:{k}")).collect();
    keys.extend(CASES.iter().map(|(_, _, _, k)| format!("ns:{k}")));
    // Every string of up to four characters over braces, a letter and a colon.
    let mut last = vec![String::new()];
    for _ in 0..4 {
        last = last
            .iter()
            .flat_map(|k| ['{', '}', 'a', ':'].map(|c| format!("{k}{c}")))
            .collect();
        keys.extend(last.iter().cloned());
    }
    for key in &keys {
        let slot = cluster_keyslot(&mut conn, key).await;
        assert_eq!(key_slot(key), slot, "CLUSTER KEYSLOT {key:?}");
        for prefix in AUX_PREFIXES {
            let aux = aux_key(prefix, key);
            assert_eq!(cluster_keyslot(&mut conn, &aux).await, slot, "{aux:?}");
        }
    }
}

/// Long keys (a huge argument, long manual keys with braces anywhere) on the cluster node: the
/// digest form keeps a short hash tag, so the key stays in its slot, and its auxiliary keys
/// share the digest form's slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_keys_on_a_cluster_node() {
    let node = RedisServer::start_cluster_node();
    let cache = cluster_cache(&node, "cluster_long").await;
    let mut conn = raw_connection(&node.url()).await;
    let region = "r".repeat(500);
    for tenant in ["acme", ""] {
        for locked in [false, true] {
            let calls = Calls::new();
            let expected = Ok(user(tenant, &region, 7));
            for _ in 0..2 {
                let got = if locked {
                    long_locked(&cache, &calls, tenant, &region, 7).await
                } else {
                    long(&cache, &calls, tenant, &region, 7).await
                };
                assert_eq!(got, expected);
            }
            assert_eq!(
                calls.get(),
                1,
                "{tenant:?} (lock: {locked}): the second call is a hit"
            );
            let key = format!("{{{tenant}}}:long:{region}:7");
            let stored = cache.full_key(&key);
            assert!(stored.len() <= 256, "{stored}");
            assert_eq!(
                cache.get::<User>(&key).await.unwrap(),
                Some(user(tenant, &region, 7))
            );
            if !tenant.is_empty() {
                let unbounded = format!("{}:{key}", cache.namespace());
                assert_eq!(
                    cluster_keyslot(&mut conn, &stored).await,
                    cluster_keyslot(&mut conn, &unbounded).await,
                    "the digest form keeps the hash tag: {stored}"
                );
            }
            cache.invalidate(&key).await.unwrap();
            assert_eq!(cache.get::<User>(&key).await.unwrap(), None);
        }
    }
    assert_no_backend_errors(&cache);

    let long = "x".repeat(300);
    for key in [
        format!("{{t}}:{long}"),
        format!("{{}}:{long}"),
        format!("{{:{long}"),
        format!("}}:{long}"),
        "}".repeat(300),
        format!("{long}{{{long}}}"),
    ] {
        cache
            .set(&key, &1u8, Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(cache.get::<u8>(&key).await.unwrap(), Some(1));
        let stored = cache.full_key(&key);
        assert!(stored.len() <= 256, "{stored}");
        let slot = cluster_keyslot(&mut conn, &stored).await;
        for prefix in AUX_PREFIXES {
            let aux = aux_key(prefix, &stored);
            assert_eq!(cluster_keyslot(&mut conn, &aux).await, slot, "{aux:?}");
        }
        cache.invalidate(&key).await.unwrap();
        assert_eq!(cache.get::<u8>(&key).await.unwrap(), None);
    }
}
