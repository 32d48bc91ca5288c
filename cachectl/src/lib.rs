//! `cachectl`: look into a cache-runtime cache on Redis from the command line.
//!
//! The binary (`src/main.rs`) calls [`run`]; the integration tests call [`run_async`] in
//! process. See [`USAGE`] for the commands, options and exit codes.

use std::io::Write;
use std::time::Duration;

use cache_runtime::{Cache, EntryState, Error, ErrorKind};

/// `cachectl --help`.
pub const USAGE: &str = "\
cachectl: look into a cache-runtime cache on Redis

usage: cachectl [OPTIONS] COMMAND [ARGS]

commands:
  stats [--watch [SECS]] [--count N]
                        the fleet's per-function stats (instances that publish them:
                        CacheBuilder::publish_stats); --watch refreshes every SECS (2)
                        seconds, clearing the screen, until interrupted or N refreshes
  get KEY               the entry under KEY: value (JSON), TTL left, age, compute time,
                        generation, tags, a pending load's lease holder
  invalidate KEY [--force]
                        removes the entry under KEY, in every process; a key that holds
                        something else than a cache entry only with --force
  invalidate-tag TAG    invalidates every entry stored under TAG
  queue [QUEUE...]      write-behind queues: pending writes, the oldest's age, dead letters
                        (without QUEUE: the queues the fleet's programs name)
  retry-dead QUEUE      moves QUEUE's dead letters back to their partitions

options:
  --redis URL           the Redis
  --cluster URLS        a Redis Cluster: comma-separated node URLs
                        (neither given: $REDIS_CLUSTER_URLS if set, else $REDIS_URL)
  --namespace NS        the cache's namespace (default: none)
  --partitions N        write-behind partitions per queue, as the cache's builder sets
                        them (default: 16)
  --timeout SECS        how long one Redis operation may take (default: 5)
  -h, --help            this text

KEY and TAG are given without the namespace, as in the code (`user:42`).

exit codes:
  0  done
  1  other failure
  2  bad usage: unknown command or option, missing or invalid argument
  3  no entry for the key (get, invalidate: nothing done)
  4  the key holds something that is not a cache entry (get; invalidate without --force)
  5  Redis unreachable, timed out, or replied with an error
";

/// Exit code: done.
pub const EXIT_OK: i32 = 0;
/// Exit code: another failure.
pub const EXIT_FAILURE: i32 = 1;
/// Exit code: bad usage.
pub const EXIT_USAGE: i32 = 2;
/// Exit code: no entry for the key.
pub const EXIT_NO_ENTRY: i32 = 3;
/// Exit code: the key holds something that is not a cache entry.
pub const EXIT_NOT_ENTRY: i32 = 4;
/// Exit code: Redis unreachable, timed out, or replied with an error.
pub const EXIT_REDIS: i32 = 5;

/// A failure: its exit code and its one-line message.
#[derive(Debug)]
struct Failure {
    code: i32,
    message: String,
}

impl Failure {
    fn usage(message: impl Into<String>) -> Failure {
        Failure {
            code: EXIT_USAGE,
            message: format!("{}; see cachectl --help", message.into()),
        }
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Failure {
        let code = match e.kind() {
            ErrorKind::Unavailable | ErrorKind::Timeout | ErrorKind::Backend => EXIT_REDIS,
            ErrorKind::Config => EXIT_USAGE,
            _ => EXIT_FAILURE,
        };
        Failure {
            code,
            message: match code {
                EXIT_REDIS => format!("redis: {e}"),
                _ => e.to_string(),
            },
        }
    }
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Failure {
        Failure {
            code: EXIT_FAILURE,
            message: format!("cannot write the output: {e}"),
        }
    }
}

/// What the command line asks for.
#[derive(Debug, Default)]
struct Options {
    redis: Option<String>,
    cluster: Option<String>,
    namespace: String,
    partitions: Option<u16>,
    timeout: Option<Duration>,
    help: bool,
    command: Vec<String>,
}

/// The value of option `name` (the next argument).
fn value_of(name: &str, args: &mut impl Iterator<Item = String>) -> Result<String, Failure> {
    args.next()
        .ok_or_else(|| Failure::usage(format!("option {name} needs a value")))
}

fn parse(args: impl IntoIterator<Item = String>) -> Result<Options, Failure> {
    let mut o = Options::default();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "-h" | "--help" => o.help = true,
            "--redis" => o.redis = Some(value_of("--redis", &mut args)?),
            "--cluster" => o.cluster = Some(value_of("--cluster", &mut args)?),
            "--namespace" => o.namespace = value_of("--namespace", &mut args)?,
            "--partitions" => {
                let v = value_of("--partitions", &mut args)?;
                o.partitions = Some(v.parse().map_err(|_| {
                    Failure::usage(format!("--partitions takes a number, not {v:?}"))
                })?);
            }
            "--timeout" => {
                let v = value_of("--timeout", &mut args)?;
                o.timeout = Some(seconds(&v).ok_or_else(|| {
                    Failure::usage(format!("--timeout takes seconds, not {v:?}"))
                })?);
            }
            // The command, its arguments and its own options (parsed with it); the options
            // above may come before or after it.
            _ => o.command.push(arg),
        }
    }
    Ok(o)
}

