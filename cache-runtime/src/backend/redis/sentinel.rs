//! Redis Sentinel: where the master is, and following it through failovers.
//!
//! The configuration comes from a `redis+sentinel://` URL (parsed here: redis-rs has no such
//! parser) or from [`CacheBuilder::redis_sentinel`](crate::CacheBuilder::redis_sentinel).
//! Discovery is redis-rs's (`sentinel` feature): [`SentinelClient::async_get_client`] asks
//! the sentinels, in the order given, for the master of the service (`SENTINEL MASTERS`,
//! skipping a master flagged down), connects to it and checks with `ROLE` that it is a
//! master, then returns a client for it.
//!
//! A [`Resolver`] keeps the master last found and an *epoch* that changes only when the
//! master's address changes. The command connections (`conn`) are made on the current
//! master's client and remember its epoch; when it moves, each runtime's connection is
//! replaced on its next operation (a `ConnectionManager` keeps reconnecting to the address it
//! was made for). A resolution runs in a task of its own (callers never drive it, so a
//! caller's timeout never cancels it), one at a time, at most once per breaker cooldown
//! (`every`) when asked by failures ([`Resolver::suspect`]): connectivity failures, and
//! replies that say the server is not the master any more (`READONLY`: the old master came
//! back as a replica, `MASTERDOWN`). The bus resolves on every reconnection attempt
//! ([`Resolver::resolve`], paced by its own backoff) and records what it finds.
//!
//! Credentials: the URL's `user:password@` (and its database) are the master's (and
//! replicas') and are never sent to the sentinels. Sentinels that require a password of
//! their own are given one per address in the builder form
//! (`redis_sentinel(["redis://:pw@host:26379"], ..)`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use futures_util::StreamExt;
use redis::RedisError;
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{ConnectionAddr, ConnectionInfo, IntoConnectionInfo, RedisConnectionInfo};
use tokio::sync::Notify;

use super::conn::Target;

/// The port sentinels listen on unless told otherwise.
const DEFAULT_PORT: u16 = 26379;

/// How often the `+switch-master` subscription sends a `PING` (see [`watch`]).
const WATCH_PING_EVERY: Duration = Duration::from_secs(5);

/// Which sentinels to ask, for which service, and how to log in to its master. Its `Debug`
/// shows no password.
#[derive(Clone)]
pub(crate) struct SentinelConfig {
    sentinels: Vec<ConnectionInfo>,
    service: String,
    /// The master's database, user and password.
    master: RedisConnectionInfo,
}

impl std::fmt::Debug for SentinelConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sentinels: Vec<String> = self
            .sentinels
            .iter()
            .map(|s| s.addr().to_string())
            .collect();
        f.debug_struct("SentinelConfig")
            .field("sentinels", &sentinels)
            .field("service", &self.service)
            .field("db", &self.master.db())
            .field("user", &self.master.username())
            .field("password", &self.master.password().map(|_| "<redacted>"))
            .finish()
    }
}

/// Whether `url` is a Sentinel URL (`redis+sentinel://`, or the TLS form, refused by
/// [`SentinelConfig::parse_url`]).
pub(crate) fn is_sentinel_url(url: &str) -> bool {
    url.split_once("://").is_some_and(|(scheme, _)| {
        scheme.eq_ignore_ascii_case("redis+sentinel")
            || scheme.eq_ignore_ascii_case("rediss+sentinel")
    })
}

