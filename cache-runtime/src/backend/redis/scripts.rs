//! The Lua scripts of the atomic steps. Each touches one value key and its auxiliary keys
//! (waiters, stale copy, refresh lease), all in one Redis Cluster hash slot (see
//! `key::aux_key`).

use std::sync::LazyLock;

use redis::{Cmd, FromRedisValue, RedisResult};

use super::conn::Conn;

/// `EVALSHA <script> <keys>`: add the keys and arguments, then [`run`] it. The arguments are
/// written into the command once (`Script::key`/`arg` would copy each into a buffer of its own
/// first, the envelope included), sized for `args` more arguments of `bytes` bytes in all.
pub(super) fn evalsha(script: &Lua, keys: usize, args: usize, bytes: usize) -> Cmd {
    let mut cmd = Cmd::with_capacity(3 + args, 48 + bytes);
    cmd.arg("EVALSHA").arg(script.get_hash()).arg(keys);
    cmd
}

/// Runs a command made by [`evalsha`], loading `script` if the server does not have it
/// (`NOSCRIPT`: a restart, a failover, `SCRIPT FLUSH`, a cluster node that never ran it).
///
/// On a cluster the script is loaded on the master that owns the command's first key, not on
/// every node as redis-rs's `Script::load_async` would: that fails while any node is down,
/// which is exactly when a failover's new master needs it. During a slot migration the
/// `NOSCRIPT` may come from another node than the one `SCRIPT LOAD` reaches (redis-rs follows
/// `ASK` to the importing node; the load is routed by slot, to the source): if the retried
/// `EVALSHA` answers `NOSCRIPT` again, the script is sent whole (`EVAL`), which any node runs.
pub(super) async fn run<T: FromRedisValue>(
    conn: &mut Conn,
    script: &Lua,
    cmd: &Cmd,
) -> RedisResult<T> {
    match cmd.query_async(conn).await {
        Err(e) if is_noscript(&e) => {
            let mut load = redis::cmd("SCRIPT");
            load.arg("LOAD").arg(script.code);
            let _: String = conn.query_on_slot(first_key_slot(cmd), &load).await?;
            match cmd.query_async(conn).await {
                Err(e) if is_noscript(&e) => eval_of(cmd, script).query_async(conn).await,
                other => other,
            }
        }
        other => other,
    }
}

fn is_noscript(e: &redis::RedisError) -> bool {
    e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript)
}

/// `EVALSHA <sha> <numkeys> <keys and args>` -> `EVAL <code> <numkeys> <keys and args>`.
/// (A command made by [`evalsha`] has no cursor arguments.)
fn eval_of(cmd: &Cmd, script: &Lua) -> Cmd {
    let rest: Vec<&[u8]> = cmd
        .args_iter()
        .skip(2)
        .filter_map(|arg| match arg {
            redis::Arg::Simple(a) => Some(a),
            _ => None,
        })
        .collect();
    let bytes = rest.iter().map(|a| a.len()).sum::<usize>();
    let mut eval = Cmd::with_capacity(2 + rest.len(), 4 + script.code.len() + bytes);
    eval.arg("EVAL").arg(script.code);
    for arg in rest {
        eval.arg(arg);
    }
    eval
}

/// The hash slot of an `EVALSHA`'s first key (`EVALSHA sha numkeys key ..`); 0 without keys.
fn first_key_slot(cmd: &Cmd) -> u16 {
    match cmd.args_iter().nth(3) {
        Some(redis::Arg::Simple(key)) => crate::key::key_slot_bytes(key),
        _ => 0,
    }
}

/// A Lua script: its source (for `SCRIPT LOAD`) and its SHA1 (for `EVALSHA`).
pub(crate) struct Lua {
    code: &'static str,
    script: redis::Script,
}

impl Lua {
    pub(crate) fn new(code: &'static str) -> Self {
        Lua {
            code,
            script: redis::Script::new(code),
        }
    }

    /// The script's SHA1, in hexadecimal.
    pub(crate) fn get_hash(&self) -> &str {
        self.script.get_hash()
    }
}

/// KEYS: value, waiters. ARGV: marker, marker ttl ms, waiters ttl ms.
/// `SET value marker NX PX .. GET`, and if the key holds another caller's marker, registers a
/// waiter (so that the fill publishes). Returns what the key held (nil: the marker was set).
pub(super) static LEASE: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(
        r"
local v = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2], 'GET')
if v and string.sub(v, 1, 5) == '\0crp:' then
  redis.call('SET', KEYS[2], '1', 'PX', ARGV[3])
end
return v
",
    )
});

/// KEYS: value. ARGV: marker, marker ttl ms, the caller's backend's marker prefix.
/// Replaces a value the caller cannot use (of any Redis type) with its marker, unless another
/// process's marker is already there (returned: that process is loading; a marker of the
/// caller's own backend is dead, see `RedisBackend::lookup`, and is replaced). Returns nil if
/// the marker was set.
pub(super) static REPLACE: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(
        r"
if redis.call('TYPE', KEYS[1]).ok == 'string' then
  local v = redis.call('GET', KEYS[1])
  if string.sub(v, 1, 5) == '\0crp:' and string.sub(v, 1, #ARGV[3]) ~= ARGV[3] then
    return v
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
",
    )
});

/// KEYS: value. ARGV: the marker observed, our marker, marker ttl ms.
/// Takes over a lease whose holder seems gone: replaces its marker with ours if it is still
/// there. Returns 1 if taken.
pub(super) static TAKEOVER: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
",
    )
});

