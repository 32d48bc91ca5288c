//! The crate's one error type.

use std::fmt;

/// What went wrong, broadly. Match on it with a wildcard arm: new kinds may be added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The configuration or an argument is invalid (a malformed Redis URL, a zero TTL, a bad
    /// namespace, a second `set_default`). Returned by
    /// [`CacheBuilder::build`](crate::CacheBuilder::build) and
    /// [`build_sync`](crate::CacheBuilder::build_sync), [`set_default`](crate::set_default),
    /// and [`Cache::set`](crate::Cache::set) given a zero `ttl`; never because of the
    /// backend's state.
    Config,
    /// The backend is unreachable: connection refused or dropped, or the circuit breaker is
    /// open after repeated failures, so the operation was not attempted.
    Unavailable,
    /// The backend did not answer within the operation timeout.
    Timeout,
    /// The backend answered with an error (for example `WRONGTYPE` on a key that holds
    /// something else).
    Backend,
    /// A value could not be encoded for storage: its `Serialize` implementation failed, or it
    /// holds a NaN or infinite float, which JSON cannot represent (it would be written as
    /// `null` and never read back).
    Encode,
    /// No longer returned: every key is accepted now (a key whose braces do not form a Redis
    /// Cluster hash tag still gets its auxiliary keys in its own hash slot). Kept so that code
    /// matching on it keeps compiling.
    #[deprecated(note = "no operation returns it any more: every key is accepted")]
    InvalidKey,
}

impl ErrorKind {
    fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Config => "invalid configuration",
            ErrorKind::Unavailable => "cache backend unavailable",
            ErrorKind::Timeout => "cache backend timed out",
            ErrorKind::Backend => "cache backend error",
            ErrorKind::Encode => "value could not be encoded",
            #[allow(deprecated)]
            ErrorKind::InvalidKey => "invalid key",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error returned by the manual API ([`Cache::get`](crate::Cache::get),
/// [`Cache::set`](crate::Cache::set), ...) and by configuration.
///
/// The attribute macros never surface it: a cached function fails open and returns its own
/// result whatever the cache does.
///
/// ```
/// # async fn demo(cache: &cache_runtime::Cache) {
/// match cache.get::<u64>("counter").await {
///     Ok(Some(v)) => println!("cached: {v}"),
///     Ok(None) => println!("miss"),
///     Err(e) if e.is_unavailable() => println!("cache is down, carry on: {e}"),
///     Err(e) => println!("cache error: {e}"),
/// }
/// # }
/// ```
#[derive(Clone)]
pub struct Error {
    kind: ErrorKind,
    message: String,
}

impl Error {
    pub(crate) fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
        }
    }

    pub(crate) fn config(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Config, message)
    }

    /// The broad category of this error.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The configuration was invalid.
    pub fn is_config(&self) -> bool {
        self.kind == ErrorKind::Config
    }

    /// The backend could not be reached, or the circuit breaker is open.
    pub fn is_unavailable(&self) -> bool {
        self.kind == ErrorKind::Unavailable
    }

    /// The backend did not answer in time.
    pub fn is_timeout(&self) -> bool {
        self.kind == ErrorKind::Timeout
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.message.is_empty() {
            f.write_str(self.kind.as_str())
        } else {
            write!(f, "{}: {}", self.kind.as_str(), self.message)
        }
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Error")
            .field("kind", &self.kind)
            .field("message", &self.message)
            .finish()
    }
}

impl std::error::Error for Error {}

/// Shorthand for `Result<T, cache_runtime::Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;
