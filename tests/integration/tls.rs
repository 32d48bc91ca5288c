//! TLS and authentication (issue 11) on private servers: a `redis-server` speaking TLS only,
//! with certificates made by `openssl` for the test, with and without an ACL user and client
//! certificates. With the CA, everything works over TLS (hits, misses, `lock`, the bus, L1
//! invalidation across caches, write-behind); without it, or with a wrong password or a
//! missing client certificate, calls run uncached, the log says why, and no password appears
//! in any log line, `Debug` output or error message.
//!
//! The tests run on a current-thread runtime with a capturing `tracing` subscriber set for
//! the test's thread, so that every log line of the cache (the bus and redis-rs's connection
//! tasks run on that thread too) is captured.

use std::fmt::Write as _;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use cache_runtime::write_behind::Worker;
use cache_runtime::{Cache, CacheBuilder, cached, write_behind};
use cache_tests::{RedisCluster, RedisServer, TestCerts, unique_namespace};

use crate::support::{Calls, Gate};

const PASSWORD: &str = "s3cret-Pa55word";
const WRONG: &str = "wr0ng-Pa55word-XYZ";

/// The ACL of the servers with a user: `default` disabled, `app` with `PASSWORD` and the
/// least the README says the cache needs, `admin` (same password) with everything.
fn acl() -> Vec<String> {
    [
        "--user",
        "default",
        "off",
        "--user",
        "app",
        "on",
        &format!(">{PASSWORD}"),
        "~*",
        "&__cr:*",
        "+@read",
        "+@write",
        "+@scripting",
        "+@pubsub",
        "+@stream",
        "+@connection",
        // For the tests' own administration (`ACL SETUSER`).
        "--user",
        "admin",
        "on",
        &format!(">{PASSWORD}"),
        "~*",
        "&*",
        "+@all",
    ]
    .map(str::to_owned)
    .to_vec()
}

fn acl_args(acl: &[String]) -> Vec<&str> {
    acl.iter().map(String::as_str).collect()
}

/// `url` with `user:password@` inserted after the scheme, and `/db` appended.
fn with_credentials(url: &str, user: &str, password: &str, db: u32) -> String {
    let (scheme, rest) = url.split_once("://").unwrap();
    format!("{scheme}://{user}:{password}@{rest}/{db}")
}

fn builder(url: &str, ns: &str) -> CacheBuilder {
    Cache::builder()
        .redis(url)
        .namespace(ns)
        .operation_timeout(Duration::from_secs(2))
        .connect_timeout(Duration::from_secs(2))
}

// ---- log capture -----------------------------------------------------------------------

/// Every event's level, target and fields, one line each.
#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<String>>>);

impl Lines {
    fn all(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }

    fn any(&self, needle: &str) -> bool {
        self.all().iter().any(|l| l.contains(needle))
    }

    /// Waits (at most 10 s) for a line containing `needle`.
    async fn wait_for(&self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.any(needle) {
            assert!(
                Instant::now() < deadline,
                "no log line contains {needle:?}; lines: {:#?}",
                self.all()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for line in self.all().iter().filter(|l| l.contains(needle)) {
            eprintln!("found: {line}");
        }
    }

    fn assert_never(&self, secret: &str) {
        for line in self.all() {
            assert!(!line.contains(secret), "a log line shows a secret: {line}");
        }
    }
}

struct Fields<'a>(&'a mut String);

impl tracing::field::Visit for Fields<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        let _ = write!(self.0, " {}={value:?}", field.name());
    }
}

