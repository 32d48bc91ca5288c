//! Write-behind on Redis: the queue keys, the scripts (`WB_ENQUEUE`, `WB_REASSERT`, `WB_ACK`,
//! `WB_DEAD`, `WB_RENEW`, `WB_RELEASE`, `WB_RETRY`) and the stream commands the worker uses.
//! See docs/design-write-behind.md for the layout:
//!
//! ```text
//! __cr:wb:{<ns>:<q>:<p>}           stream: partition p of queue q; consumer group "cr"
//! __cr:wb:{<ns>:<q>:<p>}:owner     lease of the worker applying p: its token, PX <lease>
//! __cr:wb:{<ns>:<q>:<p>}:tries     hash: entry id -> failed attempts so far
//! __cr:wb:{<ns>:<q>}:dead          dead-letter stream of q
//! __cr:wb:{<ns>:<q>}:workers       zset: live workers serving q, score = expiry (ms since epoch)
//! __cr:wbl:{K}                     the id of the last write-behind write of K
//! ```
//!
//! Every key has a TTL: the value key the value's, `wbl` the value's but at least an hour, the streams, tries hashes and
//! dead letters the queue's retention (extended by every `XADD` and every worker poll), the
//! owner leases theirs, the workers set the retention too.

mod reply;
mod scripts;

use std::time::Duration;

use redis::Value;

pub(crate) use self::reply::StreamEntry;
use self::reply::{int_of, items, parse_consumers, parse_entries, parse_read, string_of};
use self::scripts::{WB_ACK, WB_DEAD, WB_ENQUEUE, WB_REASSERT, WB_RELEASE, WB_RENEW, WB_RETRY};
use self::scripts::{WB_DROP_AT, WB_PEEK, WB_REASSERT_AT, WB_STORE_AT};
/// A connection of the worker's own (see [`RedisBackend::own_connection`]).
pub(crate) use super::conn::Conn as WbConn;

use super::conn::SlotPipe;
use super::scripts::{evalsha, run};
use super::{CHANNEL, RedisBackend, inv, millis};
use crate::backend::BackendResult;
use crate::key::{aux_key, key_slot};
use crate::store::{Store, WbWrite};

/// The consumer group of every partition.
pub(crate) const GROUP: &str = "cr";

const WBL_PREFIX: &str = "__cr:wbl:";

/// On a cluster, what an enqueue's first step puts in a `wbl` that does not exist: a position
/// older than any (the key has a write-behind record; no value stored by it yet).
const CLAIMED: &str = "0-0";

/// The keys of one queue partition.
#[derive(Debug, Clone)]
pub(crate) struct PartitionKeys {
    pub(crate) stream: String,
    pub(crate) owner: String,
    pub(crate) tries: String,
}

impl PartitionKeys {
    pub(crate) fn new(namespace: &str, queue: &str, partition: u16) -> Self {
        let stream = format!("__cr:wb:{{{namespace}:{queue}:{partition}}}");
        PartitionKeys {
            owner: format!("{stream}:owner"),
            tries: format!("{stream}:tries"),
            stream,
        }
    }
}

/// The dead-letter stream of a queue.
pub(crate) fn dead_key(namespace: &str, queue: &str) -> String {
    format!("__cr:wb:{{{namespace}:{queue}}}:dead")
}

/// The live workers serving a queue.
pub(crate) fn workers_key(namespace: &str, queue: &str) -> String {
    format!("__cr:wb:{{{namespace}:{queue}}}:workers")
}

/// The partition of value key `key`: CRC16 of the full key (as Redis Cluster hashes it,
/// without the hash-tag rule) modulo `partitions`.
pub(crate) fn partition_of(key: &str, partitions: u16) -> u16 {
    crate::key::crc16(key.as_bytes()) % partitions.max(1)
}

/// The fields a dead letter adds to its entry (dropped when it is retried).
const DEAD_FIELDS: [&str; 3] = ["e", "n", "from"];

/// The field of an entry moved back by `retry_dead`: its first position (stream id).
pub(crate) const POSITION_FIELD: &str = "p";

/// What `WB_DEAD` records about the entries it moves, and the key it may invalidate.
pub(crate) struct DeadLetter<'a> {
    /// The value key (empty for an entry without one: nothing is invalidated).
    pub(crate) key: &'a str,
    /// The write id of the last entry of the run (empty: none).
    pub(crate) write_id: &'a str,
    /// The position of the last entry of the run (a cluster compares positions, not ids).
    pub(crate) position: Option<String>,
    pub(crate) error: &'a str,
    pub(crate) attempts: u32,
}

/// What one owned partition's reads and acknowledgements need.
pub(crate) struct Owned<'a> {
    pub(crate) keys: &'a PartitionKeys,
    pub(crate) token: &'a str,
    pub(crate) retention: Duration,
}

/// Appends a queued write's stream fields (function, key, write id, arguments, envelope, ttl
/// ms): the one place the entry's layout is written, for `WB_ENQUEUE`'s `XADD` and the
/// cluster's.
fn push_entry(cmd: &mut redis::Cmd, w: &WbWrite<'_>, envelope: &[u8], ttl: &str) {
    cmd.arg("f")
        .arg(w.function)
        .arg("k")
        .arg(w.key)
        .arg("i")
        .arg(w.id)
        .arg("a")
        .arg(w.args)
        .arg("v")
        .arg(envelope)
        .arg("t")
        .arg(ttl);
}

