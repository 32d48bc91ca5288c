//! The load generator for the users service (`cargo run --release --example loadgen
//! -- --url http://127.0.0.1:3000`): N clients, each on its own
//! keep-alive connection, pick user ids from a Zipf(1.1) distribution and send `GET
//! /users/{id}` or, with probability `--writes`, `PUT /users/{id}`. A progress line every
//! second; at the end throughput, latency percentiles, the service's hit rate (from its
//! `/metrics`, before and after) and the database's query rate.

mod client;
pub mod zipf;

use crate::parse;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio_postgres::NoTls;

pub use self::client::{Client, Response};
use self::zipf::{Rng, Zipf};
use crate::users_service::{DB_QUERIES, GET_USER};

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// The service (`--url`, default `http://127.0.0.1:3000`).
    pub url: String,
    /// Concurrent clients, one connection each (`--clients`, default 32).
    pub clients: usize,
    /// How long (`--duration` in seconds, default 20).
    pub duration: Duration,
    /// The share of requests that are `PUT`s (`--writes`, default 0.05).
    pub writes: f64,
    /// Ids are drawn from `1..=users` (`--users`, default 100 000: the seeded rows).
    pub users: u64,
    /// The Zipf exponent (`--zipf`, default 1.1).
    pub zipf: f64,
    /// The random seed (`--seed`, default 1).
    pub seed: u64,
    /// PostgreSQL, for `pg_stat_database` (`--pg`, default `PG_URL` or the local `test`
    /// database; `--pg none` skips it).
    pub pg_url: Option<String>,
    /// The stats label whose hit rate is reported (`--function`, default `users.get`).
    pub function: String,
    /// Only the series of this `cache` label (the service's namespace; `--cache-label`),
    /// when several caches report the same function; default: all.
    pub cache_label: Option<String>,
    /// Print a progress line every second.
    pub progress: bool,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            url: "http://127.0.0.1:3000".to_owned(),
            clients: 32,
            duration: Duration::from_secs(20),
            writes: 0.05,
            users: 100_000,
            zipf: 1.1,
            seed: 1,
            pg_url: Some(
                std::env::var("PG_URL")
                    .ok()
                    .filter(|v| !v.is_empty())
                    .unwrap_or_else(|| {
                        "host=127.0.0.1 port=5432 user=postgres dbname=test".to_owned()
                    }),
            ),
            function: GET_USER.to_owned(),
            cache_label: None,
            progress: true,
        }
    }
}

impl Options {
    /// Applies command-line options: `--url`, `--clients`, `--duration` (seconds),
    /// `--writes`, `--users`, `--zipf`, `--seed`, `--pg URL|none`, `--function`, `--cache-label`,
    /// `--quiet`.
    /// Other arguments are returned, for the caller's own flags.
    ///
    /// # Errors
    /// A missing or invalid value.
    pub fn apply_args(
        mut self,
        args: impl IntoIterator<Item = String>,
    ) -> Result<(Options, Vec<String>), String> {
        let mut rest = Vec::new();
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            let mut value = || args.next().ok_or_else(|| format!("`{arg}` needs a value"));
            match arg.as_str() {
                "--url" => self.url = value()?,
                "--clients" => self.clients = parse("--clients", &value()?)?,
                "--duration" => {
                    let secs: f64 = parse("--duration", &value()?)?;
                    if !secs.is_finite() || secs <= 0.0 {
                        return Err(format!(
                            "invalid --duration {secs}: a positive number of seconds"
                        ));
                    }
                    self.duration = Duration::from_secs_f64(secs);
                }
                "--writes" => self.writes = parse("--writes", &value()?)?,
                "--users" => self.users = parse("--users", &value()?)?,
                "--zipf" => self.zipf = parse("--zipf", &value()?)?,
                "--seed" => self.seed = parse("--seed", &value()?)?,
                "--pg" => {
                    let v = value()?;
                    self.pg_url = (v != "none").then_some(v);
                }
                "--function" => self.function = value()?,
                "--cache-label" => self.cache_label = Some(value()?),
                "--quiet" => self.progress = false,
                _ => rest.push(arg),
            }
        }
        Ok((self, rest))
    }

    fn validate(&self) -> Result<SocketAddr, String> {
        if self.clients == 0 {
            return Err("--clients must be at least 1".to_owned());
        }
        if !(0.0..=1.0).contains(&self.writes) {
            return Err(format!(
                "invalid --writes {}: a share in [0, 1]",
                self.writes
            ));
        }
        service_addr(&self.url)
    }
}

