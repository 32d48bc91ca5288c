//! The load generator: `cargo run --release --example loadgen -- --url
//! http://127.0.0.1:3000 --clients 32 --writes 0.05 --duration 20`.
//!
//! `--compare` starts the users service itself, in this process (configured from the same
//! environment as the service: `PG_URL`, `USERS_TABLE`, `REDIS_URL`, ...), and runs the load
//! twice: with the cache, then without (`CACHE=off`); `--url` is then ignored. Options:
//! `cache_service_example::loadgen::Options`.

use cache_service_example::loadgen::{Options, Report, run};
use cache_service_example::users_service::{self, Config};

#[tokio::main]
async fn main() {
    if let Err(e) = main_inner().await {
        eprintln!("loadgen: {e}");
        std::process::exit(1);
    }
}

async fn main_inner() -> Result<(), String> {
    let (mut options, rest) = Options::default().apply_args(std::env::args().skip(1))?;
    let compare = match rest.as_slice() {
        [] => false,
        [flag] if flag == "--compare" => true,
        [flag, ..] if flag == "--compare" => {
            return Err(format!("unknown option `{}`", rest[1]));
        }
        [other, ..] => return Err(format!("unknown option `{other}`")),
    };
    if !compare {
        println!(
            "{} clients, {:?}, {:.0}% writes, Zipf({}) over {} users, against {}",
            options.clients,
            options.duration,
            options.writes * 100.0,
            options.zipf,
            options.users,
            options.url
        );
        let report = run(&options, |line| println!("{line}")).await?;
        print!("{report}");
        return Ok(());
    }
    let metrics = users_service::prometheus()?;
    let mut reports: Vec<(&str, Report)> = Vec::new();
    for (label, enabled) in [("cache on", true), ("cache off", false)] {
        let config = Config {
            port: 0,
            cache_enabled: enabled,
            ..Config::from_env()?
        };
        let service = users_service::start(config, Some(metrics.clone()))
            .await
            .map_err(|e| e.to_string())?;
        options.url = format!("http://{}", service.addr());
        println!(
            "== {label}: {} clients, {:?}",
            options.clients, options.duration
        );
        let report = run(&options, |line| println!("{line}")).await;
        service
            .stop()
            .await
            .map_err(|e| format!("stopping the service: {e}"))?;
        let report = report?;
        print!("{report}");
        reports.push((label, report));
    }
    if let [(_, on), (_, off)] = reports.as_slice() {
        println!(
            "== cache on vs off: {:.2}x throughput, p99 {:.2}x, {:.3} vs {:.3} db queries per request",
            on.throughput() / off.throughput(),
            on.p99.as_secs_f64() / off.p99.as_secs_f64().max(1e-9),
            on.db_queries_per_request(),
            off.db_queries_per_request()
        );
    }
    Ok(())
}