/// `SECS` as a positive duration.
fn seconds(v: &str) -> Option<Duration> {
    v.parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s > 0.0 && *s < 1e9)
        .map(Duration::from_secs_f64)
}

/// The cache the options name.
fn connect(o: &Options) -> Result<Cache, Failure> {
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    // The options first, then the environment; a cluster before a single server.
    let target = match (&o.cluster, &o.redis) {
        (Some(urls), _) => Some((true, urls.clone())),
        (None, Some(url)) => Some((false, url.clone())),
        (None, None) => env("REDIS_CLUSTER_URLS")
            .map(|u| (true, u))
            .or_else(|| env("REDIS_URL").map(|u| (false, u))),
    };
    let builder = match target {
        Some((true, urls)) => Cache::builder().redis_cluster(
            urls.split(',')
                .map(str::trim)
                .filter(|u| !u.is_empty())
                .map(str::to_owned)
                .collect::<Vec<_>>(),
        ),
        Some((false, url)) => Cache::builder().redis(url),
        None => {
            return Err(Failure::usage(
                "no Redis given: use --redis URL or --cluster URLS, or set REDIS_URL",
            ));
        }
    };
    let timeout = o.timeout.unwrap_or(Duration::from_secs(5));
    let mut builder = builder
        .namespace(&o.namespace)
        .operation_timeout(timeout)
        .connect_timeout(timeout);
    if let Some(p) = o.partitions {
        builder = builder.write_behind_partitions(p);
    }
    Ok(builder.build_sync()?)
}

/// Runs `cachectl` with `args` (without the program name) in a runtime of its own: the
/// binary's `main`. Returns the exit code.
pub fn run(args: Vec<String>, out: &mut dyn Write, err: &mut dyn Write) -> i32 {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = writeln!(err, "cachectl: cannot start a runtime: {e}");
            return EXIT_FAILURE;
        }
    };
    runtime.block_on(run_async(args, out, err))
}

/// Runs `cachectl` with `args` (without the program name) in the current Tokio runtime;
/// output to `out`, the one-line error (if any) to `err`. Returns the exit code.
pub async fn run_async(args: Vec<String>, out: &mut dyn Write, err: &mut dyn Write) -> i32 {
    match command(args, out).await {
        Ok(()) => EXIT_OK,
        Err(f) => {
            let _ = writeln!(err, "cachectl: {}", f.message);
            f.code
        }
    }
}