impl SentinelConfig {
    /// Parses `redis+sentinel://[user[:password]@]host1[:port],host2[:port]/<service>[/<db>]`
    /// (port 26379 by default; IPv6 hosts in brackets; user, password and service
    /// percent-decoded). The error never contains the password.
    pub(crate) fn parse_url(url: &str) -> Result<SentinelConfig, String> {
        const FORM: &str =
            "expected redis+sentinel://[user:password@]host:port[,host:port...]/<service>[/<db>]";
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err(format!("not a URL; {FORM}"));
        };
        if scheme.eq_ignore_ascii_case("rediss+sentinel") {
            return Err("TLS through sentinel (`rediss+sentinel://`) is not supported".to_owned());
        }
        if !scheme.eq_ignore_ascii_case("redis+sentinel") {
            return Err(format!("unknown scheme; {FORM}"));
        }
        // The user information ends at the last `@`: a password may hold `/`, `?` or `#`
        // (which should be percent-encoded), never a host or service name.
        let (userinfo, rest) = match rest.rfind('@') {
            Some(at) => (Some(&rest[..at]), &rest[at + 1..]),
            None => (None, rest),
        };
        if rest.contains(['?', '#']) {
            return Err("query parameters and fragments are not supported".to_owned());
        }
        let Some((hosts, path)) = rest.split_once('/') else {
            return Err(format!("no service name; {FORM}"));
        };
        let sentinels = hosts
            .split(',')
            .map(|entry| {
                let (host, port) = host_port(entry)?;
                tcp(host, port)
            })
            .collect::<Result<Vec<_>, String>>()?;
        let path = path.strip_suffix('/').unwrap_or(path);
        let mut segments = path.split('/');
        let service = percent_decode(segments.next().unwrap_or_default())
            .ok_or("the service name is not valid percent-encoded UTF-8")?;
        if service.is_empty() {
            return Err(format!("no service name; {FORM}"));
        }
        let db = match segments.next() {
            None => 0,
            Some(db) => match db.parse::<i64>() {
                Ok(db) if db >= 0 => db,
                _ => return Err(format!("invalid database number `{db}`")),
            },
        };
        if segments.next().is_some() {
            return Err(format!("too many path segments; {FORM}"));
        }
        let mut master = RedisConnectionInfo::default().set_db(db);
        if let Some(userinfo) = userinfo {
            let (user, password) = match userinfo.split_once(':') {
                Some((user, password)) => (user, Some(password)),
                None => (userinfo, None),
            };
            let user =
                percent_decode(user).ok_or("the user name is not valid percent-encoded UTF-8")?;
            if !user.is_empty() {
                master = master.set_username(user);
            }
            if let Some(password) = password {
                let password = percent_decode(password)
                    .ok_or("the password is not valid percent-encoded UTF-8")?;
                if !password.is_empty() {
                    master = master.set_password(password);
                }
            }
        }
        Ok(SentinelConfig {
            sentinels,
            service,
            master,
        })
    }

    /// The builder's form: each sentinel as `host[:port]` or `redis://[user:password@]host[:port]`
    /// (credentials of that sentinel), and the service's name. The master is logged in to
    /// without credentials, on database 0 (the URL form sets them).
    pub(crate) fn from_parts(sentinels: Vec<String>, service: String) -> Result<Self, String> {
        if service.is_empty() {
            return Err("the sentinel service name is empty".to_owned());
        }
        let sentinels = sentinels
            .iter()
            .map(|entry| {
                if !entry.contains("://") {
                    if entry.contains('@') {
                        return Err(format!(
                            "invalid sentinel address `{}`: credentials need the form redis://[user:password@]host:port",
                            crate::cache::redact(entry)
                        ));
                    }
                    let (host, port) = host_port(entry)?;
                    return tcp(host, port);
                }
                let info = entry.as_str().into_connection_info().map_err(|_| {
                    format!(
                        "invalid sentinel address {:?}: expected host:port or redis://[user:password@]host:port",
                        crate::cache::redact(entry)
                    )
                })?;
                if !matches!(info.addr(), ConnectionAddr::Tcp(..)) {
                    return Err(format!(
                        "invalid sentinel address {:?}: only redis:// (TCP) is supported",
                        crate::cache::redact(entry)
                    ));
                }
                if info.redis_settings().db() != 0 {
                    return Err(format!(
                        "invalid sentinel address {:?}: a sentinel has no database number",
                        crate::cache::redact(entry)
                    ));
                }
                Ok(info)
            })
            .collect::<Result<Vec<_>, String>>()?;
        if sentinels.is_empty() {
            return Err("no sentinel address given".to_owned());
        }
        Ok(SentinelConfig {
            sentinels,
            service,
            master: RedisConnectionInfo::default(),
        })
    }

    /// The service's name.
    #[cfg(test)]
    pub(crate) fn service(&self) -> &str {
        &self.service
    }
}