/// `http://host:port[/]` → the address.
fn service_addr(url: &str) -> Result<SocketAddr, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("invalid --url `{url}`: expected http://host:port"))?;
    let hostport = rest.trim_end_matches('/');
    if hostport.contains('/') {
        return Err(format!(
            "invalid --url `{url}`: no path, only http://host:port"
        ));
    }
    hostport
        .to_socket_addrs()
        .map_err(|e| format!("invalid --url `{url}`: {e}"))?
        .next()
        .ok_or_else(|| format!("invalid --url `{url}`: no address"))
}

/// The counters read from the service's `/metrics` for one function.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Scrape {
    /// `cache_hits_total` of the function, all levels.
    pub hits: f64,
    /// Of them, `level="l1"`.
    pub l1_hits: f64,
    /// `cache_misses_total` of the function.
    pub misses: f64,
    /// `users_db_queries_total`.
    pub db_queries: f64,
}

/// Reads the sums of the metrics in [`Scrape`] out of a Prometheus text exposition: the
/// series of `function`, and of the cache `cache` if given.
pub fn parse_metrics(text: &str, function: &str, cache: Option<&str>) -> Scrape {
    let label = format!("function=\"{function}\"");
    let cache_label = cache.map(|c| format!("cache=\"{c}\""));
    let mut s = Scrape::default();
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (name, labels) = series.split_once('{').unwrap_or((series, ""));
        let has = |wanted: &str| labels.split(',').any(|l| l.trim_end_matches('}') == wanted);
        let ours = has(&label) && cache_label.as_deref().is_none_or(has);
        match name {
            "cache_hits_total" if ours => {
                s.hits += value;
                if labels.contains("level=\"l1\"") {
                    s.l1_hits += value;
                }
            }
            "cache_misses_total" if ours => s.misses += value,
            n if n == DB_QUERIES => s.db_queries += value,
            _ => {}
        }
    }
    s
}

/// Scrapes `GET /metrics`.
///
/// # Errors
/// The request failed or did not answer 200.
pub async fn scrape(
    addr: SocketAddr,
    function: &str,
    cache: Option<&str>,
) -> Result<Scrape, String> {
    let r = Client::new(addr)
        .send("GET", "/metrics", None)
        .await
        .map_err(|e| format!("GET /metrics: {e}"))?;
    if r.status != 200 {
        return Err(format!("GET /metrics answered {}", r.status));
    }
    Ok(parse_metrics(
        &String::from_utf8_lossy(&r.body),
        function,
        cache,
    ))
}

/// Transactions committed and rolled back in the current database so far.
async fn pg_transactions(client: &tokio_postgres::Client) -> Result<i64, String> {
    client
        .query_one(
            "SELECT (xact_commit + xact_rollback)::bigint FROM pg_stat_database
              WHERE datname = current_database()",
            &[],
        )
        .await
        .map(|r| r.get(0))
        .map_err(|e| format!("reading pg_stat_database: {e}"))
}

/// What a run measured.
#[derive(Debug, Clone)]
pub struct Report {
    /// Wall time of the run.
    pub elapsed: Duration,
    /// Requests answered (any status).
    pub requests: u64,
    /// Of them, `PUT`s.
    pub writes: u64,
    /// Requests answered with a status other than 200 (and 404 for a deleted user), or
    /// that failed.
    pub errors: u64,
    /// Latency percentiles over every answered request: p50, p99, max.
    pub p50: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// Slowest request.
    pub max: Duration,
    /// The function's counters over the run (after − before).
    pub delta: Scrape,
    /// Transactions in the database over the run, from `pg_stat_database` (all clients of
    /// the database, not only the service's), if it was read.
    pub pg_transactions: Option<i64>,
}

impl Report {
    /// Requests per second.
    pub fn throughput(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }

