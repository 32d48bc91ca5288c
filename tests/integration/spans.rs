//! `tracing`: each cached call opens one `debug` span, `cache_call`, whose `outcome` field
//! says what the call came to (hit, miss, coalesced, lock_wait, bypass, fail_open), on
//! memory, the shared Redis and a Redis Cluster; the key is recorded only with
//! `CacheBuilder::trace_keys(true)`. Each test installs a small subscriber of its own as its
//! thread's default (`set_default`, never a global one) and runs a current-thread runtime
//! inside, so spawned calls report to it too and parallel tests do not see each other's spans.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cache_runtime::{Cache, cached};
use cache_tests::{redis_url, shared_cluster, unique_namespace};

use crate::support::{Calls, Gate};

/// One span as the subscriber saw it: its name and its fields' last recorded values.
#[derive(Debug, Clone, Default)]
struct SpanRec {
    name: String,
    fields: BTreeMap<String, String>,
}

/// A subscriber that keeps every span of `cache_runtime` (their fields as last recorded).
#[derive(Clone, Default)]
struct Spans {
    spans: Arc<Mutex<Vec<SpanRec>>>,
}

struct Fields<'a>(&'a mut BTreeMap<String, String>);

impl tracing::field::Visit for Fields<'_> {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.insert(
            field.name().to_owned(),
            format!("{value:?}").trim_matches('"').to_owned(),
        );
    }
}

impl tracing::Subscriber for Spans {
    fn enabled(&self, meta: &tracing::Metadata<'_>) -> bool {
        meta.target().starts_with("cache_runtime")
    }
    fn new_span(&self, span: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        let mut rec = SpanRec {
            name: span.metadata().name().to_owned(),
            ..SpanRec::default()
        };
        span.record(&mut Fields(&mut rec.fields));
        let mut spans = self.spans.lock().unwrap();
        spans.push(rec);
        tracing::span::Id::from_u64(spans.len() as u64)
    }
    fn record(&self, id: &tracing::span::Id, values: &tracing::span::Record<'_>) {
        let mut spans = self.spans.lock().unwrap();
        let rec = &mut spans[id.into_u64() as usize - 1];
        values.record(&mut Fields(&mut rec.fields));
    }
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, _: &tracing::Event<'_>) {}
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

impl Spans {
    /// The `cache_call` spans of `function`, in the order they were opened.
    fn calls(&self, function: &str) -> Vec<SpanRec> {
        self.spans
            .lock()
            .unwrap()
            .iter()
            .filter(|s| {
                s.name == "cache_call"
                    && s.fields.get("function").map(String::as_str) == Some(function)
            })
            .cloned()
            .collect()
    }

