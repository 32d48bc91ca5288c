//! The command connection: one multiplexed connection per Tokio runtime that uses the cache
//! (a `ConnectionManager` on a single Redis, a `ClusterConnection` on Redis Cluster), behind
//! a circuit breaker and one timer per operation.
//!
//! Either connection belongs to the runtime it was created in: its driver task runs there,
//! and dies with it. A `Cache` in a `static`, or the default cache under several
//! `#[tokio::test]`s, is used from several runtimes, one after the other or at once. So each
//! runtime gets its own connection, made lazily on its first operation; a connection whose
//! runtime has shut down is dropped. The common case, one runtime, costs one atomic load and
//! a comparison per operation.

use std::future::Future;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, ErrorKind as RedisKind, Pipeline, RedisError, RedisFuture, Value};
use tokio::runtime::{Handle, Id};
use tokio::task::JoinHandle;

use super::RedisOptions;
use crate::backend::{BackendError, BackendResult};
use crate::breaker::{Breaker, FailureKind, FailureLog};

/// Where the cache's data lives.
#[derive(Clone)]
pub(crate) enum Target {
    /// One Redis server (or a proxy that looks like one).
    Single(redis::Client),
    /// A Redis Cluster, reached through any of its nodes.
    Cluster(Box<ClusterClient>),
}