    /// The function's hit rate over the run, `None` without cached calls (the cache off).
    pub fn hit_rate(&self) -> Option<f64> {
        let calls = self.delta.hits + self.delta.misses;
        (calls > 0.0).then(|| self.delta.hits / calls)
    }

    /// Statements the service sent to PostgreSQL per request.
    pub fn db_queries_per_request(&self) -> f64 {
        self.delta.db_queries / self.requests.max(1) as f64
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secs = self.elapsed.as_secs_f64();
        writeln!(
            f,
            "requests      {} in {:.1} s ({} writes, {} errors)",
            self.requests, secs, self.writes, self.errors
        )?;
        writeln!(f, "throughput    {:.0} req/s", self.throughput())?;
        writeln!(
            f,
            "latency       p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            self.p50.as_secs_f64() * 1e3,
            self.p99.as_secs_f64() * 1e3,
            self.max.as_secs_f64() * 1e3
        )?;
        match self.hit_rate() {
            Some(rate) => writeln!(
                f,
                "hit rate      {:.1}% ({} hits, {} in process, {} misses){}",
                rate * 100.0,
                self.delta.hits,
                self.delta.l1_hits,
                self.delta.misses,
                if rate < 0.8 { "  ! under 80%" } else { "" }
            )?,
            None => writeln!(f, "hit rate      - (no cached calls: the cache is off)")?,
        }
        writeln!(
            f,
            "db queries    {:.0}/s, {:.3} per request (the service's count)",
            self.delta.db_queries / secs,
            self.db_queries_per_request()
        )?;
        if let Some(t) = self.pg_transactions {
            writeln!(
                f,
                "pg xacts      {:.0}/s (pg_stat_database: every client of the database, flushed by the server about once a second)",
                t as f64 / secs
            )?;
        }
        Ok(())
    }
}

fn percentile(sorted: &[u32], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    Duration::from_micros(u64::from(sorted[i]))
}

