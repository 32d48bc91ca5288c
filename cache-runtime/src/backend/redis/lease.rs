//! `lock` on Redis: the value, or the key's lease, or a wait for the holder's fill.
//!
//! ```text
//! GET ── hit ─────────────────────────────────────────────────► Hit (a lock hit costs a plain hit)
//!  └ miss ── LEASE script ── hit ─────────────────────────────► Hit
//!                           ├ acquired ───────────────────────► Acquired(generation)
//!                           └ busy ── register for the key's fill notification,
//!                                     then LEASE again ... woken by the fill's PUBLISH or a
//!                                     jittered re-check (100 ms doubling to 1 s; 50 ms while
//!                                     the subscription is down), at most twice the lease
//!                                     ──────────────────────────► WaitedOut(generation)
//! ```
//!
//! A holder that dies loses its lease when it expires: the next LEASE of a waiter takes it
//! (a takeover). Every process asks once per key, however many of its tasks wait: the engine
//! coalesces them before they get here.

use std::time::{Duration, Instant};

use bytes::Bytes;
use redis::Value;

use super::RedisBackend;
use super::scripts::LEASE;
use crate::backend::{BackendResult, Gen, LeaseReply, Leased, OnWait, Stored, Token};

/// One answer of the LEASE script.
enum Once {
    Hit(Stored),
    Acquired(Gen),
    Busy {
        generation: Gen,
        remaining: Duration,
    },
}

fn unexpected(what: &str) -> redis::RedisError {
    redis::RedisError::from((
        redis::ErrorKind::UnexpectedReturnType,
        "unexpected reply",
        what.to_owned(),
    ))
}

fn bytes_of(v: Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.into_bytes()),
        Value::Int(i) => Some(i.to_string().into_bytes()),
        _ => None,
    }
}

/// `d` scaled by a pseudo-random factor in [0.75, 1.25).
fn jitter(d: Duration) -> Duration {
    use std::hash::{BuildHasher, RandomState};
    let r = RandomState::new().hash_one(Instant::now()) % 1000;
    d.mul_f64(0.75 + r as f64 / 2000.0)
}

impl RedisBackend {
    pub(super) async fn lease_or_wait(
        &self,
        key: &str,
        token: &Token,
        lease: Duration,
        on_wait: &OnWait<'_>,
    ) -> BackendResult<LeaseReply> {
        let reply = |answer, waited| LeaseReply { answer, waited };
        // A hit must cost what a plain hit costs: a GET, not a script.
        if let Some(stored) = self.get(key).await? {
            return Ok(reply(Leased::Hit(stored), None));
        }
        let started = Instant::now();
        match self.lease_once(key, token.get(), lease).await? {
            Once::Hit(stored) => return Ok(reply(Leased::Hit(stored), None)),
            Once::Acquired(generation) => return Ok(reply(Leased::Acquired(generation), None)),
            Once::Busy { .. } => {}
        }

        // Someone else loads. Subscribe (once per cache), register for this key, ask again,
        // then wait: registered before asking, so a fill in between still wakes us.
        on_wait();
        let max_wait = lease * 2;
        self.bus.ready(self.conns.operation_timeout()).await;
        let registration = self.bus.register(key);
        let mut recheck = Duration::from_millis(100);
        loop {
            let notified = registration.notify().notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let waited = Some(started.elapsed());
            let (generation, remaining) = match self.lease_once(key, token.get(), lease).await? {
                Once::Hit(stored) => return Ok(reply(Leased::Hit(stored), waited)),
                Once::Acquired(generation) => {
                    return Ok(reply(Leased::Acquired(generation), waited));
                }
                Once::Busy {
                    generation,
                    remaining,
                } => (generation, remaining),
            };
            let elapsed = started.elapsed();
            if elapsed >= max_wait {
                return Ok(reply(Leased::WaitedOut(generation), Some(elapsed)));
            }
            // Notifications are expected: re-check rarely. Without a subscription (it
            // dropped, or its runtime ended), re-check often and try to restore it.
            let base = if self.bus.is_subscribed() {
                recheck
            } else {
                self.bus.start();
                Duration::from_millis(50)
            };
            let sleep_for = jitter(base)
                .min(remaining + Duration::from_millis(5))
                .min(max_wait - elapsed);
            let _ = tokio::time::timeout(sleep_for, notified).await;
            recheck = (recheck * 2).min(Duration::from_secs(1));
        }
    }

    async fn lease_once(&self, key: &str, token: &str, lease: Duration) -> BackendResult<Once> {
        let k = self.keys(key);
        self.conns
            .run("lease", |mut conn| async move {
                let reply: Value = LEASE
                    .key(key)
                    .key(&k.generation)
                    .key(&k.lease)
                    .key(&k.waiters)
                    .arg(token)
                    .arg(super::millis(lease))
                    .invoke_async(&mut conn)
                    .await?;
                let Value::Array(mut items) = reply else {
                    return Err(unexpected("lease script"));
                };
                items.reverse();
                let kind = match items.pop() {
                    Some(Value::Int(k)) => k,
                    _ => return Err(unexpected("lease script kind")),
                };
                let second = items.pop().and_then(bytes_of).unwrap_or_default();
                match kind {
                    1 => Ok(Once::Hit(Stored::bytes(Bytes::from(second)))),
                    2 => Ok(Once::Acquired(Gen(Bytes::from(second)))),
                    3 => {
                        let pttl = match items.pop() {
                            Some(Value::Int(ms)) if ms > 0 => ms as u64,
                            _ => 0,
                        };
                        Ok(Once::Busy {
                            generation: Gen(Bytes::from(second)),
                            remaining: Duration::from_millis(pttl),
                        })
                    }
                    _ => Err(unexpected("lease script kind")),
                }
            })
            .await
    }
}
