//! The users service (`cargo run --release --example users-service`): an
//! axum HTTP API over a PostgreSQL `users` table, its reads cached with `#[cached(lock,
//! local)]`, its writes followed by `#[cache_evict]`, its metrics on
//! `GET /metrics` in the Prometheus text format.
//!
//! | route | what | cache |
//! |---|---|---|
//! | `GET /users/{id}` | the user, 404 if none | `#[cached(key = "user:{id}", lock, local)]` |
//! | `PUT /users/{id}` | JSON `{"name": .., "email": ..}` (email optional): the updated user | `UPDATE .. RETURNING`, then `#[cache_evict(keys = ["user:{id}"], tags = ["org:{org}"])]` (not `#[cache_put]`: two concurrent `PUT`s could leave the older row cached; see the README) |
//! | `DELETE /users/{id}` | 204, 404 if none | `#[cache_evict(keys = ["user:{id}"], tags = ["org:{org}"])]` |
//! | `GET /orgs/{org}/users` | the organisation's first 50 users | `#[cached(key = "org_users:{org}", tags = ["org:{org}"], lock, local)]` |
//! | `GET /metrics` | Prometheus exposition | |
//! | `GET /stats` | [`Cache::stats`] as a table | |
//!
//! Everything is configured by [`Config`], from the environment and the command line.

mod db;
mod http;

use crate::parse;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use cache_runtime::{Cache, cache_evict, cached};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use self::db::DB_QUERIES;
use self::db::Db;
use cache_examples::DbError;

/// The stats label (`name`) of the cached `GET /users/{id}` read: the `function` label of
/// its metrics.
pub const GET_USER: &str = "users.get";
/// The stats label of the cached `GET /orgs/{org}/users` read.
pub const ORG_USERS: &str = "users.by_org";

/// A row of the users table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// Primary key, `1..=rows` when seeded.
    pub id: i64,
    /// Display name (`User <id>` when seeded).
    pub name: String,
    /// E-mail address.
    pub email: String,
    /// Organisation (`id % 1000` when seeded).
    pub org_id: i64,
}

/// The body of `PUT /users/{id}`.
#[derive(Debug, Clone, Deserialize)]
pub struct UserUpdate {
    /// The new name.
    pub name: String,
    /// The new e-mail address; unchanged when absent.
    #[serde(default)]
    pub email: Option<String>,
}

/// The service's settings. [`Config::from_env`] reads the environment, then
/// [`Config::apply_args`] the command line (which wins).
#[derive(Debug, Clone)]
pub struct Config {
    /// PostgreSQL connection string (`PG_URL`; default `host=127.0.0.1 port=5432
    /// user=postgres dbname=test`).
    pub pg_url: String,
    /// The table (`USERS_TABLE`, `--table`; default `users_service`): `[a-z_][a-z0-9_]*`.
    pub table: String,
    /// Rows seeded at start, ids `1..=rows` (`USERS_ROWS`, `--rows`; default 100 000).
    pub rows: i64,
    /// Connections to PostgreSQL (`PG_POOL`, `--pool`; default 8).
    pub pool: usize,
    /// Redis (`REDIS_URL`, `--redis`); `None`: the cache is in process memory.
    pub redis_url: Option<String>,
    /// Redis Cluster seed nodes (`REDIS_CLUSTER_URLS`, comma-separated; `--redis-cluster`):
    /// when not empty, used instead of `redis_url`.
    pub redis_cluster: Vec<String>,
    /// The cache's namespace (`CACHE_NAMESPACE`, `--namespace`; default: the table name).
    /// Instances sharing Redis and a namespace share their entries.
    pub namespace: Option<String>,
    /// Whether the functions use the cache (`CACHE=on|off`, `--cache on|off`; default on).
    /// Off, every read runs its query (the reads' `condition` is false); writes still
    /// invalidate, so instances with the cache on sharing the namespace stay right.
    pub cache_enabled: bool,
    /// Entries of the in-process tier (`local`) on Redis, or of the memory cache (default
    /// 10 000).
    pub local_capacity: u64,
    /// The address to listen on (`HOST`, `--host`; default 127.0.0.1).
    pub host: IpAddr,
    /// The port (`PORT`, `--port`; default 3000, 0 for any free port).
    pub port: u16,
    /// How often the instance publishes its stats snapshot for `cachectl stats` and
    /// [`Cache::fleet_stats`] (`PUBLISH_STATS`, `--publish-stats SECS`; default 5 s; `0` or
    /// `off` disables it). Only on Redis: on memory the fleet is this one process.
    pub publish_stats: Duration,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            pg_url: "host=127.0.0.1 port=5432 user=postgres dbname=test".to_owned(),
            table: "users_service".to_owned(),
            rows: 100_000,
            pool: 8,
            redis_url: None,
            redis_cluster: Vec::new(),
            namespace: None,
            cache_enabled: true,
            local_capacity: 10_000,
            host: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port: 3000,
            publish_stats: Duration::from_secs(5),
        }
    }
}

