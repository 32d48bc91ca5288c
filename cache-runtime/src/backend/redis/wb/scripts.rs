//! The write-behind Lua scripts. On one Redis server each is one atomic step. `WB_ENQUEUE`
//! (the value key's slot and a stream's), `WB_DEAD` (a partition's, the dead letters' and the
//! value key's) and `WB_RETRY` (the dead letters' and a partition's) span slots: they are for
//! a single Redis only; on Redis Cluster their steps run one slot at a time (the `*_AT`
//! scripts and `WB_PEEK` below, see `RedisBackend::wb_enqueue` and
//! docs/design-write-behind.md). The others touch one slot.

use std::sync::LazyLock;

use super::super::scripts::Lua;

/// KEYS: value, waiters, stale copy, refresh lease, wbl, stream. ARGV: envelope, ttl ms, fill
/// channel, inv channel, frame, write id, retention ms, wbl ttl ms, then the entry's
/// field/value pairs. `XADD stream * ..`, `PEXPIRE stream retention`, then with an envelope:
/// `WRITE`'s steps and `SET wbl id PX <wbl ttl>`; without one (the value could not be
/// encoded, or its tags not rendered or read): the key is invalidated as `invalidate` does
/// (value, stale copy, refresh lease; the frame published) and `wbl` deleted (no earlier
/// write's re-assert puts its value back). Returns the entry's id.
pub(super) static WB_ENQUEUE: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(
        r"
local id = redis.call('XADD', KEYS[6], '*', unpack(ARGV, 9))
redis.call('PEXPIRE', KEYS[6], ARGV[7])
if ARGV[1] == '' then
  redis.call('DEL', KEYS[1], KEYS[3], KEYS[4], KEYS[5])
  redis.call('PUBLISH', ARGV[4], ARGV[5])
  return id
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('DEL', KEYS[3], KEYS[4])
if redis.call('DEL', KEYS[2]) == 1 then
  redis.call('PUBLISH', ARGV[3], KEYS[1])
end
redis.call('SET', KEYS[5], ARGV[6], 'PX', ARGV[8])
redis.call('PUBLISH', ARGV[4], ARGV[5])
return id
",
    )
});

/// KEYS: value, waiters, stale copy, refresh lease, wbl. ARGV: write id, envelope, ttl ms,
/// fill channel, inv channel, frame. After the worker applied the write `id`: if it is still
/// the key's last write-behind write (`wbl == id`), forgets it, and if the key does not hold
/// exactly its envelope (evicted, expired, or filled from the database before it had the
/// write), does `WRITE`'s steps with it. Returns 2 if it wrote, 1 if the key held it, 0 if a
/// later write-behind write of the key was accepted since.
pub(super) static WB_REASSERT: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(
        r"
if redis.call('GET', KEYS[5]) ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[5])
if ARGV[2] == '' then
  return 1
end
if redis.call('TYPE', KEYS[1]).ok == 'string' and redis.call('GET', KEYS[1]) == ARGV[2] then
  return 1
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('DEL', KEYS[3], KEYS[4])
if redis.call('DEL', KEYS[2]) == 1 then
  redis.call('PUBLISH', ARGV[4], KEYS[1])
end
redis.call('PUBLISH', ARGV[5], ARGV[6])
return 2
",
    )
});

/// KEYS: stream, owner, tries. ARGV: token, group, retention ms, ids... Only while the caller
/// holds the partition: `XACK`, `XDEL` (an entry is removed once acknowledged), `HDEL tries`,
/// and the stream's retention renewed. Returns 0 if the lease was lost.
pub(super) static WB_ACK: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(
        r"
if redis.call('GET', KEYS[2]) ~= ARGV[1] then
  return 0
end
local ids = {unpack(ARGV, 4)}
redis.call('XACK', KEYS[1], ARGV[2], unpack(ids))
redis.call('XDEL', KEYS[1], unpack(ids))
redis.call('HDEL', KEYS[3], unpack(ids))
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
",
    )
});

