//! Fleet-wide stats and entry inspection on Redis: the commands behind
//! [`Cache::fleet_stats`](crate::Cache::fleet_stats), the stats publisher
//! ([`CacheBuilder::publish_stats`](crate::CacheBuilder::publish_stats)) and
//! [`Cache::inspect`](crate::Cache::inspect).
//!
//! ```text
//! __cr:fleet:{<ns>:stats}        zset: the publishing instances of namespace <ns>, scored by
//!                                when their snapshot expires (ms since the epoch); its TTL is
//!                                refreshed by every publish
//! __cr:fleet:{<ns>:stats}:<id>   hash: instance <id>'s last snapshot (see `stats::fleet`),
//!                                with a TTL of three publish intervals
//! ```
//!
//! Both keys carry one hash tag, so on a cluster they live in one slot: a publish is one
//! `MULTI` on one node, a read two round trips to that node. Readers find the instances in
//! the zset: no `KEYS` or `SCAN`.

use std::collections::HashMap;
use std::time::Duration;

use redis::Value;

use super::{REFRESH_PREFIX, RedisBackend, STALE_PREFIX, WAIT_PREFIX, is_marker, millis};
use crate::backend::BackendResult;
use crate::key::aux_key;

/// The registry of namespace `namespace`'s publishing instances.
pub(crate) fn registry_key(namespace: &str) -> String {
    format!("__cr:fleet:{{{namespace}:stats}}")
}

/// Instance `id`'s snapshot hash.
pub(crate) fn snapshot_key(namespace: &str, id: &str) -> String {
    format!("{}:{id}", registry_key(namespace))
}

/// One instance's snapshot, to publish.
#[derive(Clone, Copy)]
pub(crate) struct Snapshot<'a> {
    /// The cache's namespace.
    pub(crate) namespace: &'a str,
    /// The instance's id.
    pub(crate) id: &'a str,
    /// The hash's fields.
    pub(crate) fields: &'a [(String, Vec<u8>)],
    /// The hash's TTL.
    pub(crate) ttl: Duration,
    /// When the hash expires (ms since the epoch): its registry score.
    pub(crate) expires_ms: u64,
    /// The registry's TTL.
    pub(crate) registry_ttl: Duration,
    /// Registry members scored below this are dropped.
    pub(crate) prune_before_ms: u64,
}

/// One registry member's snapshot, as read.
#[derive(Debug)]
pub(crate) enum RawSnapshot {
    /// Its hash: the fields whose names are UTF-8, and how many were not (skipped).
    Hash(HashMap<String, Vec<u8>>, usize),
    /// No such key: it expired (the instance stopped publishing) or was never written.
    Gone,
    /// Not a hash (another program's key under the fleet's names): the error Redis gave.
    Foreign,
}

/// One member's `HGETALL` reply (from a pipeline with `ignore_errors`).
fn raw_snapshot(reply: Value) -> RawSnapshot {
    if matches!(reply, Value::ServerError(_)) {
        return RawSnapshot::Foreign;
    }
    match redis::from_redis_value::<Vec<(Vec<u8>, Vec<u8>)>>(reply) {
        Ok(fields) if fields.is_empty() => RawSnapshot::Gone,
        Ok(fields) => {
            let total = fields.len();
            let hash: HashMap<String, Vec<u8>> = fields
                .into_iter()
                .filter_map(|(name, value)| String::from_utf8(name).ok().map(|n| (n, value)))
                .collect();
            let bad = total - hash.len();
            RawSnapshot::Hash(hash, bad)
        }
        Err(_) => RawSnapshot::Foreign,
    }
}

/// What is stored under a value key and around it, for `Cache::inspect`.
#[derive(Debug, Default)]
pub(crate) struct RawEntry {
    /// The value key's Redis type (`TYPE`): `string` for an entry, `none` for no key.
    pub(crate) kind: String,
    /// The value key's content: an envelope, a pending load's marker, or something else.
    pub(crate) value: Option<Vec<u8>>,
    /// Its TTL left (`None`: no key, or no TTL).
    pub(crate) ttl: Option<Duration>,
    /// `refresh`: the token of the process refreshing it, if one is.
    pub(crate) refreshing: Option<String>,
    /// Whether callers wait for its fill.
    pub(crate) waiters: bool,
    /// `stale`: the TTL left of its kept copy, if it has one.
    pub(crate) stale_ttl: Option<Duration>,
}

fn pttl(v: &Value) -> Option<Duration> {
    match v {
        Value::Int(ms) if *ms >= 0 => Some(Duration::from_millis(*ms as u64)),
        _ => None,
    }
}