/// A connection to the cache's Redis: every command and pipeline of the backend goes through
/// one. On a cluster, a command is routed by its first key's hash slot, and a pipeline by its
/// commands' one slot: a pipeline must not span slots (see [`SlotPipe`]).
#[derive(Clone)]
pub(crate) enum Conn {
    /// The runtime's shared, reconnecting connection to a single Redis.
    Single(ConnectionManager),
    /// A connection of its own to a single Redis (blocking reads hold it).
    Plain(MultiplexedConnection),
    /// The runtime's connection to a cluster: one socket per node.
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Plain(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Plain(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Plain(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

impl Conn {
    /// Whether commands of different hash slots must go in different requests.
    pub(crate) fn is_cluster(&self) -> bool {
        matches!(self, Conn::Cluster(_))
    }

    /// Sends `cmd` to the master that owns `slot` (a cluster), or to the server.
    pub(crate) async fn query_on_slot<T: redis::FromRedisValue>(
        &mut self,
        slot: u16,
        cmd: &Cmd,
    ) -> redis::RedisResult<T> {
        match self {
            Conn::Cluster(c) => {
                use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
                let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(
                    Route::new(slot, SlotAddr::Master),
                ));
                let value = c.route_command(cmd.clone(), route).await?;
                Ok(redis::from_redis_value(value)?)
            }
            other => cmd.query_async(other).await,
        }
    }
}

/// Commands of several hash slots, sent as one pipeline on a single Redis (one round trip) and
/// as one pipeline per slot on a cluster (concurrently: still one round trip, the slowest
/// node's), since a cluster request may not span slots. The replies come back in the order the
/// commands were pushed, ignored ones left out, as from one pipeline.
#[derive(Default)]
pub(crate) struct SlotPipe {
    /// Each command with its slot and whether its reply is kept.
    cmds: Vec<(u16, Cmd, bool)>,
}

impl SlotPipe {
    pub(crate) fn new() -> Self {
        SlotPipe::default()
    }

    /// Adds `cmd`, whose keys are all in `slot` (a keyless command, such as `PUBLISH`, goes
    /// with the slot whose changes it follows).
    pub(crate) fn push(&mut self, slot: u16, cmd: Cmd) -> &mut Self {
        self.cmds.push((slot, cmd, true));
        self
    }

    /// Adds `cmd` (see [`Self::push`]); its reply is not returned.
    pub(crate) fn push_ignored(&mut self, slot: u16, cmd: Cmd) -> &mut Self {
        self.cmds.push((slot, cmd, false));
        self
    }

    /// Sends the commands; the kept replies, in order, as `T` (a tuple or `Vec`). On a
    /// cluster, the first failing group's error is returned (the other groups were applied).
    pub(crate) async fn query<T: redis::FromRedisValue>(
        &self,
        conn: &mut Conn,
    ) -> redis::RedisResult<T> {
        let values = if conn.is_cluster() {
            self.query_per_slot(conn).await?
        } else {
            let mut pipe = redis::pipe();
            for (_, cmd, keep) in &self.cmds {
                pipe.add_command(cmd.clone());
                if !keep {
                    pipe.ignore();
                }
            }
            pipe.query_async::<Vec<Value>>(conn).await?
        };
        Ok(redis::from_redis_value(Value::Array(values))?)
    }

    async fn query_per_slot(&self, conn: &Conn) -> redis::RedisResult<Vec<Value>> {
        use redis::cluster_routing::{Route, SingleNodeRoutingInfo, SlotAddr};
        let Conn::Cluster(cluster) = conn else {
            unreachable!("query_per_slot is for clusters only")
        };
        // The groups, in order of first appearance: a pipeline each, and which of the pushed
        // commands it holds.
        let mut groups: Vec<(u16, Pipeline, Vec<usize>)> = Vec::new();
        for (i, (slot, cmd, _)) in self.cmds.iter().enumerate() {
            let at = match groups.iter().position(|(s, _, _)| s == slot) {
                Some(at) => at,
                None => {
                    groups.push((*slot, redis::pipe(), Vec::new()));
                    groups.len() - 1
                }
            };
            let (_, pipe, held) = &mut groups[at];
            pipe.add_command(cmd.clone());
            held.push(i);
        }
        // Routed to the slot's master explicitly: redis-rs would route a pipeline by its
        // commands' keys, and take a `PUBLISH`'s channel for one.
        let replies = futures_util::future::join_all(groups.iter().map(|(slot, pipe, held)| {
            let route = SingleNodeRoutingInfo::SpecificNode(Route::new(*slot, SlotAddr::Master));
            send_following_redirects(cluster.clone(), pipe, held.len(), route)
        }))
        .await;
        let mut ordered: Vec<Option<Value>> = vec![None; self.cmds.len()];
        for ((_, _, held), reply) in groups.iter().zip(replies) {
            for (&i, value) in held.iter().zip(reply?) {
                ordered[i] = Some(value.extract_error()?);
            }
        }
        Ok(ordered
            .into_iter()
            .zip(&self.cmds)
            .filter(|(_, (_, _, keep))| *keep)
            .map(|(v, _)| v.unwrap_or(Value::Nil))
            .collect())
    }
}

/// How many times a slot group follows a `MOVED`/`ASK` or waits out a `TRYAGAIN` before its
/// error is returned.
const REDIRECTS: u32 = 4;

/// Sends one slot group's pipeline of `count` commands on `route` and returns its replies.
/// redis-rs follows redirections for a command, but hands a routed pipeline's replies back as
/// they are: while a slot migrates (a reshard), a group's commands may answer `MOVED` (the
/// slot moved: send the group to its new master), `ASK` (the keys are being imported: send it
/// there, each command after an `ASKING`) or `TRYAGAIN` (a multi-key command whose keys are
/// split between the two nodes: wait a little). The group is sent again whole: its commands
/// are idempotent (`DEL`, `SET .. XX`, `GET`) and its `PUBLISH` is repeated after the change,
/// so an early message of a failed attempt costs a receiver a miss at most.
async fn send_following_redirects(
    mut cluster: ClusterConnection,
    pipe: &Pipeline,
    count: usize,
    route: redis::cluster_routing::SingleNodeRoutingInfo,
) -> redis::RedisResult<Vec<Value>> {
    use redis::ServerErrorKind;
    use redis::cluster_routing::SingleNodeRoutingInfo;
    let (mut route, mut asking) = (route, false);
    let mut attempt = 0;
    loop {
        let replies = if asking {
            let mut asked = redis::pipe();
            for cmd in pipe.cmd_iter() {
                asked.cmd("ASKING").add_command(cmd.clone());
            }
            let all = cluster
                .route_pipeline(asked, 0, count * 2, route.clone())
                .await?;
            all.into_iter().skip(1).step_by(2).collect()
        } else {
            cluster
                .route_pipeline(pipe.clone(), 0, count, route.clone())
                .await?
        };
        let redirect = replies
            .iter()
            .find_map(|v| match v.clone().extract_error() {
                Err(e) => match e.kind() {
                    redis::ErrorKind::Server(
                        kind @ (ServerErrorKind::Moved
                        | ServerErrorKind::Ask
                        | ServerErrorKind::TryAgain),
                    ) => Some((kind, e.redirect_node().map(|(h, p)| (h.to_owned(), p)))),
                    _ => None,
                },
                Ok(_) => None,
            });
        let Some((kind, node)) = redirect else {
            return Ok(replies);
        };
        if attempt >= REDIRECTS {
            return Ok(replies);
        }
        attempt += 1;
        match (kind, node) {
            (ServerErrorKind::TryAgain, _) => {
                tokio::time::sleep(Duration::from_millis(5 << attempt)).await;
            }
            (kind, Some((host, port))) => {
                route = SingleNodeRoutingInfo::ByAddress { host, port };
                asking = kind == ServerErrorKind::Ask;
            }
            _ => return Ok(replies),
        }
    }
}

/// The connection of one runtime.
struct Slot {
    runtime: Id,
    manager: Conn,
    /// A task that never ends on its own: finished means the runtime has shut down.
    alive: JoinHandle<()>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.alive.abort();
    }
}

pub(super) struct Connections {
    target: Target,
    options: RedisOptions,
    /// The slot used last: checked first.
    current: ArcSwapOption<Slot>,
    /// Every live slot.
    slots: Mutex<Vec<Arc<Slot>>>,
    /// Shared with the bus: no heartbeat counts while it is open.
    breaker: Arc<Breaker>,
    /// Called when the breaker opens (see [`Connections::on_breaker_open`]).
    on_open: OnceLock<Box<dyn Fn() + Send + Sync>>,
    log: Arc<FailureLog>,
}

/// Whether a Redis error means "the server answered, but not with what we wanted" (the key
/// holds another type, a script error, ...) rather than "we could not talk to the server".
fn is_reply_error(e: &RedisError) -> bool {
    matches!(
        e.kind(),
        RedisKind::Server(_) | RedisKind::Extension | RedisKind::UnexpectedReturnType
    )
}

/// Clears a half-open breaker's probe if the operation is dropped before it finished.
struct ProbeGuard<'a> {
    breaker: &'a Breaker,
    armed: bool,
}

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.breaker.abandon_probe();
        }
    }
}

