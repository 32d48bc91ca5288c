//! `cachectl` against a real Redis: its commands run in process (`cachectl::run_async`, what
//! the binary's `main` runs after collecting its arguments), their output and exit codes.

use std::sync::LazyLock;
use std::time::Duration;

use cache_runtime::{Cache, cached, write_behind};
use cache_tests::{raw_connection, redis_url, shared_cluster, unique_namespace};
use redis::AsyncCommands;

/// Runs `cachectl --redis $REDIS_URL <args>`: (exit code, stdout, stderr).
async fn cachectl(args: &[&str]) -> (i32, String, String) {
    let mut all = vec!["--redis".to_owned(), redis_url()];
    all.extend(args.iter().map(|a| (*a).to_owned()));
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = cachectl::run_async(all, &mut out, &mut err).await;
    (
        code,
        String::from_utf8(out).unwrap(),
        String::from_utf8(err).unwrap(),
    )
}

/// Asserts a failure: `code`, nothing on stdout, one line on stderr containing `message`.
fn assert_fails((code, out, err): &(i32, String, String), expected: i32, message: &str) {
    assert_eq!(*code, expected, "stdout: {out}\nstderr: {err}");
    assert!(out.is_empty(), "{out}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.contains(message), "{err:?} should contain {message:?}");
}

async fn cache(name: &str) -> (Cache, String) {
    let ns = unique_namespace(name);
    let cache = Cache::builder()
        .redis(redis_url())
        .namespace(&ns)
        .operation_timeout(Duration::from_secs(2))
        .publish_stats(Duration::from_secs(1))
        .build()
        .await
        .unwrap();
    (cache, ns)
}

#[cached(cache = cache, key = "member:{id}", ttl = 60, tags = ["team:{team}"], name = "cachectl_member")]
async fn member(cache: &Cache, team: u32, id: u32) -> String {
    format!("member {id} of team {team}")
}

#[tokio::test]
async fn stats_shows_the_fleet_table() {
    let (cache, ns) = cache("cachectl_stats").await;
    member(&cache, 1, 1).await;
    member(&cache, 1, 1).await;
    cache_runtime::__private::publish_now(&cache).await.unwrap();
    let (code, out, err) = cachectl(&["--namespace", &ns, "stats"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("1 instance\n"), "{out}");
    let row = out
        .lines()
        .find(|l| l.starts_with("cachectl_member"))
        .unwrap_or_else(|| panic!("a row for the function: {out}"));
    let cells: Vec<&str> = row.split_whitespace().collect();
    // function, inst, calls, hits, misses, hit rate
    assert_eq!(
        cells[..6],
        ["cachectl_member", "1", "2", "1", "1", "!"],
        "{out}"
    );
    // --watch clears the screen before each table; --count stops it.
    let (code, out, _) = cachectl(&[
        "stats",
        "--namespace",
        &ns,
        "--watch",
        "0.1",
        "--count",
        "2",
    ])
    .await;
    assert_eq!(code, 0);
    assert_eq!(
        out.matches("\x1b[2J\x1b[H1 instance\n").count(),
        2,
        "{out:?}"
    );
    // A namespace without publishers: an empty table, and why.
    let (code, out, _) = cachectl(&["--namespace", &unique_namespace("none"), "stats"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("no live instance publishes"), "{out}");
}

#[tokio::test]
async fn get_shows_the_entry_and_invalidate_removes_it() {
    let (cache, ns) = cache("cachectl_get").await;
    cache
        .set(
            "user:1",
            &serde_json::json!({"name": "ann"}),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    let (code, out, err) = cachectl(&["--namespace", &ns, "get", "user:1"]).await;
    assert_eq!(code, 0, "{err}");
    let field = |name: &str| -> String {
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .unwrap_or_else(|| panic!("{name} in {out}"))
            .trim()
            .to_owned()
    };
    assert_eq!(field("key"), format!("{ns}:user:1"));
    assert_eq!(field("value"), r#"{"name":"ann"}"#);
    let ttl: f64 = field("ttl").trim_end_matches('s').parse().unwrap();
    assert!(ttl > 0.0 && ttl <= 60.0, "{out}");
    let generation = field("generation");
    assert_eq!(generation.len(), 26, "a 13-byte header in hex: {out}");
    assert!(generation.bytes().all(|b| b.is_ascii_hexdigit()), "{out}");
    field("age");
    field("compute");

    // A write makes a new generation.
    cache
        .set(
            "user:1",
            &serde_json::json!({"name": "bob"}),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    let (_, out2, _) = cachectl(&["--namespace", &ns, "get", "user:1"]).await;
    assert!(out2.contains(r#"{"name":"bob"}"#), "{out2}");

    let (code, out, _) = cachectl(&["--namespace", &ns, "invalidate", "user:1"]).await;
    assert_eq!((code, out.as_str()), (0, "invalidated user:1\n"));
    assert_eq!(
        cache.get::<serde_json::Value>("user:1").await.unwrap(),
        None
    );
    assert_fails(
        &cachectl(&["--namespace", &ns, "get", "user:1"]).await,
        cachectl::EXIT_NO_ENTRY,
        "no entry for key user:1",
    );
    // Nothing left to invalidate: said so, not a silent success.
    assert_fails(
        &cachectl(&["--namespace", &ns, "invalidate", "user:1"]).await,
        cachectl::EXIT_NO_ENTRY,
        "no entry for key user:1",
    );
}

#[tokio::test]
async fn get_of_something_else_is_not_a_cache_entry() {
    let (cache, ns) = cache("cachectl_foreign").await;
    let mut conn = raw_connection(&redis_url()).await;
    let _: () = conn
        .set_ex(cache.full_key("raw"), "hello", 60)
        .await
        .unwrap();
    assert_fails(
        &cachectl(&["--namespace", &ns, "get", "raw"]).await,
        cachectl::EXIT_NOT_ENTRY,
        "not a cache entry: ",
    );
    let (_, _, err) = cachectl(&["--namespace", &ns, "get", "raw"]).await;
    assert!(err.contains("\"hello\""), "{err}");
    // Another program's data is not deleted by `invalidate` without --force.
    assert_fails(
        &cachectl(&["--namespace", &ns, "invalidate", "raw"]).await,
        cachectl::EXIT_NOT_ENTRY,
        "--force deletes it",
    );
    let still: Option<String> = conn.get(cache.full_key("raw")).await.unwrap();
    assert_eq!(still.as_deref(), Some("hello"));
    let (code, out, err) = cachectl(&["--namespace", &ns, "invalidate", "raw", "--force"]).await;
    assert_eq!((code, out.as_str()), (0, "invalidated raw\n"), "{err}");
    let gone: Option<String> = conn.get(cache.full_key("raw")).await.unwrap();
    assert_eq!(gone, None);
    let _: () = conn
        .set_ex(cache.full_key("raw"), "hello", 60)
        .await
        .unwrap();
    let _: () = conn.hset(cache.full_key("hash"), "f", "v").await.unwrap();
    let _: () = conn.expire(cache.full_key("hash"), 60).await.unwrap();
    assert_fails(
        &cachectl(&["--namespace", &ns, "get", "hash"]).await,
        cachectl::EXIT_NOT_ENTRY,
        "holds a redis hash",
    );
}

#[tokio::test]
async fn get_of_a_pending_load_shows_its_lease_holder() {
    let (cache, ns) = cache("cachectl_pending").await;
    // What a `lock` load leaves in the key while it runs: its marker, the lease.
    let mut conn = raw_connection(&redis_url()).await;
    let _: () = conn
        .set_ex(cache.full_key("slow"), "\0crp:5f3a9c:1b", 60)
        .await
        .unwrap();
    let (code, out, err) = cachectl(&["--namespace", &ns, "get", "slow"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("value:       - (a load is pending)"), "{out}");
    assert!(out.contains("lease:       5f3a9c:1b"), "{out}");
}

/// The bookkeeping around an entry, as `get` shows it: a refresh running (its token),
/// callers waiting for a fill, a `stale` copy's TTL (the keys written as the engine does).
#[tokio::test]
async fn get_shows_a_refresh_waiters_and_a_stale_copy() {
    let (cache, ns) = cache("cachectl_aux").await;
    cache
        .set("user:5", &"eve", Duration::from_secs(60))
        .await
        .unwrap();
    let full = cache.full_key("user:5");
    assert!(!full.contains(['{', '}']), "{full}");
    let mut conn = raw_connection(&redis_url()).await;
    let _: () = conn
        .set_ex(format!("__cr:refresh:{{{full}}}"), "tok-123", 60)
        .await
        .unwrap();
    let _: () = conn
        .set_ex(format!("__cr:wait:{{{full}}}"), "1", 60)
        .await
        .unwrap();
    let _: () = conn
        .set_ex(format!("__cr:stale:{{{full}}}"), "old", 30)
        .await
        .unwrap();
    let (code, out, err) = cachectl(&["--namespace", &ns, "get", "user:5"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("refreshing:  tok-123"), "{out}");
    assert!(out.contains("waiters:     yes"), "{out}");
    let stale = out
        .lines()
        .find_map(|l| l.strip_prefix("stale copy:"))
        .unwrap_or_else(|| panic!("a stale copy line: {out}"));
    let secs: f64 = stale.trim().trim_end_matches("s left").parse().unwrap();
    assert!(secs > 0.0 && secs <= 30.0, "{out}");
}

#[tokio::test]
async fn invalidate_tag_voids_the_tagged_entries() {
    let (cache, ns) = cache("cachectl_tag").await;
    assert_eq!(member(&cache, 7, 1).await, "member 1 of team 7");
    let (code, out, err) = cachectl(&["--namespace", &ns, "get", "member:1"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(r#"value:       "member 1 of team 7""#),
        "{out}"
    );
    // Tags are shown as stored: with the namespace, like the key.
    assert!(
        out.contains(&format!("tag:         {ns}:team:7 (current)")),
        "{out}"
    );
    let (code, out, _) = cachectl(&["--namespace", &ns, "invalidate-tag", "team:7"]).await;
    assert_eq!((code, out.as_str()), (0, "invalidated tag team:7\n"));
    let (_, out, _) = cachectl(&["--namespace", &ns, "get", "member:1"]).await;
    assert!(
        out.contains(&format!("tag:         {ns}:team:7 (invalidated)")),
        "{out}"
    );
    member(&cache, 7, 1).await;
    let f = cache.stats();
    let f = f.function("cachectl_member").unwrap();
    assert_eq!(f.misses, 2, "the entry was not served after the tag moved");
}

static WB: LazyLock<(Cache, String)> = LazyLock::new(|| {
    let ns = unique_namespace("cachectl_wb");
    let cache = Cache::builder()
        .redis(redis_url())
        .namespace(&ns)
        .operation_timeout(Duration::from_secs(2))
        .write_behind_partitions(1)
        .publish_stats(Duration::from_secs(1))
        .build_sync()
        .unwrap();
    (cache, ns)
});

#[cache_runtime::write_behind(cache = WB.0, key = "acct:{id}", ttl = 60, value = name, queue = "cachectl-q")]
async fn save_account(id: u64, name: String) -> Result<(), String> {
    Err(format!("account {id} refused {name}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_and_retry_dead() {
    let (cache, ns) = &*WB;
    save_account(1, "ann".into()).await.unwrap();
    let worker = write_behind::Worker::builder(cache)
        .queues(["cachectl-q"])
        .max_attempts(1)
        .poll(Duration::from_millis(50))
        .backoff(Duration::from_millis(10), Duration::from_millis(50))
        .start()
        .unwrap();
    assert!(worker.flush_for(Duration::from_secs(20)).await);
    worker.shutdown().await;
    let wb = ["--namespace", ns, "--partitions", "1"];
    let (code, out, err) = cachectl(&[&wb[..], &["queue", "cachectl-q"]].concat()).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "queue cachectl-q: 0 pending (oldest -), 1 dead\n");
    // Without a name: the queues the live instances' programs name (this test binary's).
    cache_runtime::__private::publish_now(cache).await.unwrap();
    let (code, out, err) = cachectl(&[&wb[..], &["queue"]].concat()).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("queue cachectl-q: 0 pending (oldest -), 1 dead\n"),
        "{out}"
    );
    let (code, out, _) = cachectl(&[&wb[..], &["retry-dead", "cachectl-q"]].concat()).await;
    assert_eq!(code, 0);
    assert_eq!(
        out,
        "moved 1 dead letter of queue cachectl-q back to its partitions\n"
    );
    let depth = write_behind::depth(cache, "cachectl-q").await.unwrap();
    assert_eq!((depth.pending, depth.dead), (1, 0), "{depth}");
    assert_fails(
        &cachectl(&[&wb[..], &["queue", "bad queue"]].concat()).await,
        cachectl::EXIT_USAGE,
        "invalid queue name",
    );
}

#[tokio::test]
async fn bad_input_is_one_line_and_a_distinct_exit_code() {
    assert_fails(
        &cachectl(&["frobnicate"]).await,
        cachectl::EXIT_USAGE,
        "unknown command `frobnicate`",
    );
    assert_fails(
        &cachectl(&["--verbose", "stats"]).await,
        cachectl::EXIT_USAGE,
        "unknown",
    );
    assert_fails(
        &cachectl(&["get"]).await,
        cachectl::EXIT_USAGE,
        "needs a KEY",
    );
    assert_fails(
        &cachectl(&["get", "--foo"]).await,
        cachectl::EXIT_USAGE,
        "unknown option --foo of `get`",
    );
    assert_fails(
        &cachectl(&["invalidate", "k", "--bogus"]).await,
        cachectl::EXIT_USAGE,
        "takes one KEY",
    );
    assert_fails(
        &cachectl(&["get", "a", "b"]).await,
        cachectl::EXIT_USAGE,
        "takes one KEY",
    );
    assert_fails(
        &cachectl(&["stats", "--count", "2"]).await,
        cachectl::EXIT_USAGE,
        "--count goes with --watch",
    );
    assert_fails(
        &cachectl(&["--namespace", "a b", "stats"]).await,
        cachectl::EXIT_USAGE,
        "namespace",
    );
    let (code, out, _) = cachectl(&["--help"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("exit codes:"), "{out}");
}

#[tokio::test]
async fn redis_down_is_reported_not_a_miss() {
    for command in [
        &["stats"][..],
        &["get", "user:1"],
        &["invalidate", "user:1"],
        &["invalidate-tag", "t"],
        &["queue", "q"],
        &["retry-dead", "q"],
    ] {
        let mut args = vec!["--redis".to_owned(), "redis://127.0.0.1:1".to_owned()];
        args.extend(command.iter().map(|a| (*a).to_owned()));
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let code = cachectl::run_async(args, &mut out, &mut err).await;
        let result = (
            code,
            String::from_utf8(out).unwrap(),
            String::from_utf8(err).unwrap(),
        );
        assert_fails(&result, cachectl::EXIT_REDIS, "redis: ");
    }
    // A password in the URL never reaches the error line.
    for command in [
        &["stats"][..],
        &["get", "user:1"],
        &["invalidate", "user:1"],
    ] {
        let mut args = vec![
            "--redis".to_owned(),
            "redis://:s3cr3t-pw@127.0.0.1:1".to_owned(),
        ];
        args.extend(command.iter().map(|a| (*a).to_owned()));
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let code = cachectl::run_async(args, &mut out, &mut err).await;
        let (out, err) = (
            String::from_utf8(out).unwrap(),
            String::from_utf8(err).unwrap(),
        );
        assert_eq!(code, cachectl::EXIT_REDIS, "{err}");
        assert!(!err.contains("s3cr3t") && !out.contains("s3cr3t"), "{err}");
    }
}

/// `get`, `invalidate` and `stats` on a Redis Cluster (`--cluster`): the one of
/// `CACHE_TESTS_CLUSTER_URLS`, else one started for the test binary.
#[tokio::test]
async fn on_a_cluster() {
    let (urls, _cluster) = shared_cluster();
    let urls = urls.join(",");
    let ns = unique_namespace("cachectl_cluster");
    let cache = Cache::builder()
        .redis_cluster(urls.split(','))
        .namespace(&ns)
        .operation_timeout(Duration::from_secs(2))
        .publish_stats(Duration::from_secs(1))
        .build()
        .await
        .unwrap();
    member(&cache, 3, 4).await;
    cache_runtime::__private::publish_now(&cache).await.unwrap();
    let run = |args: &[&str]| {
        let mut all = vec![
            "--cluster".to_owned(),
            urls.clone(),
            "--namespace".to_owned(),
            ns.clone(),
        ];
        all.extend(args.iter().map(|a| (*a).to_owned()));
        async move {
            let (mut out, mut err) = (Vec::new(), Vec::new());
            let code = cachectl::run_async(all, &mut out, &mut err).await;
            (
                code,
                String::from_utf8(out).unwrap(),
                String::from_utf8(err).unwrap(),
            )
        }
    };
    let (code, out, err) = run(&["get", "member:4"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(r#"value:       "member 4 of team 3""#),
        "{out}"
    );
    assert!(out.contains(&format!("{ns}:team:3 (current)")), "{out}");
    let (code, out, err) = run(&["stats"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("1 instance\n"), "{out}");
    assert!(out.contains("cachectl_member"), "{out}");
    let (code, _, err) = run(&["invalidate-tag", "team:3"]).await;
    assert_eq!(code, 0, "{err}");
    let (_, out, _) = run(&["get", "member:4"]).await;
    assert!(out.contains(&format!("{ns}:team:3 (invalidated)")), "{out}");
    let (code, _, err) = run(&["invalidate", "member:4"]).await;
    assert_eq!(code, 0, "{err}");
    assert_fails(
        &run(&["get", "member:4"]).await,
        cachectl::EXIT_NO_ENTRY,
        "no entry for key member:4",
    );
}
