//! One owned partition's task: takes the partition over (its group, the entries other
//! consumers held, this consumer's pending entries), then reads new entries with a blocking
//! `XREADGROUP` on a connection of its own and applies them per key in id order: coalescing,
//! retries with backoff, dead letters, unknown functions left pending, re-assert, and
//! acknowledgement under the lease.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::{Duration, Instant};

use futures_util::FutureExt as _;

use super::{HELD_BATCHES, PartitionState, Shared, backoff, millis};
use crate::backend::wb::{DeadLetter, Owned, PartitionKeys, StreamEntry, dead_key, read_new};
use crate::backend::wb::{POSITION_FIELD, WbConn};
use crate::backend::{BackendError, RedisBackend};
use crate::stats::SiteStats;
use crate::write_behind::handler::Applied;
use crate::write_behind::{CURRENT, Position, WriteId};

/// An entry held by a partition task: delivered to this consumer, not yet acknowledged.
struct Held {
    entry: StreamEntry,
    /// The value key (empty if the entry has none: it is dead-lettered).
    key: String,
    /// Read with `>`: never attempted before (no failed attempts to look up).
    fresh: bool,
}

/// Why a partition task stops.
#[derive(PartialEq, Eq, Debug)]
enum Stop {
    /// Give the lease back (shutdown, fair share).
    Release,
    /// The lease was lost or is about to be: stop without acknowledging more.
    Lost,
}

struct Partition<'a> {
    shared: &'a Shared,
    queue: String,
    keys: PartitionKeys,
    state: &'a PartitionState,
    held: Vec<Held>,
    acks: Vec<String>,
    /// Keys waiting for a retry: when, and the failures so far.
    retry_at: HashMap<String, Instant>,
    /// Failed attempts of entries (by the id of the entry whose arguments were applied), as
    /// known here.
    attempts: HashMap<String, u32>,
    /// Keys whose last attempt failed: not coalesced until their head is settled (the head
    /// is applied alone, so a write joining a failing run neither hides nor inherits it).
    failing: HashSet<String>,
    /// Keys whose head entry is of a function this binary does not know.
    stuck: HashSet<String>,
    /// Blocked keys (stuck, or waiting for a retry) whose entries beyond the first
    /// `PER_KEY_HELD` were dropped from memory: they stay in this consumer's pending list,
    /// and so do the key's later entries, until the pending list is read again.
    trimmed: HashSet<String>,
    /// A trimmed key ran out of entries in memory: read the pending list again.
    reload_wanted: bool,
    /// When acknowledgements were last sent.
    acked_at: Instant,
    /// Consecutive failed Redis operations (the back-off grows with them).
    errors: u32,
    /// A key of the partition holds something else than a stream: warned once.
    warned_type: bool,
    warned: HashSet<String>,
}

/// Applied entries are acknowledged after a batch of them, or this long after the last
/// acknowledgement, whichever comes first (also while a slow body runs): a crash re-applies
/// little.
const ACK_EVERY: Duration = Duration::from_millis(100);

/// The longest wait after consecutive failed Redis operations.
const MAX_ERROR_PAUSE: Duration = Duration::from_secs(5);

/// A blocked key (an unknown function, or waiting for a retry) keeps at most this many of its
/// entries in memory; the rest wait in the pending list.
const PER_KEY_HELD: usize = 10;

pub(super) async fn run_partition(
    shared: Arc<Shared>,
    queue: String,
    keys: PartitionKeys,
    state: Arc<PartitionState>,
) {
    let mut p = Partition {
        shared: &shared,
        queue,
        keys,
        state: &state,
        held: Vec::new(),
        acks: Vec::new(),
        retry_at: HashMap::new(),
        attempts: HashMap::new(),
        failing: HashSet::new(),
        stuck: HashSet::new(),
        trimmed: HashSet::new(),
        reload_wanted: false,
        acked_at: Instant::now(),
        errors: 0,
        warned_type: false,
        warned: HashSet::new(),
    };
    let stop = p.run().await;
    let redis = shared.redis();
    let owned = p.owned();
    if stop == Stop::Release {
        // Acknowledge what was applied, then give the lease back.
        let _ = p.flush_acks().await;
        if let Err(e) = redis.wb_release(&p.keys.owner, &shared.token).await {
            tracing::debug!(target: "cache_runtime", "write-behind release failed: {e}");
        }
    } else {
        // WB_ACK checks the lease atomically: harmless if it is gone.
        let _ = redis.wb_ack(&owned, &p.acks).await;
    }
}

