//! Keys are bounded: a huge argument does not make a huge key, on both backends, and the manual
//! API maps a long key to the same stored key as a function rendering it.

use std::time::Duration;

use cache_runtime::{Cache, cached, escape_key_part};

use crate::support::{Calls, on_both_backends};

/// The longest key stored as it is rendered.
const MAX_KEY_LEN: usize = 256;

#[cached(cache = cache, key = "search:{query}", ttl = 60)]
async fn search(cache: &Cache, calls: &Calls, query: &str) -> Vec<String> {
    calls.hit();
    vec![format!("{} bytes", query.len())]
}

struct Searcher {
    cache: Cache,
    calls: Calls,
}

impl Searcher {
    /// The default key: the type and method, and every argument as JSON.
    #[cached(cache = self.cache, ttl = 60)]
    async fn search(&self, query: String, page: u32) -> usize {
        self.calls.hit();
        query.len() + page as usize
    }
}

fn huge_query(last: char) -> String {
    let mut q = "term: {x} ".repeat(1000);
    q.push(last);
    q
}

on_both_backends! {
    async fn huge_arguments_make_bounded_keys(fx: Fx) {
        let calls = Calls::new();
        let (a, b) = (huge_query('a'), huge_query('b'));
        let expected = vec![format!("{} bytes", a.len())];
        assert_eq!(search(&fx.cache, &calls, &a).await, expected);
        assert_eq!(search(&fx.cache, &calls, &a).await, expected);
        assert_eq!(calls.get(), 1, "the second call is a hit");
        search(&fx.cache, &calls, &b).await;
        assert_eq!(calls.get(), 2, "queries differing in their last byte are different keys");
        search(&fx.cache, &calls, &b).await;
        search(&fx.cache, &calls, &a).await;
        assert_eq!(calls.get(), 2);

        // The manual API maps the rendered key to the same stored key.
        let key = format!("search:{}", escape_key_part(&a));
        let stored = fx.cache.full_key(&key);
        assert!(stored.len() <= MAX_KEY_LEN, "{} bytes", stored.len());
        assert!(stored.contains("%#"), "{stored}");
        assert_eq!(fx.cache.get::<Vec<String>>(&key).await.unwrap(), Some(expected));
        if fx.is_redis() {
            assert!(fx.raw_get(&key).await.is_some(), "stored under {stored:?}");
        }
        fx.cache
            .set(&key, &vec!["planted".to_owned()], Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(search(&fx.cache, &calls, &a).await, vec!["planted".to_owned()]);
        fx.cache.invalidate(&key).await.unwrap();
        search(&fx.cache, &calls, &a).await;
        assert_eq!(calls.get(), 3, "invalidated through the manual API");

        let s = fx.cache.stats();
        assert!(s.functions().iter().all(|f| f.backend_errors == 0), "{s}");
    }

    async fn default_keys_of_huge_arguments_are_bounded(fx: Fx) {
        let s = Searcher { cache: fx.cache.clone(), calls: Calls::new() };
        let (a, b) = (huge_query('a'), huge_query('b'));
        assert_eq!(s.search(a.clone(), 1).await, a.len() + 1);
        assert_eq!(s.search(a.clone(), 1).await, a.len() + 1);
        assert_eq!(s.calls.get(), 1, "the second call is a hit");
        // The default key, rendered by hand: `<type>::search:[<query as JSON>,1]`, escaped.
        let json = serde_json::to_string(&a).unwrap();
        let key = format!(
            "{}::search:[{},1]",
            std::any::type_name::<Searcher>(),
            escape_key_part(&json)
        );
        assert!(fx.cache.full_key(&key).len() <= MAX_KEY_LEN);
        assert_eq!(fx.cache.get::<usize>(&key).await.unwrap(), Some(a.len() + 1));
        s.search(b.clone(), 1).await;
        s.search(a.clone(), 2).await;
        assert_eq!(s.calls.get(), 3, "other arguments are other keys, however long");
        s.search(b, 1).await;
        s.search(a, 2).await;
        assert_eq!(s.calls.get(), 3);
        let stats = fx.cache.stats();
        assert!(stats.functions().iter().all(|f| f.backend_errors == 0), "{stats}");
    }

    async fn manual_keys_with_any_braces_are_accepted(fx: Fx) {
        // A `}` that closes no hash tag used to be rejected with an InvalidKey error.
        for key in ["stray}:x", "}{", "{}:user:7", "a}b{c}"] {
            fx.cache.set(key, &7u32, Duration::from_secs(60)).await.unwrap();
            assert_eq!(fx.cache.get::<u32>(key).await.unwrap(), Some(7), "{key:?}");
            fx.cache.invalidate(key).await.unwrap();
            assert_eq!(fx.cache.get::<u32>(key).await.unwrap(), None, "{key:?}");
        }
    }
}
