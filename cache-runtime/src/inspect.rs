//! [`Cache::inspect`]: what is stored under a key, decoded for people (`cachectl get`).

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::cache::Cache;
use crate::envelope;
use crate::error::Result;

/// What [`Cache::inspect`] found under a key.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Entry {
    /// The full key read (namespace included; see [`Cache::full_key`]).
    pub key: String,
    /// What the key holds.
    pub state: EntryState,
    /// The key's TTL left (`None` on the memory backend, which does not say).
    pub ttl: Option<Duration>,
    /// `refresh`: the token of the process reloading the entry ahead of its expiry, if one
    /// is (Redis only).
    pub refreshing: Option<String>,
    /// Whether callers wait for a pending load of the key to fill it (Redis only).
    pub waiters: bool,
    /// `stale`: the TTL left of the copy kept past the entry's TTL, to be served if a load
    /// fails (Redis only).
    pub stale_ttl: Option<Duration>,
}

/// The content of a key, from [`Cache::inspect`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum EntryState {
    /// A cached value.
    Value {
        /// The value, as the JSON it is stored as.
        json: String,
        /// When it was stored.
        created_at: SystemTime,
        /// How long ago it was stored (zero if the clocks disagree).
        age: Duration,
        /// How long the function took to compute it.
        compute_time: Duration,
        /// The entry's generation: an opaque identity of this fill (its envelope header, in
        /// hex). Every write, fill and refresh of the key makes a new one; a pending load or
        /// refresh stores its result only if the key still holds the generation it read.
        generation: String,
        /// The tags the value was stored under (full names: the namespace included), with
        /// whether each still has the version it had then. A value with a tag that moved is never served (the tag was
        /// invalidated).
        tags: Vec<(String, bool)>,
    },
    /// No value: a load of the key is pending, and this is its marker. With `lock`, the
    /// marker is the lease, and `holder` the lease holder's token (`<process token>:<n>`);
    /// without, it is what the load's fill is checked against.
    Pending {
        /// The token of the load (the lease holder, with `lock`).
        holder: String,
    },
    /// Something this library did not write: another program's data, a value of another
    /// Redis type, or an envelope of an unknown format.
    Foreign {
        /// What it is: the Redis type, or a description of the bytes.
        description: String,
    },
}