/// KEYS: stream, owner, tries, dead, value, stale copy, refresh lease, wbl. ARGV: token,
/// group, retention ms, error, attempts, write id, inv channel, frame, ids... Only while the
/// caller holds the partition: each entry's fields are appended to the dead-letter stream
/// with `e` (the error), `n` (attempts) and `from` (stream and id), then the entries are
/// acknowledged and deleted; and if the value key's last write-behind write is the dead one
/// (`wbl == write id`: the cache holds a value the database never got), the key is
/// invalidated as `invalidate` does (value, stale copy, refresh lease, wbl; the frame
/// published). Returns 0 if the lease was lost, 2 if it invalidated the key, else 1.
pub(super) static WB_DEAD: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(
        r"
if redis.call('GET', KEYS[2]) ~= ARGV[1] then
  return 0
end
for i = 9, #ARGV do
  local found = redis.call('XRANGE', KEYS[1], ARGV[i], ARGV[i])
  if #found > 0 then
    local fields = found[1][2]
    table.insert(fields, 'e')
    table.insert(fields, ARGV[4])
    table.insert(fields, 'n')
    table.insert(fields, ARGV[5])
    table.insert(fields, 'from')
    table.insert(fields, KEYS[1] .. ' ' .. ARGV[i])
    redis.call('XADD', KEYS[4], '*', unpack(fields))
  end
end
redis.call('PEXPIRE', KEYS[4], ARGV[3])
local ids = {unpack(ARGV, 9)}
redis.call('XACK', KEYS[1], ARGV[2], unpack(ids))
redis.call('XDEL', KEYS[1], unpack(ids))
redis.call('HDEL', KEYS[3], unpack(ids))
if ARGV[6] ~= '' and redis.call('GET', KEYS[8]) == ARGV[6] then
  redis.call('DEL', KEYS[5], KEYS[6], KEYS[7], KEYS[8])
  redis.call('PUBLISH', ARGV[7], ARGV[8])
  return 2
end
return 1
",
    )
});

/// KEYS: owner. ARGV: token, lease ms. Renews the lease if the caller holds it. Returns 1 if
/// renewed.
pub(super) static WB_RENEW: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
",
    )
});

/// KEYS: owner. ARGV: token. Gives the lease back if the caller holds it.
pub(super) static WB_RELEASE: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
",
    )
});

/// KEYS: dead, stream. ARGV: the dead letter's id, retention ms, then the entry's field/value
/// pairs (without the dead-letter fields). Moves one dead letter back to its partition (a new
/// entry: its attempts start again). Returns 1 if moved (0: it was gone).
pub(super) static WB_RETRY: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(
        r"
if redis.call('XDEL', KEYS[1], ARGV[1]) == 0 then
  return 0
end
redis.call('XADD', KEYS[2], '*', unpack(ARGV, 3))
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return 1
",
    )
});

// Redis Cluster: the value key and the queue keys live in different hash slots, so the steps
// above that touch both are split (docs/design-cluster.md §3). On a cluster `wbl` holds the
// *position* (stream id `<ms>-<seq>`) of the key's greatest write-behind write whose value
// was stored (`0-0`: a write claimed the key, its value not stored yet), instead of a write
// id: writers of one key on several processes may claim the key and append to the stream in
// different orders, and only the stream's order is the order the database gets the writes.

/// The Lua function `newer(a, b)`: whether position `a` (`<ms>-<seq>`) comes after `b`; a
/// missing or unreadable `b` is older than anything, an unreadable `a` newer than nothing.
macro_rules! newer_fn {
    () => {
        r"
local function newer(a, b)
  local bm, bs = string.match(b or '', '^(%d+)-(%d+)$')
  if not bm then return true end
  local am, as = string.match(a or '', '^(%d+)-(%d+)$')
  if not am then return false end
  am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm), tonumber(bs)
  return am > bm or (am == bm and as > bs)
end
"
    };
}

