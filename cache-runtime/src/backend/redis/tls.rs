//! TLS and authentication: the `redis::Client` a cache connects with, and what a refused
//! handshake or refused credentials mean, in words that say what to fix and never show a
//! secret.
//!
//! **The client.** A `redis://` URL is opened as is. A `rediss://` URL (or `valkeys://`) needs
//! the crate's `tls` feature (redis-rs's `tokio-rustls-comp`, rustls with the ring provider);
//! without it the URL is a configuration error naming the feature, never a plain-TCP
//! connection. With it, the builder's certificates ([`TlsConfig`]) go into the client
//! (`Client::build_with_tls`), so every connection made from it is configured alike: the
//! command connections (`conn`), the bus (`bus`, through `get_async_pubsub`) and the
//! write-behind worker's own connections (`Connections::client`). A cluster's client gets them
//! with `ClusterClientBuilder::certs` (see `certificates`), so every node's connections use
//! them, and the echo heartbeat's node connections keep the seeds' TLS settings. Without a root CA, the
//! system's roots are trusted (redis-rs loads them with `rustls-native-certs` on each
//! connection).
//!
//! **The crypto provider.** redis-rs makes its rustls configuration with
//! `rustls::ClientConfig::builder()`, which uses the process-level default provider and, when
//! none was installed, installs the one rustls's crate features name: ring, when this crate's
//! `tls` feature is the only one choosing. This crate never installs one itself. If the
//! application's dependency graph also enables rustls's `aws-lc-rs` feature, rustls cannot
//! choose and panics; so `client` asks rustls for a configuration once, while the cache is
//! built, and turns that panic into a configuration error saying to install a provider
//! (`rustls::crypto::ring::default_provider().install_default()`, or aws-lc-rs's) in `main`,
//! rather than letting a connection attempt panic later. That check relies on
//! `std::panic::catch_unwind`: in a binary built with `panic = "abort"` the panic aborts the
//! process inside `build()`. The fix is the same: with both providers enabled, install one in
//! `main` before building the cache (the README's TLS section says so too).
//!
//! **Refusals.** [`describe`] words a failed operation's error: refused credentials
//! (`AuthenticationFailed`, `NOAUTH`), a server certificate this process does not trust, a
//! client certificate the server refused. The command connection's failure classification
//! (`conn`) counts them as unavailability (breaker, calls run uncached) and logs these words;
//! the bus logs them too. Only the user name is shown, never the password. After refused
//! credentials `conn` replaces the connection ([`breaks_the_manager`]), so that caching
//! resumes once the server accepts them.

use redis::{ErrorKind as RedisKind, RedisError};

/// The certificates given to the builder, used for every `rediss://` connection of a cache
/// (ignored for `redis://`). `Debug` shows only whether each is set.
#[derive(Clone, Default)]
pub(crate) struct TlsConfig {
    /// A PEM bundle of CA certificates trusted instead of the system's roots.
    pub(crate) root_ca: Option<Vec<u8>>,
    /// mTLS: the client's certificate chain and its private key, PEM.
    pub(crate) client_cert: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let set = |b: bool| if b { "<set>" } else { "<none>" };
        f.debug_struct("TlsConfig")
            .field("root_ca", &set(self.root_ca.is_some()))
            .field("client_cert", &set(self.client_cert.is_some()))
            .finish()
    }
}

impl TlsConfig {
    /// Whether any certificate was given.
    #[cfg(feature = "tls")]
    pub(crate) fn is_set(&self) -> bool {
        self.root_ca.is_some() || self.client_cert.is_some()
    }
}

/// Whether `url` asks for TLS (`rediss://`, `valkeys://`).
pub(crate) fn is_tls_url(url: &str) -> bool {
    let scheme = url.split_once("://").map_or("", |(s, _)| s.trim());
    scheme.eq_ignore_ascii_case("rediss") || scheme.eq_ignore_ascii_case("valkeys")
}