/// A sentinel's address, without credentials.
fn tcp(host: String, port: u16) -> Result<ConnectionInfo, String> {
    ConnectionAddr::Tcp(host, port)
        .into_connection_info()
        .map_err(|e| e.to_string())
}

/// `host[:port]` or `[v6]:port`; port 26379 if absent. Errors show the entry and the port
/// without anything up to an `@` (credentials given without `redis://`, see
/// [`redact`](crate::cache::redact)).
fn host_port(entry: &str) -> Result<(String, u16), String> {
    let shown = crate::cache::redact(entry);
    let (host, port) = if let Some(v6) = entry.strip_prefix('[') {
        let Some((host, after)) = v6.split_once(']') else {
            return Err(format!(
                "invalid sentinel address `{shown}`: no closing `]`"
            ));
        };
        match after {
            "" => (host, None),
            _ => match after.strip_prefix(':') {
                Some(port) => (host, Some(port)),
                None => return Err(format!("invalid sentinel address `{shown}`")),
            },
        }
    } else {
        match entry.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (entry, None),
        }
    };
    if host.is_empty() {
        return Err(if entry.is_empty() {
            "empty sentinel address (two commas, or none before the `/`)".to_owned()
        } else {
            format!("invalid sentinel address `{shown}`: no host")
        });
    }
    if host.contains(['/', ' ', '@', ':']) && !entry.starts_with('[') {
        return Err(format!("invalid sentinel address `{shown}`"));
    }
    let port = match port {
        None => DEFAULT_PORT,
        Some(p) => match p.parse::<u16>() {
            Ok(p) if p != 0 => p,
            _ => {
                return Err(format!(
                    "invalid port `{}` in sentinel address `{shown}`",
                    crate::cache::redact(p)
                ));
            }
        },
    };
    Ok((host.to_owned(), port))
}

/// `%XX` sequences decoded; `None` for a bad sequence or invalid UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The master found by a resolution.
pub(super) struct Master {
    pub(super) client: redis::Client,
    /// Changes (grows) whenever the master's address does.
    pub(super) epoch: u64,
    /// `host:port`.
    addr: String,
}

struct State {
    /// A resolution task runs.
    running: bool,
    /// When the last background resolution started.
    last: Option<Instant>,
    /// Why the last resolution failed (cleared by a success).
    error: Option<String>,
}

/// The current master of one service, found through the sentinels (see the module docs).
pub(crate) struct Resolver {
    config: SentinelConfig,
    master: ArcSwapOption<Master>,
    /// `master`'s epoch (0: none found yet), read on every operation.
    epoch: AtomicU64,
    state: Mutex<State>,
    /// Woken when a background resolution ends.
    done: Notify,
    /// Woken when the master's address changes.
    changed: Notify,
    /// At most one background resolution per this (the breaker's cooldown).
    every: Duration,
    /// How long one resolution may take.
    timeout: Duration,
    /// The task following the sentinels' `+switch-master` announcements (see [`watch`]).
    watcher: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// How often the watcher checks its subscription with a `PING`.
    ping_every: Duration,
}

impl Drop for Resolver {
    fn drop(&mut self) {
        let watcher = self.watcher.get_mut().unwrap_or_else(|e| e.into_inner());
        if let Some(task) = watcher.take() {
            task.abort();
        }
    }
}

/// Ends a background resolution however its task ends (its runtime shut down, say).
struct Running(Arc<Resolver>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.lock().running = false;
        self.0.done.notify_waiters();
    }
}

