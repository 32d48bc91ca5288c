//! The users service: `cargo run --release --example users-service`.
//!
//! An axum API over the PostgreSQL table `users_service` (created and seeded with 100 000
//! users on first start), cached on Redis (`REDIS_URL`) or in memory, with `GET /metrics`.
//! Options: see `cache_service_example::users_service::Config` (`--port 0` picks a free port;
//! `CACHE=off` runs every query). The first line of stdout is `listening on http://ADDR`.

use std::io::Write;

use cache_service_example::users_service::{Config, prometheus, start};

#[tokio::main]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("users-service: {e}");
        std::process::exit(1);
    }
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
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