impl tracing::Subscriber for Lines {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, span: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        let mut line = format!("span {}:", span.metadata().name());
        span.record(&mut Fields(&mut line));
        self.0.lock().unwrap().push(line);
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, values: &tracing::span::Record<'_>) {
        let mut line = "span record:".to_owned();
        values.record(&mut Fields(&mut line));
        self.0.lock().unwrap().push(line);
    }
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        let meta = event.metadata();
        let mut line = format!("{} {}:", meta.level(), meta.target());
        event.record(&mut Fields(&mut line));
        self.0.lock().unwrap().push(line);
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// Captures this thread's log lines until the guard is dropped.
fn capture() -> (Lines, tracing::subscriber::DefaultGuard) {
    let lines = Lines::default();
    let guard = tracing::subscriber::set_default(lines.clone());
    (lines, guard)
}

// ---- functions under test --------------------------------------------------------------

#[cached(cache = cache, key = "double:{id}", ttl = 60, name = "double")]
async fn double(cache: &Cache, calls: &Calls, id: u64) -> u64 {
    calls.hit();
    id * 2
}

/// With `lock`: the first call (of a test's `calls`) waits at the gate.
#[cached(cache = cache, key = "locked:{id}", ttl = 60, lock = 5, name = "locked")]
async fn locked(cache: &Cache, calls: &Calls, gate: &Gate, id: u64) -> u64 {
    if calls.hit() == 1 {
        gate.pass().await;
    }
    id * 3
}

/// With `local`: the in-process tier, kept coherent through the bus.
#[cached(cache = cache, key = "row:{id}", ttl = 60, local, name = "row")]
async fn row(cache: &Cache, calls: &Calls, id: u64) -> String {
    calls.hit();
    format!("row {id}")
}