fn split_urls(urls: &str) -> Vec<String> {
    urls.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(str::to_owned)
        .collect()
}

/// `SECS` (fractions allowed) or `off`: zero disables publishing; otherwise at least 0.1 s.
fn publish_interval(what: &str, value: &str) -> Result<Duration, String> {
    if value == "off" {
        return Ok(Duration::ZERO);
    }
    let secs: f64 = parse(what, value)?;
    if secs == 0.0 {
        return Ok(Duration::ZERO);
    }
    if !(0.1..=86_400.0).contains(&secs) {
        return Err(format!(
            "invalid {what} `{value}`: seconds from 0.1 to 86400, or 0/off"
        ));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn on_off(what: &str, value: &str) -> Result<bool, String> {
    match value {
        "on" | "true" | "1" => Ok(true),
        "off" | "false" | "0" => Ok(false),
        _ => Err(format!("invalid {what} `{value}`: expected `on` or `off`")),
    }
}

impl Config {
    /// The defaults, overridden by the environment: `PG_URL`, `USERS_TABLE`, `USERS_ROWS`,
    /// `PG_POOL`, `REDIS_URL`, `REDIS_CLUSTER_URLS`, `CACHE_NAMESPACE`, `CACHE`, `HOST`, `PORT`,
    /// `PUBLISH_STATS`.
    ///
    /// # Errors
    /// A variable that does not parse, named in the message.
    pub fn from_env() -> Result<Config, String> {
        let mut c = Config::default();
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        if let Some(v) = var("PG_URL") {
            c.pg_url = v;
        }
        if let Some(v) = var("USERS_TABLE") {
            c.table = v;
        }
        if let Some(v) = var("USERS_ROWS") {
            c.rows = parse("USERS_ROWS", &v)?;
        }
        if let Some(v) = var("PG_POOL") {
            c.pool = parse("PG_POOL", &v)?;
        }
        c.redis_url = var("REDIS_URL");
        c.redis_cluster = split_urls(&var("REDIS_CLUSTER_URLS").unwrap_or_default());
        c.namespace = var("CACHE_NAMESPACE");
        if let Some(v) = var("CACHE") {
            c.cache_enabled = on_off("CACHE", &v)?;
        }
        if let Some(v) = var("HOST") {
            c.host = parse("HOST", &v)?;
        }
        if let Some(v) = var("PORT") {
            c.port = parse("PORT", &v)?;
        }
        if let Some(v) = var("PUBLISH_STATS") {
            c.publish_stats = publish_interval("PUBLISH_STATS", &v)?;
        }
        Ok(c)
    }

    /// Applies command-line options (`--port N`, `--host IP`, `--table NAME`, `--rows N`,
    /// `--pool N`, `--redis URL`, `--redis-cluster URL,URL`, `--memory`, `--namespace NS`, `--cache on|off`,
    /// `--publish-stats SECS|off`).
    ///
    /// # Errors
    /// An unknown option, a missing or invalid value.
    pub fn apply_args(mut self, args: impl IntoIterator<Item = String>) -> Result<Config, String> {
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            if arg == "--memory" {
                self.redis_url = None;
                self.redis_cluster.clear();
                continue;
            }
            let mut value = || args.next().ok_or_else(|| format!("`{arg}` needs a value"));
            match arg.as_str() {
                "--port" => self.port = parse("--port", &value()?)?,
                "--host" => self.host = parse("--host", &value()?)?,
                "--table" => self.table = value()?,
                "--rows" => self.rows = parse("--rows", &value()?)?,
                "--pool" => self.pool = parse("--pool", &value()?)?,
                "--redis" => self.redis_url = Some(value()?),
                "--redis-cluster" => self.redis_cluster = split_urls(&value()?),
                "--namespace" => self.namespace = Some(value()?),
                "--cache" => self.cache_enabled = on_off("--cache", &value()?)?,
                "--publish-stats" => {
                    self.publish_stats = publish_interval("--publish-stats", &value()?)?;
                }
                _ => return Err(format!("unknown option `{arg}`; see --help")),
            }
        }
        Ok(self)
    }

    fn validate(&self) -> Result<(), String> {
        db::check_table_name(&self.table)?;
        if self.rows < 1 {
            return Err(format!("invalid row count {}: at least 1", self.rows));
        }
        if self.pool == 0 {
            return Err("invalid pool size 0: at least 1".to_owned());
        }
        Ok(())
    }
}

/// Installs the process's Prometheus recorder (once; later calls return the same handle)
/// with histogram buckets for the `_seconds` metrics, and starts its upkeep thread.
///
/// Call it before the first cached call: a function registers its metric handles with the
/// recorder in place at its first call.
///
/// # Errors
/// Another global recorder is already installed.
pub fn prometheus() -> Result<PrometheusHandle, String> {
    static HANDLE: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Suffix("_seconds".into()),
                    &[
                        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                        5.0,
                    ],
                )
                .and_then(|b| b.install_recorder())
                .map_err(|e| format!("installing the Prometheus recorder: {e}"))?;
            let upkeep = handle.clone();
            std::thread::Builder::new()
                .name("prometheus-upkeep".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(Duration::from_secs(5));
                        upkeep.run_upkeep();
                    }
                })
                .map_err(|e| format!("starting the metrics upkeep thread: {e}"))?;
            Ok(handle)
        })
        .clone()
}

