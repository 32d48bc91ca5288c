//! `tracing`: each cached call opens one `debug` span, `cache_call`, whose `outcome` field
//! says what the call came to (hit at either level, miss, coalesced, lock_wait, bypass,
//! fail_open), on memory, the shared Redis and a Redis Cluster; the span is entered while the
//! function's body runs (its events are the span's children); a subscriber that wants nothing
//! below `info` gets no span and no event per call; the key is recorded only with
//! `CacheBuilder::trace_keys(true)`. Each test installs a small subscriber of its own as its
//! thread's default (`set_default`, never a global one) and runs a current-thread runtime
//! inside, so spawned calls report to it too and parallel tests do not see each other's spans.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cache_runtime::{Cache, cached};
use cache_tests::{redis_url, shared_cluster, unique_namespace};

use crate::support::{Calls, Gate, Name};

/// One span as the subscriber saw it: its name, level and its fields' last recorded values.
#[derive(Debug, Clone)]
struct SpanRec {
    name: String,
    level: tracing::Level,
    fields: BTreeMap<String, String>,
}

/// One event: its target and the span it was emitted in (explicit parent, else the span
/// entered at the time; an id as [`Spans`] numbers them, from 1).
#[derive(Debug, Clone)]
struct EventRec {
    target: String,
    parent: Option<u64>,
}

/// A subscriber that keeps every span and event up to `max` (spans' fields as last
/// recorded), and tracks the spans entered (one thread: the tests run a current-thread
/// runtime).
#[derive(Clone)]
struct Spans {
    max: tracing::Level,
    spans: Arc<Mutex<Vec<SpanRec>>>,
    events: Arc<Mutex<Vec<EventRec>>>,
    entered: Arc<Mutex<Vec<u64>>>,
    /// `(span, the span it follows from)`.
    follows: Arc<Mutex<Vec<(u64, u64)>>>,
}