impl RedisBackend {
    /// A connection of the worker's own (blocking reads hold it), connected.
    pub(crate) async fn own_connection(&self) -> redis::RedisResult<WbConn> {
        self.conns.own_connection().await
    }

    /// How long one operation may take.
    pub(crate) fn op_timeout(&self) -> Duration {
        self.conns.operation_timeout()
    }

    pub(crate) fn wbl_key(key: &str) -> String {
        aux_key(WBL_PREFIX, key)
    }

    /// `WB_ENQUEUE`: the write stored (or, without a value, the key invalidated) and queued in
    /// one step.
    pub(crate) async fn wb_enqueue(&self, store: &Store, w: &WbWrite<'_>) -> BackendResult<()> {
        let config = store.wb_config();
        let partition = partition_of(w.key, config.partitions);
        let stream = PartitionKeys::new(store.namespace(), w.queue, partition).stream;
        if self.conns.is_cluster() {
            return self.wb_enqueue_in_steps(store, w, &stream).await;
        }
        let key = w.key;
        let waiters = self.waiters(key);
        let copy = Self::stale_copy(key);
        let refresh = Self::refresh_lease_key(key);
        let wbl = Self::wbl_key(key);
        let frame = self.frame(inv::Kind::Keys, &[key]);
        let ttl = millis(w.ttl).to_string();
        let wbl_ttl = millis(wbl_ttl(w.ttl));
        let envelope: &[u8] = w.value.map_or(&[], |v| &v.bytes[..]);
        let (frame, channel) = (&frame, &self.inv_channel);
        let (waiters, copy, refresh, wbl, stream, ttl) =
            (&waiters, &copy, &refresh, &wbl, &stream, &ttl);
        self.conns
            .run("write-behind enqueue", |mut conn| async move {
                let mut cmd = evalsha(
                    &WB_ENQUEUE,
                    6,
                    20,
                    6 * key.len()
                        + 2 * envelope.len()
                        + w.args.len()
                        + frame.len()
                        + w.function.len()
                        + 180,
                );
                cmd.arg(key)
                    .arg(waiters)
                    .arg(copy)
                    .arg(refresh)
                    .arg(wbl)
                    .arg(stream)
                    .arg(envelope)
                    .arg(ttl)
                    .arg(CHANNEL)
                    .arg(channel)
                    .arg(&frame[..])
                    .arg(w.id)
                    .arg(millis(config.retention))
                    .arg(wbl_ttl);
                push_entry(&mut cmd, w, envelope, ttl);
                let _: Value = run(&mut conn, &WB_ENQUEUE, &cmd).await?;
                Ok(())
            })
            .await
    }

    /// Redis Cluster: the enqueue in three steps, each in one slot (docs/design-cluster.md
    /// §3): 1. K's slot: `wbl` made to exist (a claim, [`CLAIMED`], if it did not); 2. the
    /// stream's slot: `XADD` + `PEXPIRE` (the write is accepted once this succeeded); 3. K's
    /// slot: `WB_STORE_AT` stores the value (or invalidates the key) unless a write of a later
    /// position did. Step 3 failing: the key is invalidated in the background (the worker
    /// re-asserts the write once applied). Every step is idempotent.
    async fn wb_enqueue_in_steps(
        &self,
        store: &Store,
        w: &WbWrite<'_>,
        stream: &str,
    ) -> BackendResult<()> {
        let config = store.wb_config();
        let key = w.key;
        let wbl = Self::wbl_key(key);
        let wbl_ttl = millis(wbl_ttl(w.ttl));
        let ttl = millis(w.ttl).to_string();
        let envelope: &[u8] = w.value.map_or(&[], |v| &v.bytes[..]);
        let (wbl, ttl) = (&wbl, &ttl);
        // 1. Without a record, a write stopped after step 2 would never be re-asserted.
        self.conns
            .run_for(wbl, "write-behind claim", |mut conn| async move {
                redis::pipe()
                    .cmd("SET")
                    .arg(wbl)
                    .arg(CLAIMED)
                    .arg("NX")
                    .arg("PX")
                    .arg(wbl_ttl)
                    .ignore()
                    .cmd("PEXPIRE")
                    .arg(wbl)
                    .arg(wbl_ttl)
                    .ignore()
                    .exec_async(&mut conn)
                    .await
            })
            .await?;
        // 2. Queued: from here the call has succeeded.
        let position: String = self
            .conns
            .run_for(stream, "write-behind enqueue", |mut conn| async move {
                let mut xadd = redis::cmd("XADD");
                xadd.arg(stream).arg("*");
                push_entry(&mut xadd, w, envelope, ttl);
                let (id, _): (String, i64) = redis::pipe()
                    .add_command(xadd)
                    .cmd("PEXPIRE")
                    .arg(stream)
                    .arg(millis(config.retention))
                    .query_async(&mut conn)
                    .await?;
                Ok(id)
            })
            .await?;
        // 3. The value, unless a write queued after this one stored its own already.
        let waiters = self.waiters(key);
        let copy = Self::stale_copy(key);
        let refresh = Self::refresh_lease_key(key);
        let frame = self.frame(inv::Kind::Keys, &[key]);
        let (frame, channel) = (&frame, &self.inv_channel);
        let (waiters, copy, refresh, position) = (&waiters, &copy, &refresh, &position);
        let stored = self
            .conns
            .run_for(key, "write-behind store", |mut conn| async move {
                let mut cmd = evalsha(
                    &WB_STORE_AT,
                    5,
                    7,
                    5 * key.len() + envelope.len() + frame.len() + 128,
                );
                cmd.arg(key)
                    .arg(waiters)
                    .arg(copy)
                    .arg(refresh)
                    .arg(wbl)
                    .arg(envelope)
                    .arg(ttl)
                    .arg(CHANNEL)
                    .arg(channel)
                    .arg(&frame[..])
                    .arg(position)
                    .arg(wbl_ttl);
                let _: i64 = run(&mut conn, &WB_STORE_AT, &cmd).await?;
                Ok(())
            })
            .await;
        if let Err(e) = stored {
            // Queued, but the cache may hold an older value: not served until the worker
            // re-asserts this write.
            tracing::debug!(target: "cache_runtime", "write-behind store of {key} failed after it was queued ({e}); the key is invalidated");
            store.invalidate_in_background(vec![key.to_owned()], Vec::new());
        }
        Ok(())
    }