impl Partition<'_> {
    fn owned(&self) -> Owned<'_> {
        Owned {
            keys: &self.keys,
            token: &self.shared.token,
            retention: self.shared.cache.store().wb_config().retention,
        }
    }

    fn redis(&self) -> &RedisBackend {
        self.shared.redis()
    }

    /// Why to stop now, if so.
    fn should_stop(&self) -> Option<Stop> {
        if self.state.lost.load(SeqCst) {
            return Some(Stop::Lost);
        }
        let left = self
            .state
            .lease_until
            .load(SeqCst)
            .saturating_sub(self.shared.now_ms());
        if left < millis(self.shared.config.lease) / 3 {
            return Some(Stop::Lost);
        }
        if self.state.release.load(SeqCst) {
            return Some(Stop::Release);
        }
        None
    }

    async fn run(&mut self) -> Stop {
        let config = self.shared.config.clone();
        // The group, then what other consumers held, then this consumer's pending entries.
        loop {
            if let Some(stop) = self.should_stop() {
                return stop;
            }
            match self.recover().await {
                Ok(()) => break,
                Err(e) => {
                    let wrong = matches!(&e, BackendError::Data(m) if m.contains("WRONGTYPE"));
                    self.back_off("start", &e, wrong).await;
                }
            }
        }
        let mut conn: Option<WbConn> = None;
        // A read whose answer was lost (timed out, failed, interrupted) may have delivered
        // entries to this consumer: they are read again from its pending list.
        let mut reload = false;
        loop {
            if let Some(stop) = self.should_stop() {
                return stop;
            }
            if reload {
                match self.reload_pending().await {
                    Ok(()) => reload = false,
                    Err(e) => {
                        let wrong = matches!(&e, BackendError::Data(m) if m.contains("WRONGTYPE"));
                        self.back_off("pending read", &e, wrong).await;
                        continue;
                    }
                }
            }
            let progressed = match self.apply_ready().await {
                Ok(progressed) => progressed,
                Err(stop) => return stop,
            };
            match self.flush_acks().await {
                Ok(true) => {}
                Ok(false) => return Stop::Lost,
                Err(e) => {
                    tracing::debug!(target: "cache_runtime", "write-behind ack failed: {e}");
                }
            }
            if let Some(stop) = self.should_stop() {
                return stop;
            }
            let wait = if progressed {
                Duration::from_millis(1)
            } else {
                self.next_retry()
                    .map_or(config.poll, |at| {
                        at.saturating_duration_since(Instant::now())
                    })
                    .clamp(Duration::from_millis(1), config.poll)
            };
            if std::mem::take(&mut self.reload_wanted) {
                reload = true;
                continue;
            }
            // Only entries that can run count: blocked keys keep a few each (`trim`).
            let runnable = self.held.iter().filter(|h| !self.blocked(&h.key)).count();
            if runnable >= config.batch * HELD_BATCHES {
                self.pause(wait).await;
                continue;
            }
            if conn.is_none() {
                match self.connect().await {
                    Ok(c) => conn = Some(c),
                    Err(e) => {
                        tracing::debug!(target: "cache_runtime", "write-behind connection failed: {e}");
                        self.pause(config.poll).await;
                        continue;
                    }
                }
            }
            let Some(c) = conn.as_mut() else { continue };
            let limit = wait + self.redis().op_timeout() + Duration::from_secs(1);
            let read = tokio::select! {
                read = tokio::time::timeout(limit, read_new(c, &self.keys.stream, &self.shared.name, config.batch, wait)) => read,
                () = self.state.wake.notified() => {
                    reload = true;
                    continue;
                }
            };
            match read {
                Ok(Ok(entries)) => {
                    self.errors = 0;
                    self.hold(entries, true);
                    self.trim();
                }
                Ok(Err(e)) if e.code() == Some("NOGROUP") => {
                    // The stream expired or was removed: make it again.
                    if let Err(e) = self.redis().wb_group(&self.owned()).await {
                        let wrong = matches!(&e, BackendError::Data(m) if m.contains("WRONGTYPE"));
                        self.back_off("group", &e, wrong).await;
                    }
                }
                Ok(Err(e)) => {
                    conn = None;
                    reload = true;
                    let wrong = e.code() == Some("WRONGTYPE");
                    self.back_off("read", &e, wrong).await;
                }
                Err(_elapsed) => {
                    conn = None;
                    reload = true;
                }
            }
        }
    }

    /// After a failed Redis operation: logs it (a key of the partition that holds something
    /// else than a stream: once, at `warn`) and waits, longer after each consecutive failure
    /// (from `poll` up to 5 s).
    async fn back_off(&mut self, what: &str, e: &(dyn std::fmt::Display + Sync), wrong_type: bool) {
        self.errors = self.errors.saturating_add(1);
        if wrong_type && !self.warned_type {
            self.warned_type = true;
            tracing::warn!(
                target: "cache_runtime",
                "write-behind partition {}: {what} failed: {e}; the key holds something else than a stream (its entries cannot be read until it is removed); retrying with backoff",
                self.keys.stream
            );
        } else {
            tracing::debug!(target: "cache_runtime", "write-behind partition {}: {what} failed: {e}", self.keys.stream);
        }
        let poll = self.shared.config.poll;
        let delay = poll
            .saturating_mul(1 << self.errors.saturating_sub(1).min(16))
            .min(MAX_ERROR_PAUSE)
            .max(poll);
        self.pause(delay).await;
    }

    async fn pause(&self, d: Duration) {
        tokio::select! {
            () = tokio::time::sleep(d) => {}
            () = self.state.wake.notified() => {}
        }
    }

    async fn connect(&self) -> redis::RedisResult<WbConn> {
        self.redis().own_connection().await
    }

    /// Takes the partition over: its group, the entries other consumers held (a dead or
    /// departed worker's), and this consumer's pending entries, in id order.
    async fn recover(&mut self) -> crate::backend::BackendResult<()> {
        let batch = self.shared.config.batch;
        let me = self.shared.name.clone();
        self.redis().wb_group(&self.owned()).await?;
        let mut cursor = "0-0".to_owned();
        loop {
            let (next, deleted) = self
                .redis()
                .wb_autoclaim(&self.owned(), &me, &cursor, batch)
                .await?;
            // Entries deleted while pending: only their acknowledgement is left.
            self.acks.extend(deleted);
            if next == "0-0" {
                break;
            }
            cursor = next;
        }
        // The consumers of departed workers, now without entries, are forgotten.
        if let Err(e) = self.redis().wb_prune_consumers(&self.owned(), &me).await {
            tracing::debug!(target: "cache_runtime", "write-behind consumer cleanup of {} failed: {e}", self.keys.stream);
        }
        self.held.clear();
        self.reload_pending().await
    }

    /// Reads this consumer's pending entries (oldest first) into `held`, skipping those held
    /// already, and keeps `held` in id order.
    async fn reload_pending(&mut self) -> crate::backend::BackendResult<()> {
        let batch = self.shared.config.batch;
        let me = self.shared.name.clone();
        let mut after = "0".to_owned();
        // Every entry of the trimmed keys is read again (in order, then trimmed again).
        self.trimmed.clear();
        loop {
            let entries = self
                .redis()
                .wb_pending(&self.owned(), &me, &after, batch)
                .await?;
            let Some(last) = entries.last() else { break };
            after = last.id.clone();
            self.hold(entries, false);
        }
        self.held.sort_by_key(|h| stream_order(&h.entry.id));
        self.trim();
        Ok(())
    }

    /// Whether `key` cannot run now: an unknown function, or waiting for a retry.
    fn blocked(&self, key: &str) -> bool {
        self.stuck.contains(key) || self.retry_at.contains_key(key)
    }

    /// Drops from memory the entries of blocked keys beyond the first `PER_KEY_HELD` (`held`
    /// is in id order): they stay pending, and are read again when the key runs out.
    fn trim(&mut self) {
        if self.stuck.is_empty() && self.retry_at.is_empty() {
            return;
        }
        let mut counts: HashMap<String, usize> = HashMap::new();
        let mut dropped = Vec::new();
        let mut kept = Vec::with_capacity(self.held.len());
        for h in std::mem::take(&mut self.held) {
            if self.blocked(&h.key) {
                let n = counts.entry(h.key.clone()).or_default();
                *n += 1;
                if *n > PER_KEY_HELD {
                    dropped.push(h.key);
                    continue;
                }
            }
            kept.push(h);
        }
        self.held = kept;
        self.trimmed.extend(dropped);
    }

    fn hold(&mut self, entries: Vec<StreamEntry>, fresh: bool) {
        for entry in entries {
            if entry.deleted {
                // Deleted since it was delivered.
                self.acks.push(entry.id);
                continue;
            }
            if !unseen(&self.held, &self.acks, &entry.id) {
                continue;
            }
            let key = entry.field_str("k").unwrap_or_default().to_owned();
            if self.trimmed.contains(&key) {
                // Earlier entries of the key wait in the pending list: this one too.
                continue;
            }
            self.held.push(Held { entry, key, fresh });
        }
    }

    fn next_retry(&self) -> Option<Instant> {
        self.retry_at.values().min().copied()
    }

    /// Acknowledges what was applied, between entries or while a body runs: `Err` if the
    /// lease was lost; `Ok(false)` if Redis failed (kept for the next time).
    async fn ack_now(&mut self) -> std::result::Result<bool, Stop> {
        match self.flush_acks().await {
            Ok(true) => Ok(true),
            Ok(false) => Err(Stop::Lost),
            Err(e) => {
                tracing::debug!(target: "cache_runtime", "write-behind ack failed: {e}");
                Ok(false)
            }
        }
    }

    async fn flush_acks(&mut self) -> crate::backend::BackendResult<bool> {
        self.acked_at = Instant::now();
        if self.acks.is_empty() {
            return Ok(true);
        }
        let acks = std::mem::take(&mut self.acks);
        match self.redis().wb_ack(&self.owned(), &acks).await {
            Ok(held) => Ok(held),
            Err(e) => {
                self.acks = acks;
                Err(e)
            }
        }
    }

    /// Applies every key whose head entry may run now, in id order per key. Returns whether
    /// anything was applied or settled.
    async fn apply_ready(&mut self) -> std::result::Result<bool, Stop> {
        let mut order: Vec<String> = Vec::new();
        let mut seen = HashSet::new();
        for h in &self.held {
            if seen.insert(h.key.as_str()) {
                order.push(h.key.clone());
            }
        }
        let mut progressed = false;
        for key in order {
            loop {
                if self.stuck.contains(&key) {
                    break;
                }
                if let Some(at) = self.retry_at.get(&key) {
                    if *at > Instant::now() {
                        break;
                    }
                }
                if let Some(stop) = self.should_stop() {
                    return Err(stop);
                }
                if self.acks.len() >= self.shared.config.batch
                    || (!self.acks.is_empty() && self.acked_at.elapsed() >= ACK_EVERY)
                {
                    self.ack_now().await?;
                }
                match self.apply_head(&key).await? {
                    true => progressed = true,
                    false => break,
                }
            }
            if self.trimmed.contains(&key) && !self.held.iter().any(|h| h.key == key) {
                // Its next entries are in the pending list only.
                self.reload_wanted = true;
            }
        }
        Ok(progressed)
    }

    /// Applies the first entry of `key` (with those coalesced into it). Returns whether it was
    /// settled (applied or dead-lettered): then the key's next entry may run.
    async fn apply_head(&mut self, key: &str) -> std::result::Result<bool, Stop> {
        let positions: Vec<usize> = self
            .held
            .iter()
            .enumerate()
            .filter(|(_, h)| h.key == key)
            .map(|(i, _)| i)
            .collect();
        let Some(&first) = positions.first() else {
            return Ok(false);
        };
        let head = &self.held[first];
        let function_id = head.entry.field_str("f").unwrap_or_default().to_owned();
        if head.entry.malformed || key.is_empty() || function_id.is_empty() {
            let error = if head.entry.malformed {
                "a malformed entry (fields that do not parse)"
            } else {
                "a malformed entry (no function or key)"
            };
            return self.dead_letter_malformed(key, &[first], error).await;
        }
        let Some(function) = self.shared.functions.get(&function_id).copied() else {
            self.stuck.insert(key.to_owned());
            // The supervisor gives such a partition back now and then (a newer binary may
            // have the function).
            self.state.unknown.store(true, SeqCst);
            self.trim();
            if self.warned.insert(function_id.clone()) {
                tracing::warn!(
                    target: "cache_runtime",
                    "write-behind queue {} ({}): entries of `{function_id}`, a function this binary does not have, are left pending (a binary that has it applies them); later writes of their keys wait",
                    self.queue,
                    self.keys.stream
                );
            }
            return Ok(false);
        };
        // Coalescing: the run of consecutive entries of this key by this function; the last
        // one is applied.
        let mut run = vec![first];
        if function.coalesce && !self.failing.contains(key) {
            for &i in &positions[1..] {
                if self.held[i].entry.field_str("f") == Some(function_id.as_str()) {
                    run.push(i);
                } else {
                    break;
                }
            }
        }
        let last_at = *run.last().unwrap_or(&first);
        let last = &self.held[last_at];
        // Attempts are counted per applied entry (the last of the run).
        let applied_id = last.entry.id.clone();
        let superseded = positions.len() > run.len();
        let (Some(args), Some(write_id)) = (last.entry.field("a"), last.entry.field_str("i"))
        else {
            let error = "a malformed entry (no arguments or write id)";
            let moved = self.dead_letter_malformed(key, &run, error).await?;
            if moved {
                let stats = function
                    .site
                    .stats(self.shared.cache.stats_registry(), None);
                stats.wb_dead_lettered.add(run.len() as u64);
            }
            return Ok(moved);
        };
        let write_id = WriteId::from_entry(write_id, position_of(&last.entry));
        let envelope = last
            .entry
            .field("v")
            .map(<[u8]>::to_vec)
            .unwrap_or_default();
        let ttl = last
            .entry
            .field_str("t")
            .and_then(|t| t.parse::<u64>().ok())
            .map_or(self.shared.cache.default_ttl(), Duration::from_millis);
        let stats = function
            .site
            .stats(self.shared.cache.stats_registry(), None);
        // Until the entry is settled (acknowledged, dead-lettered or scheduled for a retry)
        // and counted, `flush` does not return.
        let _in_flight = InFlight::enter(&self.shared.in_flight);
        let applying = match (function.apply)(args) {
            Ok(applying) => applying,
            Err(e) => {
                let error = e.to_string();
                let moved = self.dead_letter(key, &run, &error, 0).await?;
                if moved {
                    stats.wb_dead_lettered.add(run.len() as u64);
                }
                return Ok(moved);
            }
        };
        let fresh = self.held[last_at].fresh;
        let body = CURRENT.scope(
            write_id.clone(),
            std::panic::AssertUnwindSafe(applying.0).catch_unwind(),
        );
        // The body races the lease: lost first, the body is cancelled (its future dropped),
        // nothing is acknowledged and the partition stops; the next owner applies the entry
        // again (bodies are versioned with `position()`).
        let (state, shared) = (self.state, self.shared);
        let lost = lease_lost(state, shared);
        tokio::pin!(body, lost);
        let outcome = loop {
            tokio::select! {
                outcome = &mut body => break outcome,
                () = &mut lost => {
                    tracing::warn!(
                        target: "cache_runtime",
                        "write-behind `{function_id}` of {key}: the partition's lease was lost while the body ran; the body was cancelled and the next owner applies the write again"
                    );
                    return Err(Stop::Lost);
                }
                // A slow body does not hold back the acknowledgement of what was applied.
                () = tokio::time::sleep(ACK_EVERY), if !self.acks.is_empty() => {
                    self.ack_now().await?;
                }
            }
        };
        let error = match outcome {
            Ok(Applied::Ok) => None,
            Ok(Applied::Err(e)) => Some(e),
            Err(panic) => Some(format!("panicked: {}", panic_message(&*panic))),
        };
        let Some(error) = error else {
            stats.wb_applied.add(run.len() as u64);
            self.retry_at.remove(key);
            self.failing.remove(key);
            for &i in &run {
                self.attempts.remove(&self.held[i].entry.id);
            }
            if !superseded && !envelope.is_empty() {
                let position = write_id.position().map(|p| p.to_string());
                match self
                    .redis()
                    .wb_reassert(key, write_id.as_str(), position.as_deref(), &envelope, ttl)
                    .await
                {
                    Ok(_) => self.shared.cache.store().written_elsewhere(key),
                    Err(e) => {
                        tracing::debug!(target: "cache_runtime", "write-behind re-assert of {key} failed: {e}")
                    }
                }
            }
            self.settle(&run);
            return Ok(true);
        };
        // A failed attempt: counted in Redis (it survives a takeover).
        let known = match self.attempts.get(&applied_id) {
            Some(n) => *n,
            None if fresh => 0,
            None => self
                .redis()
                .wb_attempts(&self.owned(), &applied_id)
                .await
                .unwrap_or(0),
        };
        let failures = match self
            .redis()
            .wb_failed_attempt(&self.owned(), &applied_id)
            .await
        {
            Ok(n) => n.max(known + 1),
            Err(_) => known + 1,
        };
        self.attempts.insert(applied_id, failures);
        self.failing.insert(key.to_owned());
        if failures >= self.shared.config.max_attempts {
            let moved = self.dead_letter(key, &run, &error, failures).await?;
            if moved {
                stats.wb_dead_lettered.add(run.len() as u64);
            }
            return Ok(moved);
        }
        SiteStats::inc(&stats.wb_retried);
        let delay = backoff(&self.shared.config, failures);
        tracing::debug!(
            target: "cache_runtime",
            "write-behind `{function_id}` of {key} failed (attempt {failures}): {error}; retried in {delay:?}"
        );
        self.retry_at.insert(key.to_owned(), Instant::now() + delay);
        self.trim();
        Ok(false)
    }

    /// Removes the entries at `positions` from `held`, to be acknowledged.
    fn settle(&mut self, positions: &[usize]) {
        let mut positions = positions.to_vec();
        positions.sort_unstable();
        for i in positions.into_iter().rev() {
            let h = self.held.remove(i);
            self.acks.push(h.entry.id);
        }
    }

    /// Dead-letters entries that cannot be read (attempts 0), counted in the worker's
    /// `malformed`.
    async fn dead_letter_malformed(
        &mut self,
        key: &str,
        positions: &[usize],
        error: &str,
    ) -> std::result::Result<bool, Stop> {
        let moved = self.dead_letter(key, positions, error, 0).await?;
        if moved {
            self.shared
                .malformed
                .fetch_add(u64::try_from(positions.len()).unwrap_or(1), SeqCst);
        }
        Ok(moved)
    }

    async fn dead_letter(
        &mut self,
        key: &str,
        positions: &[usize],
        error: &str,
        attempts: u32,
    ) -> std::result::Result<bool, Stop> {
        let ids: Vec<String> = positions
            .iter()
            .map(|&i| self.held[i].entry.id.clone())
            .collect();
        let function = self.held[positions[0]]
            .entry
            .field_str("f")
            .unwrap_or("?")
            .to_owned();
        let last = positions.iter().copied().max().unwrap_or(positions[0]);
        let write_id = self.held[last]
            .entry
            .field_str("i")
            .unwrap_or_default()
            .to_owned();
        let dead = dead_key(self.shared.cache.namespace(), &self.queue);
        // Acknowledge what came before (in order), then move these.
        match self.flush_acks().await {
            Ok(true) => {}
            Ok(false) => return Err(Stop::Lost),
            Err(_) => {}
        }
        let letter = DeadLetter {
            key,
            write_id: &write_id,
            position: position_of(&self.held[last].entry).map(|p| p.to_string()),
            error,
            attempts,
        };
        match self
            .redis()
            .wb_dead(&self.owned(), &dead, &letter, &ids)
            .await
        {
            Ok(Some(invalidated)) => {
                if invalidated {
                    // The cache held a value the database never got.
                    self.shared.cache.store().written_elsewhere(key);
                }
                tracing::warn!(
                    target: "cache_runtime",
                    "write-behind `{function}` of {key} moved to the dead letters of queue {} after {attempts} failed attempts: {error}{}",
                    self.queue,
                    if invalidated { " (its cached value was invalidated)" } else { "" }
                );
                let mut positions = positions.to_vec();
                positions.sort_unstable();
                for i in positions.into_iter().rev() {
                    let h = self.held.remove(i);
                    self.attempts.remove(&h.entry.id);
                }
                self.retry_at.remove(key);
                self.failing.remove(key);
                Ok(true)
            }
            Ok(None) => Err(Stop::Lost),
            Err(e) => {
                // Try again later.
                tracing::debug!(target: "cache_runtime", "write-behind dead letter failed: {e}");
                self.retry_at.insert(
                    key.to_owned(),
                    Instant::now() + self.shared.config.backoff_base,
                );
                Ok(false)
            }
        }
    }
}

