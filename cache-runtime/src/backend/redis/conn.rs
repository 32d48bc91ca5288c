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
//!
//! Behind Sentinel (`Target::Sentinel`), connections are made on the master the sentinels
//! named last (`sentinel::Resolver`) and remember its epoch: a connection whose master moved
//! is replaced on its runtime's next operation. The first operation waits (within the
//! operation timeout) for the first resolution; connectivity failures and `READONLY` /
//! `MASTERDOWN` replies ask for another one.

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

use super::sentinel::Resolver;
use super::{RedisOptions, tls};
use crate::backend::{BackendError, BackendResult};
use crate::breaker::{Breaker, FailureKind, FailureLog};

/// Where the cache's data lives (the Sentinel methods are in `sentinel.rs`).
#[derive(Clone)]
// One per cache, made once: its size does not matter.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Target {
    /// One Redis server, at a fixed address (or a proxy that looks like one).
    Single(redis::Client),
    /// The master the sentinels name (see `sentinel`).
    Sentinel(Arc<Resolver>),
    /// A Redis Cluster, reached through any of its nodes.
    Cluster(Box<ClusterTarget>),
}

/// `template`'s settings (credentials, TLS and its certificates) for the node at `host:port`.
pub(crate) fn info_at(
    template: &redis::ConnectionInfo,
    host: &str,
    port: u16,
) -> redis::ConnectionInfo {
    let addr = match template.addr() {
        redis::ConnectionAddr::TcpTls {
            insecure,
            tls_params,
            ..
        } => redis::ConnectionAddr::TcpTls {
            host: host.to_owned(),
            port,
            insecure: *insecure,
            tls_params: tls_params.clone(),
        },
        _ => redis::ConnectionAddr::Tcp(host.to_owned(), port),
    };
    template.clone().set_addr(addr)
}

/// A cluster: the client made from the seeds, and what makes another one.
#[derive(Clone)]
pub(crate) struct ClusterTarget {
    client: ClusterClient,
    /// The seeds as given (credentials, TLS): a new client's nodes are made from the first.
    seeds: Vec<redis::ConnectionInfo>,
    connect_timeout: Duration,
    /// The builder's certificates (for `rediss://` seeds).
    tls: tls::TlsConfig,
}

impl ClusterTarget {
    /// A client for the cluster whose nodes include `seeds`. Fails on an invalid URL only.
    pub(crate) fn new(
        seeds: Vec<redis::ConnectionInfo>,
        connect_timeout: Duration,
        tls: tls::TlsConfig,
    ) -> redis::RedisResult<Self> {
        let client = Self::client_for(seeds.clone(), connect_timeout, &tls)?;
        Ok(ClusterTarget {
            client,
            seeds,
            connect_timeout,
            tls,
        })
    }

    fn client_for(
        nodes: Vec<redis::ConnectionInfo>,
        connect_timeout: Duration,
        tls: &tls::TlsConfig,
    ) -> redis::RedisResult<ClusterClient> {
        let builder = redis::cluster::ClusterClientBuilder::new(nodes);
        #[cfg(feature = "tls")]
        let builder = if tls.is_set() {
            builder.certs(tls::certificates(tls))
        } else {
            builder
        };
        #[cfg(not(feature = "tls"))]
        let _ = tls;
        builder
            // Enough to follow `MOVED`/`ASK` and a slot-map refresh during a reshard or a
            // failover; never long: the operation's timer bounds the whole call anyway.
            .retries(3)
            .min_retry_wait(1)
            .max_retry_wait(100)
            .connection_timeout(connect_timeout)
            .build()
    }

    /// A client whose initial nodes are the cluster's nodes as last seen (`addrs`: host,
    /// port), then the seeds: a new connection must find the cluster even when every seed is
    /// down (redis-rs reads the slots from the initial nodes only).
    fn client_with(&self, addrs: &[(String, u16)]) -> Option<ClusterClient> {
        let template = self.seeds.first()?;
        let mut nodes: Vec<redis::ConnectionInfo> = addrs
            .iter()
            .map(|(host, port)| info_at(template, host, *port))
            .collect();
        nodes.extend(self.seeds.iter().cloned());
        Self::client_for(nodes, self.connect_timeout, &self.tls).ok()
    }
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
    /// The same, for the commands of one operation on the keys of one hash slot
    /// ([`Connections::run_for`]): each command and pipeline is sent to that slot's master,
    /// so redis-rs does not parse it again for its keys and hash the first one (about 800
    /// instructions a command, measured: BENCHMARKS.md, "Redis Cluster").
    ClusterSlot(ClusterConnection, u16),
}