    /// `WB_REASSERT` (see the script; on a cluster `WB_REASSERT_AT`, by `position`). Returns
    /// whether it wrote the value.
    pub(crate) async fn wb_reassert(
        &self,
        key: &str,
        id: &str,
        position: Option<&str>,
        envelope: &[u8],
        ttl: Duration,
    ) -> BackendResult<bool> {
        // The script, and what it compares `wbl` with: the write's id on a single Redis (one
        // script claims and stores), its queue position on a cluster (see `WB_REASSERT_AT`).
        let (script, mark, wbl_ttl) = if self.conns.is_cluster() {
            let Some(position) = position else {
                return Ok(false);
            };
            (&*WB_REASSERT_AT, position, Some(millis(wbl_ttl(ttl))))
        } else {
            (&*WB_REASSERT, id, None)
        };
        let waiters = self.waiters(key);
        let copy = Self::stale_copy(key);
        let refresh = Self::refresh_lease_key(key);
        let wbl = Self::wbl_key(key);
        let frame = self.frame(inv::Kind::Keys, &[key]);
        let (frame, channel) = (&frame, &self.inv_channel);
        let (waiters, copy, refresh, wbl) = (&waiters, &copy, &refresh, &wbl);
        self.conns
            .run_for(key, "write-behind re-assert", |mut conn| async move {
                let args = 6 + usize::from(wbl_ttl.is_some());
                let mut cmd = evalsha(script, 5, args, 5 * key.len() + envelope.len() + 96);
                cmd.arg(key)
                    .arg(waiters)
                    .arg(copy)
                    .arg(refresh)
                    .arg(wbl)
                    .arg(mark)
                    .arg(envelope)
                    .arg(millis(ttl))
                    .arg(CHANNEL)
                    .arg(channel)
                    .arg(&frame[..]);
                if let Some(wbl_ttl) = wbl_ttl {
                    cmd.arg(wbl_ttl);
                }
                let wrote: i64 = run(&mut conn, script, &cmd).await?;
                Ok(wrote == 2)
            })
            .await
    }

    /// `WB_ACK`: returns false if the lease was lost.
    pub(crate) async fn wb_ack(&self, p: &Owned<'_>, ids: &[String]) -> BackendResult<bool> {
        if ids.is_empty() {
            return Ok(true);
        }
        self.conns
            .run("write-behind ack", |mut conn| async move {
                let mut cmd = evalsha(&WB_ACK, 3, 3 + ids.len(), 64 + 24 * ids.len());
                cmd.arg(&p.keys.stream)
                    .arg(&p.keys.owner)
                    .arg(&p.keys.tries)
                    .arg(p.token)
                    .arg(GROUP)
                    .arg(millis(p.retention))
                    .arg(ids);
                let held: i64 = run(&mut conn, &WB_ACK, &cmd).await?;
                Ok(held == 1)
            })
            .await
    }