/// Cluster, step 3 of an enqueue (K's slot). KEYS: value, waiters, stale copy, refresh lease,
/// wbl. ARGV: envelope, ttl ms, fill channel, inv channel, frame, position (the entry's
/// stream id), wbl ttl ms. Unless a write of a later position stored its value already
/// (`wbl` newer): `SET wbl position`, then `WRITE`'s steps, or with an empty envelope
/// `invalidate`'s. Returns 1 if it stored, 0 if a later write had.
pub(super) static WB_STORE_AT: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(concat!(
        newer_fn!(),
        r"
if newer(redis.call('GET', KEYS[5]), ARGV[6]) then
  return 0
end
redis.call('SET', KEYS[5], ARGV[6], 'PX', ARGV[7])
if ARGV[1] == '' then
  redis.call('DEL', KEYS[1], KEYS[3], KEYS[4])
  redis.call('PUBLISH', ARGV[4], ARGV[5])
  return 1
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('DEL', KEYS[3], KEYS[4])
if redis.call('DEL', KEYS[2]) == 1 then
  redis.call('PUBLISH', ARGV[3], KEYS[1])
end
redis.call('PUBLISH', ARGV[4], ARGV[5])
return 1
"
    ))
});

/// Cluster: `WB_REASSERT` by position. KEYS: value, waiters, stale copy, refresh lease, wbl.
/// ARGV: position, envelope, ttl ms, fill channel, inv channel, frame, wbl ttl ms. After the
/// worker applied the write at `position`: if `wbl` exists (a claim or a stored position: an
/// inline write that forgot the key deletes it) and holds no later position, records the
/// position and, if the key does not hold exactly the envelope, does `WRITE`'s steps.
/// Returns 2 if it wrote, 1 if the key held it, 0 if refused.
pub(super) static WB_REASSERT_AT: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(concat!(
        newer_fn!(),
        r"
local last = redis.call('GET', KEYS[5])
if not last or newer(last, ARGV[1]) then
  return 0
end
redis.call('SET', KEYS[5], ARGV[1], 'PX', ARGV[7])
if ARGV[2] == '' then
  return 1
end
if redis.call('TYPE', KEYS[1]).ok == 'string' and redis.call('GET', KEYS[1]) == ARGV[2] then
  return 1
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('DEL', KEYS[3], KEYS[4])
if redis.call('DEL', KEYS[2]) == 1 then
  redis.call('PUBLISH', ARGV[4], KEYS[1])
end
redis.call('PUBLISH', ARGV[5], ARGV[6])
return 2
"
    ))
});

/// Cluster, last step of a dead letter (K's slot). KEYS: value, stale copy, refresh lease,
/// wbl. ARGV: position (of the run's last entry), inv channel, frame. If `wbl` exists and
/// holds no later position (the cache may hold a value of the dead run, which the database
/// never got), invalidates the key as `invalidate` does (`wbl` stays: a later write that
/// crashed before storing its value is still re-asserted). Returns 2 if it invalidated, 1
/// if not.
pub(super) static WB_DROP_AT: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(concat!(
        newer_fn!(),
        r"
local last = redis.call('GET', KEYS[4])
if not last or newer(last, ARGV[1]) then
  return 1
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
redis.call('PUBLISH', ARGV[2], ARGV[3])
return 2
"
    ))
});

/// Cluster, first step of a dead letter (the partition's slot). KEYS: stream, owner. ARGV:
/// token, ids... Only while the caller holds the partition: the entries' fields, in order (an
/// entry gone: an empty list). Returns 0 if the lease was lost, else `{1, fields...}`.
pub(super) static WB_PEEK: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(
        r"
if redis.call('GET', KEYS[2]) ~= ARGV[1] then
  return 0
end
local out = {1}
for i = 2, #ARGV do
  local found = redis.call('XRANGE', KEYS[1], ARGV[i], ARGV[i])
  if #found > 0 then
    table.insert(out, found[1][2])
  else
    table.insert(out, {})
  end
end
return out
",
    )
});