/// A configuration error with our own words (its `Display` is `message`).
fn config_error(message: String) -> RedisError {
    RedisError::from(std::io::Error::other(message))
}

/// The message for a `rediss://` URL without the `tls` feature.
#[cfg(not(feature = "tls"))]
const NEEDS_FEATURE: &str = "a `rediss://` URL needs cache-runtime's `tls` feature \
     (cache-runtime = { version = \"..\", features = [\"tls\"] }); without it the cache \
     cannot speak TLS";

/// The client for `url`: plain for `redis://`, with `tls`'s certificates for `rediss://`.
///
/// Fails on an invalid URL, on `rediss://` without the `tls` feature, on certificates or a
/// key that are not PEM, and when rustls has no crypto provider it can choose (see the module
/// docs). Connects nothing.
pub(crate) fn client(url: &str, tls: &TlsConfig) -> redis::RedisResult<redis::Client> {
    if !is_tls_url(url) {
        return redis::Client::open(url);
    }
    #[cfg(not(feature = "tls"))]
    {
        let _ = tls;
        Err(config_error(NEEDS_FEATURE.to_owned()))
    }
    #[cfg(feature = "tls")]
    {
        ensure_provider()?;
        if !tls.is_set() {
            return redis::Client::open(url);
        }
        check_pem(tls)?;
        redis::Client::build_with_tls(url, certificates(tls))
    }
}

/// The builder's certificates as redis-rs takes them (a cluster client gets them with
/// `ClusterClientBuilder::certs`: its nodes' connections do not take them from the seeds).
#[cfg(feature = "tls")]
pub(crate) fn certificates(tls: &TlsConfig) -> redis::TlsCertificates {
    redis::TlsCertificates {
        client_tls: tls
            .client_cert
            .as_ref()
            .map(|(cert, key)| redis::ClientTlsConfig {
                client_cert: cert.clone(),
                client_key: key.clone(),
            }),
        root_cert: tls.root_ca.clone(),
    }
}

/// Makes sure rustls can make a configuration when redis-rs asks for one (see the module
/// docs): a process default is installed, or rustls's crate features name exactly one
/// provider (then rustls installs it now, as it would on the first connection).
#[cfg(feature = "tls")]
fn ensure_provider() -> redis::RedisResult<()> {
    if rustls::crypto::CryptoProvider::get_default().is_some() {
        return Ok(());
    }
    match std::panic::catch_unwind(|| drop(rustls::ClientConfig::builder())) {
        Ok(()) => Ok(()),
        Err(_) => Err(config_error(
            "rustls cannot choose a crypto provider (both `ring` and `aws-lc-rs` are enabled in \
             this build, and none is installed): call \
             `rustls::crypto::ring::default_provider().install_default()` (or aws-lc-rs's) in \
             main before building the cache"
                .to_owned(),
        )),
    }
}

/// Checks the builder's PEM now, so that a mistake is a configuration error of `build`, worded
/// without the key's contents.
#[cfg(feature = "tls")]
fn check_pem(tls: &TlsConfig) -> redis::RedisResult<()> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certificates = |what: &str, pem: &[u8]| -> redis::RedisResult<()> {
        let mut count = 0;
        for cert in CertificateDer::pem_slice_iter(pem) {
            cert.map_err(|e| config_error(format!("{what} is not a PEM certificate ({e})")))?;
            count += 1;
        }
        if count == 0 {
            return Err(config_error(format!(
                "{what} holds no PEM certificate (`-----BEGIN CERTIFICATE-----`)"
            )));
        }
        Ok(())
    };
    if let Some(ca) = &tls.root_ca {
        certificates("the root CA given to `redis_tls_root_ca`", ca)?;
    }
    if let Some((cert, key)) = &tls.client_cert {
        certificates(
            "the client certificate given to `redis_tls_client_cert`",
            cert,
        )?;
        // The key's parse error is not shown: it could quote part of the key.
        PrivateKeyDer::from_pem_slice(key).map_err(|_| {
            config_error(
                "the private key given to `redis_tls_client_cert` is not a PEM private key \
                 (PKCS#8, PKCS#1 or SEC1)"
                    .to_owned(),
            )
        })?;
    }
    Ok(())
}

