//! `stampede`: N processes x M tasks call a function on one cold key at the same moment.
//! How many times does the function run, and how long after the fill do the waiters get the
//! value? See `cache_benches::stampede` and BENCHMARKS.md.
//!
//! ```text
//! cargo run --release --bin stampede -- [--processes N] [--tasks M] [--load-ms L]
//!                                       [--json FILE] [--quick] [--redis-url URL]
//! ```

use cache_benches::stampede::{self, Options, Row};
use cache_benches::{Table, fmt_ns, machine_description};
use serde::Serialize;

struct Args {
    opts: Options,
    json: Option<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        opts: Options {
            processes: 4,
            tasks: 250,
            load_ms: 250,
            redis_url: std::env::var("REDIS_URL")
                .unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned()),
            cluster_urls: Vec::new(),
        },
        json: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--processes" => {
                a.opts.processes = value("--processes")?
                    .parse()
                    .map_err(|e| format!("--processes: {e}"))?
            }
            "--tasks" => {
                a.opts.tasks = value("--tasks")?
                    .parse()
                    .map_err(|e| format!("--tasks: {e}"))?
            }
            "--load-ms" => {
                a.opts.load_ms = value("--load-ms")?
                    .parse()
                    .map_err(|e| format!("--load-ms: {e}"))?
            }
            "--json" => a.json = Some(value("--json")?),
            "--redis-url" => a.opts.redis_url = value("--redis-url")?,
            "--quick" => {
                a.opts.processes = 2;
                a.opts.tasks = 50;
                a.opts.load_ms = 150;
            }
            "-h" | "--help" => {
                println!(
                    "stampede [--processes N] [--tasks M] [--load-ms L] [--json FILE] [--quick] [--redis-url URL]"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    if a.opts.processes == 0 || a.opts.tasks == 0 {
        return Err("--processes and --tasks must be > 0".to_owned());
    }
    Ok(a)
}

#[derive(Serialize)]
struct Report {
    machine: String,
    args: String,
    rows: Vec<Row>,
}

fn main() {
    stampede::worker_main_if_requested();
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("stampede: {e}");
            std::process::exit(2);
        }
    };
    let rt = cache_benches::runtime();
    if let Err(e) = rt.block_on(coordinate(args)) {
        eprintln!("stampede: {e}");
        std::process::exit(1);
    }
}

async fn coordinate(args: Args) -> Result<(), String> {
    let client = redis::Client::open(args.opts.redis_url.as_str()).map_err(|e| e.to_string())?;
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| format!("cannot connect to {}: {e}", args.opts.redis_url))?;
    let redis_version = cache_benches::redis_version(&mut conn).await?;
    let rows = stampede::run(&args.opts).await?;

    let us = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| fmt_ns(v * 1e3));
    let mut table = Table::new(&[
        "contender",
        "callers",
        "executions",
        "correct",
        "waiters",
        "wake-up p50",
        "wake-up p99",
        "wake-up max",
        "all done after",
    ]);
    for r in &rows {
        table.row(vec![
            r.contender.clone(),
            format!("{} x {}", r.processes, r.tasks_per_process),
            r.executions.to_string(),
            format!("{}/{}", r.correct, r.processes * r.tasks_per_process),
            r.waiters.to_string(),
            us(r.wake_p50_us),
            us(r.wake_p99_us),
            us(r.wake_max_us),
            format!("{:.0} ms", r.total_ms),
        ]);
    }
    let machine = machine_description(&redis_version);
    let argline = format!(
        "processes={} tasks={} load={} ms",
        args.opts.processes, args.opts.tasks, args.opts.load_ms
    );
    println!("Machine: {machine}");
    println!("Run: {argline}\n");
    println!("{}", table.render());
    println!(
        "executions: times the function ran (counted in Redis); waiters: callers that did not run it; wake-up: how long after the first execution finished (its fill had landed) each waiter got the value."
    );
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&Report {
            machine,
            args: argline,
            rows,
        })
        .map_err(|e| e.to_string())?;
        std::fs::write(path, json).map_err(|e| format!("writing {path}: {e}"))?;
        eprintln!("wrote {path}");
    }
    Ok(())
}