/// Whether an entry read again (from the pending list) is new to this task: neither held nor
/// applied and waiting for its acknowledgement (re-applying it would run its body twice).
fn unseen(held: &[Held], acks: &[String], id: &str) -> bool {
    !held.iter().any(|h| h.entry.id == id) && !acks.iter().any(|a| a == id)
}

/// Returns once the partition's lease is lost, or about to expire as far as this worker
/// knows (its renewals failed).
async fn lease_lost(state: &PartitionState, shared: &Shared) {
    let margin = millis(shared.config.lease) / 10;
    loop {
        let notified = state.wake.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if state.lost.load(SeqCst) {
            return;
        }
        let until = state.lease_until.load(SeqCst).saturating_sub(margin);
        let now = shared.now_ms();
        if now >= until {
            return;
        }
        tokio::select! {
            () = notified => {}
            () = tokio::time::sleep(Duration::from_millis(until - now)) => {}
        }
    }
}

/// An entry's position: its `p` field (a dead letter moved back by `retry_dead` keeps its
/// first position there), else its stream id.
fn position_of(entry: &StreamEntry) -> Option<Position> {
    entry
        .field_str(POSITION_FIELD)
        .and_then(Position::parse)
        .or_else(|| Position::parse(&entry.id))
}

/// A stream id (`<ms>-<seq>`) as a sortable pair; an id that does not parse sorts last.
fn stream_order(id: &str) -> (u64, u64) {
    let mut parts = id.splitn(2, '-');
    let ms = parts
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or(u64::MAX);
    let seq = parts
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or(u64::MAX);
    (ms, seq)
}