impl RedisBackend {
    /// Stores `s`: the instance's hash (replacing the previous one) with its TTL, its
    /// registry entry scored by its expiry, the registry's TTL refreshed, and registry members
    /// whose snapshot expired before `s.prune_before_ms` dropped. One `MULTI`.
    pub(crate) async fn fleet_publish(&self, s: &Snapshot<'_>) -> BackendResult<()> {
        let Snapshot {
            namespace,
            id,
            fields,
            ttl,
            expires_ms,
            registry_ttl,
            prune_before_ms,
        } = *s;
        let registry = registry_key(namespace);
        let snapshot = snapshot_key(namespace, id);
        let registry = &registry;
        self.conns
            .run_for(registry, "fleet stats publish", |mut conn| async move {
                let mut pipe = redis::pipe();
                pipe.atomic();
                pipe.cmd("DEL").arg(&snapshot).ignore();
                if !fields.is_empty() {
                    let mut hset = redis::cmd("HSET");
                    hset.arg(&snapshot);
                    for (name, value) in fields {
                        hset.arg(name).arg(value.as_slice());
                    }
                    pipe.add_command(hset).ignore();
                }
                pipe.cmd("PEXPIRE")
                    .arg(&snapshot)
                    .arg(millis(ttl))
                    .ignore()
                    .cmd("ZADD")
                    .arg(registry)
                    .arg(expires_ms)
                    .arg(id)
                    .ignore()
                    .cmd("ZREMRANGEBYSCORE")
                    .arg(registry)
                    .arg("-inf")
                    .arg(format!("({prune_before_ms}"))
                    .ignore()
                    .cmd("PEXPIRE")
                    .arg(registry)
                    .arg(millis(registry_ttl))
                    .ignore();
                pipe.query_async::<()>(&mut conn).await
            })
            .await
    }

    /// The snapshots of the instances registered with an expiry at or after `live_after_ms`
    /// (a candidate: its hash's TTL decides, an expired one reads as `None`): the registry,
    /// then every member's hash (one pipeline, one slot), one [`RawSnapshot`] per member.
    pub(crate) async fn fleet_read(
        &self,
        namespace: &str,
        live_after_ms: u64,
    ) -> BackendResult<Vec<RawSnapshot>> {
        let registry = &registry_key(namespace);
        self.conns
            .run_for(registry, "fleet stats read", |mut conn| async move {
                let ids: Vec<String> = redis::cmd("ZRANGE")
                    .arg(registry)
                    .arg(live_after_ms)
                    .arg("+inf")
                    .arg("BYSCORE")
                    .query_async(&mut conn)
                    .await?;
                if ids.is_empty() {
                    return Ok(Vec::new());
                }
                // One member's failure (a key of another type: WRONGTYPE) is its own reply,
                // not the pipeline's.
                let mut pipe = redis::pipe();
                pipe.ignore_errors();
                for id in &ids {
                    pipe.cmd("HGETALL").arg(snapshot_key(namespace, id));
                }
                let replies: Vec<Value> = pipe.query_async(&mut conn).await?;
                Ok(replies.into_iter().map(raw_snapshot).collect())
            })
            .await
    }

    /// What is stored under `key` and its bookkeeping keys: a pipeline on `key`'s slot, then
    /// a `GET` if the key holds a string (gone by then: reported as no key, `none`).
    pub(crate) async fn inspect(&self, key: &str) -> BackendResult<RawEntry> {
        let refresh = aux_key(REFRESH_PREFIX, key);
        let wait = aux_key(WAIT_PREFIX, key);
        let stale = aux_key(STALE_PREFIX, key);
        self.conns
            .run_for(key, "inspect", |mut conn| async move {
                let (kind, ttl, refreshing, waiters, stale_ttl): (
                    String,
                    Value,
                    Option<Vec<u8>>,
                    bool,
                    Value,
                ) = redis::pipe()
                    .cmd("TYPE")
                    .arg(key)
                    .cmd("PTTL")
                    .arg(key)
                    .cmd("GET")
                    .arg(&refresh)
                    .cmd("EXISTS")
                    .arg(&wait)
                    .cmd("PTTL")
                    .arg(&stale)
                    .query_async(&mut conn)
                    .await?;
                let value: Option<Vec<u8>> = match kind.as_str() {
                    "string" => redis::cmd("GET").arg(key).query_async(&mut conn).await?,
                    _ => None,
                };
                // A string that expired (or was deleted) between `TYPE` and `GET`: no entry
                // now, not a foreign string without a value.
                let kind = if kind == "string" && value.is_none() {
                    "none".to_owned()
                } else {
                    kind
                };
                Ok(RawEntry {
                    kind,
                    value,
                    ttl: pttl(&ttl),
                    refreshing: refreshing.map(|t| String::from_utf8_lossy(&t).into_owned()),
                    waiters,
                    stale_ttl: pttl(&stale_ttl),
                })
            })
            .await
    }
}

/// Whether `bytes`, read from a value key, is a pending load's marker (a lease, with `lock`).
pub(crate) fn is_pending_marker(bytes: &[u8]) -> bool {
    is_marker(bytes)
}