impl Resolver {
    /// `every`: at most one resolution asked by failures per this; `connect_timeout`: the
    /// bound of each connection a resolution makes (a resolution may take two of them).
    pub(crate) fn new(config: SentinelConfig, every: Duration, connect_timeout: Duration) -> Self {
        Resolver {
            config,
            master: ArcSwapOption::empty(),
            epoch: AtomicU64::new(0),
            state: Mutex::new(State {
                running: false,
                last: None,
                error: None,
            }),
            done: Notify::new(),
            changed: Notify::new(),
            every,
            timeout: connect_timeout.saturating_mul(2),
            watcher: Mutex::new(None),
            ping_every: WATCH_PING_EVERY,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The epoch of the current master (0: none found yet).
    #[inline]
    pub(super) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// The master last found, if any.
    pub(super) fn current(&self) -> Option<Arc<Master>> {
        self.master.load_full()
    }

    /// The master may have moved (a connectivity failure, a `READONLY` reply): starts a
    /// resolution in the background, unless one runs or one started less than a cooldown ago.
    pub(super) fn suspect(self: &Arc<Self>) {
        self.start();
        self.ensure_watcher();
    }

    /// Makes sure a task follows the sentinels' announcements (in the calling runtime, if
    /// the last one died with its own).
    pub(super) fn ensure_watcher(self: &Arc<Self>) {
        let mut watcher = self.watcher.lock().unwrap_or_else(|e| e.into_inner());
        if watcher.as_ref().is_some_and(|t| !t.is_finished()) {
            return;
        }
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            *watcher = Some(handle.spawn(watch(Arc::downgrade(self))));
        }
    }

    /// Starts a background resolution (see [`Self::suspect`]); returns whether one runs.
    fn start(self: &Arc<Self>) -> bool {
        let mut state = self.lock();
        if state.running {
            return true;
        }
        if state.last.is_some_and(|t| t.elapsed() < self.every) {
            return false;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return false;
        };
        state.running = true;
        state.last = Some(Instant::now());
        drop(state);
        let running = Running(self.clone());
        handle.spawn(async move {
            let _ = running.0.resolve().await;
            drop(running);
        });
        true
    }

    /// The current master; if none was found yet, waits at most `wait` for a resolution
    /// (started now unless one failed less than a cooldown ago).
    pub(super) async fn first(self: &Arc<Self>, wait: Duration) -> Result<Arc<Master>, String> {
        if let Some(master) = self.current() {
            return Ok(master);
        }
        let done = self.done.notified();
        tokio::pin!(done);
        done.as_mut().enable();
        let running = self.start();
        if let Some(master) = self.current() {
            return Ok(master);
        }
        if running && tokio::time::timeout(wait, done).await.is_err() {
            return Err(format!(
                "the sentinels did not name a master of `{}` within {wait:?}",
                self.config.service
            ));
        }
        self.current().ok_or_else(|| {
            self.lock()
                .error
                .clone()
                .unwrap_or_else(|| format!("no master of `{}` known yet", self.config.service))
        })
    }

    /// Asks the sentinels now (not rate-limited: the bus paces its reconnections itself) and
    /// records the answer.
    pub(super) async fn resolve(&self) -> Result<Arc<Master>, String> {
        let asked = tokio::time::timeout(self.timeout, self.ask()).await;
        let found = match asked {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => return Err(self.failed(format!("{e}"))),
            Err(_) => {
                return Err(self.failed(format!("no answer within {:?}", self.timeout)));
            }
        };
        Ok(self.record(found))
    }

    /// A sentinel announced `host:port` as the new master (`+switch-master`): adopted once
    /// it answers `ROLE` as a master (the sentinels asked in order may still name the old
    /// one, which may not be demoted yet); otherwise the sentinels are asked.
    async fn adopt(&self, host: &str, port: u16) {
        let info = ConnectionAddr::Tcp(host.to_owned(), port)
            .into_connection_info()
            .map(|info| info.set_redis_settings(self.config.master.clone()));
        let checked = async {
            let client = redis::Client::open(info?)?;
            let mut conn = client.get_multiplexed_async_connection().await?;
            let role: redis::Value = redis::cmd("ROLE").query_async(&mut conn).await?;
            let is_master = matches!(&role, redis::Value::Array(items)
                if matches!(items.first(), Some(redis::Value::BulkString(b)) if b == b"master"));
            Ok::<_, RedisError>(is_master.then_some(client))
        };
        match tokio::time::timeout(self.timeout, checked).await {
            Ok(Ok(Some(client))) => {
                self.record(client);
            }
            _ => {
                let _ = self.resolve().await;
            }
        }
    }

    /// Records the master found: a new epoch if its address changed.
    fn record(&self, found: redis::Client) -> Arc<Master> {
        let addr = found.get_connection_info().addr().to_string();
        let mut state = self.lock();
        state.error = None;
        let current = self.current();
        if let Some(current) = current.filter(|m| m.addr == addr) {
            return current;
        }
        let master = Arc::new(Master {
            client: found,
            epoch: self.epoch() + 1,
            addr,
        });
        self.master.store(Some(master.clone()));
        self.epoch.store(master.epoch, Ordering::Release);
        drop(state);
        tracing::info!(
            target: "cache_runtime",
            "redis sentinel: the master of `{}` is {}",
            self.config.service,
            master.addr
        );
        self.changed.notify_waiters();
        master
    }

    fn failed(&self, why: String) -> String {
        let why = format!(
            "asking the sentinels for the master of `{}` failed: {why}",
            self.config.service
        );
        self.lock().error = Some(why.clone());
        why
    }

    /// One question to the sentinels (redis-rs: `SENTINEL MASTERS`, then `ROLE` on the
    /// master named). A new `SentinelClient` each time: its cached sentinel connections
    /// belong to the runtime that made them, and resolutions are rare.
    async fn ask(&self) -> redis::RedisResult<redis::Client> {
        let node = SentinelNodeConnectionInfo::default()
            .set_redis_connection_info(self.config.master.clone());
        let mut client = SentinelClient::build(
            self.config.sentinels.clone(),
            self.config.service.clone(),
            Some(node),
            SentinelServerType::Master,
        )?;
        client.async_get_client().await
    }

    /// Completes when the master's epoch is no longer `epoch`.
    pub(super) async fn moved_from(&self, epoch: u64) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.epoch() != epoch {
                return;
            }
            changed.await;
        }
    }
}