impl Default for Spans {
    fn default() -> Self {
        Spans::up_to(tracing::Level::TRACE)
    }
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
    fn register_callsite(
        &self,
        _: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        // Asked each time: another test's subscriber may want what this one does not.
        tracing::subscriber::Interest::sometimes()
    }
    fn enabled(&self, meta: &tracing::Metadata<'_>) -> bool {
        *meta.level() <= self.max
    }
    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        Some(tracing::level_filters::LevelFilter::from_level(self.max))
    }
    fn new_span(&self, span: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        let mut rec = SpanRec {
            name: span.metadata().name().to_owned(),
            level: *span.metadata().level(),
            fields: BTreeMap::new(),
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
    fn record_follows_from(&self, span: &tracing::span::Id, follows: &tracing::span::Id) {
        self.follows
            .lock()
            .unwrap()
            .push((span.into_u64(), follows.into_u64()));
    }
    fn event(&self, event: &tracing::Event<'_>) {
        let parent = match event.parent() {
            Some(id) => Some(id.into_u64()),
            None if event.is_contextual() => self.entered.lock().unwrap().last().copied(),
            None => None,
        };
        self.events.lock().unwrap().push(EventRec {
            target: event.metadata().target().to_owned(),
            parent,
        });
    }
    fn enter(&self, id: &tracing::span::Id) {
        self.entered.lock().unwrap().push(id.into_u64());
    }
    fn exit(&self, id: &tracing::span::Id) {
        let mut entered = self.entered.lock().unwrap();
        let top = entered.pop();
        assert_eq!(top, Some(id.into_u64()), "spans exited out of order");
    }
}

impl Spans {
    /// A subscriber that wants spans and events up to `max`.
    fn up_to(max: tracing::Level) -> Spans {
        Spans {
            max,
            spans: Arc::default(),
            events: Arc::default(),
            entered: Arc::default(),
            follows: Arc::default(),
        }
    }

    /// The ids of the `cache_call` spans of `function`, in the order they were opened.
    fn call_ids(&self, function: &str) -> Vec<u64> {
        self.ids("cache_call", function)
    }

    /// The ids of the spans named `name` of `function`, in the order they were opened.
    fn ids(&self, name: &str, function: &str) -> Vec<u64> {
        let spans = self.spans.lock().unwrap();
        (1..=spans.len() as u64)
            .filter(|&id| {
                let s = &spans[id as usize - 1];
                s.name == name && s.fields.get("function").map(String::as_str) == Some(function)
            })
            .collect()
    }

    /// The spans that the events of `target` were emitted in.
    fn parents(&self, target: &str) -> Vec<Option<u64>> {
        let events = self.events.lock().unwrap();
        events
            .iter()
            .filter(|e| e.target == target)
            .map(|e| e.parent)
            .collect()
    }

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
    capture_with(Spans::default(), test)
}

/// [`capture`] with the subscriber `spans`.
fn capture_with(spans: Spans, test: impl AsyncFnOnce()) -> Spans {
    let _guard = tracing::subscriber::set_default(spans.clone());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(test());
    spans
}

/// Its body emits a `debug` event (target `spans_body`): the call's span is its parent.
#[cached(cache = cache, key = "s:{id}", ttl = 60, condition = id != 0, name = "spans_get")]
async fn get(cache: &Cache, id: u64) -> Result<u64, String> {
    tracing::debug!(target: "spans_body", id);
    Ok(id * 10)
}

/// A `name` of `None` does not render: the call has no key.
#[cached(cache = cache, key = "n:{name}", ttl = 60, name = "spans_named")]
async fn named(cache: &Cache, name: &Name) -> Result<u64, String> {
    let _ = name;
    Ok(1)
}

#[cached(cache = cache, key = "d:{id}", ttl = 60, name = "spans_decode")]
async fn decoded(cache: &Cache, id: u64) -> Result<u64, String> {
    Ok(id)
}

/// Refreshed in the background by a hit past 5% of its TTL; its body emits a `debug` event.
#[cached(cache = cache, key = "r:{id}", ttl = 2, refresh = "5%", name = "spans_refresh")]
async fn refreshed(cache: &Cache, calls: &Arc<Calls>, id: u64) -> Result<u64, String> {
    calls.hit();
    tracing::debug!(target: "spans_refresh_body", id);
    Ok(id)
}

#[cached(cache = cache, key = "loc:{id}", ttl = 60, local, name = "spans_local")]
async fn local(cache: &Cache, id: u64) -> Result<u64, String> {
    Ok(id)
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
        assert_eq!(named(&cache, &Name(None)).await, Ok(1)); // no key: bypass
        wait_for_a_load(&cache, &cache, 7).await; // miss, coalesced
        if shared {
            let other = build(&namespace, false).await;
            wait_for_a_load(&cache, &other, 8).await; // miss, lock wait
        }
    });
    assert_eq!(spans.outcomes("spans_get"), ["miss", "hit/l2", "bypass"]);
    assert_eq!(spans.outcomes("spans_named"), ["bypass"]);
    // Debug spans, entered while the body runs: its event (the miss's and the bypass's) has
    // the call's span as its parent.
    let ids = spans.call_ids("spans_get");
    assert_eq!(
        spans.parents("spans_body"),
        [Some(ids[0]), Some(ids[2])],
        "{:?}",
        spans.events.lock().unwrap()
    );
    for span in spans.spans.lock().unwrap().iter() {
        if span.name == "cache_call" {
            assert_eq!(span.level, tracing::Level::DEBUG, "{span:?}");
        }
    }
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

