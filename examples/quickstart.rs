//! The quickstart: `cargo run --example quickstart`. No server needed — the cache is in
//! process memory. Point it at Redis instead with `cargo run --example redis`.

use std::time::{Duration, Instant};

use cache_examples::{DbError, User, queries, select_user};
use cache_runtime::{Cache, cached, default_cache};

/// An existing data-access function, plus one attribute. `lock`: one load per key at a
/// time (across processes on Redis; in this process here), the other callers wait for it.
#[cached(key = "user:{id}", ttl = "10m", lock)]
async fn get_user(id: u64) -> Result<Option<User>, DbError> {
    select_user(id, Duration::from_millis(50)).await
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The default cache is built from the environment on first use (REDIS_URL set: Redis,
    // otherwise memory). Set it explicitly here so the quickstart always runs in memory.
    cache_runtime::set_default(Cache::builder().memory(10_000).build().await?)?;

    let t = Instant::now();
    let user = get_user(42).await?;
    println!(
        "miss: {:?} in {:?} ({} query)",
        user.map(|u| u.name),
        t.elapsed(),
        queries()
    );

    let t = Instant::now();
    let user = get_user(42).await?;
    println!(
        "hit:  {:?} in {:?} ({} query)",
        user.map(|u| u.name),
        t.elapsed(),
        queries()
    );

    // A stampede: 100 concurrent callers of a cold key share one load (`lock`).
    let before = queries();
    let callers: Vec<_> = (0..100).map(|_| tokio::spawn(get_user(7))).collect();
    for caller in callers {
        caller.await??;
    }
    println!(
        "100 concurrent callers of a cold key: {} query",
        queries() - before
    );

    // `None` is not cached unless the function says `cache_none`.
    let before = queries();
    assert_eq!(get_user(0).await?, None);
    assert_eq!(get_user(0).await?, None);
    println!(
        "a missing user, twice: {} queries (None is not cached)",
        queries() - before
    );

    // The manual API works on the same keys.
    default_cache().invalidate("user:42").await?;
    let before = queries();
    get_user(42).await?;
    println!("after invalidating user:42: {} query", queries() - before);

    println!("\n{}", default_cache().stats());
    Ok(())
}
