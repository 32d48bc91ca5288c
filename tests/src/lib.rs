//! Test support: unique namespaces on the shared Redis, and private `redis-server` processes
//! that a test may kill and restart.
//!
//! Nothing here flushes or scans the shared Redis: every test works in its own namespace.

use std::hash::{BuildHasher, RandomState};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

mod tls;
pub use tls::TestCerts;

/// The shared Redis: `REDIS_URL`, or `redis://127.0.0.1:6379`.
pub fn redis_url() -> String {
    std::env::var("REDIS_URL")
        .ok()
        .filter(|u| !u.trim().is_empty())
        .unwrap_or_else(|| "redis://127.0.0.1:6379".to_owned())
}

/// A namespace no other test (or test run) uses: `test:<name>:<random>`.
pub fn unique_namespace(name: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let random = RandomState::new().hash_one((std::process::id(), n, Instant::now()));
    format!("test:{name}:{random:016x}")
}

/// A connection to `url` for inspecting what the cache wrote (`PTTL`, raw `GET`), or for
/// planting garbage.
pub async fn raw_connection(url: &str) -> redis::aio::MultiplexedConnection {
    let client = redis::Client::open(url).expect("valid redis url");
    tokio::time::timeout(
        Duration::from_secs(5),
        client.get_multiplexed_async_connection(),
    )
    .await
    .expect("redis answers within 5 s")
    .unwrap_or_else(|e| panic!("cannot connect to redis at {url}: {e}"))
}

/// Runs the test `test` (`module::name`) of the current test binary in a child process, with
/// `env` set and `REDIS_URL` passed on, its output piped: how the multi-process tests start
/// their worker processes (each worker test is a no-op unless its variable is set).
pub fn spawn_test_worker(test: &str, env: &[(&str, String)]) -> Child {
    let mut cmd = Command::new(std::env::current_exe().expect("the test binary"));
    cmd.args([test, "--exact", "--nocapture", "--test-threads=1"]);
    for (name, value) in env {
        cmd.env(name, value);
    }
    cmd.env("REDIS_URL", redis_url())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn a worker process")
}

/// The PostgreSQL the write-behind tests apply writes to: `PG_URL` (a libpq-style
/// connection string or URL), or the local server's `test` database.
pub fn pg_url() -> String {
    std::env::var("PG_URL")
        .ok()
        .filter(|u| !u.trim().is_empty())
        .unwrap_or_else(|| "host=127.0.0.1 port=5432 user=postgres dbname=test".to_owned())
}

/// A loopback port nobody listens on right now, not handed out before by this process, and
/// below the kernel's ephemeral range (`/proc/sys/net/ipv4/ip_local_port_range`): a port in
/// that range can be taken by an outgoing connection's local end between this check and the
/// server's bind ("Address already in use"), which a cluster of 12 ports met. A random port
/// in [10000, the range's low end); a port from the kernel (`:0`) if the range is unknown
/// or too low.
pub fn free_port() -> u16 {
    use std::collections::HashSet;
    use std::sync::Mutex;
    static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    const LOW: u16 = 10000;
    let bindable = |port: u16| TcpListener::bind(("127.0.0.1", port)).is_ok();
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    let given = given.get_or_insert_with(HashSet::new);
    if let Some(high) = ephemeral_low().filter(|&high| high > LOW + 2000) {
        let span = u64::from(high - LOW);
        for attempt in 0u64..1000 {
            let random = RandomState::new().hash_one((std::process::id(), attempt, Instant::now()));
            let port = LOW + (random % span) as u16;
            if !given.contains(&port) && bindable(port) {
                given.insert(port);
                return port;
            }
        }
    }
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free loopback port");
        if given.insert(port) {
            return port;
        }
    }
}

