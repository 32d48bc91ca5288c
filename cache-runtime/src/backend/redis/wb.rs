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

use super::scripts::{evalsha, run};
use super::{CHANNEL, RedisBackend, inv, millis};
use crate::backend::BackendResult;
use crate::key::aux_key;
use crate::store::{Store, WbWrite};

/// The consumer group of every partition.
pub(crate) const GROUP: &str = "cr";

const WBL_PREFIX: &str = "__cr:wbl:";

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
    pub(crate) error: &'a str,
    pub(crate) attempts: u32,
}

/// What one owned partition's reads and acknowledgements need.
pub(crate) struct Owned<'a> {
    pub(crate) keys: &'a PartitionKeys,
    pub(crate) token: &'a str,
    pub(crate) retention: Duration,
}

impl RedisBackend {
    /// A client for the connections of the worker's own (blocking reads): behind Sentinel,
    /// the current master's (waiting at most `wait` for the first resolution).
    pub(crate) async fn client(&self, wait: Duration) -> redis::RedisResult<redis::Client> {
        Ok(self.conns.target().client(wait).await?.0)
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
                    .arg(wbl_ttl)
                    .arg("f")
                    .arg(w.function)
                    .arg("k")
                    .arg(key)
                    .arg("i")
                    .arg(w.id)
                    .arg("a")
                    .arg(w.args)
                    .arg("v")
                    .arg(envelope)
                    .arg("t")
                    .arg(ttl);
                let _: Value = run(&mut conn, &WB_ENQUEUE, &cmd).await?;
                Ok(())
            })
            .await
    }

    /// `WB_REASSERT` (see the script). Returns whether it wrote the value.
    pub(crate) async fn wb_reassert(
        &self,
        key: &str,
        id: &str,
        envelope: &[u8],
        ttl: Duration,
    ) -> BackendResult<bool> {
        let waiters = self.waiters(key);
        let copy = Self::stale_copy(key);
        let refresh = Self::refresh_lease_key(key);
        let wbl = Self::wbl_key(key);
        let frame = self.frame(inv::Kind::Keys, &[key]);
        let (frame, channel) = (&frame, &self.inv_channel);
        let (waiters, copy, refresh, wbl) = (&waiters, &copy, &refresh, &wbl);
        self.conns
            .run("write-behind re-assert", |mut conn| async move {
                let mut cmd = evalsha(&WB_REASSERT, 5, 6, 5 * key.len() + envelope.len() + 96);
                cmd.arg(key)
                    .arg(waiters)
                    .arg(copy)
                    .arg(refresh)
                    .arg(wbl)
                    .arg(id)
                    .arg(envelope)
                    .arg(millis(ttl))
                    .arg(CHANNEL)
                    .arg(channel)
                    .arg(&frame[..]);
                let wrote: i64 = run(&mut conn, &WB_REASSERT, &cmd).await?;
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
                let mut pipe = redis::pipe();
                for owner in owners {
                    pipe.cmd("GET").arg(owner);
                }
                pipe.query_async(&mut conn).await
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
                let mut pipe = redis::pipe();
                for key in keys {
                    pipe.cmd("PEXPIRE").arg(key).arg(millis(retention)).ignore();
                }
                pipe.exec_async(&mut conn).await
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
                let mut pipe = redis::pipe();
                for set in workers {
                    pipe.cmd("ZADD")
                        .arg(set)
                        .arg(now + millis(ttl))
                        .arg(name)
                        .ignore()
                        .cmd("ZREMRANGEBYSCORE")
                        .arg(set)
                        .arg("-inf")
                        .arg(now)
                        .ignore()
                        .cmd("ZCARD")
                        .arg(set)
                        .cmd("PEXPIRE")
                        .arg(set)
                        .arg(millis(retention))
                        .ignore();
                }
                let live: Vec<i64> = pipe.query_async(&mut conn).await?;
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
                let mut pipe = redis::pipe();
                for set in workers {
                    pipe.cmd("ZREM").arg(set).arg(name).ignore();
                }
                pipe.exec_async(&mut conn).await
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
                let mut pipe = redis::pipe();
                for s in streams {
                    pipe.cmd("XLEN").arg(s);
                    pipe.cmd("XRANGE")
                        .arg(s)
                        .arg("-")
                        .arg("+")
                        .arg("COUNT")
                        .arg(1);
                }
                pipe.cmd("XLEN").arg(dead);
                let replies: Vec<Value> = pipe.query_async(&mut conn).await?;
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
                let mut pipe = redis::pipe();
                for s in streams {
                    pipe.cmd("XLEN").arg(s);
                }
                let lens: Vec<Value> = pipe.query_async(&mut conn).await?;
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
    conn: &mut redis::aio::MultiplexedConnection,
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