/// Whether `e` is a refusal [`describe`] words (credentials or TLS): a connectivity failure,
/// even when it is the server's reply (`NOAUTH`).
pub(crate) fn is_refusal(e: &RedisError) -> bool {
    refusal(e, None).is_some()
}

/// Whether a `ConnectionManager` that returned `e` will keep returning it: its connection's
/// setup was refused (`AUTH`), and redis-rs 1.8 reconnects only after an I/O error
/// (`connection_manager.rs`, `reconnect_if_io_error!`), so the failed connection would be
/// kept for ever, even once the server accepts the password. `conn` then makes a new one.
pub(crate) fn breaks_the_manager(e: &RedisError) -> bool {
    e.kind() == RedisKind::AuthenticationFailed
}

/// `e` in words for logs and errors: a refusal named with what to fix (see the module docs),
/// anything else as redis-rs words it. `client` gives the user name (`default` when the URL
/// has none); the password is never shown.
pub(crate) fn describe(e: &RedisError, client: Option<&redis::Client>) -> String {
    refusal(e, client).unwrap_or_else(|| e.to_string())
}

fn refusal(e: &RedisError, client: Option<&redis::Client>) -> Option<String> {
    let user = || {
        client
            .and_then(|c| c.get_connection_info().redis_settings().username())
            .unwrap_or("default")
            .to_owned()
    };
    if e.kind() == RedisKind::AuthenticationFailed || e.code() == Some("WRONGPASS") {
        return Some(format!(
            "redis refused the credentials of user `{}` (wrong password, or no such enabled user)",
            user()
        ));
    }
    if e.code() == Some("NOAUTH") {
        return Some(
            "redis requires a password and the URL has none (redis://user:password@host)"
                .to_owned(),
        );
    }
    #[cfg(feature = "tls")]
    if let Some(tls) = rustls_error(e) {
        return Some(tls_refusal(tls));
    }
    None
}

/// The rustls error inside an I/O error of redis-rs (tokio-rustls reports handshake and
/// record errors as `io::Error::new(InvalidData, rustls::Error)`; redis-rs keeps the
/// `io::Error` in an `Arc`).
#[cfg(feature = "tls")]
fn rustls_error(e: &RedisError) -> Option<&rustls::Error> {
    use std::error::Error as _;
    type Shared = std::sync::Arc<dyn std::error::Error + Send + Sync>;
    if e.kind() != RedisKind::Io {
        return None;
    }
    let source = e.source()?;
    let io = match source.downcast_ref::<Shared>() {
        Some(shared) => shared.downcast_ref::<std::io::Error>()?,
        None => source.downcast_ref::<std::io::Error>()?,
    };
    io.get_ref()?.downcast_ref::<rustls::Error>()
}