/// KEYS: value, waiters[, stale copy]. ARGV: the marker read before the load, envelope, ttl
/// ms, channel[, the stale copy's ttl ms].
/// Stores only if the key still holds that marker (no write, invalidation or eviction since
/// the read), and with a third key (`stale`) the same envelope as the key's stale copy, which
/// outlives it; wakes waiters. Returns 1 if stored.
pub(super) static FILL: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(
        r"
local stored = 0
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  if KEYS[3] then
    redis.call('SET', KEYS[3], ARGV[2], 'PX', ARGV[5])
  end
  stored = 1
end
if redis.call('DEL', KEYS[2]) == 1 then
  redis.call('PUBLISH', ARGV[4], KEYS[1])
end
return stored
",
    )
});

/// KEYS: value, waiters. ARGV: marker, channel. Removes the caller's marker (its load is not
/// stored), waking the waiters.
pub(super) static RELEASE: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
end
if redis.call('DEL', KEYS[2]) == 1 then
  redis.call('PUBLISH', ARGV[2], KEYS[1])
end
return 1
",
    )
});

/// KEYS: value, waiters, stale copy, refresh lease. ARGV: envelope, ttl ms, fill channel,
/// invalidation channel, the key's invalidation frame (see `inv`). A write: replaces whatever
/// the key holds (a pending load's marker included, so that load's fill is rejected), drops the
/// key's stale copy (`stale`: an older value must not be served after it) and its refresh
/// lease (`refresh`: a refresh running now does not store its result over the write), wakes
/// the key's waiters, and announces the write to other processes' in-process tiers, after it
/// is applied.
pub(super) static WRITE: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(
        r"
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('DEL', KEYS[3], KEYS[4])
if redis.call('DEL', KEYS[2]) == 1 then
  redis.call('PUBLISH', ARGV[3], KEYS[1])
end
redis.call('PUBLISH', ARGV[4], ARGV[5])
return 1
",
    )
});

/// KEYS: value, refresh lease. ARGV: token, the header of the entry the caller read (its first
/// 13 bytes: format, created-at, compute time), lease ms.
/// `refresh`: takes the key's refresh lease if the key still holds that entry and nobody holds
/// the lease (`SET .. NX PX`). Returns 1 if taken.
pub(super) static REFRESH_LEASE: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(
        r"
if redis.call('TYPE', KEYS[1]).ok ~= 'string' then
  return 0
end
local v = redis.call('GET', KEYS[1])
if string.sub(v, 1, #ARGV[2]) ~= ARGV[2] then
  return 0
end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[3]) then
  return 1
end
return 0
",
    )
});

/// KEYS: value, refresh lease[, stale copy]. ARGV: token, the header of the entry the refresh
/// started from, envelope, ttl ms[, the stale copy's ttl ms].
/// `refresh`: stores the refreshed value only if the caller still holds the refresh lease (no
/// write or invalidation deleted it) and the key still holds the entry the refresh started
/// from (no expiry, `REPLACE` or other fill since), then gives the lease back; with a third
/// key (`stale`), the value also replaces the key's stale copy, as `FILL` does. Wakes nobody
/// and publishes nothing: nobody waits for a refresh, and other processes' in-process copies
/// live out the old entry's TTL. Returns 1 if stored.
pub(super) static REFRESH_FILL: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(
        r"
if redis.call('GET', KEYS[2]) ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[2])
if redis.call('TYPE', KEYS[1]).ok ~= 'string' then
  return 0
end
local v = redis.call('GET', KEYS[1])
if string.sub(v, 1, #ARGV[2]) ~= ARGV[2] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4])
if KEYS[3] then
  redis.call('SET', KEYS[3], ARGV[3], 'PX', ARGV[5])
end
return 1
",
    )
});

#[cfg(test)]
mod tests {
    use super::*;

    fn args(cmd: &Cmd) -> Vec<Vec<u8>> {
        cmd.args_iter()
            .map(|arg| match arg {
                redis::Arg::Simple(a) => a.to_vec(),
                _ => b"<cursor>".to_vec(),
            })
            .collect()
    }

    #[test]
    fn eval_of_replaces_evalsha_and_sha_with_eval_and_code_keeping_keys_and_args() {
        let mut cmd = evalsha(&FILL, 2, 3, 16);
        cmd.arg("ns:k")
            .arg("__cr:w{ns:k}")
            .arg(&b"\0crp:m"[..])
            .arg(&[0u8, 1, 255][..]);
        cmd.arg(60_000);
        let eval = eval_of(&cmd, &FILL);
        let mut want: Vec<Vec<u8>> = vec![b"EVAL".to_vec(), FILL.code.as_bytes().to_vec()];
        want.extend(args(&cmd).into_iter().skip(2));
        assert_eq!(args(&eval), want);
        assert_eq!(args(&eval)[2], b"2");
        assert_eq!(args(&eval).len(), args(&cmd).len());
    }

    #[test]
    fn eval_of_a_script_without_keys() {
        let cmd = evalsha(&RELEASE, 0, 0, 0);
        let eval = eval_of(&cmd, &RELEASE);
        assert_eq!(
            args(&eval),
            vec![
                b"EVAL".to_vec(),
                RELEASE.code.as_bytes().to_vec(),
                b"0".to_vec()
            ]
        );
    }
}
