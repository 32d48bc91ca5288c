//! TLS test support: certificates made with `openssl` at test time, and a private
//! `redis-server` that speaks TLS only.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};

use super::{RedisServer, free_port};

/// A CA, a server certificate for `127.0.0.1` and a client certificate (CN `app`), both signed
/// by the CA, made with `openssl` in a directory of their own (removed when dropped). Valid
/// for a day.
///
/// The server certificate is signed by a CA rather than self-signed: rustls (webpki) refuses
/// a certificate marked as a CA (what `openssl req -x509` makes by default) as a server's own.
pub struct TestCerts {
    dir: PathBuf,
}

impl TestCerts {
    /// Makes the certificates; panics if `openssl` is missing or fails.
    pub fn generate() -> TestCerts {
        static DIRS: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "cache-tests-tls-{}-{}",
            std::process::id(),
            DIRS.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create the certificates' directory");
        let certs = TestCerts { dir };
        certs.openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=cache-tests CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
        ]);
        certs.sign(
            "server",
            "/CN=127.0.0.1",
            "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
        );
        certs.sign(
            "client",
            "/CN=app",
            "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n",
        );
        certs
    }

    /// A key and a certificate `<name>.key` / `<name>.crt` signed by the CA.
    fn sign(&self, name: &str, subject: &str, extensions: &str) {
        let (key, csr, crt, ext) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.crt"),
            format!("{name}.ext"),
        );
        std::fs::write(self.dir.join(&ext), extensions).expect("write the extensions file");
        self.openssl(&[
            "req", "-newkey", "rsa:2048", "-nodes", "-subj", subject, "-keyout", &key, "-out", &csr,
        ]);
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            &ext,
            "-out",
            &crt,
        ]);
    }

    fn openssl(&self, args: &[&str]) {
        let output = Command::new("openssl")
            .args(args)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run openssl ({e}): install it (apt-get install -y openssl)")
            });
        assert!(
            output.status.success(),
            "openssl {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// The path of one of the files: `ca.crt`, `server.crt`, `server.key`, `client.crt`,
    /// `client.key`.
    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    fn read(&self, file: &str) -> Vec<u8> {
        std::fs::read(self.path(file)).expect("read a certificate")
    }

    /// The CA certificate, PEM.
    pub fn ca(&self) -> Vec<u8> {
        self.read("ca.crt")
    }

    /// The client certificate, PEM.
    pub fn client_cert(&self) -> Vec<u8> {
        self.read("client.crt")
    }

    /// The client's private key, PEM.
    pub fn client_key(&self) -> Vec<u8> {
        self.read("client.key")
    }

    fn arg(&self, file: &str) -> String {
        self.path(file).to_string_lossy().into_owned()
    }
}

impl Drop for TestCerts {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl RedisServer {
    /// Starts a server that speaks TLS only (`--port 0 --tls-port <port>`) with `certs`'
    /// server certificate, trusting `certs`' CA for client certificates, which it does not
    /// ask for (`--tls-auth-clients no`) unless `extra` says otherwise. `extra`: more
    /// arguments (an ACL: `["--user", "default", "off", "--user", "app", "on", ">secret",
    /// "~*", "&*", "+@all"]`). [`url`](RedisServer::url) is then `rediss://127.0.0.1:<port>`.
    pub fn start_tls(certs: &TestCerts, extra: &[&str]) -> RedisServer {
        let port = free_port();
        let mut args = vec![
            "--port".to_owned(),
            "0".to_owned(),
            "--tls-port".to_owned(),
            port.to_string(),
            "--tls-cert-file".to_owned(),
            certs.arg("server.crt"),
            "--tls-key-file".to_owned(),
            certs.arg("server.key"),
            "--tls-ca-cert-file".to_owned(),
            certs.arg("ca.crt"),
            "--tls-auth-clients".to_owned(),
            "no".to_owned(),
        ];
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        let mut server = RedisServer {
            port,
            child: None,
            extra_args: args,
            dir: None,
        };
        server.restart();
        server
    }

    /// Whether this server speaks TLS only ([`RedisServer::start_tls`]: no plain port).
    pub(crate) fn is_tls(&self) -> bool {
        self.extra_args.iter().any(|a| a == "--tls-port")
            && self
                .extra_args
                .windows(2)
                .any(|w| w[0] == "--port" && w[1] == "0")
    }
}

impl super::RedisCluster {
    /// A cluster ([`RedisCluster::start`](super::RedisCluster::start)) whose nodes also speak
    /// TLS, on a port of their own each, with `certs`' server certificate (the cluster bus
    /// and replication over TLS too: `--tls-cluster yes --tls-replication yes`). A TLS client
    /// is told the nodes' TLS ports (`CLUSTER SLOTS`); the plain ports stay for the test's
    /// own checks. Returns the cluster and its nodes' `rediss://` URLs.
    pub fn start_tls(certs: &TestCerts) -> (super::RedisCluster, Vec<String>) {
        let mut urls = Vec::new();
        let nodes: Vec<RedisServer> = (0..Self::NODES)
            .map(|_| {
                let tls_port = free_port().to_string();
                urls.push(format!("rediss://127.0.0.1:{tls_port}"));
                let (cert, key, ca) = (
                    certs.arg("server.crt"),
                    certs.arg("server.key"),
                    certs.arg("ca.crt"),
                );
                RedisServer::start_unassigned_cluster_node(&[
                    "--cluster-node-timeout",
                    "2000",
                    "--tls-port",
                    &tls_port,
                    "--tls-cert-file",
                    &cert,
                    "--tls-key-file",
                    &key,
                    "--tls-client-cert-file",
                    &certs.arg("client.crt"),
                    "--tls-client-key-file",
                    &certs.arg("client.key"),
                    "--tls-ca-cert-file",
                    &ca,
                    "--tls-auth-clients",
                    "no",
                    "--tls-cluster",
                    "yes",
                    "--tls-replication",
                    "yes",
                ])
            })
            .collect();
        (Self::join(nodes), urls)
    }
}
