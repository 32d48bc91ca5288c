//! The heartbeat on a Redis Cluster: an echo through every master (docs/design-cluster.md
//! §4.4).
//!
//! The bus subscribes with classic pub/sub on one node, C. A message published on another
//! master, A, reaches C over the cluster bus link A→C, so C answering a `PING` says nothing
//! about A's earlier messages. Instead, each heartbeat
//!
//! 1. asks C for the slot table (`CLUSTER SLOTS`) and takes its masters, in order;
//! 2. publishes, on every master `i`, the frame `h` (this backend's origin, the heartbeat's
//!    sequence number, `i`) on this backend's own channel (`inv::heartbeat_channel`);
//! 3. and counts the frames that come back through the subscription: when all N are back,
//!    every message published on any of the N masters before the heartbeat was sent has been
//!    received (a node writes messages to a subscriber in the order it handles them, and A's
//!    messages travel to C over one link, in order), so the bus calls `delivered(sent)`.
//!
//! A master that cannot be reached (its publish fails) is a missed heartbeat: `lost`, as when
//! the echoes are late. A change of the master set between two heartbeats (a failover, a
//! master added or emptied by a reshard) is `lost` too: messages of a master that died may not
//! have reached C, and the new master's echo says nothing about them. The slot table also
//! names every node, replicas included: where the subscription moves when C fails (see
//! [`Echo::nodes`]).
//!
//! What the echo cannot see: a cluster-bus link that drops and reconnects between two
//! heartbeats loses the messages queued on it without a trace, and an echo sent after the
//! reconnection comes back. Redis's cluster bus gives no sequence numbers to detect it; such a
//! link drop follows a node being unreachable for half the node timeout, which the heartbeats
//! of that period (their publishes time out) usually report.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{ConnectionAddr, ConnectionInfo, Value};

use super::inv;

/// A node's address.
pub(super) type Addr = (String, u16);

/// Why a heartbeat could not be sent.
pub(super) enum Failure {
    /// The subscribed node did not give its slot table.
    Subscribed(redis::RedisError),
    /// Publishing on this master failed.
    Master(Addr, redis::RedisError),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Subscribed(e) => write!(f, "the subscribed node's slot table: {e}"),
            Failure::Master((host, port), e) => write!(f, "publishing on {host}:{port}: {e}"),
        }
    }
}

/// What a sent heartbeat found: the masters it was published on (index = position).
pub(super) type Sent = Result<Vec<Addr>, Failure>;

/// The state of the echo heartbeats of one bus task (kept across its resubscriptions).
pub(super) struct Echo {
    /// The seeds' first connection settings (credentials, TCP settings), used for every node.
    template: ConnectionInfo,
    /// `__cr:hb:<origin>`.
    channel: String,
    origin: inv::Origin,
    config: redis::AsyncConnectionConfig,
    /// A connection per node, made on first use, dropped when it fails.
    conns: Arc<Mutex<HashMap<Addr, MultiplexedConnection>>>,
    /// The masters of the last heartbeat that got that far.
    masters: Option<Vec<Addr>>,
    /// Every node of the last slot table.
    nodes: Arc<Mutex<Vec<Addr>>>,
    seq: u64,
}

/// One heartbeat in flight: which echoes came back.
pub(super) struct Round {
    pub(super) seq: u64,
    /// The number of masters, once the publishes are done.
    masters: Option<usize>,
    got: BTreeSet<u16>,
}

impl Round {
    /// An echo of ours came back (of any heartbeat).
    pub(super) fn echo(&mut self, seq: u64, master: u16) {
        if seq == self.seq {
            self.got.insert(master);
        }
    }

    /// The publishes are done, on `masters` masters.
    pub(super) fn published(&mut self, masters: usize) {
        self.masters = Some(masters);
    }