/// Runs the load against the service and measures it. `progress` receives a line every
/// second when [`Options::progress`] is set.
///
/// # Errors
/// Invalid options, the service's `/metrics` unreachable.
pub async fn run(options: &Options, progress: impl Fn(&str)) -> Result<Report, String> {
    let addr = options.validate()?;
    let zipf = Arc::new(Zipf::new(options.users, options.zipf)?);
    let pg = match &options.pg_url {
        Some(url) => match tokio_postgres::connect(url, NoTls).await {
            Ok((client, conn)) => {
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                Some(client)
            }
            Err(e) => {
                progress(&format!("pg_stat_database not read: {e}"));
                None
            }
        },
        None => None,
    };
    let before = scrape(addr, &options.function, options.cache_label.as_deref()).await?;
    let pg_before = match &pg {
        Some(c) => Some(pg_transactions(c).await?),
        None => None,
    };

    let done = Arc::new(AtomicBool::new(false));
    let requests = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..options.clients {
        let (zipf, done, requests) = (zipf.clone(), done.clone(), requests.clone());
        let mut rng = Rng::new(options.seed.wrapping_mul(1_000_003).wrapping_add(c as u64));
        let writes = options.writes;
        tasks.push(tokio::spawn(async move {
            let mut client = Client::new(addr);
            let mut latencies = Vec::with_capacity(1 << 16);
            let (mut puts, mut errors, mut n) = (0u64, 0u64, 0u64);
            while !done.load(Ordering::Relaxed) {
                let id = zipf.sample(&mut rng);
                let path = format!("/users/{id}");
                let write = rng.next_f64() < writes;
                let t = Instant::now();
                let result = if write {
                    n += 1;
                    let body = format!(r#"{{"name":"User {id} (edit {c}.{n})"}}"#);
                    client.send("PUT", &path, Some(body.as_bytes())).await
                } else {
                    client.send("GET", &path, None).await
                };
                let took = t.elapsed();
                match result {
                    Ok(r) => {
                        latencies.push(took.as_micros().min(u128::from(u32::MAX)) as u32);
                        requests.fetch_add(1, Ordering::Relaxed);
                        puts += u64::from(write);
                        errors += u64::from(r.status != 200 && r.status != 404);
                    }
                    Err(_) => {
                        errors += 1;
                        // The service is gone or refusing: do not spin.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            (latencies, puts, errors)
        }));
    }

    let mut last = 0;
    let mut second = 0u32;
    while start.elapsed() < options.duration {
        let left = options.duration.saturating_sub(start.elapsed());
        tokio::time::sleep(left.min(Duration::from_secs(1))).await;
        second += 1;
        if options.progress && left >= Duration::from_secs(1) {
            let now = requests.load(Ordering::Relaxed);
            let rate = match scrape(addr, &options.function, options.cache_label.as_deref()).await {
                Ok(s) => {
                    let (h, m) = (s.hits - before.hits, s.misses - before.misses);
                    if h + m > 0.0 {
                        format!("{:.1}%", 100.0 * h / (h + m))
                    } else {
                        "-".to_owned()
                    }
                }
                Err(e) => format!("? ({e})"),
            };
            progress(&format!(
                "{second:>4} s  {:>8} req/s  hit rate so far {rate}",
                now - last
            ));
            last = now;
        }
    }
    done.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    let (mut writes, mut errors) = (0, 0);
    for task in tasks {
        let (l, w, e) = task
            .await
            .map_err(|e| format!("a client task failed: {e}"))?;
        latencies.extend(l);
        writes += w;
        errors += e;
    }
    let elapsed = start.elapsed();
    let after = scrape(addr, &options.function, options.cache_label.as_deref()).await?;
    let pg_after = match &pg {
        Some(c) => Some(pg_transactions(c).await?),
        None => None,
    };
    latencies.sort_unstable();
    Ok(Report {
        elapsed,
        requests: latencies.len() as u64,
        writes,
        errors,
        p50: percentile(&latencies, 0.50),
        p99: percentile(&latencies, 0.99),
        max: percentile(&latencies, 1.0),
        delta: Scrape {
            hits: after.hits - before.hits,
            l1_hits: after.l1_hits - before.l1_hits,
            misses: after.misses - before.misses,
            db_queries: after.db_queries - before.db_queries,
        },
        pg_transactions: pg_before.zip(pg_after).map(|(b, a)| a - b),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_summed_for_the_function_only() {
        let text = "\
# TYPE cache_hits_total counter
cache_hits_total{function=\"users.get\",cache=\"t\",level=\"l2\"} 10
cache_hits_total{function=\"users.get\",cache=\"t\",level=\"l1\"} 30
cache_hits_total{function=\"users.by_org\",cache=\"t\",level=\"l1\"} 7
cache_misses_total{function=\"users.get\",cache=\"t\"} 5
cache_misses_total{function=\"users.get2\",cache=\"t\"} 9
users_db_queries_total 6
";
        let s = parse_metrics(text, "users.get", None);
        assert_eq!(
            s,
            Scrape {
                hits: 40.0,
                l1_hits: 30.0,
                misses: 5.0,
                db_queries: 6.0
            }
        );
        let s = parse_metrics(text, "users.get", Some("u"));
        assert_eq!((s.hits, s.misses, s.db_queries), (0.0, 0.0, 6.0));
    }

    #[test]
    fn urls_and_options_are_checked() {
        assert!(service_addr("http://127.0.0.1:3000").is_ok());
        assert!(service_addr("http://127.0.0.1:3000/").is_ok());
        assert!(service_addr("https://127.0.0.1:3000").is_err());
        assert!(service_addr("http://127.0.0.1:3000/users").is_err());
        let args = ["--clients", "0"].map(String::from);
        let (o, _) = Options::default().apply_args(args).unwrap();
        assert!(o.validate().is_err());
        let args = ["--writes", "1.5"].map(String::from);
        let (o, _) = Options::default().apply_args(args).unwrap();
        assert!(o.validate().is_err());
        assert!(
            Options::default()
                .apply_args(["--duration".to_owned()])
                .is_err()
        );
    }

    #[test]
    fn percentiles_pick_the_rank() {
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.5), Duration::from_micros(50));
        assert_eq!(percentile(&v, 0.99), Duration::from_micros(99));
        assert_eq!(percentile(&v, 1.0), Duration::from_micros(100));
        assert_eq!(percentile(&[], 0.5), Duration::ZERO);
    }
}