impl Connections {
    pub(super) fn new(target: Target, options: RedisOptions, log: Arc<FailureLog>) -> Self {
        Connections {
            breaker: Arc::new(Breaker::new(
                options.breaker_threshold,
                options.breaker_cooldown,
            )),
            on_open: OnceLock::new(),
            target,
            options,
            current: ArcSwapOption::empty(),
            slots: Mutex::new(Vec::new()),
            log,
        }
    }

    /// The circuit breaker every operation goes through.
    pub(super) fn breaker(&self) -> &Arc<Breaker> {
        &self.breaker
    }

    /// Calls `hook` whenever the breaker opens (Redis is unreachable: the invalidation stream
    /// can no longer be trusted). Set once; later calls are ignored. It runs on the failing
    /// operation's task and must not block.
    pub(super) fn on_breaker_open(&self, hook: Box<dyn Fn() + Send + Sync>) {
        let _ = self.on_open.set(hook);
    }

    /// The connection of the current runtime, created (not connected) on first use.
    fn connection(&self) -> BackendResult<Conn> {
        let handle = Handle::try_current().map_err(|_| {
            BackendError::Unavailable("not called inside a Tokio runtime".to_owned())
        })?;
        let runtime = handle.id();
        if let Some(slot) = &*self.current.load() {
            if slot.runtime == runtime {
                return Ok(slot.manager.clone());
            }
        }
        self.connection_slow(&handle, runtime)
    }

