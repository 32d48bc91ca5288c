//! The quickstart against Redis: `cargo run --example redis`.
//!
//! Uses `REDIS_URL` (default `redis://127.0.0.1:6379`). Run it twice: the second run's first
//! call is already a hit, because the value lives in Redis, not in the process. Stop Redis
//! and run it again: every call still answers, from the "database".

use std::time::{Duration, Instant};

use cache_examples::{DbError, User, queries, select_user};
use cache_runtime::{Cache, cached, default_cache};

#[cached(key = "user:{id}", ttl = "10m", lock)]
async fn get_user(id: u64) -> Result<Option<User>, DbError> {
    select_user(id, Duration::from_millis(50)).await
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let cache = Cache::builder()
        .redis(&url)
        .namespace("cache-runtime-example")
        .default_ttl(Duration::from_secs(600))
        .build()
        .await?;
    cache_runtime::set_default(cache)?;
    println!(
        "cache: redis at {url}, keys like {}",
        default_cache().full_key("user:42")
    );

    for attempt in 1..=3 {
        let t = Instant::now();
        let user = get_user(42).await?;
        println!(
            "call {attempt}: {:?} in {:?} ({} queries so far)",
            user.map(|u| u.email),
            t.elapsed(),
            queries()
        );
    }

    println!("\n{}", default_cache().stats());
    if default_cache()
        .stats()
        .functions()
        .iter()
        .any(|f| f.backend_errors > 0)
    {
        println!("(redis was unreachable: every call ran the function, as it should)");
    }
    Ok(())
}