impl EntryState {
    /// Whether the key holds a cached value.
    pub fn is_value(&self) -> bool {
        matches!(self, EntryState::Value { .. })
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// What `bytes`, read from a value key, are.
fn state_of(bytes: &[u8], tags: Vec<(String, bool)>) -> EntryState {
    if crate::backend::fleet::is_pending_marker(bytes) {
        let holder = String::from_utf8_lossy(&bytes[5..]).into_owned();
        return EntryState::Pending { holder };
    }
    let Some(header) = envelope::header_of(bytes) else {
        return EntryState::Foreign {
            description: describe(bytes),
        };
    };
    let Ok(json) = envelope::decode::<serde_json::Value>(bytes) else {
        return EntryState::Foreign {
            description: format!(
                "an envelope header but no JSON payload: {}",
                describe(bytes)
            ),
        };
    };
    let created_ms = envelope::header_created_at_ms(&header);
    EntryState::Value {
        json: json.to_string(),
        created_at: UNIX_EPOCH + Duration::from_millis(created_ms),
        age: Duration::from_millis(envelope::now_ms().saturating_sub(created_ms)),
        compute_time: Duration::from_micros(u64::from(envelope::header_compute_us(&header))),
        generation: hex(&header),
        tags,
    }
}

/// A short description of bytes that are not an envelope.
fn describe(bytes: &[u8]) -> String {
    const SHOWN: usize = 40;
    let shown = &bytes[..bytes.len().min(SHOWN)];
    let more = if bytes.len() > SHOWN { "..." } else { "" };
    match std::str::from_utf8(shown) {
        Ok(text) => format!("a string of {} bytes: {text:?}{more}", bytes.len()),
        Err(_) => format!("{} bytes: {}{more}", bytes.len(), hex(shown)),
    }
}

impl Cache {
    /// What is stored under `key` (the namespace is added), decoded for people: the value as
    /// JSON, its age, compute time, generation and TTL left, a pending load's lease holder,
    /// and, on Redis, the bookkeeping around it (a refresh running, waiters, a `stale` copy).
    /// `None` if the key holds nothing.
    ///
    /// Unlike lookups, which fail open, this reports the backend's failures.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), cache_runtime::Error> {
    /// use cache_runtime::{Cache, EntryState};
    /// let cache = Cache::memory();
    /// cache.set("user:1", &"ann", std::time::Duration::from_secs(60)).await?;
    /// let entry = cache.inspect("user:1").await?.expect("stored");
    /// assert!(matches!(entry.state, EntryState::Value { ref json, .. } if json == "\"ann\""));
    /// assert!(cache.inspect("user:2").await?.is_none());
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Unavailable`](crate::ErrorKind::Unavailable) or
    /// [`ErrorKind::Timeout`](crate::ErrorKind::Timeout) when the backend cannot be reached
    /// (including while the circuit breaker is open);
    /// [`ErrorKind::Backend`](crate::ErrorKind::Backend) when it replies with an error.
    pub async fn inspect(&self, key: &str) -> Result<Option<Entry>> {
        let full = self.full_key(key);
        let store = self.store();
        let Some(redis) = store.redis() else {
            let Some(stored) = store.read(&full).await? else {
                return Ok(None);
            };
            let tags = self.tag_states(&stored.bytes).await?;
            return Ok(Some(Entry {
                state: state_of(&stored.bytes, tags),
                key: full,
                ttl: None,
                refreshing: None,
                waiters: false,
                stale_ttl: None,
            }));
        };
        let raw = redis.inspect(&full).await?;
        let state = match (raw.kind.as_str(), &raw.value) {
            ("none", _) => return Ok(None),
            (_, Some(bytes)) => {
                let tags = self.tag_states(bytes).await?;
                state_of(bytes, tags)
            }
            (kind, None) => EntryState::Foreign {
                description: format!("a redis {kind}"),
            },
        };
        Ok(Some(Entry {
            key: full,
            state,
            ttl: raw.ttl,
            refreshing: raw.refreshing,
            waiters: raw.waiters,
            stale_ttl: raw.stale_ttl,
        }))
    }

    /// The tags a tagged envelope records, each with whether it still has its version.
    async fn tag_states(&self, bytes: &[u8]) -> Result<Vec<(String, bool)>> {
        if !envelope::is_tagged(bytes) {
            return Ok(Vec::new());
        }
        let recorded: Vec<(String, &[u8])> = envelope::recorded_tags(bytes)
            .map(|(n, v)| (String::from_utf8_lossy(n).into_owned(), v))
            .collect();
        let names: Vec<&str> = recorded.iter().map(|(n, _)| n.as_str()).collect();
        let current = self.store().current_tags(&names, None).await?;
        Ok(recorded
            .iter()
            .zip(&current)
            .map(|((n, v), c)| (n.clone(), c.as_deref() == Some(*v)))
            .collect())
    }
}

fn fmt_ttl(d: Option<Duration>) -> String {
    d.map_or_else(|| "-".to_owned(), |d| format!("{:.1}s", d.as_secs_f64()))
}

/// Several lines, `name: value`, as `cachectl get` prints them.
impl fmt::Display for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "key:         {}", self.key)?;
        match &self.state {
            EntryState::Value {
                json,
                age,
                compute_time,
                generation,
                tags,
                ..
            } => {
                writeln!(f, "value:       {json}")?;
                writeln!(f, "ttl:         {}", fmt_ttl(self.ttl))?;
                writeln!(f, "age:         {:.1}s", age.as_secs_f64())?;
                writeln!(f, "compute:     {:.3}ms", compute_time.as_secs_f64() * 1e3)?;
                writeln!(f, "generation:  {generation}")?;
                for (tag, current) in tags {
                    let state = if *current { "current" } else { "invalidated" };
                    writeln!(f, "tag:         {tag} ({state})")?;
                }
            }
            EntryState::Pending { holder } => {
                writeln!(f, "value:       - (a load is pending)")?;
                writeln!(f, "ttl:         {}", fmt_ttl(self.ttl))?;
                writeln!(f, "lease:       {holder}")?;
            }
            EntryState::Foreign { description } => {
                writeln!(f, "value:       not a cache entry: {description}")?;
            }
        }
        if let Some(token) = &self.refreshing {
            writeln!(f, "refreshing:  {token}")?;
        }
        if self.waiters {
            writeln!(f, "waiters:     yes")?;
        }
        if let Some(ttl) = self.stale_ttl {
            writeln!(f, "stale copy:  {:.1}s left", ttl.as_secs_f64())?;
        }
        Ok(())
    }
}