/// Calls `row` until it is answered by the in-process tier, which is used only once the
/// bus's subscription answered a heartbeat; panics after 10 s.
async fn until_l1_hit(cache: &Cache, calls: &Calls, id: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert_eq!(row(cache, calls, id).await, format!("row {id}"));
        if cache.stats().function("row").is_some_and(|f| f.l1_hits > 0) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no L1 hit within 10 s: {}",
            cache.stats()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Calls `double` three times; returns how many times it ran (1: a miss, then hits).
async fn miss_then_hit(cache: &Cache, id: u64) -> u32 {
    let calls = Calls::new();
    for _ in 0..3 {
        assert_eq!(double(cache, &calls, id).await, id * 2);
    }
    calls.get()
}

// ---- the cases -------------------------------------------------------------------------

/// With the CA: misses, hits, a `lock` waiter in another cache woken by the holder's fill,
/// and the bus (L1 hits need its heartbeat; another cache's write removes the copy).
#[tokio::test]
async fn with_the_ca_everything_works_over_tls() {
    let (lines, _guard) = capture();
    let certs = TestCerts::generate();
    let server = RedisServer::start_tls(&certs, &[]);
    let ns = unique_namespace("tls_works");
    let a = builder(&server.url(), &ns)
        .redis_tls_root_ca(certs.ca())
        .build()
        .await
        .unwrap();
    let b = builder(&server.url(), &ns)
        .redis_tls_root_ca(certs.ca())
        .build()
        .await
        .unwrap();

    assert_eq!(miss_then_hit(&a, 7).await, 1, "{}", a.stats());
    let s = a.stats().function("double").cloned().unwrap();
    assert_eq!((s.misses, s.hits, s.backend_errors), (1, 2, 0), "{s:?}");
    // The other cache reads the same entry from the server.
    assert_eq!(miss_then_hit(&b, 7).await, 0);

    // `lock`: `a` holds the lease, `b` waits for its fill.
    let (calls, gate) = (Arc::new(Calls::new()), Gate::new());
    let holder = {
        let (a, calls, gate) = (a.clone(), calls.clone(), gate.clone());
        tokio::spawn(async move { locked(&a, &calls, &gate, 4).await })
    };
    gate.entered.notified().await;
    let waiter = {
        let (b, calls, gate) = (b.clone(), calls.clone(), gate.clone());
        tokio::spawn(async move { locked(&b, &calls, &gate, 4).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    gate.release.notify_one();
    assert_eq!(holder.await.unwrap(), 12);
    let got = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("the waiter was woken");
    assert_eq!(got.unwrap(), 12);
    assert_eq!(calls.get(), 1, "one load across the two caches");
    let s = b.stats().function("locked").cloned().unwrap();
    assert_eq!(s.lock_waits, 1, "{s:?}");

    // The bus: L1 hits in `a` (trusted only after a heartbeat on the subscription), then a
    // write in `b` removes `a`'s copy.
    let calls = Calls::new();
    until_l1_hit(&a, &calls, 1).await;
    b.set("row:1", &"changed", Duration::from_secs(60))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    while row(&a, &calls, 1).await != "changed" {
        assert!(
            Instant::now() < deadline,
            "the write in the other cache did not reach this one's L1 tier"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(!lines.any("failed"), "{:#?}", lines.all());
}

/// Without the CA (the system's roots do not know it): calls run uncached, the log names the
/// certificate problem.
#[tokio::test]
async fn without_the_ca_calls_run_uncached_and_the_log_says_why() {
    let (lines, _guard) = capture();
    let certs = TestCerts::generate();
    let server = RedisServer::start_tls(&certs, &[]);
    let cache = builder(&server.url(), &unique_namespace("tls_no_ca"))
        .build()
        .await
        .unwrap();
    assert_eq!(miss_then_hit(&cache, 3).await, 3, "every call ran");
    let e = cache.get::<u64>("double:3").await.unwrap_err();
    assert!(e.is_unavailable(), "{e}");
    lines
        .wait_for("redis's TLS certificate is not trusted")
        .await;
    assert!(lines.any("redis_tls_root_ca"), "{:#?}", lines.all());
}

/// An ACL user with its password, a database number, over TLS: the value lands in that
/// database; the bus authenticates too (L1 hits need it).
#[tokio::test]
async fn an_acl_user_and_a_database_work() {
    let (lines, _guard) = capture();
    let certs = TestCerts::generate();
    let acl = acl();
    let server = RedisServer::start_tls(&certs, &acl_args(&acl));
    let url = with_credentials(&server.url(), "app", PASSWORD, 3);
    let cache = builder(&url, &unique_namespace("tls_acl"))
        .redis_tls_root_ca(certs.ca())
        .build()
        .await
        .unwrap();
    assert_eq!(miss_then_hit(&cache, 5).await, 1, "{}", cache.stats());
    until_l1_hit(&cache, &Calls::new(), 2).await;

    // The key is in database 3, not 0.
    let key = cache.full_key("double:5");
    let raw = |db: u32| {
        redis::Client::build_with_tls(
            with_credentials(&server.url(), "app", PASSWORD, db),
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(certs.ca()),
            },
        )
        .unwrap()
    };
    let mut db3 = raw(3).get_multiplexed_async_connection().await.unwrap();
    let mut db0 = raw(0).get_multiplexed_async_connection().await.unwrap();
    let exists = |conn: &mut redis::aio::MultiplexedConnection| {
        let mut conn = conn.clone();
        let key = key.clone();
        async move {
            redis::cmd("EXISTS")
                .arg(&key)
                .query_async::<u32>(&mut conn)
                .await
                .unwrap()
        }
    };
    assert_eq!((exists(&mut db3).await, exists(&mut db0).await), (1, 0));
    lines.assert_never(PASSWORD);
}

/// The same over plain TCP: the bus's own `AUTH` (sent with its `CLIENT SETNAME`) names the
/// user, and its connection is named.
#[tokio::test]
async fn an_acl_user_works_over_tcp_and_the_bus_is_named() {
    let acl = acl();
    let server = RedisServer::start_with(&acl_args(&acl));
    let url = with_credentials(&server.url(), "app", PASSWORD, 2);
    let cache = builder(&url, &unique_namespace("tcp_acl"))
        .build()
        .await
        .unwrap();
    assert_eq!(miss_then_hit(&cache, 5).await, 1, "{}", cache.stats());
    until_l1_hit(&cache, &Calls::new(), 2).await;
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        list.lines()
            .any(|l| l.contains("name=cr-bus:") && l.contains("user=app")),
        "{list}"
    );
}

/// A wrong password: calls run uncached; the log says the credentials of `app` were refused;
/// the password is in no log line, no `Debug` output, no error message. When the server
/// starts accepting it, caching resumes.
#[tokio::test]
async fn a_wrong_password_fails_open_and_is_never_shown() {
    let (lines, _guard) = capture();
    let certs = TestCerts::generate();
    let acl = acl();
    let server = RedisServer::start_tls(&certs, &acl_args(&acl));
    let url = with_credentials(&server.url(), "app", WRONG, 0);
    let builder = builder(&url, &unique_namespace("tls_wrongpass")).redis_tls_root_ca(certs.ca());
    let mut shown = vec![format!("{builder:?}")];
    let cache = builder.build().await.unwrap();
    assert_eq!(miss_then_hit(&cache, 9).await, 3, "every call ran");
    // `lock` and `local` (which start the bus) fail open too. (The bus's own "cannot
    // subscribe" line shares the rate limit of the lines above, so it may not show.)
    let (calls, gate) = (Calls::new(), Gate::new());
    gate.release.notify_one();
    assert_eq!(locked(&cache, &calls, &gate, 2).await, 6);
    assert_eq!(row(&cache, &calls, 2).await, "row 2");
    lines
        .wait_for("redis refused the credentials of user `app`")
        .await;
    for e in [
        cache.get::<u64>("double:9").await.unwrap_err(),
        cache
            .set("k", &1, Duration::from_secs(5))
            .await
            .unwrap_err(),
        // A malformed URL with the password: the error shows it redacted.
        Cache::builder()
            .redis(format!("redis://app:{WRONG}@127.0.0.1:1/notadb"))
            .build()
            .await
            .unwrap_err(),
    ] {
        shown.push(e.to_string());
        shown.push(format!("{e:?}"));
    }
    shown.push(format!("{cache:?}"));
    shown.push(format!("{:?}", cache.stats()));
    shown.push(cache.stats().to_string());
    for text in &shown {
        assert!(!text.contains(WRONG), "shows the password: {text}");
    }
    assert!(lines.any("user `app`"), "{:#?}", lines.all());

    // The server starts accepting that password: caching resumes after a breaker cooldown.
    let admin = redis::Client::build_with_tls(
        with_credentials(&server.url(), "admin", PASSWORD, 0),
        redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(certs.ca()),
        },
    )
    .unwrap();
    let mut admin = admin.get_multiplexed_async_connection().await.unwrap();
    let () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg("app")
        .arg(format!(">{WRONG}"))
        .query_async(&mut admin)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while miss_then_hit(&cache, 10).await != 0 {
        assert!(
            Instant::now() < deadline,
            "caching did not resume: {}",
            cache.stats()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    lines.wait_for("caching resumed").await;
    lines.assert_never(WRONG);
}

/// mTLS (`--tls-auth-clients yes`): with the client certificate it works; without, calls run
/// uncached and the log says the server refused this client's certificate.
#[tokio::test]
async fn client_certificates_for_mutual_tls() {
    let (lines, _guard) = capture();
    let certs = TestCerts::generate();
    let server = RedisServer::start_tls(&certs, &["--tls-auth-clients", "yes"]);
    let with = builder(&server.url(), &unique_namespace("mtls"))
        .redis_tls_root_ca(certs.ca())
        .redis_tls_client_cert(certs.client_cert(), certs.client_key())
        .build()
        .await
        .unwrap();
    assert_eq!(miss_then_hit(&with, 1).await, 1, "{}", with.stats());
    let without = builder(&server.url(), &unique_namespace("mtls_none"))
        .redis_tls_root_ca(certs.ca())
        .build()
        .await
        .unwrap();
    assert_eq!(miss_then_hit(&without, 1).await, 3, "every call ran");
    lines
        .wait_for("redis refused this client's TLS certificate")
        .await;
}

// ---- write-behind over TLS -------------------------------------------------------------

static WB_CACHE: OnceLock<Cache> = OnceLock::new();
static APPLIED: Mutex<Vec<(u64, String)>> = Mutex::new(Vec::new());

#[write_behind(cache = WB_CACHE.get().expect("built by the test"), key = "note:{id}", ttl = 60, value = text, queue = "tls-notes")]
async fn save_note(id: u64, text: String) -> Result<(), String> {
    APPLIED.lock().unwrap().push((id, text));
    Ok(())
}

/// The worker's own connections (blocking reads) are made from the cache's client: TLS with
/// the CA, as the ACL user.
#[tokio::test]
async fn write_behind_works_over_tls() {
    let certs = TestCerts::generate();
    let acl = acl();
    let server = RedisServer::start_tls(&certs, &acl_args(&acl));
    let url = with_credentials(&server.url(), "app", PASSWORD, 0);
    let cache = builder(&url, &unique_namespace("tls_wb"))
        .redis_tls_root_ca(certs.ca())
        .build()
        .await
        .unwrap();
    WB_CACHE.set(cache.clone()).unwrap();
    save_note(1, "hello".to_owned()).await.unwrap();
    assert!(APPLIED.lock().unwrap().is_empty(), "queued, not applied");
    let depth = write_behind::depth(&cache, "tls-notes").await.unwrap();
    assert_eq!(depth.pending, 1, "{depth}");
    let worker = Worker::builder(&cache)
        .queues(["tls-notes"])
        .poll(Duration::from_millis(50))
        .start()
        .unwrap();
    assert!(worker.flush_for(Duration::from_secs(20)).await, "drained");
    assert_eq!(*APPLIED.lock().unwrap(), vec![(1, "hello".to_owned())]);
    worker.shutdown().await;
}

/// A Redis Cluster over TLS (client connections, cluster bus and replication): with the CA,
/// keys on every shard miss once and then hit, an invalidation reaches the key's shard, the
/// in-process tier is trusted (the echo heartbeat went through every master over TLS);
/// without the CA every call runs the function (on a cluster redis-rs connects in the
/// background, so the log shows timed-out operations and the open breaker, not the
/// certificate problem itself).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_over_tls() {
    let certs = TestCerts::generate();
    let (_cluster, urls) = RedisCluster::start_tls(&certs);
    let ns = unique_namespace("tls_cluster");
    let cache = Cache::builder()
        .redis_cluster(urls.clone())
        .redis_tls_root_ca(certs.ca())
        .namespace(&ns)
        .operation_timeout(Duration::from_secs(2))
        .build()
        .await
        .unwrap();
    assert_eq!(cache.backend_name(), "redis-cluster");
    // 30 keys: every shard holds some.
    for id in 0..30 {
        assert_eq!(miss_then_hit(&cache, id).await, 1, "{}", cache.stats());
    }
    let s = cache.stats().function("double").cloned().unwrap();
    assert_eq!((s.misses, s.hits, s.backend_errors), (30, 60, 0), "{s:?}");
    cache
        .invalidate(&format!("double:{}", 3))
        .await
        .expect("an invalidation over TLS");
    assert_eq!(miss_then_hit(&cache, 3).await, 1, "loaded again after it");
    until_l1_hit(&cache, &Calls::new(), 1).await;

    let (lines, _guard) = capture();
    let untrusting = Cache::builder()
        .redis_cluster(urls)
        .namespace(&ns)
        .build()
        .await
        .unwrap();
    assert_eq!(miss_then_hit(&untrusting, 5).await, 3, "runs uncached");
    lines.wait_for("circuit breaker open").await;
}