/// The low end of the kernel's ephemeral port range, if readable.
fn ephemeral_low() -> Option<u16> {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The `redis-server` binary: `REDIS_SERVER`, else from `PATH`.
fn redis_server_binary() -> PathBuf {
    redis_binary("REDIS_SERVER", "redis-server")
}

/// The `redis-cli` binary: `REDIS_CLI`, else next to `REDIS_SERVER`, else from `PATH`.
fn redis_cli_binary() -> PathBuf {
    if std::env::var_os("REDIS_CLI").is_none() {
        if let Some(dir) = std::env::var_os("REDIS_SERVER")
            .map(PathBuf::from)
            .and_then(|p| p.parent().map(PathBuf::from))
        {
            let candidate = dir.join("redis-cli");
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    redis_binary("REDIS_CLI", "redis-cli")
}

/// A Redis binary: the path in `var`, else `name` from `PATH` or the usual directories.
fn redis_binary(var: &str, name: &str) -> PathBuf {
    if let Ok(p) = std::env::var(var) {
        return PathBuf::from(p);
    }
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let candidate = PathBuf::from(dir).join(name);
        if candidate.is_file() {
            return candidate;
        }
    }
    for dir in ["/usr/bin", "/usr/local/bin", "/usr/sbin"] {
        let candidate = PathBuf::from(dir).join(name);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!("{name} not found: install it (apt-get install -y redis-server) or set {var}")
}

/// A private `redis-server` on a free loopback port, killed when dropped.
pub struct RedisServer {
    port: u16,
    child: Option<Child>,
    /// Arguments besides the port and the common ones (cluster mode).
    extra_args: Vec<String>,
    /// A directory of this server's own (a cluster node's `nodes.conf`), removed when dropped.
    dir: Option<PathBuf>,
}

impl RedisServer {
    /// Starts a server on a free port and waits until it answers.
    pub fn start() -> RedisServer {
        let mut server = RedisServer {
            port: free_port(),
            child: None,
            extra_args: Vec::new(),
            dir: None,
        };
        server.restart();
        server
    }

    /// Starts a server with extra `redis-server` arguments (`["--maxmemory", "4mb"]`).
    pub fn start_with(args: &[&str]) -> RedisServer {
        let mut server = RedisServer {
            port: free_port(),
            child: None,
            extra_args: args.iter().map(|a| (*a).to_owned()).collect(),
            dir: None,
        };
        server.restart();
        server
    }

    /// Starts a server that keeps its data on disk: AOF with `appendfsync always`, in a
    /// directory of its own (removed when dropped). After [`kill`](Self::kill) (SIGKILL),
    /// [`restart`](Self::restart) brings back every write it acknowledged.
    pub fn start_durable() -> RedisServer {
        static DIRS: AtomicU64 = AtomicU64::new(0);
        let port = free_port();
        let dir = std::env::temp_dir().join(format!(
            "cache-tests-aof-{}-{}-{}",
            std::process::id(),
            port,
            DIRS.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create the durable server's directory");
        let mut server = RedisServer {
            port,
            child: None,
            extra_args: vec![
                "--appendonly".into(),
                "yes".into(),
                "--appendfsync".into(),
                "always".into(),
                "--dir".into(),
                dir.to_string_lossy().into_owned(),
            ],
            dir: Some(dir),
        };
        server.restart();
        server
    }

    /// Starts a Redis Cluster node (`--cluster-enabled yes`) on a free port, assigns every
    /// hash slot to it and waits until `CLUSTER INFO` reports `cluster_state:ok`.
    ///
    /// A plain (non-cluster) client can use it like any server, but it enforces the cluster's
    /// rules: a command or script whose keys are in different hash slots fails with
    /// `CROSSSLOT`.
    pub fn start_cluster_node() -> RedisServer {
        let server = RedisServer::start_unassigned_cluster_node(&[]);
        server.assign_all_slots();
        server
    }

    /// Starts a Redis Cluster node (`--cluster-enabled yes`, plus `extra` arguments) on a free
    /// port, owning no slot yet: a member for [`RedisCluster`].
    fn start_unassigned_cluster_node(extra: &[&str]) -> RedisServer {
        static NODES: AtomicU64 = AtomicU64::new(0);
        let port = free_port();
        let dir = std::env::temp_dir().join(format!(
            "cache-tests-node-{}-{}-{}",
            std::process::id(),
            port,
            NODES.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create the cluster node's directory");
        let nodes_conf = dir.join("nodes.conf").to_string_lossy().into_owned();
        let mut server = RedisServer {
            port,
            child: None,
            extra_args: vec![
                "--cluster-enabled".into(),
                "yes".into(),
                "--cluster-config-file".into(),
                nodes_conf,
                // The bus port defaults to port + 10000, which may be taken or above 65535.
                "--cluster-port".into(),
                free_port().to_string(),
                "--dir".into(),
                dir.to_string_lossy().into_owned(),
            ]
            .into_iter()
            .chain(extra.iter().map(|a| (*a).to_owned()))
            .collect(),
            dir: Some(dir),
        };
        server.restart();
        server
    }

    /// `CLUSTER ADDSLOTSRANGE 0 16383`, then waits for `cluster_state:ok`.
    fn assign_all_slots(&self) {
        let client = redis::Client::open(self.url()).expect("valid redis url");
        let mut conn = client
            .get_connection_with_timeout(Duration::from_secs(5))
            .expect("connect to the cluster node");
        let _: () = redis::cmd("CLUSTER")
            .arg("ADDSLOTSRANGE")
            .arg(0)
            .arg(16383)
            .query(&mut conn)
            .expect("CLUSTER ADDSLOTSRANGE 0 16383");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let info: String = redis::cmd("CLUSTER")
                .arg("INFO")
                .query(&mut conn)
                .expect("CLUSTER INFO");
            if info.lines().any(|l| l.trim() == "cluster_state:ok") {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "cluster node on port {} did not reach cluster_state:ok: {info}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The server's URL (`rediss://` for a TLS server, see [`RedisServer::start_tls`]).
    pub fn url(&self) -> String {
        let scheme = if self.is_tls() { "rediss" } else { "redis" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// The server's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the server with SIGKILL (no shutdown, nothing saved).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port (after [`kill`](Self::kill)), and waits until
    /// it answers.
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let child = Command::new(redis_server_binary())
                .args(["--port", &self.port.to_string()])
                .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .args(["--protected-mode", "no", "--loglevel", "warning"])
                .args(&self.extra_args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn redis-server");
            self.child = Some(child);
            if self.wait_ready(Duration::from_secs(3)) {
                return;
            }
            // The port may still be held by the killed process's socket; try again.
            self.kill();
            assert!(
                Instant::now() < deadline,
                "redis-server did not start on port {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn wait_ready(&mut self, timeout: Duration) -> bool {
        use std::io::{Read, Write};
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(_)) = child.try_wait() {
                    return false; // exited: port in use, say
                }
            }
            if self.is_tls() {
                // Listening is enough: a plain PING cannot cross TLS (nor an ACL without the
                // default user).
                if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) {
                let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
                if s.write_all(b"PING\r\n").is_ok() {
                    let mut buf = [0u8; 7];
                    // `-NOAUTH`: up, with an ACL that disables the default user.
                    if s.read_exact(&mut buf).is_ok()
                        && (&buf == b"+PONG\r\n" || &buf == b"-NOAUTH")
                    {
                        return true;
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        if let Some(dir) = self.dir.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// One node of `CLUSTER NODES`: its id, port, whether it is a (live) master, its slot ranges.
type NodeRow = (String, u16, bool, Vec<(u16, u16)>);

/// A private Redis Cluster of 3 masters and 3 replicas on free loopback ports (the Rust twin
/// of `scripts/redis-cluster`), every node killed (by its PID) and its directory removed when
/// dropped. A node's failure is noticed after 2 s (`cluster-node-timeout 2000`), so a killed
/// master's replica is promoted within a few seconds.
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// The number of nodes: 3 masters, each with one replica.
    pub const NODES: usize = 6;

    /// Starts six nodes, joins them with `redis-cli --cluster create --cluster-replicas 1`,
    /// and waits until every node reports `cluster_state:ok` and every replica is in sync.
    pub fn start() -> RedisCluster {
        Self::start_with(&[])
    }

    /// [`start`](Self::start) with more `redis-server` arguments for every node (e.g.
    /// `--cluster-require-full-coverage no`).
    pub fn start_with(extra: &[&str]) -> RedisCluster {
        let args: Vec<&str> = ["--cluster-node-timeout", "2000"]
            .into_iter()
            .chain(extra.iter().copied())
            .collect();
        let nodes: Vec<RedisServer> = (0..Self::NODES)
            .map(|_| RedisServer::start_unassigned_cluster_node(&args))
            .collect();
        Self::join(nodes)
    }

    /// Joins six unassigned nodes into a cluster (3 masters, 3 replicas) and waits until it
    /// is ready.
    fn join(nodes: Vec<RedisServer>) -> RedisCluster {
        let cluster = RedisCluster { nodes };
        let output = Command::new(redis_cli_binary())
            .arg("--cluster")
            .arg("create")
            .args(
                cluster
                    .nodes
                    .iter()
                    .map(|n| format!("127.0.0.1:{}", n.port())),
            )
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            output.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        for node in &cluster.nodes {
            loop {
                let info = node.query_text(&["CLUSTER", "INFO"]);
                let replication = node.query_text(&["INFO", "replication"]);
                let ok = has_line(&info, "cluster_state:ok")
                    && (has_line(&replication, "master_link_status:up")
                        || has_line(&replication, "connected_slaves:1"));
                if ok {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "cluster node on port {} not ready after 30 s: {info}\n{replication}",
                    node.port()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        cluster
    }

    /// Every node's URL (seeds for a cluster client; any subset would do).
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// The URLs as `REDIS_CLUSTER_URLS` spells them: comma-separated.
    pub fn urls_env(&self) -> String {
        self.urls().join(",")
    }

    /// The nodes, in the order given to `redis-cli --cluster create` (which made the first
    /// three masters; failovers change that).
    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    /// Node `i`, to kill (a failover) or restart.
    pub fn node_mut(&mut self, i: usize) -> &mut RedisServer {
        &mut self.nodes[i]
    }

    /// The indices of the nodes holding a pub/sub client whose name starts with `prefix`
    /// (`cr-bus:`: where the caches' buses are subscribed).
    pub fn nodes_with_client(&self, prefix: &str) -> Vec<usize> {
        let needle = format!("name={prefix}");
        (0..self.nodes.len())
            .filter(|&i| {
                self.nodes[i]
                    .query_text(&["CLIENT", "LIST", "TYPE", "pubsub"])
                    .contains(&needle)
            })
            .collect()
    }

    /// `CLUSTER NODES` as seen by a live node: per node, its id, port, whether it is a
    /// master, and the slot ranges it owns.
    fn topology(&self) -> Vec<NodeRow> {
        let text = self
            .nodes
            .iter()
            .map(|n| n.query_text(&["CLUSTER", "NODES"]))
            .find(|t| !t.is_empty())
            .expect("a live cluster node");
        text.lines()
            .filter_map(|line| {
                let f: Vec<&str> = line.split_whitespace().collect();
                let port = f
                    .get(1)?
                    .split('@')
                    .next()?
                    .rsplit(':')
                    .next()?
                    .parse()
                    .ok()?;
                let master = f.get(2)?.contains("master") && !f[2].contains("fail");
                let ranges = f
                    .iter()
                    .skip(8)
                    .filter(|r| !r.starts_with('['))
                    .filter_map(|r| match r.split_once('-') {
                        Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                        None => r.parse().ok().map(|s| (s, s)),
                    })
                    .collect();
                Some((f[0].to_owned(), port, master, ranges))
            })
            .collect()
    }

    /// The port of the master owning `slot`.
    pub fn master_of(&self, slot: u16) -> u16 {
        self.topology()
            .into_iter()
            .find(|(_, _, master, ranges)| {
                *master && ranges.iter().any(|&(a, b)| a <= slot && slot <= b)
            })
            .map(|(_, port, _, _)| port)
            .expect("a master owns the slot")
    }

    /// Moves `slot` to another master the way `redis-cli --cluster reshard` does
    /// (`SETSLOT IMPORTING`/`MIGRATING`, `MIGRATE` in batches, `SETSLOT NODE` on every
    /// master), sleeping `pause` after marking the slot migrating and after each batch, so
    /// that clients meet `ASK` and `TRYAGAIN` meanwhile. Returns the old and the new owner's
    /// ports.
    pub fn migrate_slot(&self, slot: u16, pause: Duration) -> (u16, u16) {
        let nodes = self.topology();
        let owns = |ranges: &[(u16, u16)]| ranges.iter().any(|&(a, b)| a <= slot && slot <= b);
        let (src_id, src_port, _, _) = nodes
            .iter()
            .find(|(_, _, m, r)| *m && owns(r))
            .expect("a master owns the slot")
            .clone();
        let (dst_id, dst_port, _, _) = nodes
            .iter()
            .find(|(id, _, m, _)| *m && *id != src_id)
            .expect("another master")
            .clone();
        let conn = |port: u16| {
            redis::Client::open(format!("redis://127.0.0.1:{port}"))
                .expect("valid url")
                .get_connection_with_timeout(Duration::from_secs(5))
                .expect("connect to a cluster node")
        };
        let (mut src, mut dst) = (conn(src_port), conn(dst_port));
        let setslot = |c: &mut redis::Connection, how: &str, id: &str| {
            let _: () = redis::cmd("CLUSTER")
                .arg("SETSLOT")
                .arg(slot)
                .arg(how)
                .arg(id)
                .query(c)
                .unwrap_or_else(|e| panic!("CLUSTER SETSLOT {slot} {how}: {e}"));
        };
        setslot(&mut dst, "IMPORTING", &src_id);
        setslot(&mut src, "MIGRATING", &dst_id);
        std::thread::sleep(pause);
        loop {
            let keys: Vec<Vec<u8>> = redis::cmd("CLUSTER")
                .arg("GETKEYSINSLOT")
                .arg(slot)
                .arg(10)
                .query(&mut src)
                .expect("CLUSTER GETKEYSINSLOT");
            if keys.is_empty() {
                break;
            }
            let _: redis::Value = redis::cmd("MIGRATE")
                .arg("127.0.0.1")
                .arg(dst_port)
                .arg("")
                .arg(0)
                .arg(5000)
                .arg("REPLACE")
                .arg("KEYS")
                .arg(&keys)
                .query(&mut src)
                .expect("MIGRATE");
            std::thread::sleep(pause);
        }
        setslot(&mut dst, "NODE", &dst_id);
        setslot(&mut src, "NODE", &dst_id);
        for (_, port, master, _) in &nodes {
            if *master && *port != src_port && *port != dst_port {
                setslot(&mut conn(*port), "NODE", &dst_id);
            }
        }
        (src_port, dst_port)
    }

    /// `CLUSTER KEYSLOT key`.
    pub fn key_slot(&self, key: &str) -> u16 {
        self.nodes
            .iter()
            .find_map(|n| {
                let client = redis::Client::open(n.url()).ok()?;
                let mut c = client
                    .get_connection_with_timeout(Duration::from_secs(2))
                    .ok()?;
                redis::cmd("CLUSTER")
                    .arg("KEYSLOT")
                    .arg(key)
                    .query::<u16>(&mut c)
                    .ok()
            })
            .expect("a live cluster node")
    }

    /// Waits (at most `within`) until every live node reports `cluster_state:ok`.
    pub fn wait_ok(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let ok = self
                .nodes
                .iter()
                .filter(|n| n.child.is_some())
                .all(|n| has_line(&n.query_text(&["CLUSTER", "INFO"]), "cluster_state:ok"));
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the cluster is not ok after {within:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A private Redis Sentinel setup (the Rust twin of `scripts/redis-sentinel`): a master, its
/// replica and 3 sentinels (quorum 2, `down-after-milliseconds 1000`, `failover-timeout
/// 3000`) watching them as [`RedisSentinel::SERVICE`], on free loopback ports. Every process
/// is killed (by its PID) and the sentinels' directories removed when dropped.
pub struct RedisSentinel {
    /// The two data servers (the first started as the master; failovers change that).
    data: Vec<RedisServer>,
    sentinels: Vec<SentinelProcess>,
}

/// One `redis-server <conf> --sentinel`.
struct SentinelProcess {
    port: u16,
    child: Child,
    dir: PathBuf,
}

impl Drop for SentinelProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl RedisSentinel {
    /// The service name the sentinels monitor.
    pub const SERVICE: &'static str = "mymaster";

    /// Starts the master, the replica (waiting until it is in sync) and three sentinels, and
    /// waits until every sentinel knows the replica and the two other sentinels (so that a
    /// failover can happen).
    pub fn start() -> RedisSentinel {
        static DIRS: AtomicU64 = AtomicU64::new(0);
        let master = RedisServer::start();
        let master_port = master.port().to_string();
        let replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &master_port]);
        let mut setup = RedisSentinel {
            data: vec![master, replica],
            sentinels: Vec::new(),
        };
        wait_until(Duration::from_secs(30), "the replica to sync", || {
            has_line(
                &setup.data[1].query_text(&["INFO", "replication"]),
                "master_link_status:up",
            )
        });
        for _ in 0..3 {
            let port = free_port();
            let dir = std::env::temp_dir().join(format!(
                "cache-tests-sentinel-{}-{}-{}",
                std::process::id(),
                port,
                DIRS.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&dir).expect("create the sentinel's directory");
            let conf = dir.join("sentinel.conf");
            let service = Self::SERVICE;
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\nprotected-mode no\nloglevel warning\ndir {}\n\
                     sentinel monitor {service} 127.0.0.1 {master_port} 2\n\
                     sentinel down-after-milliseconds {service} 1000\n\
                     sentinel failover-timeout {service} 3000\n\
                     sentinel parallel-syncs {service} 1\n",
                    dir.display()
                ),
            )
            .expect("write sentinel.conf");
            let child = Command::new(redis_server_binary())
                .arg(&conf)
                .arg("--sentinel")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn redis-server --sentinel");
            setup.sentinels.push(SentinelProcess { port, child, dir });
        }
        for i in 0..setup.sentinels.len() {
            wait_until(Duration::from_secs(30), "the sentinels to be ready", || {
                let info = setup.sentinel_query(i, &["SENTINEL", "master", Self::SERVICE]);
                info.get("num-slaves").map(String::as_str) == Some("1")
                    && info.get("num-other-sentinels").map(String::as_str) == Some("2")
            });
        }
        setup
    }

    /// `SENTINEL <args>` on sentinel `i`, as a map (empty if it does not answer).
    fn sentinel_query(&self, i: usize, args: &[&str]) -> std::collections::HashMap<String, String> {
        let url = format!("redis://127.0.0.1:{}", self.sentinels[i].port);
        let Ok(client) = redis::Client::open(url) else {
            return Default::default();
        };
        let Ok(mut conn) = client.get_connection_with_timeout(Duration::from_secs(2)) else {
            return Default::default();
        };
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query(&mut conn).unwrap_or_default()
    }

    /// `redis+sentinel://127.0.0.1:<s1>,127.0.0.1:<s2>,127.0.0.1:<s3>/mymaster`.
    pub fn url(&self) -> String {
        format!(
            "redis+sentinel://{}/{}",
            self.sentinel_addrs().join(","),
            Self::SERVICE
        )
    }

    /// The sentinels as `127.0.0.1:<port>`.
    pub fn sentinel_addrs(&self) -> Vec<String> {
        self.sentinels
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect()
    }

    /// The port of the master the first sentinel that answers names.
    pub fn master_port(&self) -> Option<u16> {
        (0..self.sentinels.len()).find_map(|i| {
            let url = format!("redis://127.0.0.1:{}", self.sentinels[i].port);
            let client = redis::Client::open(url).ok()?;
            let mut conn = client
                .get_connection_with_timeout(Duration::from_secs(2))
                .ok()?;
            let (_, port): (String, u16) = redis::cmd("SENTINEL")
                .arg("get-master-addr-by-name")
                .arg(Self::SERVICE)
                .query(&mut conn)
                .ok()?;
            Some(port)
        })
    }

    /// The data server listening on `port`.
    pub fn server(&self, port: u16) -> &RedisServer {
        self.data
            .iter()
            .find(|s| s.port() == port)
            .expect("a data server of this setup")
    }

    /// Kills the current master with SIGKILL; returns its port.
    pub fn kill_master(&mut self) -> u16 {
        let port = self.master_port().expect("the sentinels name a master");
        for server in &mut self.data {
            if server.port() == port {
                server.kill();
            }
        }
        port
    }

    /// `SENTINEL FAILOVER mymaster` (retried while a sentinel refuses, e.g. `INPROG`).
    pub fn failover(&self) {
        wait_until(
            Duration::from_secs(30),
            "SENTINEL FAILOVER to be accepted",
            || {
                let url = format!("redis://127.0.0.1:{}", self.sentinels[0].port);
                let Ok(client) = redis::Client::open(url) else {
                    return false;
                };
                let Ok(mut conn) = client.get_connection_with_timeout(Duration::from_secs(2))
                else {
                    return false;
                };
                redis::cmd("SENTINEL")
                    .arg("FAILOVER")
                    .arg(Self::SERVICE)
                    .query::<()>(&mut conn)
                    .is_ok()
            },
        );
    }

    /// Waits until every sentinel names a master other than `old`, and it answers as one;
    /// returns its port.
    pub fn wait_for_new_master(&self, old: u16, timeout: Duration) -> u16 {
        let mut found = 0;
        wait_until(timeout, "the sentinels to name a new master", || {
            let ports: Vec<Option<u16>> = (0..self.sentinels.len())
                .map(|i| {
                    self.sentinel_query(i, &["SENTINEL", "master", Self::SERVICE])
                        .get("port")
                        .and_then(|p| p.parse().ok())
                })
                .collect();
            match ports[0] {
                Some(p) if p != old && ports.iter().all(|q| *q == Some(p)) => {
                    found = p;
                    has_line(
                        &self.server(p).query_text(&["INFO", "replication"]),
                        "role:master",
                    )
                }
                _ => false,
            }
        });
        found
    }
}

/// Polls `ready` every 50 ms until it holds; panics after `timeout`.
fn wait_until(timeout: Duration, what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ready() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn has_line(text: &str, line: &str) -> bool {
    text.lines().any(|l| l.trim() == line)
}

impl RedisServer {
    /// A command's reply as text (a bulk string; `CLUSTER INFO`, `INFO ..`), on a fresh
    /// connection; empty if the server does not answer.
    pub fn query_text(&self, args: &[&str]) -> String {
        let Ok(client) = redis::Client::open(self.url()) else {
            return String::new();
        };
        let Ok(mut conn) = client.get_connection_with_timeout(Duration::from_secs(2)) else {
            return String::new();
        };
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query::<String>(&mut conn).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `free_port` hands out distinct bindable ports below the ephemeral range.
    #[test]
    fn free_ports_are_distinct_bindable_and_below_the_ephemeral_range() {
        let ports: Vec<u16> = (0..64).map(|_| free_port()).collect();
        let distinct: std::collections::HashSet<_> = ports.iter().collect();
        assert_eq!(distinct.len(), ports.len(), "{ports:?}");
        if let Some(low) = ephemeral_low().filter(|&low| low > 12000) {
            assert!(
                ports.iter().all(|&p| (10000..low).contains(&p)),
                "{ports:?}"
            );
        }
        for port in ports {
            TcpListener::bind(("127.0.0.1", port)).expect("bindable");
        }
    }

    /// `RedisCluster` starts six nodes that agree on a healthy cluster with three masters and
    /// three replicas, and stops them when dropped.
    #[test]
    fn redis_cluster_starts_and_stops() {
        let cluster = RedisCluster::start();
        let info = cluster.nodes()[0].query_text(&["CLUSTER", "INFO"]);
        assert!(has_line(&info, "cluster_state:ok"), "{info}");
        assert!(has_line(&info, "cluster_slots_assigned:16384"), "{info}");
        assert!(has_line(&info, "cluster_known_nodes:6"), "{info}");
        assert!(has_line(&info, "cluster_size:3"), "{info}");
        let ports: Vec<u16> = cluster.nodes().iter().map(RedisServer::port).collect();
        assert_eq!(cluster.urls_env().split(',').count(), RedisCluster::NODES);
        drop(cluster);
        for port in ports {
            assert!(
                std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
                "node on port {port} still answers after drop"
            );
        }
    }
}

/// A raw connection for inspecting what the cache wrote: to one Redis, or to a cluster
/// (commands routed by their key's slot, as the cache's own are).
#[derive(Clone)]
pub enum RawConn {
    /// One Redis server.
    Single(redis::aio::MultiplexedConnection),
    /// A Redis Cluster.
    Cluster(redis::cluster_async::ClusterConnection),
}

impl redis::aio::ConnectionLike for RawConn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            RawConn::Single(c) => c.req_packed_command(cmd),
            RawConn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            RawConn::Single(c) => c.req_packed_commands(cmd, offset, count),
            RawConn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RawConn::Single(c) => c.get_db(),
            RawConn::Cluster(c) => c.get_db(),
        }
    }
}

/// A connection to the cluster whose nodes are `urls`.
pub async fn raw_cluster_connection(urls: &[String]) -> redis::cluster_async::ClusterConnection {
    let client = redis::cluster::ClusterClient::new(urls.to_vec()).expect("valid cluster urls");
    tokio::time::timeout(Duration::from_secs(10), client.get_async_connection())
        .await
        .expect("the redis cluster answers within 10 s")
        .unwrap_or_else(|e| panic!("cannot connect to the redis cluster at {urls:?}: {e}"))
}

/// The Redis Cluster the cluster variants of the behaviour tests use: the one at
/// `CACHE_TESTS_CLUSTER_URLS` or else `REDIS_CLUSTER_URLS` (comma-separated; `scripts/test`
/// starts one for the whole suite and names it by the first), or else a private one started
/// for the caller, kept alive by the returned guard.
pub fn shared_cluster() -> (Vec<String>, Option<RedisCluster>) {
    let urls: Vec<String> = std::env::var("CACHE_TESTS_CLUSTER_URLS")
        .ok()
        .filter(|u| !u.trim().is_empty())
        .or_else(|| std::env::var("REDIS_CLUSTER_URLS").ok())
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(str::to_owned)
        .collect();
    if urls.is_empty() {
        let cluster = RedisCluster::start();
        (cluster.urls(), Some(cluster))
    } else {
        (urls, None)
    }
}

impl RedisCluster {
    /// The port of the master that serves `slot` now, from `CLUSTER NODES` on a live node
    /// (`None` if no live node answers or no healthy master claims the slot).
    pub fn master_port_of(&self, slot: u16) -> Option<u16> {
        self.nodes.iter().find_map(|node| {
            let text = node.query_text(&["CLUSTER", "NODES"]);
            if text.is_empty() {
                return None;
            }
            text.lines().find_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                if fields.len() < 9 {
                    return None;
                }
                let flags = fields[2];
                if !flags.contains("master") || flags.contains("fail") {
                    return None;
                }
                let serves = fields[8..].iter().any(|range| {
                    let mut ends = range.split('-');
                    let (Some(lo), hi) = (ends.next(), ends.next()) else {
                        return false;
                    };
                    let (Ok(lo), Ok(hi)) = (lo.parse::<u16>(), hi.unwrap_or(lo).parse::<u16>())
                    else {
                        return false; // an importing/migrating marker
                    };
                    (lo..=hi).contains(&slot)
                });
                let port = fields[1].split('@').next()?.rsplit(':').next()?;
                serves.then(|| port.parse().ok()).flatten()
            })
        })
    }

    /// The node listening on `port`, to kill or restart.
    pub fn node_on_port(&mut self, port: u16) -> &mut RedisServer {
        self.nodes
            .iter_mut()
            .find(|n| n.port() == port)
            .expect("a node of this cluster")
    }

    /// Waits until a master other than the one on `old_port` serves `slot` and every live node
    /// reports `cluster_state:ok` (a failover is over); panics after `within`.
    pub fn wait_for_failover(&self, slot: u16, old_port: u16, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let promoted = self.master_port_of(slot).is_some_and(|p| p != old_port);
            let ok = self
                .nodes
                .iter()
                .filter(|n| n.port() != old_port)
                .all(|n| has_line(&n.query_text(&["CLUSTER", "INFO"]), "cluster_state:ok"));
            if promoted && ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "slot {slot} not failed over from port {old_port} within {within:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
