//! The Lua scripts of the atomic steps. Each touches one value key and its auxiliary keys,
//! all in one Redis Cluster hash slot (see `key::aux_key`).

use std::sync::LazyLock;

use redis::Script;

/// KEYS: value, generation, lease, waiters. ARGV: token, lease ms.
/// Returns {1, value} (hit), {2, generation} (lease acquired), {3, generation, lease pttl} (busy).
pub(super) static LEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local v = redis.call('GET', KEYS[1])
if v then return {1, v} end
local g = redis.call('GET', KEYS[2]) or ''
if redis.call('SET', KEYS[3], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {2, g}
end
redis.call('SET', KEYS[4], '1', 'PX', ARGV[2])
return {3, g, redis.call('PTTL', KEYS[3])}
",
    )
});

/// KEYS: value, generation, lease, waiters. ARGV: generation seen, envelope, ttl ms, token ('' if none),
/// channel. Stores only if the generation is unchanged; releases the lease if it is the
/// caller's; wakes waiters. Returns 1 if stored.
pub(super) static FILL: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local stored = 0
if (redis.call('GET', KEYS[2]) or '') == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  stored = 1
end
if ARGV[4] ~= '' and redis.call('GET', KEYS[3]) == ARGV[4] then
  redis.call('DEL', KEYS[3])
end
if redis.call('DEL', KEYS[4]) == 1 then
  redis.call('PUBLISH', ARGV[5], KEYS[1])
end
return stored
",
    )
});

/// KEYS: lease, waiters. ARGV: token, channel, value key.
pub(super) static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
end
if redis.call('DEL', KEYS[2]) == 1 then
  redis.call('PUBLISH', ARGV[2], ARGV[3])
end
return 1
",
    )
});

/// KEYS: value, generation, waiters. ARGV: envelope, ttl ms, new generation, generation ttl
/// ms, channel. Generations are random tokens, never counters: a counter whose key expired
/// would restart and could repeat the value a slow loader read.
pub(super) static WRITE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[4])
if redis.call('DEL', KEYS[3]) == 1 then
  redis.call('PUBLISH', ARGV[5], KEYS[1])
end
return 1
",
    )
});

/// KEYS: value, generation, lease, waiters. ARGV: new generation, generation ttl ms, channel.
pub(super) static INVALIDATE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
redis.call('DEL', KEYS[1], KEYS[3])
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
if redis.call('DEL', KEYS[4]) == 1 then
  redis.call('PUBLISH', ARGV[3], KEYS[1])
end
return 1
",
    )
});