async fn command(args: Vec<String>, out: &mut dyn Write) -> Result<(), Failure> {
    let o = parse(args)?;
    if o.help {
        out.write_all(USAGE.as_bytes())?;
        return Ok(());
    }
    let Some((name, rest)) = o.command.split_first() else {
        return Err(Failure::usage("no command given"));
    };
    let one = |what: &str| -> Result<&String, Failure> {
        match rest {
            [arg] if !arg.starts_with("--") => Ok(arg),
            [flag] => Err(Failure::usage(format!("unknown option {flag} of `{name}`"))),
            [] => Err(Failure::usage(format!("`{name}` needs a {what}"))),
            _ => Err(Failure::usage(format!(
                "`{name}` takes one {what}, not {rest:?}"
            ))),
        }
    };
    match name.as_str() {
        "stats" => {
            let watch = parse_watch(rest)?;
            stats(&connect(&o)?, watch, out).await
        }
        "get" => {
            let key = one("KEY")?;
            get(&connect(&o)?, key, out).await
        }
        "invalidate" => {
            let force = rest.iter().any(|a| a == "--force");
            let args: Vec<&String> = rest.iter().filter(|a| *a != "--force").collect();
            let key = match args[..] {
                [key] if !key.starts_with('-') => key,
                [] => return Err(Failure::usage("`invalidate` needs a KEY")),
                [flag] => {
                    return Err(Failure::usage(format!(
                        "unknown option {flag} of `invalidate`"
                    )));
                }
                _ => {
                    return Err(Failure::usage(format!(
                        "`invalidate` takes one KEY (and --force), not {rest:?}"
                    )));
                }
            };
            invalidate(&connect(&o)?, key, force, out).await
        }
        "invalidate-tag" => {
            let tag = one("TAG")?;
            connect(&o)?.invalidate_tag(tag).await?;
            writeln!(out, "invalidated tag {tag}")?;
            Ok(())
        }
        "queue" => {
            if let Some(flag) = rest.iter().find(|a| a.starts_with('-')) {
                return Err(Failure::usage(format!("unknown option {flag} of `queue`")));
            }
            queue(&connect(&o)?, rest, out).await
        }
        "retry-dead" => {
            let queue = one("QUEUE")?;
            let moved = cache_runtime::write_behind::retry_dead(&connect(&o)?, queue).await?;
            writeln!(
                out,
                "moved {moved} dead letter{} of queue {queue} back to its partitions",
                if moved == 1 { "" } else { "s" }
            )?;
            Ok(())
        }
        other if other.starts_with('-') => Err(Failure::usage(format!("unknown option {other}"))),
        other => Err(Failure::usage(format!("unknown command `{other}`"))),
    }
}

/// `stats`' `--watch [SECS]` and `--count N`: `None` without `--watch`, else the period
/// and the number of refreshes (`None`: until interrupted).
fn parse_watch(args: &[String]) -> Result<Option<(Duration, Option<u64>)>, Failure> {
    let mut watch = None;
    let mut count = None;
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--watch" => {
                let secs = args.get(i + 1).and_then(|v| seconds(v));
                if secs.is_some() {
                    i += 1;
                }
                watch = Some(secs.unwrap_or(Duration::from_secs(2)));
            }
            "--count" => {
                let v = args
                    .get(i + 1)
                    .ok_or_else(|| Failure::usage("--count needs a value"))?;
                count = Some(v.parse::<u64>().ok().filter(|n| *n > 0).ok_or_else(|| {
                    Failure::usage(format!("--count takes a positive number, not {v:?}"))
                })?);
                i += 1;
            }
            other => {
                return Err(Failure::usage(format!(
                    "unknown argument {other:?} of `stats`"
                )));
            }
        }
        i += 1;
    }
    match (watch, count) {
        (None, Some(_)) => Err(Failure::usage("--count goes with --watch")),
        (None, None) => Ok(None),
        (Some(period), count) => Ok(Some((period, count))),
    }
}

async fn stats(
    cache: &Cache,
    watch: Option<(Duration, Option<u64>)>,
    out: &mut dyn Write,
) -> Result<(), Failure> {
    let Some((period, count)) = watch else {
        show(cache, &cache.fleet_stats().await?, out)?;
        return Ok(());
    };
    let mut shown = 0u64;
    loop {
        let fleet = cache.fleet_stats().await?;
        // Clear the screen and go home, then the table.
        write!(out, "\x1b[2J\x1b[H")?;
        show(cache, &fleet, out)?;
        out.flush()?;
        shown += 1;
        if count.is_some_and(|n| shown >= n) {
            return Ok(());
        }
        tokio::time::sleep(period).await;
    }
}