/// Counts an entry being applied while it lives.
struct InFlight<'a>(&'a AtomicUsize);

impl<'a> InFlight<'a> {
    fn enter(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, SeqCst);
        InFlight(count)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, SeqCst);
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(id: &str) -> Held {
        Held {
            entry: StreamEntry {
                id: id.to_owned(),
                ..StreamEntry::default()
            },
            key: "k".to_owned(),
            fresh: true,
        }
    }

    #[test]
    fn entries_applied_but_not_yet_acknowledged_are_not_taken_again() {
        let held = vec![held("1-0")];
        let acks = vec!["2-0".to_owned()];
        assert!(!unseen(&held, &acks, "1-0"), "held");
        assert!(!unseen(&held, &acks, "2-0"), "applied, waiting for its ack");
        assert!(unseen(&held, &acks, "3-0"));
    }

    #[test]
    fn positions_come_from_p_else_the_stream_id() {
        let mut entry = StreamEntry {
            id: "20-1".to_owned(),
            ..StreamEntry::default()
        };
        assert_eq!(position_of(&entry), Some(Position::new(20, 1)));
        entry.fields.push(("p".to_owned(), b"10-3".to_vec()));
        assert_eq!(position_of(&entry), Some(Position::new(10, 3)));
        assert!(Position::new(10, 3) < Position::new(10, 4));
        assert!(Position::new(10, 9) < Position::new(11, 0));
        assert_eq!(Position::new(10, 3).to_string(), "10-3");
    }
}
