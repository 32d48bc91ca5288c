//! `lock` on Redis: the value, or the key's lease, or a wait for the holder's fill.
//!
//! The lease is the pending load's marker in the value key itself (see the module above):
//!
//! ```text
//! SET K m NX GET ── value ────────────────────────────────────────► Hit (a lock hit costs a plain hit)
//!                ├ nil (m set) ───────────────────────────────────► Acquired(m)
//!                └ another marker o ── register for the key's fill notification
//!                     (LEASE script: SET NX GET + waiters flag), then again ...
//!                     woken by the fill's PUBLISH or a jittered re-check (100 ms doubling to
//!                     1 s; 50 ms while the subscription is down)
//!                     ├ the same marker o for a whole lease: its holder is gone or too
//!                     │ slow, TAKEOVER (o -> m, if o is still there) ──► Acquired(m)
//!                     └ at most twice the lease ───────────────────► WaitedOut(o)
//! ```
//!
//! A lock miss is two round trips (this lookup and the fill), like a miss without `lock`.
//! Every process asks once per key, however many of its tasks wait: the engine coalesces them
//! before they get here.

use std::time::{Duration, Instant};

use bytes::Bytes;

use super::scripts::{LEASE, TAKEOVER, evalsha, run};
use super::{RedisBackend, classify, millis};
use crate::backend::{BackendResult, Gen, LeaseReply, Leased, OnWait, PENDING_TTL, Read, Token};

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
        let mine = self.marker(token);
        // The marker outlives the lease: a holder slower than its lease still fills, unless a
        // waiter took over.
        let marker_ttl = PENDING_TTL.max(lease * 4);
        let started = Instant::now();
        let mut observed = match self.lookup(key, mine, marker_ttl).await? {
            Read::Hit(stored) => return Ok(reply(Leased::Hit(stored), None)),
            Read::Miss(m) if m.0 == mine.as_bytes() => {
                return Ok(reply(Leased::Acquired(m), None));
            }
            // The server refuses writes (see `set_nx_get`): no lease to take or wait for.
            Read::Miss(m) if m.0.is_empty() => return Ok(reply(Leased::WaitedOut(m), None)),
            Read::Miss(other) => other,
        };

        // Someone else loads. Subscribe (once per cache), register for this key, ask again,
        // then wait: registered before asking, so a fill in between still wakes us.
        on_wait();
        let max_wait = lease * 2;
        self.bus.ready(self.conns.operation_timeout()).await;
        let registration = self.bus.register(key);
        let mut observed_since = Instant::now();
        let mut recheck = Duration::from_millis(100);
        loop {
            let notified = registration.notify().notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let waited = Some(started.elapsed());
            match self.lease_once(key, mine, marker_ttl, max_wait).await? {
                Read::Hit(stored) => return Ok(reply(Leased::Hit(stored), waited)),
                Read::Miss(m) if m.0 == mine.as_bytes() => {
                    return Ok(reply(Leased::Acquired(m), waited));
                }
                Read::Miss(m) => {
                    if m != observed {
                        // A new holder: its lease starts now.
                        observed = m;
                        observed_since = Instant::now();
                    }
                }
            }
            let held = observed_since.elapsed();
            if held >= lease {
                // The same holder for a whole lease: gone, or slower than its lease.
                if self.takeover(key, &observed, mine, marker_ttl).await? {
                    return Ok(reply(
                        Leased::Acquired(Gen(Bytes::copy_from_slice(mine.as_bytes()))),
                        Some(started.elapsed()),
                    ));
                }
                continue;
            }
            let elapsed = started.elapsed();
            if elapsed >= max_wait {
                return Ok(reply(Leased::WaitedOut(observed), Some(elapsed)));
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
                .min(lease - held + Duration::from_millis(5))
                .min(max_wait - elapsed);
            let _ = tokio::time::timeout(sleep_for, notified).await;
            recheck = (recheck * 2).min(Duration::from_secs(1));
        }
    }

    /// The LEASE script: the lookup, registering as a waiter if another caller holds the key.
    async fn lease_once(
        &self,
        key: &str,
        mine: &str,
        marker_ttl: Duration,
        wait: Duration,
    ) -> BackendResult<Read> {
        let waiters = self.waiters(key);
        let value: Option<Vec<u8>> = self
            .conns
            .run_for(key, "lease", |mut conn| async move {
                let mut cmd = evalsha(&LEASE, 2, 5, 2 * key.len() + mine.len() + 32);
                cmd.arg(key)
                    .arg(&waiters)
                    .arg(mine)
                    .arg(millis(marker_ttl))
                    .arg(millis(wait));
                run(&mut conn, &LEASE, &cmd).await
            })
            .await?;
        Ok(classify(value, mine))
    }

    /// Replaces `observed` with `mine` if the key still holds it.
    pub(super) async fn takeover(
        &self,
        key: &str,
        observed: &Gen,
        mine: &str,
        marker_ttl: Duration,
    ) -> BackendResult<bool> {
        self.conns
            .run_for(key, "takeover", |mut conn| async move {
                let mut cmd = evalsha(
                    &TAKEOVER,
                    1,
                    4,
                    key.len() + observed.0.len() + mine.len() + 16,
                );
                cmd.arg(key)
                    .arg(&observed.0[..])
                    .arg(mine)
                    .arg(millis(marker_ttl));
                let taken: i64 = run(&mut conn, &TAKEOVER, &cmd).await?;
                Ok(taken == 1)
            })
            .await
    }
}