/// The route to the master serving `slot` (redis-rs follows `MOVED`/`ASK` from there, as for
/// a command it routed itself).
fn master_of(slot: u16) -> redis::cluster_routing::SingleNodeRoutingInfo {
    use redis::cluster_routing::{Route, SingleNodeRoutingInfo, SlotAddr};
    SingleNodeRoutingInfo::SpecificNode(Route::new(slot, SlotAddr::Master))
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Plain(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
            Conn::ClusterSlot(c, slot) => Box::pin(c.route_command(
                cmd.clone(),
                redis::cluster_routing::RoutingInfo::SingleNode(master_of(*slot)),
            )),
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
            Conn::ClusterSlot(c, slot) => {
                Box::pin(c.route_pipeline(cmd.clone(), offset, count, master_of(*slot)))
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Plain(c) => c.get_db(),
            Conn::Cluster(c) | Conn::ClusterSlot(c, _) => c.get_db(),
        }
    }
}

impl Conn {
    /// Whether commands of different hash slots must go in different requests.
    pub(crate) fn is_cluster(&self) -> bool {
        matches!(self, Conn::Cluster(_) | Conn::ClusterSlot(..))
    }

    /// A cluster connection, whatever its routing.
    fn cluster(&self) -> Option<&ClusterConnection> {
        match self {
            Conn::Cluster(c) | Conn::ClusterSlot(c, _) => Some(c),
            Conn::Single(_) | Conn::Plain(_) => None,
        }
    }