    /// Whether every master's echo came back.
    pub(super) fn complete(&self) -> bool {
        self.masters.is_some_and(|n| {
            n > 0 && self.got.len() == n && self.got.iter().all(|&i| usize::from(i) < n)
        })
    }
}

impl Echo {
    pub(super) fn new(
        template: ConnectionInfo,
        origin: inv::Origin,
        connect_timeout: Duration,
        response_timeout: Duration,
    ) -> Echo {
        Echo {
            template,
            channel: inv::heartbeat_channel(&origin),
            origin,
            config: redis::AsyncConnectionConfig::new()
                .set_connection_timeout(Some(connect_timeout))
                .set_response_timeout(Some(response_timeout)),
            conns: Arc::new(Mutex::new(HashMap::new())),
            masters: None,
            nodes: Arc::new(Mutex::new(Vec::new())),
            seq: 0,
        }
    }

    /// The channel the echoes come back on.
    pub(super) fn channel(&self) -> &str {
        &self.channel
    }

    /// Every node of the last slot table (masters and replicas), as connection settings.
    pub(super) fn nodes(&self) -> Vec<ConnectionInfo> {
        let nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner()).clone();
        nodes.into_iter().map(|a| self.info(a)).collect()
    }

    fn info(&self, (host, port): Addr) -> ConnectionInfo {
        super::conn::info_at(&self.template, &host, port)
    }

    /// Starts a heartbeat: the round to count its echoes in, and the future that publishes it
    /// (through `subscribed`, the node the bus is subscribed on, for the slot table).
    pub(super) fn send(
        &mut self,
        subscribed: &ConnectionInfo,
    ) -> (Round, Pin<Box<dyn Future<Output = Sent> + Send>>) {
        self.seq += 1;
        let seq = self.seq;
        let (conns, nodes, config) = (self.conns.clone(), self.nodes.clone(), self.config.clone());
        let (template, channel, origin) =
            (self.template.clone(), self.channel.clone(), self.origin);
        let here = match subscribed.addr() {
            ConnectionAddr::Tcp(host, port) | ConnectionAddr::TcpTls { host, port, .. } => {
                Some((host.clone(), *port))
            }
            _ => None,
        };
        let future = async move {
            let here = here.ok_or_else(|| {
                Failure::Subscribed(redis::RedisError::from((
                    redis::ErrorKind::InvalidClientConfig,
                    "the echo heartbeat needs a TCP address",
                )))
            })?;
            let connect = |addr: Addr| {
                let (conns, config, template) = (conns.clone(), config.clone(), template.clone());
                async move {
                    let known = conns
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get(&addr)
                        .cloned();
                    if let Some(conn) = known {
                        return Ok(conn);
                    }
                    let info = super::conn::info_at(&template, &addr.0, addr.1);
                    let conn = redis::Client::open(info)?
                        .get_multiplexed_async_connection_with_config(&config)
                        .await?;
                    conns
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(addr, conn.clone());
                    Ok::<_, redis::RedisError>(conn)
                }
            };
            let forget = |addr: &Addr| {
                conns.lock().unwrap_or_else(|e| e.into_inner()).remove(addr);
            };
            let table = async {
                let mut conn = connect(here.clone()).await?;
                redis::cmd("CLUSTER")
                    .arg("SLOTS")
                    .query_async::<Value>(&mut conn)
                    .await
            }
            .await
            .map_err(|e| {
                forget(&here);
                Failure::Subscribed(e)
            })?;
            let (masters, all) = parse_slots(&table, &here.0);
            *nodes.lock().unwrap_or_else(|e| e.into_inner()) = all;
            let publishes = masters.iter().enumerate().map(|(i, addr)| {
                let index = u16::try_from(i).unwrap_or(u16::MAX);
                let frame = inv::encode_heartbeat(&origin, seq, index);
                let channel = channel.as_str();
                async move {
                    let mut conn = connect(addr.clone()).await?;
                    redis::cmd("PUBLISH")
                        .arg(channel)
                        .arg(frame)
                        .query_async::<i64>(&mut conn)
                        .await
                }
            });
            let results = futures_util::future::join_all(publishes).await;
            for (addr, result) in masters.iter().zip(results) {
                if let Err(e) = result {
                    forget(addr);
                    return Err(Failure::Master(addr.clone(), e));
                }
            }
            Ok(masters)
        };
        let round = Round {
            seq,
            masters: None,
            got: BTreeSet::new(),
        };
        (round, Box::pin(future))
    }

    /// Records the masters a heartbeat was published on; whether they differ from the last
    /// heartbeat's (a failover or a reshard: messages may have been lost).
    pub(super) fn masters_changed(&mut self, masters: &[Addr]) -> bool {
        let changed = self.masters.as_deref().is_some_and(|last| last != masters);
        self.masters = Some(masters.to_vec());
        changed
    }
}