/// The service's data access, each read and write annotated.
pub struct Users {
    cache: Cache,
    db: Db,
    cached: bool,
}

impl Users {
    /// The cache the functions use.
    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    /// `GET /users/{id}`. `lock`: one query per key at a time across every instance;
    /// `local`: hot users are answered in process, kept coherent by the writes below.
    #[cached(cache = self.cache, key = "user:{id}", ttl = "10m", lock, local, condition = self.cached, name = "users.get")]
    pub async fn user(&self, id: i64) -> Result<Option<User>, DbError> {
        self.db.select(id).await
    }

    /// `GET /orgs/{org}/users`: recorded under the tag `org:{org}`, which every write of a
    /// member invalidates.
    #[cached(cache = self.cache, key = "org_users:{org}", ttl = "10m", lock, local, tags = ["org:{org}"], condition = self.cached, name = "users.by_org")]
    pub async fn org_users(&self, org: i64) -> Result<Vec<User>, DbError> {
        self.db.by_org(org).await
    }

    /// A user was updated (the event-handler form of `#[cache_evict]`: the `UPDATE`
    /// committed before): its entry and its organisation's listings go, and the next read
    /// loads the committed row.
    ///
    /// Not `#[cache_put]` with the `UPDATE`'s row: two concurrent `PUT`s of one id commit
    /// in one order and may write the cache in the other, leaving the older row cached for
    /// the TTL (the framework orders a write against the readers' loads, not two writers
    /// against each other). An eviction after the commit cannot leave an old row behind:
    /// whichever eviction comes last, the next load reads the database. See the README's
    /// "The example service".
    ///
    /// No `condition`: writes invalidate even with the cache off (`CACHE=off`), so that
    /// instances sharing the namespace with the cache on never serve the old row.
    #[cache_evict(cache = self.cache, keys = ["user:{id}"], tags = ["org:{org}"], name = "users.updated")]
    async fn updated(&self, id: i64, org: i64) -> Result<(), DbError> {
        Ok(())
    }

    /// A user was deleted: its entry and its organisation's listings go (with the cache off
    /// too: see [`Users::updated`]).
    #[cache_evict(cache = self.cache, keys = ["user:{id}"], tags = ["org:{org}"], name = "users.deleted")]
    async fn deleted(&self, id: i64, org: i64) -> Result<(), DbError> {
        Ok(())
    }

    /// `PUT /users/{id}`: `UPDATE .. RETURNING`, then the user's entry and listings are
    /// evicted; the updated user, `None` if there is none.
    ///
    /// # Errors
    /// The database's.
    pub async fn update(&self, id: i64, change: &UserUpdate) -> Result<Option<User>, DbError> {
        let user = self
            .db
            .update(id, &change.name, change.email.as_deref())
            .await?;
        if let Some(user) = &user {
            self.updated(id, user.org_id).await?;
        }
        Ok(user)
    }