/// The fleet's table, and why it is empty when it is.
fn show(
    cache: &Cache,
    fleet: &cache_runtime::FleetStats,
    out: &mut dyn Write,
) -> Result<(), Failure> {
    write!(out, "{fleet}")?;
    if fleet.instances() == 0 {
        writeln!(
            out,
            "(no live instance publishes its stats in namespace {:?}: see CacheBuilder::publish_stats)",
            cache.namespace()
        )?;
    }
    Ok(())
}

async fn get(cache: &Cache, key: &str, out: &mut dyn Write) -> Result<(), Failure> {
    let Some(entry) = cache.inspect(key).await? else {
        return Err(Failure {
            code: EXIT_NO_ENTRY,
            message: format!("no entry for key {key} ({})", cache.full_key(key)),
        });
    };
    if let EntryState::Foreign { description } = &entry.state {
        return Err(Failure {
            code: EXIT_NOT_ENTRY,
            message: format!("not a cache entry: {} holds {description}", entry.key),
        });
    }
    write!(out, "{entry}")?;
    Ok(())
}

/// `invalidate KEY [--force]`: only an entry (a value or a pending load's marker) is
/// invalidated; nothing there is exit 3, another program's data exit 4 unless `--force`.
async fn invalidate(
    cache: &Cache,
    key: &str,
    force: bool,
    out: &mut dyn Write,
) -> Result<(), Failure> {
    let Some(entry) = cache.inspect(key).await? else {
        return Err(Failure {
            code: EXIT_NO_ENTRY,
            message: format!(
                "no entry for key {key} ({}): nothing invalidated",
                cache.full_key(key)
            ),
        });
    };
    if let EntryState::Foreign { description } = &entry.state {
        if !force {
            return Err(Failure {
                code: EXIT_NOT_ENTRY,
                message: format!(
                    "not a cache entry: {} holds {description}; nothing invalidated (--force deletes it)",
                    entry.key
                ),
            });
        }
    }
    cache.invalidate(key).await?;
    writeln!(out, "invalidated {key}")?;
    Ok(())
}

async fn queue(cache: &Cache, queues: &[String], out: &mut dyn Write) -> Result<(), Failure> {
    let named: Vec<String> = if queues.is_empty() {
        let found = cache.fleet_stats().await?.queues().to_vec();
        if found.is_empty() {
            return Err(Failure::usage(
                "no queue given, and no live instance publishing its stats names one",
            ));
        }
        found
    } else {
        queues.to_vec()
    };
    for q in &named {
        writeln!(
            out,
            "{}",
            cache_runtime::write_behind::depth(cache, q).await?
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn options_then_the_command() {
        let o = parse(args(&["--namespace", "app", "get", "user:1"])).unwrap();
        assert_eq!(o.namespace, "app");
        assert_eq!(o.command, ["get", "user:1"]);
        assert_eq!(
            parse(args(&["--redis"])).unwrap_err().code,
            EXIT_USAGE,
            "a missing value"
        );
        assert_eq!(
            parse(args(&["--timeout", "0", "stats"])).unwrap_err().code,
            EXIT_USAGE
        );
    }

    #[test]
    fn watch_options() {
        assert_eq!(parse_watch(&[]).unwrap(), None);
        assert_eq!(
            parse_watch(&args(&["--watch"])).unwrap(),
            Some((Duration::from_secs(2), None))
        );
        assert_eq!(
            parse_watch(&args(&["--watch", "0.5", "--count", "3"])).unwrap(),
            Some((Duration::from_millis(500), Some(3)))
        );
        assert!(parse_watch(&args(&["--count", "3"])).is_err());
        assert!(parse_watch(&args(&["--watch", "--count", "x"])).is_err());
        assert!(parse_watch(&args(&["--bogus"])).is_err());
    }
}