impl Target {
    /// The current master's epoch (always 0 for `Single`).
    #[inline]
    pub(super) fn epoch(&self) -> u64 {
        match self {
            Target::Single(_) | Target::Cluster(_) => 0,
            Target::Sentinel(r) => r.epoch(),
        }
    }

    /// A client for a connection of its own (the bus, the write-behind worker's blocking
    /// reads), and the master's epoch. Sentinel: the current master, waiting at most `wait`
    /// for the first resolution.
    pub(super) async fn client(&self, wait: Duration) -> redis::RedisResult<(redis::Client, u64)> {
        match self {
            Target::Single(client) => Ok((client.clone(), 0)),
            Target::Cluster(_) => Err(unavailable(
                "a cluster has no single client (use its connection)".to_owned(),
            )),
            Target::Sentinel(r) => r
                .first(wait)
                .await
                .map(|m| (m.client.clone(), m.epoch))
                .map_err(unavailable),
        }
    }

    /// Sentinel: asks the sentinels now (the bus, on each reconnection attempt).
    pub(super) async fn resolve(&self) -> redis::RedisResult<(redis::Client, u64)> {
        match self {
            Target::Single(client) => Ok((client.clone(), 0)),
            Target::Cluster(_) => Err(unavailable(
                "a cluster has no single client (use its connection)".to_owned(),
            )),
            Target::Sentinel(r) => r
                .resolve()
                .await
                .map(|m| (m.client.clone(), m.epoch))
                .map_err(unavailable),
        }
    }

    /// Completes when the master moved away from `epoch` (never for `Single`).
    pub(super) async fn moved_from(&self, epoch: u64) {
        match self {
            Target::Single(_) | Target::Cluster(_) => std::future::pending().await,
            Target::Sentinel(r) => r.moved_from(epoch).await,
        }
    }