/// The masters (sorted, distinct) and every node of a `CLUSTER SLOTS` reply; a node without
/// an address (the answering node, which does not know its own) is `here`.
fn parse_slots(table: &Value, here: &str) -> (Vec<Addr>, Vec<Addr>) {
    let mut masters = BTreeSet::new();
    let mut all = BTreeSet::new();
    let Value::Array(ranges) = table else {
        return (Vec::new(), Vec::new());
    };
    for range in ranges {
        let Value::Array(range) = range else { continue };
        // start, end, then the master, then its replicas.
        for (i, node) in range.iter().skip(2).enumerate() {
            let Value::Array(node) = node else { continue };
            let host = match node.first() {
                Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
                Some(Value::SimpleString(s)) => s.clone(),
                _ => continue,
            };
            let Some(Value::Int(port)) = node.get(1) else {
                continue;
            };
            let Ok(port) = u16::try_from(*port) else {
                continue;
            };
            let host = if host.is_empty() || host == "?" {
                here.to_owned()
            } else {
                host
            };
            if i == 0 {
                masters.insert((host.clone(), port));
            }
            all.insert((host, port));
        }
    }
    (masters.into_iter().collect(), all.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(host: &str, port: i64) -> Value {
        Value::Array(vec![
            Value::BulkString(host.as_bytes().to_vec()),
            Value::Int(port),
            Value::BulkString(b"id".to_vec()),
        ])
    }

    #[test]
    fn slots_give_masters_and_nodes() {
        let table = Value::Array(vec![
            Value::Array(vec![
                Value::Int(0),
                Value::Int(5460),
                node("10.0.0.2", 7001),
                node("10.0.0.5", 7004),
            ]),
            Value::Array(vec![
                Value::Int(5461),
                Value::Int(10922),
                node("", 7000),
                node("10.0.0.4", 7003),
            ]),
            Value::Array(vec![
                Value::Int(10923),
                Value::Int(12000),
                node("10.0.0.2", 7001),
            ]),
        ]);
        let (masters, all) = parse_slots(&table, "10.0.0.1");
        assert_eq!(
            masters,
            [("10.0.0.1".to_owned(), 7000), ("10.0.0.2".to_owned(), 7001)]
        );
        assert_eq!(all.len(), 4);
    }

    #[test]
    fn a_round_completes_with_every_master_s_echo() {
        let mut round = Round {
            seq: 7,
            masters: None,
            got: BTreeSet::new(),
        };
        round.echo(7, 0);
        round.echo(7, 1);
        round.echo(6, 2);
        assert!(!round.complete(), "the publishes are not done");
        round.published(3);
        assert!(!round.complete(), "an old heartbeat's echo does not count");
        round.echo(7, 1);
        assert!(!round.complete(), "a duplicate does not count");
        round.echo(7, 2);
        assert!(round.complete());
        let mut empty = Round {
            seq: 1,
            masters: None,
            got: BTreeSet::new(),
        };
        empty.published(0);
        assert!(!empty.complete(), "no master, no proof");
    }
}
