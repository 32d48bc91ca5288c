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
    if let Ok(p) = std::env::var("REDIS_SERVER") {
        return PathBuf::from(p);
    }
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let candidate = PathBuf::from(dir).join("redis-server");
        if candidate.is_file() {
            return candidate;
        }
    }
    for fallback in [
        "/usr/bin/redis-server",
        "/usr/local/bin/redis-server",
        "/usr/sbin/redis-server",
    ] {
        if std::path::Path::new(fallback).is_file() {
            return PathBuf::from(fallback);
        }
    }
    panic!(
        "redis-server not found: install it (apt-get install -y redis-server) or set REDIS_SERVER"
    )
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
            ],
            dir: Some(dir),
        };
        server.restart();
        server.assign_all_slots();
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

    /// The server's URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
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
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) {
                let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
                if s.write_all(b"PING\r\n").is_ok() {
                    let mut buf = [0u8; 7];
                    if s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n" {
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