    /// `WB_DEAD`: moves `ids` to the dead letters; if `key`'s last write-behind write is
    /// `write_id` (the last of the run), invalidates `key` (its value never reaches the
    /// database). Returns `None` if the lease was lost, else whether `key` was invalidated.
    pub(crate) async fn wb_dead(
        &self,
        p: &Owned<'_>,
        dead: &str,
        letter: &DeadLetter<'_>,
        ids: &[String],
    ) -> BackendResult<Option<bool>> {
        if self.conns.is_cluster() {
            return self.wb_dead_in_steps(p, dead, letter, ids).await;
        }
        let key = letter.key;
        let copy = Self::stale_copy(key);
        let refresh = Self::refresh_lease_key(key);
        let wbl = Self::wbl_key(key);
        let frame = self.frame(inv::Kind::Keys, &[key]);
        let (frame, channel) = (&frame, &self.inv_channel);
        let (copy, refresh, wbl) = (&copy, &refresh, &wbl);
        self.conns
            .run("write-behind dead letter", |mut conn| async move {
                let mut cmd = evalsha(
                    &WB_DEAD,
                    8,
                    8 + ids.len(),
                    256 + 5 * key.len() + frame.len() + letter.error.len() + 24 * ids.len(),
                );
                cmd.arg(&p.keys.stream)
                    .arg(&p.keys.owner)
                    .arg(&p.keys.tries)
                    .arg(dead)
                    .arg(key)
                    .arg(copy)
                    .arg(refresh)
                    .arg(wbl)
                    .arg(p.token)
                    .arg(GROUP)
                    .arg(millis(p.retention))
                    .arg(letter.error)
                    .arg(letter.attempts)
                    .arg(letter.write_id)
                    .arg(channel)
                    .arg(&frame[..])
                    .arg(ids);
                let held: i64 = run(&mut conn, &WB_DEAD, &cmd).await?;
                Ok(match held {
                    0 => None,
                    2 => Some(true),
                    _ => Some(false),
                })
            })
            .await
    }

    /// Redis Cluster: `WB_DEAD` in four steps, one slot each: 1. the partition's: under the
    /// lease, the entries' fields (`WB_PEEK`); 2. the dead letters' slot: `XADD` each with
    /// `e`, `n`, `from`; 3. the partition's: `WB_ACK` (under the lease); 4. K's slot:
    /// `WB_DROP_AT`. A stop between 2 and 3 leaves the entries pending as well as dead: the
    /// next owner applies them again (and may dead-letter them a second time).
    async fn wb_dead_in_steps(
        &self,
        p: &Owned<'_>,
        dead: &str,
        letter: &DeadLetter<'_>,
        ids: &[String],
    ) -> BackendResult<Option<bool>> {
        let peeked: Value = self
            .conns
            .run("write-behind dead letter", |mut conn| async move {
                let mut cmd = evalsha(&WB_PEEK, 2, 1 + ids.len(), 64 + 24 * ids.len());
                cmd.arg(&p.keys.stream)
                    .arg(&p.keys.owner)
                    .arg(p.token)
                    .arg(ids);
                run(&mut conn, &WB_PEEK, &cmd).await
            })
            .await?;
        let Value::Array(found) = peeked else {
            return Ok(None);
        };
        let mut adds = Vec::new();
        for (fields, id) in found.iter().skip(1).zip(ids) {
            let fields = items(fields);
            if fields.is_empty() {
                continue;
            }
            let mut cmd = redis::cmd("XADD");
            cmd.arg(dead).arg("*");
            for f in fields {
                if let Value::BulkString(b) = f {
                    cmd.arg(&b[..]);
                } else if let Some(text) = string_of(f) {
                    cmd.arg(text);
                }
            }
            cmd.arg("e")
                .arg(letter.error)
                .arg("n")
                .arg(letter.attempts)
                .arg("from")
                .arg(format!("{} {id}", p.keys.stream));
            adds.push(cmd);
        }
        if !adds.is_empty() {
            let adds = &adds;
            self.conns
                .run("write-behind dead letter", |mut conn| async move {
                    let mut pipe = redis::pipe();
                    for cmd in adds {
                        pipe.add_command(cmd.clone()).ignore();
                    }
                    pipe.cmd("PEXPIRE")
                        .arg(dead)
                        .arg(millis(p.retention))
                        .ignore();
                    pipe.exec_async(&mut conn).await
                })
                .await?;
        }
        if !self.wb_ack(p, ids).await? {
            return Ok(None);
        }
        let (key, Some(position)) = (letter.key, letter.position.as_deref()) else {
            return Ok(Some(false));
        };
        if key.is_empty() {
            return Ok(Some(false));
        }
        let copy = Self::stale_copy(key);
        let refresh = Self::refresh_lease_key(key);
        let wbl = Self::wbl_key(key);
        let frame = self.frame(inv::Kind::Keys, &[key]);
        let (frame, channel) = (&frame, &self.inv_channel);
        let (copy, refresh, wbl) = (&copy, &refresh, &wbl);
        let dropped = self
            .conns
            .run("write-behind dead letter", |mut conn| async move {
                let mut cmd = evalsha(&WB_DROP_AT, 4, 3, 4 * key.len() + frame.len() + 64);
                cmd.arg(key)
                    .arg(copy)
                    .arg(refresh)
                    .arg(wbl)
                    .arg(position)
                    .arg(channel)
                    .arg(&frame[..]);
                let dropped: i64 = run(&mut conn, &WB_DROP_AT, &cmd).await?;
                Ok(dropped == 2)
            })
            .await;
        match dropped {
            Ok(dropped) => Ok(Some(dropped)),
            Err(e) => {
                // The entries are dead letters already; the key may hold the dead write's
                // value: removed unconditionally (a miss at worst).
                use crate::backend::Backend as _;
                match self.invalidate(&[key]).await {
                    Ok(()) => Ok(Some(true)),
                    Err(again) => {
                        tracing::warn!(target: "cache_runtime", "write-behind dead letter of {key}: the key could not be invalidated ({e}; {again}); it may serve the dead write's value until its TTL");
                        Ok(Some(false))
                    }
                }
            }
        }
    }