    /// Sends `cmd` to the master that owns `slot` (a cluster), or to the server.
    pub(crate) async fn query_on_slot<T: redis::FromRedisValue>(
        &mut self,
        slot: u16,
        cmd: &Cmd,
    ) -> redis::RedisResult<T> {
        match self {
            Conn::Cluster(c) | Conn::ClusterSlot(c, _) => {
                let route = redis::cluster_routing::RoutingInfo::SingleNode(master_of(slot));
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
        let Some(cluster) = conn.cluster() else {
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
            send_following_redirects(cluster.clone(), pipe, held.len(), master_of(*slot))
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
/// slot moved: send them to its new master), `ASK` (those keys are being imported: send them
/// there, each after an `ASKING`) or `TRYAGAIN` (a multi-key command whose keys are split
/// between the two nodes: wait a little). Only the commands that answered so are sent again
/// (a `SET .. NX GET` the source served must not run a second time on the target, where its
/// key would then block the migration), and with them the group's `PUBLISH`es, so that an
/// invalidation frame also follows the change made on the new node.
async fn send_following_redirects(
    mut cluster: ClusterConnection,
    pipe: &Pipeline,
    count: usize,
    route: redis::cluster_routing::SingleNodeRoutingInfo,
) -> redis::RedisResult<Vec<Value>> {
    use redis::ServerErrorKind;
    use redis::cluster_routing::SingleNodeRoutingInfo;
    let cmds: Vec<&Cmd> = pipe.cmd_iter().collect();
    let is_publish = |cmd: &Cmd| matches!(cmd.args_iter().next(), Some(redis::Arg::Simple(name)) if name.eq_ignore_ascii_case(b"PUBLISH"));
    let mut replies: Vec<Option<Value>> = vec![None; count];
    let mut pending: Vec<usize> = (0..count.min(cmds.len())).collect();
    let (mut route, mut asking) = (route, false);
    let mut attempt = 0;
    loop {
        let mut sent = redis::pipe();
        for &i in &pending {
            if asking {
                sent.cmd("ASKING");
            }
            sent.add_command(cmds[i].clone());
        }
        let per = if asking { 2 } else { 1 };
        let got = cluster
            .route_pipeline(sent, 0, pending.len() * per, route.clone())
            .await?;
        let got: Vec<Value> = got.into_iter().skip(per - 1).step_by(per).collect();
        let mut redirect = None;
        let mut again = Vec::new();
        for (&i, value) in pending.iter().zip(got) {
            let kind = match &value {
                Value::ServerError(_) => match value.clone().extract_error() {
                    Err(e) => match e.kind() {
                        redis::ErrorKind::Server(
                            kind @ (ServerErrorKind::Moved
                            | ServerErrorKind::Ask
                            | ServerErrorKind::TryAgain),
                        ) => Some((kind, e.redirect_node().map(|(h, p)| (h.to_owned(), p)))),
                        _ => None,
                    },
                    Ok(_) => None,
                },
                _ => None,
            };
            replies[i] = Some(value);
            if let Some(found) = kind {
                again.push(i);
                redirect.get_or_insert(found);
            }
        }
        let Some((kind, node)) = redirect else {
            break;
        };
        if attempt >= REDIRECTS {
            break;
        }
        attempt += 1;
        // The group's `PUBLISH`es go again, after the commands sent again.
        let first = again[0];
        for (i, cmd) in cmds.iter().enumerate() {
            if i > first && is_publish(cmd) && !again.contains(&i) {
                again.push(i);
            }
        }
        again.sort_unstable();
        pending = again;
        match (kind, node) {
            (ServerErrorKind::TryAgain, _) => {
                tokio::time::sleep(Duration::from_millis(5 << attempt)).await;
            }
            (kind, Some((host, port))) => {
                route = SingleNodeRoutingInfo::ByAddress { host, port };
                asking = kind == ServerErrorKind::Ask;
            }
            _ => break,
        }
    }
    Ok(replies
        .into_iter()
        .map(|v| v.unwrap_or(Value::Nil))
        .collect())
}

/// The connection of one runtime.
struct Slot {
    runtime: Id,
    /// The master's epoch it was made for (`Target::epoch`; 0 but behind Sentinel).
    epoch: u64,
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
    /// On a cluster: a breaker per master, so that one unreachable master sends only its
    /// slots' calls to the function.
    shards: Option<Arc<Shards>>,
    /// On a cluster, once a connection was renewed: the client made from the nodes last seen
    /// (used instead of the seeds' from then on).
    renewed_client: ArcSwapOption<ClusterClient>,
}

/// A cluster's masters, as last read with `CLUSTER SLOTS`: which one serves each slot, and a
/// breaker for each. Operations on one key go through its master's breaker; the others (no
/// key, or keys of several slots) through the cache's. Until the table is first read, every
/// operation uses the cache's breaker.
struct Shards {
    table: ArcSwapOption<ShardTable>,
    /// The breaker of every master in the current table, by address.
    by_addr: Mutex<Vec<Arc<Node>>>,
    /// A new breaker's threshold and cooldown.
    template: (u32, Duration),
    epoch: std::time::Instant,
    /// When (ms since `epoch`) the table was last read, and the connection last renewed.
    refreshed: std::sync::atomic::AtomicU64,
    renewed: std::sync::atomic::AtomicU64,
    refreshing: std::sync::atomic::AtomicBool,
    /// The cache's namespace, once its breakers report as gauges (`Connections::report_as`):
    /// each master's breaker then reports as `cache_breaker_open{cache, node}`.
    report_as: OnceLock<String>,
}

/// A master and its breaker.
struct Node {
    addr: String,
    breaker: Breaker,
}

struct ShardTable {
    /// For each of the 16384 slots, an index into `nodes` (`u16::MAX`: not served).
    owner: Box<[u16]>,
    nodes: Vec<Arc<Node>>,
    /// Every node the table names, masters and replicas: where a new connection starts.
    addrs: Vec<(String, u16)>,
}

/// How often the table is read again while everything works.
const SHARDS_EVERY: Duration = Duration::from_secs(10);
/// At most one read of the table per this, after failures.
const SHARDS_AFTER_FAILURE: Duration = Duration::from_millis(500);

impl Shards {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// `at` in ms since `epoch`.
    fn ms_at(&self, at: std::time::Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_millis() as u64
    }

    /// Whether the table should be read again at `now_ms`: no read ran in the last `min_age`.
    #[inline]
    fn due(&self, now_ms: u64, min_age: Duration) -> bool {
        let last = self.refreshed.load(std::sync::atomic::Ordering::Acquire);
        last == 0 || now_ms.saturating_sub(last) >= min_age.as_millis() as u64
    }

    /// The breaker of the master serving `slot`, if known.
    fn node(&self, slot: u16) -> Option<Arc<Node>> {
        let table = self.table.load();
        let table = table.as_ref()?;
        let i = *table.owner.get(usize::from(slot))?;
        table.nodes.get(usize::from(i)).cloned()
    }

    /// Reads the table again in the background, unless a read is running or one finished
    /// less than `min_age` ago.
    fn refresh(self: &Arc<Self>, conn: &Conn, min_age: Duration, timeout: Duration) {
        use std::sync::atomic::Ordering::{AcqRel, Release};
        let Some(cluster) = conn.cluster() else {
            return;
        };
        if !self.due(self.now_ms(), min_age) {
            return;
        }
        if self.refreshing.swap(true, AcqRel) {
            return;
        }
        let (shards, mut cluster) = (self.clone(), cluster.clone());
        /// Clears `refreshing` however the task ends (its runtime may shut down first).
        struct Done(Arc<Shards>);
        impl Drop for Done {
            fn drop(&mut self) {
                self.0
                    .refreshing
                    .store(false, std::sync::atomic::Ordering::Release);
            }
        }
        let done = Done(shards.clone());
        tokio::spawn(async move {
            let _done = done;
            use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
            let read = tokio::time::timeout(
                timeout,
                cluster.route_command(
                    redis::cmd("CLUSTER").arg("SLOTS").clone(),
                    RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
                ),
            )
            .await;
            if let Ok(Ok(reply)) = read {
                if let Some(table) = shards.table_from(&reply) {
                    shards.table.store(Some(Arc::new(table)));
                }
            }
            shards.refreshed.store(shards.now_ms().max(1), Release);
        });
    }

    /// The table from a `CLUSTER SLOTS` reply: `[[start, end, [host, port, ..], replicas..]..]`.
    fn table_from(&self, reply: &Value) -> Option<ShardTable> {
        let Value::Array(ranges) = reply else {
            return None;
        };
        let mut owner = vec![u16::MAX; 16384].into_boxed_slice();
        let mut nodes: Vec<Arc<Node>> = Vec::new();
        let mut addrs: Vec<(String, u16)> = Vec::new();
        let mut known = self.by_addr.lock().unwrap_or_else(|e| e.into_inner());
        for range in ranges {
            let Value::Array(fields) = range else {
                continue;
            };
            let (Some(Value::Int(start)), Some(Value::Int(end)), Some(Value::Array(master))) =
                (fields.first(), fields.get(1), fields.get(2))
            else {
                continue;
            };
            let host = match master.first() {
                Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
                Some(Value::SimpleString(s)) => s.clone(),
                _ => continue,
            };
            let Some(Value::Int(port)) = master.get(1) else {
                continue;
            };
            for node in &fields[2..] {
                let Value::Array(node) = node else { continue };
                let host = match node.first() {
                    Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
                    Some(Value::SimpleString(s)) => s.clone(),
                    _ => continue,
                };
                if let (Some(Value::Int(p)), false) = (node.get(1), host.is_empty()) {
                    if let Ok(p) = u16::try_from(*p) {
                        if !addrs.iter().any(|(h, q)| *h == host && *q == p) {
                            addrs.push((host, p));
                        }
                    }
                }
            }
            let addr = format!("{host}:{port}");
            let index = match nodes.iter().position(|n| n.addr == addr) {
                Some(i) => i,
                None => {
                    let node = match known.iter().find(|n| n.addr == addr) {
                        Some(n) => n.clone(),
                        None => {
                            let template = &self.template;
                            let n = Arc::new(Node {
                                addr: addr.clone(),
                                breaker: Breaker::new(template.0, template.1),
                            });
                            if let Some(namespace) = self.report_as.get() {
                                n.breaker.report_as(namespace, Some(&addr));
                            }
                            known.push(n.clone());
                            n
                        }
                    };
                    nodes.push(node);
                    nodes.len() - 1
                }
            };
            let (start, end) = (
                (*start).clamp(0, 16383) as usize,
                (*end).clamp(0, 16383) as usize,
            );
            for slot in owner.iter_mut().take(end + 1).skip(start) {
                *slot = index as u16;
            }
        }
        // Masters that left the table (a failover, a pod restart: addresses change, the list
        // must not grow for ever) are forgotten, and their breaker's gauge retired: nothing is
        // sent through it any more, so an open one would never be probed and its
        // `cache_breaker_open` would stay 1. A master that returns gets a new, closed breaker.
        known.retain(|n| {
            let kept = nodes.iter().any(|m| Arc::ptr_eq(m, n));
            if !kept {
                n.breaker.retire();
            }
            kept
        });
        Some(ShardTable {
            owner,
            nodes,
            addrs,
        })
    }
}

/// Whether a Redis error means "the server answered, but not with what we wanted" (the key
/// holds another type, a script error, ...) rather than "we could not talk to the server".
///
/// A cluster's `CLUSTERDOWN` (a master is down and its slots are not served yet),
/// `MASTERDOWN` (a replica lost its master) and a node's `LOADING` are answers that say the
/// data cannot be reached now: unavailability, like a refused connection (the breaker counts
/// them, and the call runs uncached). `TRYAGAIN` (the keys of a multi-key command are split by
/// a slot migration in progress; `SlotPipe` retries it first) is a reply: the call runs
/// uncached, but a reshard does not open breakers.
fn is_reply_error(e: &RedisError) -> bool {
    use redis::ServerErrorKind as S;
    match e.kind() {
        RedisKind::Server(S::ClusterDown | S::MasterDown | S::BusyLoading) => false,
        RedisKind::Server(_) | RedisKind::Extension | RedisKind::UnexpectedReturnType => true,
        _ => false,
    }
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
        let shards = matches!(target, Target::Cluster(_)).then(|| {
            Arc::new(Shards {
                table: ArcSwapOption::empty(),
                by_addr: Mutex::new(Vec::new()),
                template: (options.breaker_threshold, options.breaker_cooldown),
                epoch: std::time::Instant::now(),
                refreshed: std::sync::atomic::AtomicU64::new(0),
                renewed: std::sync::atomic::AtomicU64::new(0),
                refreshing: std::sync::atomic::AtomicBool::new(false),
                report_as: OnceLock::new(),
            })
        });
        Connections {
            shards,
            renewed_client: ArcSwapOption::empty(),
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

    /// Reports the breakers' states as `cache_breaker_open` gauges of the cache named
    /// `namespace` (feature `metrics`): the cache's breaker now, on a cluster each master's
    /// breaker (with its address as `node`) when the slot table first names the master.
    pub(super) fn report_as(&self, namespace: &str) {
        self.breaker.report_as(namespace, None);
        if let Some(shards) = &self.shards {
            let _ = shards.report_as.set(namespace.to_owned());
        }
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
            if slot.runtime == runtime && slot.epoch == self.target.epoch() {
                return Ok(slot.manager.clone());
            }
        }
        self.connection_slow(&handle, runtime)
    }

    #[cold]
    fn connection_slow(&self, handle: &Handle, runtime: Id) -> BackendResult<Conn> {
        let epoch = match &self.target {
            Target::Sentinel(r) => match r.current() {
                Some(master) => {
                    r.ensure_watcher();
                    master.epoch
                }
                None => {
                    return Err(BackendError::Unavailable(
                        "no master named by the sentinels yet".to_owned(),
                    ));
                }
            },
            _ => 0,
        };
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        // Connections of runtimes that have shut down are dead, those to a former master
        // useless: drop them.
        slots.retain(|s| !s.alive.is_finished() && s.epoch == epoch);
        if let Some(slot) = slots.iter().find(|s| s.runtime == runtime) {
            self.current.store(Some(slot.clone()));
            return Ok(slot.manager.clone());
        }
        let single = |client: redis::Client| {
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(self.options.connect_timeout))
                // No response timeout in redis-rs: `run` bounds the whole operation
                // (including a wait for a reconnection) with one timer, instead of two
                // timers per command.
                .set_response_timeout(None)
                // One attempt per reconnection; the breaker paces the attempts.
                .set_number_of_retries(0);
            ConnectionManager::new_lazy_with_config(client, config)
                .map(Conn::Single)
                .map_err(|e| BackendError::Unavailable(e.to_string()))
        };
        let manager = match &self.target {
            Target::Single(client) => single(client.clone())?,
            Target::Sentinel(r) => match r.current() {
                Some(master) if master.epoch == epoch => single(master.client.clone())?,
                _ => {
                    return Err(BackendError::Unavailable(
                        "the sentinels' master changed; retry".to_owned(),
                    ));
                }
            },
            // Connects in the background: the first operations wait for it, bounded by
            // their timer, as with the lazy `ConnectionManager`.
            Target::Cluster(cluster) => {
                let config = self.cluster_config();
                Conn::Cluster(match &*self.renewed_client.load() {
                    Some(client) => client.get_pending_async_connection_with_config(config),
                    None => cluster
                        .client
                        .get_pending_async_connection_with_config(config),
                })
            }
        };
        let slot = Arc::new(Slot {
            runtime,
            epoch,
            manager: manager.clone(),
            alive: handle.spawn(std::future::pending()),
        });
        slots.push(slot.clone());
        self.current.store(Some(slot));
        Ok(manager)
    }

    /// Sends one command on `key` (and keys of its slot) through the breaker and the timeout
    /// (see [`Connections::run`]); on a cluster, through the breaker of `key`'s master. Its
    /// future is smaller than `run`'s: a lookup's state holds it.
    pub(super) async fn query_for<T: redis::FromRedisValue>(
        &self,
        key: &str,
        op: &'static str,
        cmd: redis::Cmd,
    ) -> BackendResult<T> {
        let (slot, node) = self.route(key);
        let breaker = node.as_deref().map_or(&*self.breaker, |n| &n.breaker);
        self.query_with(breaker, node.as_deref(), slot, op, cmd)
            .await
    }

    async fn query_with<T: redis::FromRedisValue>(
        &self,
        breaker: &Breaker,
        node: Option<&Node>,
        slot: Option<u16>,
        op: &'static str,
        cmd: redis::Cmd,
    ) -> BackendResult<T> {
        let (probe, mut conn) = self.begin(breaker, op).await?;
        let mut guard = ProbeGuard {
            breaker,
            armed: probe,
        };
        let started = tokio::time::Instant::now();
        let result = tokio::time::timeout_at(self.deadline(started), async {
            use redis::aio::ConnectionLike as _;
            let value = match (&mut conn, slot) {
                // The slot is known: sent to its master as it is (no copy of the command,
                // no second parse and hash of its key by redis-rs). Boxed, as redis-rs boxes
                // it in `req_packed_command`: the single Redis's future stays as it was.
                (Conn::Cluster(c), Some(slot)) => {
                    let route = redis::cluster_routing::RoutingInfo::SingleNode(master_of(slot));
                    Box::pin(c.route_command(cmd, route)).await?
                }
                (conn, _) => conn.req_packed_command(&cmd).await?,
            };
            Ok(redis::from_redis_value(value.extract_error()?)?)
        })
        .await;
        guard.armed = false;
        drop(conn);
        self.end(op, result, breaker, node, started)
    }

    /// When an operation started at `started` times out (as `tokio::time::timeout` computes
    /// it; its start is kept for `end`, which then reads no clock).
    fn deadline(&self, started: tokio::time::Instant) -> tokio::time::Instant {
        started
            .checked_add(self.options.operation_timeout)
            // What `tokio::time::timeout` uses when the sum overflows: about 30 years.
            .unwrap_or_else(|| started + Duration::from_secs(86400 * 365 * 30))
    }

    /// Runs one operation through the breaker and the timeout, classifying its failure.
    pub(super) async fn run<T, F, Fut>(&self, op: &'static str, f: F) -> BackendResult<T>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        self.run_with(&self.breaker, None, None, op, f).await
    }

    /// [`Self::run`] of an operation on `key` (and keys of its slot): on a cluster, through
    /// the breaker of `key`'s master.
    pub(super) async fn run_for<T, F, Fut>(
        &self,
        key: &str,
        op: &'static str,
        f: F,
    ) -> BackendResult<T>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let (slot, node) = self.route(key);
        let breaker = node.as_deref().map_or(&*self.breaker, |n| &n.breaker);
        self.run_with(breaker, node.as_deref(), slot, op, f).await
    }

    /// `slot`: on a cluster, the hash slot of every key `f` uses; its commands are sent to that
    /// slot's master (`Conn::ClusterSlot`).
    async fn run_with<T, F, Fut>(
        &self,
        breaker: &Breaker,
        node: Option<&Node>,
        slot: Option<u16>,
        op: &'static str,
        f: F,
    ) -> BackendResult<T>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let (probe, conn) = self.begin(breaker, op).await?;
        let conn = match (conn, slot) {
            (Conn::Cluster(c), Some(slot)) => Conn::ClusterSlot(c, slot),
            (conn, _) => conn,
        };
        let mut guard = ProbeGuard {
            breaker,
            armed: probe,
        };
        let started = tokio::time::Instant::now();
        let result = tokio::time::timeout_at(self.deadline(started), f(conn)).await;
        guard.armed = false;
        self.end(op, result, breaker, node, started)
    }

    /// On a cluster: `key`'s hash slot, and the master serving it if the table is known.
    fn route(&self, key: &str) -> (Option<u16>, Option<Arc<Node>>) {
        let Some(shards) = &self.shards else {
            return (None, None);
        };
        let slot = crate::key::key_slot(key);
        (Some(slot), shards.node(slot))
    }

    /// The current runtime's connection if it has one (none is made).
    fn current_connection(&self) -> Option<Conn> {
        let runtime = Handle::try_current().ok()?.id();
        if let Some(slot) = &*self.current.load() {
            if slot.runtime == runtime {
                return Some(slot.manager.clone());
            }
        }
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots
            .iter()
            .find(|s| s.runtime == runtime)
            .map(|s| s.manager.clone())
    }

    /// An operation starts: whether it is the half-open breaker's probe, and the connection.
    async fn begin(&self, breaker: &Breaker, op: &'static str) -> BackendResult<(bool, Conn)> {
        let Some(probe) = breaker.acquire() else {
            return Err(BackendError::Unavailable(
                "circuit breaker open after repeated failures".to_owned(),
            ));
        };
        // Until the caller holds its own guard: a probe dropped while it waits for the first
        // resolution (the caller cancelled) is given back, or the breaker would stay
        // half-open with nobody probing.
        let mut guard = ProbeGuard {
            breaker,
            armed: probe,
        };
        match self.connection() {
            Ok(conn) => {
                guard.armed = false;
                Ok((probe, conn))
            }
            // Sentinel, no master known yet: wait for the first resolution (boxed: rare, and
            // every operation's future holds this one's state).
            Err(_) if matches!(&self.target, Target::Sentinel(r) if r.epoch() == 0) => {
                let first = Box::pin(self.first_master()).await;
                guard.armed = false;
                match first {
                    Ok(conn) => Ok((probe, conn)),
                    Err(e) => {
                        // Counted (a probe's failure opens the breaker again).
                        self.connectivity_failure(op, &e, breaker, None);
                        Err(e)
                    }
                }
            }
            // The guard gives the probe back.
            Err(e) => Err(e),
        }
    }

    /// Sentinel: the connection once the first resolution found the master, waiting at most
    /// the operation timeout.
    async fn first_master(&self) -> BackendResult<Conn> {
        if let Target::Sentinel(r) = &self.target {
            r.first(self.options.operation_timeout)
                .await
                .map_err(BackendError::Unavailable)?;
        }
        self.connection()
    }

    /// An operation ended: its result, its failure classified (and counted by the breaker).
    /// `started`: when it was sent.
    fn end<T>(
        &self,
        op: &'static str,
        result: Result<redis::RedisResult<T>, tokio::time::error::Elapsed>,
        breaker: &Breaker,
        node: Option<&Node>,
        started: tokio::time::Instant,
    ) -> BackendResult<T> {
        match result {
            Ok(Ok(v)) => {
                if breaker.success() {
                    match node {
                        Some(n) => {
                            tracing::info!(target: "cache_runtime", "redis node {} is reachable again; caching of its slots resumed", n.addr)
                        }
                        None => {
                            tracing::info!(target: "cache_runtime", "redis is reachable again; caching resumed")
                        }
                    }
                }
                if let Some(shards) = &self.shards {
                    // The time the operation started, not a clock read per operation.
                    if shards.due(shards.ms_at(started.into_std()), SHARDS_EVERY) {
                        self.refresh_shards(shards, SHARDS_EVERY);
                    }
                }
                Ok(v)
            }
            // Sentinel: this server is no longer the master (`READONLY`: demoted).
            Ok(Err(e)) if self.target.wrong_master(&e) => {
                let err = BackendError::Unavailable(format!("{e} (not the master any more)"));
                self.connectivity_failure(op, &err, breaker, node);
                Err(err)
            }
            // Refused credentials (`NOAUTH` is a reply) count as unavailability; see `tls`.
            Ok(Err(e)) if is_reply_error(&e) && !tls::is_refusal(&e) => {
                breaker.success();
                Err(BackendError::Data(e.to_string()))
            }
            Ok(Err(e)) => {
                if tls::breaks_the_manager(&e) {
                    self.drop_connection();
                }
                let err = if e.is_timeout() {
                    BackendError::Timeout
                } else {
                    BackendError::Unavailable(tls::describe(&e, self.user_client()))
                };
                self.connectivity_failure(op, &err, breaker, node);
                Err(err)
            }
            Err(_elapsed) => {
                let err = BackendError::Timeout;
                self.connectivity_failure(op, &err, breaker, node);
                Err(err)
            }
        }
    }

    /// On a cluster, after a connectivity failure: the table is read again, and the runtime's
    /// connection is replaced (at most once per breaker cooldown). redis-rs moves a slot to
    /// another node only when a node answers `MOVED`, which a dead master never does: without
    /// a new connection, which reads the slots afresh, the calls of a failed-over master's
    /// slots would keep going to its address.
    fn cluster_failure(&self) {
        use std::sync::atomic::Ordering::{AcqRel, Acquire};
        let Some(shards) = &self.shards else {
            return;
        };
        self.refresh_shards(shards, SHARDS_AFTER_FAILURE);
        let now = shards.now_ms().max(1);
        let last = shards.renewed.load(Acquire);
        if now.saturating_sub(last) < self.options.breaker_cooldown.as_millis() as u64 && last != 0
        {
            return;
        }
        if shards
            .renewed
            .compare_exchange(last, now, AcqRel, Acquire)
            .is_err()
        {
            return;
        }
        if let (Target::Cluster(cluster), Some(table)) = (&self.target, &*shards.table.load()) {
            if let Some(client) = cluster.client_with(&table.addrs) {
                self.renewed_client.store(Some(Arc::new(client)));
            }
        }
        if let Ok(handle) = Handle::try_current() {
            let runtime = handle.id();
            let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            slots.retain(|s| s.runtime != runtime);
            self.current.store(None);
        }
    }

    /// Reads the cluster's table again in the background, on the current runtime's connection
    /// (see [`Shards::refresh`]).
    #[cold]
    fn refresh_shards(&self, shards: &Arc<Shards>, min_age: Duration) {
        if let Some(conn) = self.current_connection() {
            let timeout = self.options.operation_timeout.max(Duration::from_secs(1));
            shards.refresh(&conn, min_age, timeout);
        }
    }

    /// Forgets the current runtime's connection: the next operation (the breaker's probe)
    /// makes a new one. For a `ConnectionManager` that will not reconnect by itself (see
    /// `tls::breaks_the_manager`).
    #[cold]
    fn drop_connection(&self) {
        let Ok(handle) = Handle::try_current() else {
            return;
        };
        let runtime = handle.id();
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.retain(|s| s.runtime != runtime);
        if self
            .current
            .load()
            .as_ref()
            .is_some_and(|s| s.runtime == runtime)
        {
            self.current.store(None);
        }
    }

    /// A client whose URL names the user (for messages about refused credentials).
    fn user_client(&self) -> Option<&redis::Client> {
        match &self.target {
            Target::Single(client) => Some(client),
            Target::Sentinel(_) | Target::Cluster(_) => None,
        }
    }

    fn connectivity_failure(
        &self,
        op: &'static str,
        err: &BackendError,
        breaker: &Breaker,
        node: Option<&Node>,
    ) {
        self.cluster_failure();
        // Sentinel: the master may have moved.
        self.target.suspect();
        let opened = breaker.failure();
        let kind = match err {
            BackendError::Timeout => FailureKind::Timeout,
            _ => FailureKind::Unavailable,
        };
        if opened {
            if let Some(hook) = self.on_open.get() {
                hook();
            }
            match node {
                Some(n) => tracing::warn!(
                    target: "cache_runtime",
                    "redis {op} failed on node {} ({err}); its circuit breaker is open: calls on its slots bypass the cache and retry it every {:?}",
                    n.addr,
                    self.options.breaker_cooldown
                ),
                None => tracing::warn!(
                    target: "cache_runtime",
                    "redis {op} failed ({err}); circuit breaker open, calls bypass the cache and retry redis every {:?}",
                    self.options.breaker_cooldown
                ),
            }
        } else {
            self.log.warn(
                kind,
                &format_args!("redis {op} failed ({err}); the call runs uncached"),
            );
        }
    }

    /// Whether the cache's Redis is a cluster.
    pub(super) fn is_cluster(&self) -> bool {
        matches!(self.target, Target::Cluster(_))
    }

    /// A connection of the caller's own, not shared with other operations (the write-behind
    /// worker's blocking reads hold theirs): connected before it is returned.
    pub(super) async fn own_connection(&self) -> redis::RedisResult<Conn> {
        let timeout = self.options.operation_timeout.max(Duration::from_secs(1));
        match &self.target {
            Target::Single(_) | Target::Sentinel(_) => {
                // Behind Sentinel: the current master (waiting for the first resolution).
                let (client, _) = self.target.client(timeout).await?;
                let config = redis::AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(timeout))
                    .set_response_timeout(None);
                Ok(Conn::Plain(
                    client
                        .get_multiplexed_async_connection_with_config(&config)
                        .await?,
                ))
            }
            Target::Cluster(cluster) => {
                let config = self.cluster_config();
                let client = match &*self.renewed_client.load() {
                    Some(client) => ClusterClient::clone(client),
                    None => cluster.client.clone(),
                };
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

    /// What connections are made to (for connections of their own: the bus).
    pub(super) fn target(&self) -> &Target {
        &self.target
    }

    /// How long one operation may take.
    pub(super) fn operation_timeout(&self) -> Duration {
        self.options.operation_timeout
    }
}

#[cfg(all(test, feature = "metrics"))]
mod tests {
    use super::*;
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    fn shards() -> Shards {
        Shards {
            table: ArcSwapOption::empty(),
            by_addr: Mutex::new(Vec::new()),
            template: (1, Duration::from_secs(3600)),
            epoch: std::time::Instant::now(),
            refreshed: std::sync::atomic::AtomicU64::new(0),
            renewed: std::sync::atomic::AtomicU64::new(0),
            refreshing: std::sync::atomic::AtomicBool::new(false),
            report_as: OnceLock::from("ns".to_owned()),
        }
    }

    /// A `CLUSTER SLOTS` reply: each `(start, end, port)` served by `127.0.0.1:port`.
    fn slots(ranges: &[(i64, i64, i64)]) -> Value {
        Value::Array(
            ranges
                .iter()
                .map(|&(start, end, port)| {
                    Value::Array(vec![
                        Value::Int(start),
                        Value::Int(end),
                        Value::Array(vec![
                            Value::BulkString(b"127.0.0.1".to_vec()),
                            Value::Int(port),
                        ]),
                    ])
                })
                .collect(),
        )
    }

    /// The `cache_breaker_open` gauge of each node, by node.
    fn gauges(snapshotter: &metrics_util::debugging::Snapshotter) -> Vec<(String, f64)> {
        let mut out: Vec<(String, f64)> = snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .filter(|(key, ..)| key.key().name() == "cache_breaker_open")
            .filter_map(|(key, _, _, value)| {
                let node = key.key().labels().find(|l| l.key() == "node")?;
                let DebugValue::Gauge(v) = value else {
                    return None;
                };
                Some((node.value().to_owned(), v.into_inner()))
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    #[test]
    fn a_master_that_leaves_the_table_stops_reporting_its_breaker_open() {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        metrics::with_local_recorder(&recorder, || {
            let shards = shards();
            let table = shards
                .table_from(&slots(&[(0, 8191, 7000), (8192, 16383, 7001)]))
                .unwrap();
            assert_eq!(
                gauges(&snapshotter),
                [
                    ("127.0.0.1:7000".to_owned(), 0.0),
                    ("127.0.0.1:7001".to_owned(), 0.0)
                ]
            );
            // The master of 7001 fails: its breaker opens.
            let dead = table.nodes[usize::from(table.owner[9000])].clone();
            assert_eq!(dead.addr, "127.0.0.1:7001");
            assert!(dead.breaker.failure());
            assert_eq!(gauges(&snapshotter)[1], ("127.0.0.1:7001".to_owned(), 1.0));

            // Failover: a replica (7002) takes its slots; the dead master leaves the table.
            shards
                .table_from(&slots(&[(0, 8191, 7000), (8192, 16383, 7002)]))
                .unwrap();
            assert_eq!(
                gauges(&snapshotter),
                [
                    ("127.0.0.1:7000".to_owned(), 0.0),
                    ("127.0.0.1:7001".to_owned(), 0.0),
                    ("127.0.0.1:7002".to_owned(), 0.0)
                ],
                "the departed master's gauge is retired to 0"
            );
            let known = shards.by_addr.lock().unwrap();
            assert!(
                known.iter().all(|n| n.addr != "127.0.0.1:7001"),
                "forgotten"
            );
            drop(known);
            // An operation still in flight on the old breaker does not report any more.
            dead.breaker.failure();
            assert_eq!(gauges(&snapshotter)[1].1, 0.0);

            // It returns as a master (of part of the slots): a new breaker, which reports.
            let table = shards
                .table_from(&slots(&[
                    (0, 8191, 7000),
                    (8192, 9999, 7002),
                    (10000, 16383, 7001),
                ]))
                .unwrap();
            let back = table.nodes[usize::from(table.owner[12000])].clone();
            assert_eq!(back.addr, "127.0.0.1:7001");
            assert!(!Arc::ptr_eq(&back, &dead));
            assert_eq!(gauges(&snapshotter)[1].1, 0.0);
            assert!(back.breaker.failure());
            assert_eq!(gauges(&snapshotter)[1], ("127.0.0.1:7001".to_owned(), 1.0));
        });
    }
}