#[cfg(feature = "tls")]
fn tls_refusal(e: &rustls::Error) -> String {
    use rustls::{AlertDescription as Alert, CertificateError, Error};
    match e {
        Error::InvalidCertificate(CertificateError::NotValidForName)
        | Error::InvalidCertificate(CertificateError::NotValidForNameContext { .. }) => format!(
            "redis's TLS certificate does not name the host of the URL ({e}); connect with a \
             name or address the certificate lists"
        ),
        Error::InvalidCertificate(_) => format!(
            "redis's TLS certificate is not trusted ({e}); give the cache the CA that signed it \
             with `CacheBuilder::redis_tls_root_ca`"
        ),
        Error::AlertReceived(
            Alert::CertificateRequired
            | Alert::BadCertificate
            | Alert::UnknownCA
            | Alert::CertificateUnknown
            | Alert::UnsupportedCertificate
            | Alert::CertificateExpired
            | Alert::CertificateRevoked
            | Alert::AccessDenied,
        ) => format!(
            "redis refused this client's TLS certificate ({e}); give the cache one the server \
             trusts with `CacheBuilder::redis_tls_client_cert`"
        ),
        _ => format!("the TLS handshake with redis failed ({e})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_urls_are_recognised() {
        assert!(is_tls_url("rediss://h:1"));
        assert!(is_tls_url("REDISS://h"));
        assert!(is_tls_url("valkeys://h"));
        assert!(!is_tls_url("redis://h:1"));
        assert!(!is_tls_url("unix:///tmp/s"));
        assert!(!is_tls_url("nonsense"));
    }

    #[test]
    fn debug_shows_no_certificate() {
        let tls = TlsConfig {
            root_ca: Some(b"CA-BYTES".to_vec()),
            client_cert: Some((b"CERT-BYTES".to_vec(), b"KEY-BYTES".to_vec())),
        };
        let shown = format!("{tls:?}");
        assert!(!shown.contains("BYTES"), "{shown}");
        assert!(shown.contains("<set>"), "{shown}");
    }

    #[cfg(not(feature = "tls"))]
    #[test]
    fn rediss_without_the_feature_names_it() {
        let e = client("rediss://127.0.0.1:6380", &TlsConfig::default()).unwrap_err();
        assert!(e.to_string().contains("`tls` feature"), "{e}");
    }

    #[test]
    fn credentials_are_worded_with_the_user_only() {
        let client = redis::Client::open("redis://app:hunter2@127.0.0.1:1/3").unwrap();
        let e = RedisError::from((
            RedisKind::AuthenticationFailed,
            "Password authentication failed",
        ));
        assert!(is_refusal(&e));
        let words = describe(&e, Some(&client));
        assert!(words.contains("user `app`"), "{words}");
        assert!(!words.contains("hunter2"), "{words}");
        let anonymous = redis::Client::open("redis://:hunter2@127.0.0.1:1").unwrap();
        assert!(describe(&e, Some(&anonymous)).contains("user `default`"));
        let other = RedisError::from((RedisKind::Io, "connection refused"));
        assert!(!is_refusal(&other));
    }

    #[cfg(feature = "tls")]
    #[test]
    fn certificate_failures_are_recognised_inside_redis_errors() {
        use rustls::{AlertDescription, CertificateError};
        let wrap = |e: rustls::Error| {
            RedisError::from(std::io::Error::new(std::io::ErrorKind::InvalidData, e))
        };
        let client = redis::Client::open("redis://127.0.0.1:1").unwrap();
        let unknown = wrap(rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer,
        ));
        let words = describe(&unknown, Some(&client));
        assert!(words.contains("not trusted"), "{words}");
        assert!(words.contains("redis_tls_root_ca"), "{words}");
        let refused = wrap(rustls::Error::AlertReceived(
            AlertDescription::CertificateRequired,
        ));
        assert!(describe(&refused, Some(&client)).contains("redis_tls_client_cert"));
        let plain = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(!is_refusal(&plain));
    }

    #[cfg(feature = "tls")]
    #[test]
    fn rediss_builds_and_bad_pem_is_refused_without_quoting_the_key() {
        assert!(client("rediss://127.0.0.1:6380", &TlsConfig::default()).is_ok());
        let bad_ca = TlsConfig {
            root_ca: Some(b"not a certificate".to_vec()),
            client_cert: None,
        };
        let e = client("rediss://127.0.0.1:6380", &bad_ca).unwrap_err();
        assert!(e.to_string().contains("redis_tls_root_ca"), "{e}");
        let bad_key = TlsConfig {
            root_ca: None,
            client_cert: Some((
                b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".to_vec(),
                b"-----BEGIN PRIVATE KEY-----\nSECRETKEYMATERIAL\n".to_vec(),
            )),
        };
        // The certificate is not valid base64 DER either; whichever is refused first, the
        // key's contents are not quoted.
        let e = client("rediss://127.0.0.1:6380", &bad_key).unwrap_err();
        assert!(!e.to_string().contains("SECRETKEYMATERIAL"), "{e}");
    }
}