    /// One more failed attempt of entry `id`: the count so far.
    pub(crate) async fn wb_failed_attempt(&self, p: &Owned<'_>, id: &str) -> BackendResult<u32> {
        self.conns
            .run("write-behind attempt", |mut conn| async move {
                let (n, _): (i64, i64) = redis::pipe()
                    .cmd("HINCRBY")
                    .arg(&p.keys.tries)
                    .arg(id)
                    .arg(1)
                    .cmd("PEXPIRE")
                    .arg(&p.keys.tries)
                    .arg(millis(p.retention))
                    .query_async(&mut conn)
                    .await?;
                Ok(u32::try_from(n).unwrap_or(u32::MAX))
            })
            .await
    }

    /// Failed attempts recorded for entry `id` (by any owner).
    pub(crate) async fn wb_attempts(&self, p: &Owned<'_>, id: &str) -> BackendResult<u32> {
        self.conns
            .run("write-behind attempts", |mut conn| async move {
                let n: Option<i64> = redis::cmd("HGET")
                    .arg(&p.keys.tries)
                    .arg(id)
                    .query_async(&mut conn)
                    .await?;
                Ok(n.and_then(|n| u32::try_from(n).ok()).unwrap_or(0))
            })
            .await
    }

    /// The holders of the leases `owners` (their tokens; `None`: free).
    pub(crate) async fn wb_owners(&self, owners: &[String]) -> BackendResult<Vec<Option<String>>> {
        if owners.is_empty() {
            return Ok(Vec::new());
        }
        self.conns
            .run("write-behind leases", |mut conn| async move {
                let mut pipe = SlotPipe::new();
                for owner in owners {
                    pipe.push(key_slot(owner), redis::cmd("GET").arg(owner).clone());
                }
                pipe.query(&mut conn).await
            })
            .await
    }

