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

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
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
        let nodes: Vec<RedisServer> = (0..Self::NODES)
            .map(|_| {
                RedisServer::start_unassigned_cluster_node(&["--cluster-node-timeout", "2000"])
            })
            .collect();
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