/// A subscriber that wants nothing below `info`: no `cache_call` span is created, and the
/// library emits no event per call.
fn quiet(build: impl AsyncFn(&str, bool) -> Cache) {
    let spans = capture_with(Spans::up_to(tracing::Level::INFO), async || {
        let cache = build(&unique_namespace("spans"), true).await;
        assert_eq!(get(&cache, 4).await, Ok(40));
        assert_eq!(get(&cache, 4).await, Ok(40));
        assert_eq!(get(&cache, 0).await, Ok(0));
        wait_for_a_load(&cache, &cache, 9).await;
    });
    let created = spans.spans.lock().unwrap().clone();
    assert!(
        created.iter().all(|s| s.name != "cache_call"),
        "{created:?}"
    );
    assert_eq!(spans.parents("cache_runtime"), []);
    assert_eq!(spans.parents("spans_body"), [], "a debug event was enabled");
}

#[test]
fn spans_none_below_debug_memory() {
    quiet(memory);
}

#[test]
fn spans_none_below_debug_redis() {
    quiet(redis);
}

/// A background refresh runs in a `debug` span of its own, `cache_refresh`, which follows
/// from the hit that started it; the body's events are its children.
fn refresh(build: impl AsyncFn(&str, bool) -> Cache) {
    let spans = capture(async || {
        let cache = build(&unique_namespace("spans"), false).await;
        let calls = Arc::new(Calls::new());
        assert_eq!(refreshed(&cache, &calls, 1).await, Ok(1)); // miss
        tokio::time::sleep(Duration::from_millis(300)).await; // past 5% of the TTL
        assert_eq!(refreshed(&cache, &calls, 1).await, Ok(1)); // hit: starts the refresh
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while calls.get() < 2 {
            assert!(std::time::Instant::now() < deadline, "no refresh ran");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Let the refresh finish storing.
        tokio::time::sleep(Duration::from_millis(100)).await;
    });
    assert_eq!(spans.outcomes("spans_refresh"), ["miss", "hit/l2"]);
    let calls = spans.call_ids("spans_refresh");
    let refreshes = spans.ids("cache_refresh", "spans_refresh");
    assert_eq!(refreshes.len(), 1, "{:?}", spans.spans);
    let rec = spans.spans.lock().unwrap()[refreshes[0] as usize - 1].clone();
    assert_eq!(rec.level, tracing::Level::DEBUG);
    assert_eq!(
        spans.follows.lock().unwrap().clone(),
        [(refreshes[0], calls[1])],
        "follows from the hit"
    );
    assert_eq!(
        spans.parents("spans_refresh_body"),
        [Some(calls[0]), Some(refreshes[0])]
    );
}

#[test]
fn spans_refresh_memory() {
    refresh(memory);
}

#[test]
fn spans_refresh_redis() {
    refresh(redis);
}

/// `local` on Redis: once the in-process tier is usable, a hit's span says `hit` with
/// `level=l1`.
#[test]
fn spans_l1_hit_redis() {
    let spans = capture(async || {
        let cache = redis(&unique_namespace("spans"), false).await;
        crate::local::until_l1_hit(&cache, "spans_local", || local(&cache, 1)).await;
    });
    let outcomes = spans.outcomes("spans_local");
    assert_eq!(
        outcomes.first().map(String::as_str),
        Some("miss"),
        "{outcomes:?}"
    );
    assert_eq!(
        outcomes.last().map(String::as_str),
        Some("hit/l1"),
        "{outcomes:?}"
    );
    let between = &outcomes[1..outcomes.len() - 1];
    assert!(between.iter().all(|o| o == "hit/l2"), "{outcomes:?}");
}

/// An undecodable value at the key: the call runs uncached (`fail_open`, not `miss`); its
/// result overwrites the value, and the next call is a hit.
#[test]
fn spans_fail_open_decode_redis() {
    let spans = capture(async || {
        let fx = crate::support::Fx::redis("spans").await;
        fx.plant_garbage("d:5").await;
        assert_eq!(decoded(&fx.cache, 5).await, Ok(5));
        assert_eq!(decoded(&fx.cache, 5).await, Ok(5));
    });
    assert_eq!(spans.outcomes("spans_decode"), ["fail_open", "hit/l2"]);
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