    #[cold]
    fn connection_slow(&self, handle: &Handle, runtime: Id) -> BackendResult<Conn> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        // Connections of runtimes that have shut down are dead: drop them.
        slots.retain(|s| !s.alive.is_finished());
        if let Some(slot) = slots.iter().find(|s| s.runtime == runtime) {
            self.current.store(Some(slot.clone()));
            return Ok(slot.manager.clone());
        }
        let manager = match &self.target {
            Target::Single(client) => {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(self.options.connect_timeout))
                    // No response timeout in redis-rs: `run` bounds the whole operation
                    // (including a wait for a reconnection) with one timer, instead of two
                    // timers per command.
                    .set_response_timeout(None)
                    // One attempt per reconnection; the breaker paces the attempts.
                    .set_number_of_retries(0);
                Conn::Single(
                    ConnectionManager::new_lazy_with_config(client.clone(), config)
                        .map_err(|e| BackendError::Unavailable(e.to_string()))?,
                )
            }
            // Connects in the background: the first operations wait for it, bounded by
            // their timer, as with the lazy `ConnectionManager`.
            Target::Cluster(client) => Conn::Cluster(
                client.get_pending_async_connection_with_config(self.cluster_config()),
            ),
        };
        let slot = Arc::new(Slot {
            runtime,
            manager: manager.clone(),
            alive: handle.spawn(std::future::pending()),
        });
        slots.push(slot.clone());
        self.current.store(Some(slot));
        Ok(manager)
    }

    /// Sends one command through the breaker and the timeout (see [`Connections::run`]). Its
    /// future is smaller than `run`'s: a lookup's state holds it.
    pub(super) async fn query<T: redis::FromRedisValue>(
        &self,
        op: &'static str,
        cmd: &redis::Cmd,
    ) -> BackendResult<T> {
        let (probe, mut conn) = self.begin()?;
        let mut guard = ProbeGuard {
            breaker: &self.breaker,
            armed: probe,
        };
        let result = tokio::time::timeout(self.options.operation_timeout, async {
            use redis::aio::ConnectionLike as _;
            let value = conn.req_packed_command(cmd).await?.extract_error()?;
            Ok(redis::from_redis_value(value)?)
        })
        .await;
        guard.armed = false;
        self.end(op, result)
    }

    /// Runs one operation through the breaker and the timeout, classifying its failure.
    pub(super) async fn run<T, F, Fut>(&self, op: &'static str, f: F) -> BackendResult<T>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let (probe, conn) = self.begin()?;
        let mut guard = ProbeGuard {
            breaker: &self.breaker,
            armed: probe,
        };
        let result = tokio::time::timeout(self.options.operation_timeout, f(conn)).await;
        guard.armed = false;
        self.end(op, result)
    }

    /// An operation starts: whether it is the half-open breaker's probe, and the connection.
    fn begin(&self) -> BackendResult<(bool, Conn)> {
        let Some(probe) = self.breaker.acquire() else {
            return Err(BackendError::Unavailable(
                "circuit breaker open after repeated failures".to_owned(),
            ));
        };
        match self.connection() {
            Ok(conn) => Ok((probe, conn)),
            Err(e) => {
                if probe {
                    self.breaker.abandon_probe();
                }
                Err(e)
            }
        }
    }

    /// An operation ended: its result, its failure classified (and counted by the breaker).
    fn end<T>(
        &self,
        op: &'static str,
        result: Result<redis::RedisResult<T>, tokio::time::error::Elapsed>,
    ) -> BackendResult<T> {
        match result {
            Ok(Ok(v)) => {
                if self.breaker.success() {
                    tracing::info!(target: "cache_runtime", "redis is reachable again; caching resumed");
                }
                Ok(v)
            }
            Ok(Err(e)) if is_reply_error(&e) => {
                self.breaker.success();
                Err(BackendError::Data(e.to_string()))
            }
            Ok(Err(e)) => {
                let err = if e.is_timeout() {
                    BackendError::Timeout
                } else {
                    BackendError::Unavailable(e.to_string())
                };
                self.connectivity_failure(op, &err);
                Err(err)
            }
            Err(_elapsed) => {
                let err = BackendError::Timeout;
                self.connectivity_failure(op, &err);
                Err(err)
            }
        }
    }

    fn connectivity_failure(&self, op: &'static str, err: &BackendError) {
        let opened = self.breaker.failure();
        let kind = match err {
            BackendError::Timeout => FailureKind::Timeout,
            _ => FailureKind::Unavailable,
        };
        if opened {
            if let Some(hook) = self.on_open.get() {
                hook();
            }
            tracing::warn!(
                target: "cache_runtime",
                "redis {op} failed ({err}); circuit breaker open, calls bypass the cache and retry redis every {:?}",
                self.options.breaker_cooldown
            );
        } else {
            self.log.warn(
                kind,
                &format_args!("redis {op} failed ({err}); the call runs uncached"),
            );
        }
    }

    /// A connection of the caller's own, not shared with other operations (the write-behind
    /// worker's blocking reads hold theirs): connected before it is returned.
    pub(super) async fn own_connection(&self) -> redis::RedisResult<Conn> {
        let timeout = self.options.operation_timeout.max(Duration::from_secs(1));
        match &self.target {
            Target::Single(client) => {
                let config = redis::AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(timeout))
                    .set_response_timeout(None);
                Ok(Conn::Plain(
                    client
                        .get_multiplexed_async_connection_with_config(&config)
                        .await?,
                ))
            }
            Target::Cluster(client) => {
                let config = self.cluster_config();
                let connect = client.get_async_connection_with_config(config);
                match tokio::time::timeout(timeout, connect).await {
                    Ok(conn) => Ok(Conn::Cluster(conn?)),
                    Err(_) => Err(RedisError::from(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "connecting to the redis cluster timed out",
                    ))),
                }
            }
        }
    }

    /// The per-connection settings of a cluster connection (the client's retries are set
    /// when it is made, see `RedisBackend::cluster`).
    fn cluster_config(&self) -> redis::cluster::ClusterConfig {
        redis::cluster::ClusterConfig::new().set_connection_timeout(self.options.connect_timeout)
    }

    /// Whether the cache's Redis is a cluster.
    pub(super) fn is_cluster(&self) -> bool {
        matches!(self.target, Target::Cluster(_))
    }

    /// How long one operation may take.
    pub(super) fn operation_timeout(&self) -> Duration {
        self.options.operation_timeout
    }
}