    /// Takes the lease `owner` if it is free (`SET owner token NX PX lease`), or renews it if
    /// `token` holds it already (a partition task stopped while its renewal failed: the new
    /// task's lease clock then starts from a real renewal). Returns whether it is held now.
    pub(crate) async fn wb_take(
        &self,
        owner: &str,
        token: &str,
        lease: Duration,
    ) -> BackendResult<bool> {
        let won: Option<String> = self
            .conns
            .run("write-behind take", |mut conn| async move {
                redis::cmd("SET")
                    .arg(owner)
                    .arg(token)
                    .arg("NX")
                    .arg("PX")
                    .arg(millis(lease))
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        if won.is_some() {
            return Ok(true);
        }
        Ok(self.wb_renew(&[owner], token, lease).await?.first() == Some(&true))
    }

    /// Renews the leases `owners` held with `token`: for each, whether it is still held.
    pub(crate) async fn wb_renew(
        &self,
        owners: &[&str],
        token: &str,
        lease: Duration,
    ) -> BackendResult<Vec<bool>> {
        if owners.is_empty() {
            return Ok(Vec::new());
        }
        let renewed: Vec<i64> = self
            .conns
            .run("write-behind renew", |mut conn| async move {
                if conn.is_cluster() {
                    // One request per lease (each its partition's slot), concurrently; each
                    // loads the script on its node if needed.
                    let renewals = owners.iter().map(|owner| {
                        let mut conn = conn.clone();
                        async move {
                            let mut cmd = evalsha(&WB_RENEW, 1, 2, 64);
                            cmd.arg(*owner).arg(token).arg(millis(lease));
                            run::<i64>(&mut conn, &WB_RENEW, &cmd).await
                        }
                    });
                    return futures_util::future::join_all(renewals)
                        .await
                        .into_iter()
                        .collect::<redis::RedisResult<Vec<i64>>>();
                }
                // Make sure the server has the script (a pipeline cannot reload it).
                let mut probe = evalsha(&WB_RENEW, 1, 2, 64);
                probe.arg(owners[0]).arg(token).arg(millis(lease));
                let first: i64 = run(&mut conn, &WB_RENEW, &probe).await?;
                let mut pipe = redis::pipe();
                for owner in &owners[1..] {
                    let mut cmd = evalsha(&WB_RENEW, 1, 2, 64);
                    cmd.arg(*owner).arg(token).arg(millis(lease));
                    pipe.add_command(cmd);
                }
                let mut rest: Vec<i64> = if owners.len() > 1 {
                    pipe.query_async(&mut conn).await?
                } else {
                    Vec::new()
                };
                rest.insert(0, first);
                Ok(rest)
            })
            .await?;
        Ok(renewed.into_iter().map(|r| r == 1).collect())
    }

    /// Gives a lease back if `token` holds it.
    pub(crate) async fn wb_release(&self, owner: &str, token: &str) -> BackendResult<()> {
        self.conns
            .run("write-behind release", |mut conn| async move {
                let mut cmd = evalsha(&WB_RELEASE, 1, 1, 64);
                cmd.arg(owner).arg(token);
                let _: i64 = run(&mut conn, &WB_RELEASE, &cmd).await?;
                Ok(())
            })
            .await
    }

    /// Deletes `key`'s last write-behind write record (`__cr:wbl:{K}`): a write the caller
    /// makes itself follows, and the worker's re-assert of an older queued write must not put
    /// that write's value back over it.
    pub(crate) async fn wb_forget_last(&self, key: &str) -> BackendResult<()> {
        let wbl = Self::wbl_key(key);
        let wbl = &wbl;
        self.conns
            .run("write-behind forget", |mut conn| async move {
                redis::cmd("DEL").arg(wbl).exec_async(&mut conn).await
            })
            .await
    }

    /// Extends the life of `keys` (queues a worker polls) to `retention`.
    pub(crate) async fn wb_touch(&self, keys: &[String], retention: Duration) -> BackendResult<()> {
        if keys.is_empty() {
            return Ok(());
        }
        self.conns
            .run("write-behind retention", |mut conn| async move {
                let mut pipe = SlotPipe::new();
                for key in keys {
                    let mut cmd = redis::cmd("PEXPIRE");
                    cmd.arg(key).arg(millis(retention));
                    pipe.push_ignored(key_slot(key), cmd);
                }
                pipe.query::<Vec<Value>>(&mut conn).await.map(drop)
            })
            .await
    }

    /// Registers `name` as a live worker of each queue of `workers` (their live sets) until
    /// `now + ttl`, drops expired ones, and returns how many are live in each.
    pub(crate) async fn wb_heartbeat(
        &self,
        workers: &[String],
        name: &str,
        ttl: Duration,
        retention: Duration,
    ) -> BackendResult<Vec<usize>> {
        let now = now_ms();
        self.conns
            .run("write-behind heartbeat", |mut conn| async move {
                let mut pipe = SlotPipe::new();
                for set in workers {
                    let slot = key_slot(set);
                    let mut add = redis::cmd("ZADD");
                    add.arg(set).arg(now + millis(ttl)).arg(name);
                    let mut expired = redis::cmd("ZREMRANGEBYSCORE");
                    expired.arg(set).arg("-inf").arg(now);
                    let mut expire = redis::cmd("PEXPIRE");
                    expire.arg(set).arg(millis(retention));
                    pipe.push_ignored(slot, add)
                        .push_ignored(slot, expired)
                        .push(slot, redis::cmd("ZCARD").arg(set).clone())
                        .push_ignored(slot, expire);
                }
                let live: Vec<i64> = pipe.query(&mut conn).await?;
                Ok(live
                    .into_iter()
                    .map(|n| usize::try_from(n).unwrap_or(1).max(1))
                    .collect())
            })
            .await
    }

    /// Removes `name` from the live sets `workers`.
    pub(crate) async fn wb_leave(&self, workers: &[String], name: &str) -> BackendResult<()> {
        self.conns
            .run("write-behind leave", |mut conn| async move {
                let mut pipe = SlotPipe::new();
                for set in workers {
                    let mut cmd = redis::cmd("ZREM");
                    cmd.arg(set).arg(name);
                    pipe.push_ignored(key_slot(set), cmd);
                }
                pipe.query::<Vec<Value>>(&mut conn).await.map(drop)
            })
            .await
    }

    /// Makes the partition's consumer group (from the stream's start), and the stream if
    /// there is none; renews the stream's retention.
    pub(crate) async fn wb_group(&self, p: &Owned<'_>) -> BackendResult<()> {
        self.conns
            .run("write-behind group", |mut conn| async move {
                let made: redis::RedisResult<Value> = redis::cmd("XGROUP")
                    .arg("CREATE")
                    .arg(&p.keys.stream)
                    .arg(GROUP)
                    .arg("0")
                    .arg("MKSTREAM")
                    .query_async(&mut conn)
                    .await;
                match made {
                    Ok(_) => {}
                    Err(e) if e.code() == Some("BUSYGROUP") => {}
                    Err(e) => return Err(e),
                }
                redis::cmd("PEXPIRE")
                    .arg(&p.keys.stream)
                    .arg(millis(p.retention))
                    .query_async::<i64>(&mut conn)
                    .await?;
                Ok(())
            })
            .await
    }

    /// `XAUTOCLAIM stream cr <me> 0 <cursor> COUNT n`: entries other consumers held become
    /// `me`'s. Returns the next cursor (`0-0`: done) and the ids of deleted entries found
    /// pending.
    pub(crate) async fn wb_autoclaim(
        &self,
        p: &Owned<'_>,
        me: &str,
        cursor: &str,
        count: usize,
    ) -> BackendResult<(String, Vec<String>)> {
        self.conns
            .run("write-behind autoclaim", |mut conn| async move {
                let reply: Value = redis::cmd("XAUTOCLAIM")
                    .arg(&p.keys.stream)
                    .arg(GROUP)
                    .arg(me)
                    .arg(0)
                    .arg(cursor)
                    .arg("COUNT")
                    .arg(count)
                    .arg("JUSTID")
                    .query_async(&mut conn)
                    .await?;
                let parts = items(&reply);
                let next = parts
                    .first()
                    .and_then(string_of)
                    .unwrap_or_else(|| "0-0".to_owned());
                let deleted = parts
                    .get(2)
                    .map(|d| items(d).iter().filter_map(string_of).collect())
                    .unwrap_or_default();
                Ok((next, deleted))
            })
            .await
    }

    /// Deletes the partition's consumers other than `me` that hold no pending entry (workers
    /// gone: after `XAUTOCLAIM` took their entries, nothing refers to them). Returns how many
    /// were deleted.
    pub(crate) async fn wb_prune_consumers(&self, p: &Owned<'_>, me: &str) -> BackendResult<usize> {
        self.conns
            .run("write-behind consumers", |mut conn| async move {
                let reply: Value = redis::cmd("XINFO")
                    .arg("CONSUMERS")
                    .arg(&p.keys.stream)
                    .arg(GROUP)
                    .query_async(&mut conn)
                    .await?;
                let idle: Vec<String> = parse_consumers(&reply)
                    .into_iter()
                    .filter(|(name, pending)| *pending == 0 && name != me)
                    .map(|(name, _)| name)
                    .collect();
                if idle.is_empty() {
                    return Ok(0);
                }
                let mut pipe = redis::pipe();
                for name in &idle {
                    pipe.cmd("XGROUP")
                        .arg("DELCONSUMER")
                        .arg(&p.keys.stream)
                        .arg(GROUP)
                        .arg(name)
                        .ignore();
                }
                pipe.exec_async(&mut conn).await?;
                Ok(idle.len())
            })
            .await
    }

    /// `me`'s pending entries after `after` (exclusive), oldest first, at most `count`.
    pub(crate) async fn wb_pending(
        &self,
        p: &Owned<'_>,
        me: &str,
        after: &str,
        count: usize,
    ) -> BackendResult<Vec<StreamEntry>> {
        self.conns
            .run("write-behind pending", |mut conn| async move {
                let reply: Value = redis::cmd("XREADGROUP")
                    .arg("GROUP")
                    .arg(GROUP)
                    .arg(me)
                    .arg("COUNT")
                    .arg(count)
                    .arg("STREAMS")
                    .arg(&p.keys.stream)
                    .arg(after)
                    .query_async(&mut conn)
                    .await?;
                Ok(parse_read(&reply))
            })
            .await
    }

    /// Queue depth: for each partition stream its length and its oldest entry's id, and the
    /// dead-letter stream's length.
    pub(crate) async fn wb_depth(
        &self,
        streams: &[String],
        dead: &str,
    ) -> BackendResult<(u64, Option<u64>, u64)> {
        self.conns
            .run("write-behind depth", |mut conn| async move {
                let mut pipe = SlotPipe::new();
                for s in streams {
                    let slot = key_slot(s);
                    let mut first = redis::cmd("XRANGE");
                    first.arg(s).arg("-").arg("+").arg("COUNT").arg(1);
                    pipe.push(slot, redis::cmd("XLEN").arg(s).clone())
                        .push(slot, first);
                }
                pipe.push(key_slot(dead), redis::cmd("XLEN").arg(dead).clone());
                let replies: Vec<Value> = pipe.query(&mut conn).await?;
                let mut pending = 0u64;
                let mut oldest: Option<u64> = None;
                for pair in replies.chunks(2) {
                    match pair {
                        [len, first] => {
                            pending += int_of(len);
                            if let Some(ms) = parse_entries(first)
                                .first()
                                .and_then(|e| e.id.split('-').next()?.parse::<u64>().ok())
                            {
                                oldest = Some(oldest.map_or(ms, |o| o.min(ms)));
                            }
                        }
                        [dead] => return Ok((pending, oldest, int_of(dead))),
                        _ => {}
                    }
                }
                Ok((pending, oldest, 0))
            })
            .await
    }

    /// The lengths of `streams`, summed.
    pub(crate) async fn wb_len(&self, streams: &[String]) -> BackendResult<u64> {
        self.conns
            .run("write-behind length", |mut conn| async move {
                let mut pipe = SlotPipe::new();
                for s in streams {
                    pipe.push(key_slot(s), redis::cmd("XLEN").arg(s).clone());
                }
                let lens: Vec<Value> = pipe.query(&mut conn).await?;
                Ok(lens.iter().map(int_of).sum())
            })
            .await
    }

    /// Up to `count` dead letters of `dead`, oldest first, after `after` (exclusive).
    pub(crate) async fn wb_dead_letters(
        &self,
        dead: &str,
        after: &str,
        count: usize,
    ) -> BackendResult<Vec<StreamEntry>> {
        let start = format!("({after}");
        self.conns
            .run("write-behind dead letters", |mut conn| async move {
                let reply: Value = redis::cmd("XRANGE")
                    .arg(dead)
                    .arg(&start)
                    .arg("+")
                    .arg("COUNT")
                    .arg(count)
                    .query_async(&mut conn)
                    .await?;
                Ok(parse_entries(&reply))
            })
            .await
    }

    /// `WB_RETRY`: moves one dead letter back to `stream`, with its first position (`p`:
    /// kept if it has one, else the stream id it had, from `from`). Returns whether it was
    /// moved.
    pub(crate) async fn wb_retry(
        &self,
        dead: &str,
        stream: &str,
        entry: &StreamEntry,
        retention: Duration,
    ) -> BackendResult<bool> {
        let mut fields: Vec<(&str, &[u8])> = entry
            .fields
            .iter()
            .filter(|(n, _)| !DEAD_FIELDS.contains(&n.as_str()))
            .map(|(n, v)| (n.as_str(), &v[..]))
            .collect();
        if fields.is_empty() {
            return Ok(false);
        }
        let first = entry
            .field_str("from")
            .and_then(|from| from.rsplit(' ').next())
            .map(str::to_owned);
        if entry.field(POSITION_FIELD).is_none() {
            if let Some(first) = &first {
                fields.push((POSITION_FIELD, first.as_bytes()));
            }
        }
        let fields = &fields;
        if self.conns.is_cluster() {
            return self
                .wb_retry_in_steps(dead, stream, entry, fields, retention)
                .await;
        }
        self.conns
            .run("write-behind retry", |mut conn| async move {
                let mut cmd = evalsha(&WB_RETRY, 2, 2 + 2 * fields.len(), 256);
                cmd.arg(dead)
                    .arg(stream)
                    .arg(&entry.id)
                    .arg(millis(retention));
                for (n, v) in fields {
                    cmd.arg(*n).arg(*v);
                }
                let moved: i64 = run(&mut conn, &WB_RETRY, &cmd).await?;
                Ok(moved == 1)
            })
            .await
    }
}

impl RedisBackend {
    /// Redis Cluster: `WB_RETRY` in two steps: `XADD` to the partition (its slot), then `XDEL`
    /// from the dead letters (theirs). If the dead letter was gone by then (another
    /// `retry_dead` moved it), the copy just added is deleted again (if a worker read it in
    /// between, it is applied twice: at least once). A stop between the two leaves the entry
    /// in both: applied, and moved again by the next `retry_dead`.
    async fn wb_retry_in_steps(
        &self,
        dead: &str,
        stream: &str,
        entry: &StreamEntry,
        fields: &[(&str, &[u8])],
        retention: Duration,
    ) -> BackendResult<bool> {
        let added: String = self
            .conns
            .run("write-behind retry", |mut conn| async move {
                let mut add = redis::cmd("XADD");
                add.arg(stream).arg("*");
                for (n, v) in fields {
                    add.arg(*n).arg(*v);
                }
                let (id, _): (String, i64) = redis::pipe()
                    .add_command(add)
                    .cmd("PEXPIRE")
                    .arg(stream)
                    .arg(millis(retention))
                    .query_async(&mut conn)
                    .await?;
                Ok(id)
            })
            .await?;
        let added = &added;
        self.conns
            .run("write-behind retry", |mut conn| async move {
                let removed: i64 = redis::cmd("XDEL")
                    .arg(dead)
                    .arg(&entry.id)
                    .query_async(&mut conn)
                    .await?;
                if removed == 1 {
                    return Ok(true);
                }
                let _: i64 = redis::cmd("XDEL")
                    .arg(stream)
                    .arg(added)
                    .query_async(&mut conn)
                    .await?;
                Ok(false)
            })
            .await
    }
}

/// The TTL of `wbl` for a value of TTL `ttl`: at least an hour, so that a write that waits
/// in its queue longer than its value lives is still re-asserted once applied (and an older
/// write's re-assert still refused).
fn wbl_ttl(ttl: Duration) -> Duration {
    ttl.max(WBL_MIN_TTL)
}

/// The shortest life of `wbl`.
const WBL_MIN_TTL: Duration = Duration::from_secs(3600);

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A blocking `XREADGROUP .. BLOCK poll STREAMS stream >` on a connection of the worker's own:
/// new entries for `me`.
pub(crate) async fn read_new(
    conn: &mut WbConn,
    stream: &str,
    me: &str,
    count: usize,
    block: Duration,
) -> redis::RedisResult<Vec<StreamEntry>> {
    let reply: Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(GROUP)
        .arg(me)
        .arg("COUNT")
        .arg(count)
        .arg("BLOCK")
        .arg(millis(block))
        .arg("STREAMS")
        .arg(stream)
        .arg(">")
        .query_async(conn)
        .await?;
    Ok(parse_read(&reply))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wbl_lives_at_least_an_hour() {
        assert_eq!(wbl_ttl(Duration::from_secs(5)), Duration::from_secs(3600));
        assert_eq!(
            wbl_ttl(Duration::from_secs(7200)),
            Duration::from_secs(7200)
        );
    }

    #[test]
    fn partitions_follow_crc16_of_the_full_key() {
        assert_eq!(partition_of("123456789", 16), 0x31C3 % 16);
        assert!(partition_of("ns:user:{7}", 16) < 16);
        assert_eq!(partition_of("anything", 1), 0);
    }
}