    /// `DELETE /users/{id}`: whether there was such a user.
    ///
    /// # Errors
    /// The database's.
    pub async fn delete(&self, id: i64) -> Result<bool, DbError> {
        match self.db.delete(id).await? {
            Some(org) => {
                self.deleted(id, org).await?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Statements this instance sent to PostgreSQL (also counted, for all instances of the
    /// process, in the metric [`DB_QUERIES`]).
    pub fn db_queries(&self) -> u64 {
        self.db.queries()
    }

    /// Drops the service's table (the tests' clean-up).
    ///
    /// # Errors
    /// The database's.
    pub async fn drop_table(&self) -> Result<(), DbError> {
        self.db.drop_table().await
    }
}

/// A running service: its address, its state, and a way to stop it.
pub struct Service {
    addr: SocketAddr,
    users: Arc<Users>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
}

impl Service {
    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its data access (cache, stats, the table).
    pub fn users(&self) -> &Arc<Users> {
        &self.users
    }

    /// Stops accepting, lets the requests in progress finish, and returns.
    ///
    /// # Errors
    /// The server's I/O error, if it failed.
    pub async fn stop(mut self) -> std::io::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match (&mut self.task).await {
            Ok(r) => r,
            Err(e) => Err(std::io::Error::other(e)),
        }
    }

    /// Runs until the server fails (or is stopped from elsewhere).
    ///
    /// # Errors
    /// The server's I/O error.
    pub async fn wait(mut self) -> std::io::Result<()> {
        match (&mut self.task).await {
            Ok(r) => r,
            Err(e) => Err(std::io::Error::other(e)),
        }
    }
}

/// Why the service did not start.
#[derive(Debug)]
pub struct StartError(pub String);

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StartError {}

/// Builds the cache, creates and seeds the table, binds the port and serves, on the current
/// Tokio runtime. `metrics` renders `GET /metrics` (see [`prometheus`]; `None`: 404).
///
/// # Errors
/// Invalid configuration, PostgreSQL unreachable, the port taken.
pub async fn start(
    config: Config,
    metrics: Option<PrometheusHandle>,
) -> Result<Service, StartError> {
    config.validate().map_err(StartError)?;
    let namespace = config
        .namespace
        .clone()
        .unwrap_or_else(|| config.table.clone());
    let builder = Cache::builder().namespace(namespace);
    // On Redis, the instance publishes its stats (`cachectl stats` sums the fleet's).
    let on_redis = config.redis_url.is_some() || !config.redis_cluster.is_empty();
    let builder = if on_redis && !config.publish_stats.is_zero() {
        builder.publish_stats(config.publish_stats)
    } else {
        builder
    };
    let builder = match &config.redis_url {
        _ if !config.redis_cluster.is_empty() => builder
            .redis_cluster(config.redis_cluster.iter().cloned())
            .local(config.local_capacity),
        Some(url) => builder.redis(url).local(config.local_capacity),
        None => builder.memory(config.local_capacity),
    };
    let cache = builder
        .build()
        .await
        .map_err(|e| StartError(format!("cache: {e}")))?;
    let db = Db::new(&config.pg_url, &config.table, config.pool);
    db.prepare_table(config.rows)
        .await
        .map_err(|e| StartError(format!("table {}: {e}", config.table)))?;
    let users = Arc::new(Users {
        cache,
        db,
        cached: config.cache_enabled,
    });
    let listener = TcpListener::bind((config.host, config.port))
        .await
        .map_err(|e| StartError(format!("listening on {}:{}: {e}", config.host, config.port)))?;
    let addr = listener
        .local_addr()
        .map_err(|e| StartError(format!("local address: {e}")))?;
    let app = http::router(users.clone(), metrics);
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stopped.await;
            })
            .await
    });
    Ok(Service {
        addr,
        users,
        stop: Some(stop),
        task,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn publish_stats_option() {
        let c = Config::default();
        assert_eq!(c.publish_stats, Duration::from_secs(5));
        let c = c.apply_args(args(&["--publish-stats", "0.2"])).unwrap();
        assert_eq!(c.publish_stats, Duration::from_millis(200));
        for off in ["0", "off"] {
            let c = Config::default()
                .apply_args(args(&["--publish-stats", off]))
                .unwrap();
            assert!(c.publish_stats.is_zero());
        }
        for bad in ["0.01", "-1", "x", "1e12"] {
            let e = Config::default()
                .apply_args(args(&["--publish-stats", bad]))
                .unwrap_err();
            assert!(e.contains("--publish-stats"), "{e}");
        }
        let e = Config::default()
            .apply_args(args(&["--bogus"]))
            .unwrap_err();
        assert!(e.contains("see --help"), "{e}");
    }
}
