//! The users service: `cargo run --release --example users-service`.
//!
//! An axum API over the PostgreSQL table `users_service` (created and seeded with 100 000
//! users on first start), cached on Redis (`REDIS_URL`) or in memory, with `GET /metrics`.
//! Options: see `cache_service_example::users_service::Config` (`--port 0` picks a free port;
//! `CACHE=off` runs every query; `--help` lists them). The first line of stdout is
//! `listening on http://ADDR`.

use std::io::Write;

use cache_service_example::users_service::{Config, prometheus, start};

#[tokio::main]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("users-service: {e}");
        std::process::exit(1);
    }
}

/// `users-service --help`.
const USAGE: &str = "\
users-service: the users API (axum over PostgreSQL), cached with cache-runtime

usage: users-service [OPTIONS]   (each also from the environment variable in brackets)

  --port N                 the port (PORT; 3000; 0: any free port)
  --host IP                the address to listen on (HOST; 127.0.0.1)
  --table NAME             the users table (USERS_TABLE; users_service)
  --rows N                 rows seeded at start (USERS_ROWS; 100000)
  --pool N                 PostgreSQL connections (PG_POOL; 8); the server: PG_URL
  --redis URL              cache on Redis (REDIS_URL; else in memory)
  --redis-cluster URLS     cache on a Redis Cluster, comma-separated (REDIS_CLUSTER_URLS)
  --memory                 cache in memory, whatever the environment says
  --namespace NS           the cache's namespace (CACHE_NAMESPACE; the table name)
  --cache on|off           cache the reads (CACHE; on)
  --publish-stats SECS|off publish stats for `cachectl stats`, on Redis (PUBLISH_STATS; 5)
  -h, --help               this text
";

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::args().skip(1).any(|a| a == "-h" || a == "--help") {
        print!("{USAGE}");
        return Ok(());
    }
    let config = Config::from_env()?.apply_args(std::env::args().skip(1))?;
    // Before the first cached call: the functions register their metrics then.
    let metrics = prometheus()?;
    let cache = if config.cache_enabled { "on" } else { "off" };
    let backend = match (&config.redis_url, config.redis_cluster.is_empty()) {
        (_, false) => "redis cluster",
        (Some(_), true) => "redis",
        (None, true) => "memory",
    };
    let service = start(config.clone(), Some(metrics)).await?;
    println!("listening on http://{}", service.addr());
    std::io::stdout().flush()?;
    eprintln!(
        "table {} ({} users), cache {cache} ({backend}); try: curl http://{}/users/42",
        config.table,
        config.rows,
        service.addr()
    );
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        r = service.wait() => r?,
    }
    Ok(())
}