    /// The `outcome` (with `/level` when one was recorded) of each call of `function`.
    fn outcomes(&self, function: &str) -> Vec<String> {
        self.calls(function)
            .iter()
            .map(|s| {
                let outcome = s.fields.get("outcome").cloned().unwrap_or_default();
                match s.fields.get("level") {
                    Some(level) => format!("{outcome}/{level}"),
                    None => outcome,
                }
            })
            .collect()
    }
}

/// Runs `test` on a current-thread runtime with a fresh [`Spans`] as this thread's default
/// subscriber, and returns what it captured.
fn capture(test: impl AsyncFnOnce()) -> Spans {
    let spans = Spans::default();
    let _guard = tracing::subscriber::set_default(spans.clone());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(test());
    spans
}

#[cached(cache = cache, key = "s:{id}", ttl = 60, condition = id != 0, name = "spans_get")]
async fn get(cache: &Cache, id: u64) -> Result<u64, String> {
    Ok(id * 10)
}

/// The first call is held at the gate; the other waits for its load.
#[cached(cache = cache, key = "l:{id}", ttl = 60, lock = 60, name = "spans_locked")]
async fn locked(cache: &Cache, calls: &Calls, gate: &Gate, id: u64) -> Result<u64, String> {
    if calls.hit() == 1 {
        gate.pass().await;
    }
    Ok(id)
}

/// Two concurrent calls of one key: the first loads, the second waits for it, through
/// `second` (the same cache: coalesced; another handle, as another process: a lock wait).
async fn wait_for_a_load(first: &Cache, second: &Cache, id: u64) {
    let calls = Arc::new(Calls::new());
    let gate = Gate::new();
    let one = {
        let (cache, calls, gate) = (first.clone(), calls.clone(), gate.clone());
        tokio::spawn(async move { locked(&cache, &calls, &gate, id).await })
    };
    gate.entered.notified().await;
    let two = {
        let (cache, calls, gate) = (second.clone(), calls.clone(), gate.clone());
        tokio::spawn(async move { locked(&cache, &calls, &gate, id).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    gate.release.notify_one();
    assert_eq!(one.await.unwrap(), Ok(id));
    assert_eq!(two.await.unwrap(), Ok(id));
    assert_eq!(calls.get(), 1);
}

/// miss, hit, bypass, coalesced, and with `other` (a second handle on the same shared
/// backend) a lock wait; no span records a key.
fn sequence(build: impl AsyncFn(&str, bool) -> Cache, shared: bool) {
    let namespace = unique_namespace("spans");
    let spans = capture(async || {
        let cache = build(&namespace, false).await;
        assert_eq!(get(&cache, 1).await, Ok(10)); // miss
        assert_eq!(get(&cache, 1).await, Ok(10)); // hit
        assert_eq!(get(&cache, 0).await, Ok(0)); // `condition` false: bypass
        wait_for_a_load(&cache, &cache, 7).await; // miss, coalesced
        if shared {
            let other = build(&namespace, false).await;
            wait_for_a_load(&cache, &other, 8).await; // miss, lock wait
        }
    });
    assert_eq!(spans.outcomes("spans_get"), ["miss", "hit/l2", "bypass"]);
    let mut locked = vec!["miss", "coalesced"];
    if shared {
        locked.extend(["miss", "lock_wait"]);
    }
    assert_eq!(spans.outcomes("spans_locked"), locked);
    for span in spans
        .calls("spans_get")
        .iter()
        .chain(&spans.calls("spans_locked"))
    {
        assert_eq!(span.fields.get("cache"), Some(&namespace), "{span:?}");
        assert!(
            !span.fields.contains_key("key"),
            "a key without trace_keys: {span:?}"
        );
    }
}

/// With `trace_keys(true)`, each call's span records its key (with the namespace); a
/// bypassed call has none.
fn keys(build: impl AsyncFn(&str, bool) -> Cache) {
    let full = Mutex::new(String::new());
    let spans = capture(async || {
        let cache = build(&unique_namespace("spans"), true).await;
        *full.lock().unwrap() = cache.full_key("s:3");
        assert_eq!(get(&cache, 3).await, Ok(30));
        assert_eq!(get(&cache, 3).await, Ok(30));
        assert_eq!(get(&cache, 0).await, Ok(0));
    });
    let full = full.lock().unwrap().clone();
    let calls = spans.calls("spans_get");
    assert_eq!(calls.len(), 3, "{calls:?}");
    assert_eq!(calls[0].fields.get("key"), Some(&full));
    assert_eq!(calls[1].fields.get("key"), Some(&full));
    assert_eq!(calls[2].fields.get("key"), None, "{:?}", calls[2]);
}

async fn memory(namespace: &str, trace_keys: bool) -> Cache {
    Cache::builder()
        .namespace(namespace)
        .trace_keys(trace_keys)
        .build()
        .await
        .unwrap()
}

async fn redis(namespace: &str, trace_keys: bool) -> Cache {
    Cache::builder()
        .redis(redis_url())
        .namespace(namespace)
        .operation_timeout(Duration::from_secs(2))
        .trace_keys(trace_keys)
        .build()
        .await
        .unwrap()
}

#[test]
fn spans_outcomes_memory() {
    sequence(memory, false);
}

#[test]
fn spans_outcomes_redis() {
    sequence(redis, true);
}

#[test]
fn spans_outcomes_cluster() {
    let (urls, _cluster) = shared_cluster();
    sequence(
        async |namespace: &str, trace_keys| {
            Cache::builder()
                .redis_cluster(urls.iter().cloned())
                .namespace(namespace)
                .operation_timeout(Duration::from_secs(2))
                .trace_keys(trace_keys)
                .build()
                .await
                .unwrap()
        },
        true,
    );
}

#[test]
fn spans_keys_only_when_asked_memory() {
    keys(memory);
}

#[test]
fn spans_keys_only_when_asked_redis() {
    keys(redis);
}

/// Redis unreachable: the call runs uncached, and its span says `fail_open` (not `miss`).
#[test]
fn spans_fail_open_redis_down() {
    let spans = capture(async || {
        let cache = Cache::builder()
            .redis("redis://127.0.0.1:1")
            .namespace(unique_namespace("spans"))
            .connect_timeout(Duration::from_millis(200))
            .build()
            .await
            .unwrap();
        assert_eq!(get(&cache, 1).await, Ok(10));
        assert_eq!(get(&cache, 1).await, Ok(10));
    });
    assert_eq!(spans.outcomes("spans_get"), ["fail_open", "fail_open"]);
}