    /// Whether `e` says the server is no longer the master the sentinels named (Sentinel
    /// only: on a single server `READONLY` is a read-only server, see `refuses_writes`).
    pub(super) fn wrong_master(&self, e: &RedisError) -> bool {
        matches!(self, Target::Sentinel(_)) && wrong_master(e)
    }

    /// Sentinel: the master may have moved; re-resolve (rate-limited).
    pub(super) fn suspect(&self) {
        if let Target::Sentinel(r) = self {
            r.suspect();
        }
    }
}

fn unavailable(why: String) -> RedisError {
    RedisError::from((redis::ErrorKind::Io, "redis sentinel", why))
}

/// Follows the sentinels' announcements: subscribed to `+switch-master` on the first
/// sentinel that accepts, adopts the master announced for the service (a master demoted to
/// a replica still serves reads: without this, a cache that only reads would stay on it).
/// After each (re)subscription the sentinels are asked (an announcement may have been
/// missed meanwhile). Every `ping_every` the subscription sends a `PING`; without an answer
/// within the resolution timeout (a half-open connection: a sentinel's host gone without a
/// reset, where a read would wait forever) it subscribes again. Ends when the resolver is
/// dropped.
async fn watch(resolver: Weak<Resolver>) {
    let Some((sentinels, service, timeout, ping_every)) = resolver.upgrade().map(|r| {
        (
            r.config.sentinels.clone(),
            r.config.service.clone(),
            r.timeout,
            r.ping_every,
        )
    }) else {
        return;
    };
    let mut backoff = Duration::from_millis(100);
    loop {
        for info in &sentinels {
            let subscribed = tokio::time::timeout(timeout, async {
                let mut pubsub = redis::Client::open(info.clone())?
                    .get_async_pubsub()
                    .await?;
                pubsub.subscribe("+switch-master").await?;
                Ok::<_, RedisError>(pubsub)
            })
            .await;
            let Ok(Ok(pubsub)) = subscribed else {
                continue;
            };
            match resolver.upgrade() {
                Some(r) => drop(r.resolve().await),
                None => return,
            }
            backoff = Duration::from_millis(100);
            let (mut sink, mut messages) = pubsub.split();
            let mut ping = tokio::time::interval(ping_every);
            ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ping.reset();
            loop {
                let msg = tokio::select! {
                    msg = messages.next() => match msg {
                        Some(msg) => msg,
                        None => break,
                    },
                    _ = ping.tick() => {
                        let pong = tokio::time::timeout(timeout, sink.ping::<redis::Value>()).await;
                        if !matches!(pong, Ok(Ok(_))) {
                            tracing::debug!(target: "cache_runtime", "redis sentinel: no answer to PING on the +switch-master subscription on {}", info.addr());
                            break;
                        }
                        continue;
                    }
                };
                // `<service> <old ip> <old port> <new ip> <new port>`
                let payload: String = msg.get_payload().unwrap_or_default();
                let parts: Vec<&str> = payload.split(' ').collect();
                if let [name, _, _, host, port] = parts[..] {
                    if name == service {
                        let Some(r) = resolver.upgrade() else { return };
                        if let Ok(port) = port.parse() {
                            r.adopt(host, port).await;
                        }
                    }
                }
            }
            tracing::debug!(target: "cache_runtime", "redis sentinel: the +switch-master subscription on {} dropped", info.addr());
        }
        if resolver.strong_count() == 0 {
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Whether a reply says the server is not (or no longer) a usable master: `READONLY` (a
/// replica: the old master came back demoted) or `MASTERDOWN` (a replica cut off from its
/// master).
pub(super) fn wrong_master(e: &redis::RedisError) -> bool {
    matches!(e.code(), Some("READONLY" | "MASTERDOWN"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(c: &SentinelConfig) -> Vec<String> {
        c.sentinels.iter().map(|s| s.addr().to_string()).collect()
    }

    #[test]
    fn parses_the_url_form() {
        let c = SentinelConfig::parse_url(
            "redis+sentinel://app:s%40cret@10.0.0.1:26379,sentinel-2,[::1]:26380/mymaster/3",
        )
        .unwrap();
        assert_eq!(
            addrs(&c),
            ["10.0.0.1:26379", "sentinel-2:26379", "::1:26380"]
        );
        assert_eq!(c.service(), "mymaster");
        assert_eq!(c.master.db(), 3);
        assert_eq!(c.master.username(), Some("app"));
        assert_eq!(c.master.password(), Some("s@cret"));
        // The sentinels get no credentials.
        assert!(
            c.sentinels
                .iter()
                .all(|s| s.redis_settings().password().is_none())
        );

        let c = SentinelConfig::parse_url("REDIS+SENTINEL://h:1/svc/").unwrap();
        assert_eq!(
            (addrs(&c), c.service(), c.master.db()),
            (vec!["h:1".to_owned()], "svc", 0)
        );
        assert_eq!(c.master.password(), None);
        let c = SentinelConfig::parse_url("redis+sentinel://:p/w@h/svc").unwrap();
        assert_eq!(
            (c.master.username(), c.master.password()),
            (None, Some("p/w"))
        );
        assert!(is_sentinel_url("redis+sentinel://h/s"));
        assert!(!is_sentinel_url("redis://h/0"));
    }

    #[test]
    fn refuses_bad_urls_without_showing_the_password() {
        for (url, expect) in [
            ("redis+sentinel://h1:26379", "no service name"),
            ("redis+sentinel://h1:26379/", "no service name"),
            ("redis+sentinel:///svc", "empty sentinel address"),
            ("redis+sentinel://h1,,h2/svc", "empty sentinel address"),
            ("redis+sentinel://h1:x/svc", "invalid port `x`"),
            ("redis+sentinel://h1:0/svc", "invalid port `0`"),
            ("redis+sentinel://h1:99999/svc", "invalid port"),
            ("redis+sentinel://[::1/svc", "no closing"),
            ("redis+sentinel://h1/svc/-1", "invalid database number"),
            ("redis+sentinel://h1/svc/x", "invalid database number"),
            ("redis+sentinel://h1/svc/0/more", "too many path segments"),
            ("redis+sentinel://h1/svc?x=1", "query parameters"),
            ("rediss+sentinel://h1/svc", "not supported"),
            (
                "redis+sentinel://u:%zzsecret@h1/svc",
                "password is not valid",
            ),
            (
                "redis+sentinel://u:topsecret@h1:bad/svc",
                "invalid port `bad`",
            ),
            ("nonsense", "not a URL"),
        ] {
            let err = SentinelConfig::parse_url(url).unwrap_err();
            assert!(err.contains(expect), "{url}: {err}");
            assert!(!err.contains("secret"), "{url}: {err}");
        }
    }

    #[test]
    fn builder_form_and_debug_without_password() {
        let c = SentinelConfig::from_parts(
            vec!["h1:1".into(), "h2".into(), "redis://:pw@h3:3".into()],
            "svc".into(),
        )
        .unwrap();
        assert_eq!(addrs(&c), ["h1:1", "h2:26379", "h3:3"]);
        assert_eq!(c.sentinels[2].redis_settings().password(), Some("pw"));
        for bad in [
            vec![],
            vec!["h1:x".to_owned()],
            vec!["redis://h1:1/2".to_owned()],
            vec!["unix:///tmp/s".to_owned()],
        ] {
            assert!(
                SentinelConfig::from_parts(bad.clone(), "svc".into()).is_err(),
                "{bad:?}"
            );
        }
        assert!(SentinelConfig::from_parts(vec!["h".into()], String::new()).is_err());
        let c = SentinelConfig::parse_url("redis+sentinel://u:topsecret@h/svc").unwrap();
        let debug = format!("{c:?}");
        assert!(
            !debug.contains("topsecret") && debug.contains("<redacted>"),
            "{debug}"
        );
    }

    #[test]
    fn builder_form_errors_never_show_a_password_given_without_redis_scheme() {
        for entry in [
            "app:hunter2@host:26379",
            "app:hunter2@host",
            "app:hunter2@host:x",
            "app:hunter2@host:0",
            "app:hunter2@:26379",
            "app:hunter2@",
            "hunter2@host",
            ":hunter2@host:26379",
            "app:hunter2@[::1]:26379",
            "app:hunter2@[::1",
            "app:hun@ter2@host:1",
            "[::1]:hunter2@x",
            "host:hunter2@x",
            "redis:/app:hunter2@host:26379",
            "redis://app:hunter2@host:bad",
            "redis://app:hunter2@host:1/2",
            "rediss+x://app:hunter2@host:1",
        ] {
            let err =
                SentinelConfig::from_parts(vec![entry.to_owned()], "svc".into()).expect_err(entry);
            assert!(
                !err.contains("hunter2") && !err.contains("ter2"),
                "{entry}: {err}"
            );
        }
        assert!(
            SentinelConfig::from_parts(vec!["app:pw@host:26379".into()], "svc".into())
                .unwrap_err()
                .contains("credentials need the form redis://")
        );
    }

    #[tokio::test]
    async fn build_error_and_builder_debug_never_show_a_sentinel_password() {
        for entry in ["app:hunter2@host:26379", "app:hunter2@host", "hunter2@h:x"] {
            let builder = crate::Cache::builder().redis_sentinel([entry], "svc");
            let debug = format!("{builder:?}");
            assert!(!debug.contains("hunter2"), "{entry}: {debug}");
            let err = builder.build().await.expect_err(entry).to_string();
            assert!(!err.contains("hunter2"), "{entry}: {err}");
        }
    }

    /// A sentinel that accepts `SUBSCRIBE` (counted), answers `+OK` to anything else, and
    /// never answers `PING`: a half-open connection as the watcher sees it.
    fn silent_sentinel() -> (u16, Arc<AtomicU64>) {
        use std::io::{BufRead, BufReader, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let subscribes = Arc::new(AtomicU64::new(0));
        let count = subscribes.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let count = count.clone();
                std::thread::spawn(move || {
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
                    let mut reader = BufReader::new(stream.try_clone().unwrap());
                    let mut line = String::new();
                    loop {
                        // `*<n>` then n times `$<len>` and the argument.
                        line.clear();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        let n: usize = line.trim()[1..].parse().unwrap_or(0);
                        let mut args = Vec::new();
                        for _ in 0..n * 2 {
                            line.clear();
                            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                                return;
                            }
                            args.push(line.trim().to_ascii_uppercase());
                        }
                        let reply: &[u8] = match args.get(1).map(String::as_str) {
                            Some("SUBSCRIBE") => {
                                count.fetch_add(1, Ordering::SeqCst);
                                b"*3\r\n$9\r\nsubscribe\r\n$14\r\n+switch-master\r\n:1\r\n"
                            }
                            Some("PING") => continue,
                            _ => b"+OK\r\n",
                        };
                        if stream.write_all(reply).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (port, subscribes)
    }

    #[tokio::test]
    async fn watcher_subscribes_again_when_ping_goes_unanswered() {
        let (port, subscribes) = silent_sentinel();
        let config =
            SentinelConfig::from_parts(vec![format!("127.0.0.1:{port}")], "svc".into()).unwrap();
        let mut resolver =
            Resolver::new(config, Duration::from_secs(1), Duration::from_millis(100));
        resolver.ping_every = Duration::from_millis(200);
        let resolver = Arc::new(resolver);
        resolver.ensure_watcher();
        let deadline = Instant::now() + Duration::from_secs(5);
        while subscribes.load(Ordering::SeqCst) < 2 {
            assert!(
                Instant::now() < deadline,
                "subscribed {} times: the unanswered PING did not start a new subscription",
                subscribes.load(Ordering::SeqCst)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[test]
    fn recognises_wrong_master_replies() {
        let readonly = redis::RedisError::from((
            redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly),
            "You can't write against a read only replica.",
        ));
        assert!(wrong_master(&readonly));
        let other = redis::RedisError::from((redis::ErrorKind::Io, "refused"));
        assert!(!wrong_master(&other));
    }
}
