//! Multi-level caching: an in-process tier (L1) in front of Redis (L2), kept coherent across
//! instances. `cargo run --example multi_level` (uses `REDIS_URL`, default
//! `redis://127.0.0.1:6379`).
//!
//! Two caches on the same Redis and namespace stand for two instances of a service. Each
//! keeps `setting` in its own L1; when one instance writes the setting, the other's L1 copy
//! is gone within a millisecond or so.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use cache_runtime::{Cache, cache_put, cached};

/// The "database": one row per setting.
static SETTINGS: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());

fn select(key: &str) -> String {
    SETTINGS
        .lock()
        .unwrap()
        .iter()
        .find(|(k, _)| k == key)
        .map_or_else(|| "default".to_owned(), |(_, v)| v.clone())
}

#[cached(cache = cache, key = "setting:{key}", ttl = 600, local)]
async fn setting(cache: &Cache, key: &str) -> String {
    tokio::time::sleep(Duration::from_millis(20)).await; // a query
    select(key)
}

#[cache_put(cache = cache, key = "setting:{key}", ttl = 600, value = value.to_owned())]
async fn save_setting(cache: &Cache, key: &str, value: &str) {
    let mut rows = SETTINGS.lock().unwrap();
    rows.retain(|(k, _)| k != key);
    rows.push((key.to_owned(), value.to_owned()));
}

async fn instance(url: &str, namespace: &str) -> Result<Cache, cache_runtime::Error> {
    Cache::builder()
        .redis(url)
        .namespace(namespace)
        .local(10_000)
        .build()
        .await
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let namespace = format!("multi-level-example-{}", std::process::id());
    let (a, b) = (
        instance(&url, &namespace).await?,
        instance(&url, &namespace).await?,
    );

    // Both instances read the setting: one query, then L1 hits (after the tier's first
    // heartbeat, a few milliseconds after start).
    for round in 1..=4 {
        let t = Instant::now();
        let (va, vb) = (setting(&a, "theme").await, setting(&b, "theme").await);
        println!("round {round}: A={va} B={vb} in {:?}", t.elapsed());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Instance B writes; instance A sees it within milliseconds.
    save_setting(&b, "theme", "dark").await;
    let written = Instant::now();
    loop {
        if setting(&a, "theme").await == "dark" {
            println!("A sees B's write {:?} after it returned", written.elapsed());
            break;
        }
        if written.elapsed() > Duration::from_secs(2) {
            println!("A did not see B's write (is Redis reachable at {url}?)");
            break;
        }
    }

    println!("\ninstance A:\n{}", a.stats());
    println!("instance B:\n{}", b.stats());
    let _ = a.invalidate("setting:theme").await;
    Ok(())
}
