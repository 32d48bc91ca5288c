//! The invalidation channel and its health, against the Redis at `REDIS_URL` (default
//! `redis://127.0.0.1:6379`), in namespaces of their own. Two backends on one namespace stand
//! for two processes.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::{RedisBackend, RedisOptions};
use crate::backend::{Backend, Invalidations, Stored};
use crate::breaker::FailureLog;

fn url() -> String {
    std::env::var("REDIS_URL")
        .ok()
        .filter(|u| !u.trim().is_empty())
        .unwrap_or_else(|| "redis://127.0.0.1:6379".to_owned())
}

fn namespace(name: &str) -> String {
    use std::hash::{BuildHasher, RandomState};
    let random = RandomState::new().hash_one((std::process::id(), Instant::now()));
    format!("test:inv:{name}:{random:016x}")
}

fn backend_at(url: &str, namespace: &str, options: RedisOptions) -> RedisBackend {
    let log = Arc::new(FailureLog::new(Duration::from_secs(1)));
    RedisBackend::new(url, namespace, options, log).unwrap()
}

fn backend(namespace: &str) -> RedisBackend {
    backend_at(&url(), namespace, RedisOptions::default())
}

async fn raw() -> redis::aio::MultiplexedConnection {
    redis::Client::open(url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

#[derive(Debug, Clone, PartialEq)]
enum Event {
    Keys(Vec<String>),
    Tags(Vec<String>),
    Lost,
    Delivered(Instant),
}

/// A sink that records what it is told, and when.
#[derive(Default)]
struct Recorder {
    events: Mutex<Vec<(Instant, Event)>>,
}

impl Invalidations for Recorder {
    fn keys(&self, keys: &mut dyn Iterator<Item = &str>) {
        let now = Instant::now();
        let keys = keys.map(str::to_owned).collect();
        self.events.lock().unwrap().push((now, Event::Keys(keys)));
    }

    fn tags(&self, tags: &mut dyn Iterator<Item = &str>) {
        let now = Instant::now();
        let tags = tags.map(str::to_owned).collect();
        self.events.lock().unwrap().push((now, Event::Tags(tags)));
    }

    fn lost(&self) {
        self.events
            .lock()
            .unwrap()
            .push((Instant::now(), Event::Lost));
    }

    fn delivered(&self, sent: Instant) {
        self.events
            .lock()
            .unwrap()
            .push((Instant::now(), Event::Delivered(sent)));
    }
}

impl Recorder {
    fn events(&self) -> Vec<(Instant, Event)> {
        self.events.lock().unwrap().clone()
    }

    /// Waits (at most 5 s) until `done` holds for the events so far.
    async fn until(&self, what: &str, done: impl Fn(&[(Instant, Event)]) -> bool) {
        let started = Instant::now();
        loop {
            if done(&self.events.lock().unwrap()) {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "timed out waiting for {what}; events: {:?}",
                self.events()
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Waits until a heartbeat sent after `after` was answered: everything published before
    /// `after` has been delivered.
    async fn delivered_after(&self, after: Instant) {
        self.until("a heartbeat", |events| {
            events
                .iter()
                .any(|(_, e)| matches!(e, Event::Delivered(sent) if *sent > after))
        })
        .await;
    }

    fn names(&self) -> (Vec<String>, Vec<String>) {
        let (mut keys, mut tags) = (Vec::new(), Vec::new());
        for (_, e) in self.events() {
            match e {
                Event::Keys(k) => keys.extend(k),
                Event::Tags(t) => tags.extend(t),
                _ => {}
            }
        }
        (keys, tags)
    }

    fn count(&self, what: impl Fn(&Event) -> bool) -> usize {
        self.events().iter().filter(|(_, e)| what(e)).count()
    }
}

fn watch(b: &RedisBackend, heartbeat: Duration) -> Arc<Recorder> {
    let recorder = Arc::new(Recorder::default());
    let sink: Arc<dyn Invalidations> = recorder.clone();
    b.watch(&sink, heartbeat);
    recorder
}

fn value(s: &str) -> Stored {
    Stored::bytes(Bytes::copy_from_slice(s.as_bytes()))
}

const TTL: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_and_invalidations_reach_every_process_their_own_included() {
    let ns = namespace("reach");
    let (a, b) = (backend(&ns), backend(&ns));
    let heartbeat = Duration::from_millis(50);
    let (ra, rb) = (watch(&a, heartbeat), watch(&b, heartbeat));
    let start = Instant::now();
    ra.delivered_after(start).await;
    rb.delivered_after(start).await;

    let k1 = format!("{ns}:k1");
    a.write(&k1, value("v"), TTL).await.unwrap();
    // Three keys over two hash slots: one `DEL` per slot, one frame for all.
    let grouped = [
        format!("{ns}:a"),
        format!("{ns}:{{g}}b"),
        format!("{ns}:{{g}}c"),
    ];
    let grouped: Vec<&str> = grouped.iter().map(String::as_str).collect();
    a.invalidate(&grouped).await.unwrap();
    let tags = [format!("{ns}:t1"), format!("{ns}:t2")];
    let tags: Vec<&str> = tags.iter().map(String::as_str).collect();
    a.invalidate_tags(&tags).await.unwrap();
    let k2 = format!("{ns}:k2");
    b.write(&k2, value("w"), TTL).await.unwrap();
    let done = Instant::now();
    ra.delivered_after(done).await;
    rb.delivered_after(done).await;

    // Both get every frame, their own included (a write that timed out may be applied later).
    let mut expected = vec![k1.clone()];
    expected.extend(grouped.iter().map(|k| k.to_string()));
    expected.push(k2.clone());
    let tag_names: Vec<String> = tags.iter().map(|t| t.to_string()).collect();
    assert_eq!(
        rb.names(),
        (expected.clone(), tag_names.clone()),
        "B got every write and invalidation, in order"
    );
    assert_eq!(
        rb.count(|e| matches!(e, Event::Keys(k) if k.len() == 3)),
        1,
        "the three keys of one invalidation came in one frame"
    );
    assert_eq!(ra.names(), (expected, tag_names), "A too");

    let mut conn = raw().await;
    let _: () = redis::cmd("DEL")
        .arg(&k1)
        .arg(&k2)
        .query_async(&mut conn)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_are_delivered_periodically_and_watch_keeps_the_first_sink() {
    let ns = namespace("heartbeat");
    let b = backend(&ns);
    let heartbeat = Duration::from_millis(40);
    let rb = watch(&b, heartbeat);
    let second = watch(&b, Duration::from_secs(3600));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let events = rb.events();
    let sent: Vec<Instant> = events
        .iter()
        .filter_map(|(_, e)| match e {
            Event::Delivered(sent) => Some(*sent),
            _ => None,
        })
        .collect();
    assert!(sent.len() >= 5, "a heartbeat every 40 ms: {events:?}");
    for w in sent.windows(2) {
        assert!(w[1] - w[0] >= heartbeat, "one heartbeat per period");
    }
    let first_delivered = events
        .iter()
        .position(|(_, e)| matches!(e, Event::Delivered(_)))
        .unwrap();
    assert!(
        events[..first_delivered]
            .iter()
            .any(|(_, e)| *e == Event::Lost),
        "the subscription said lost before its first heartbeat: {events:?}"
    );
    // A late answer (a loaded machine) is lost; a heartbeat sent before a loss never counts.
    for (at, e) in &events {
        if let Event::Delivered(sent) = e {
            assert!(
                !events
                    .iter()
                    .any(|(lost, l)| *l == Event::Lost && lost > sent && lost < at),
                "delivered({sent:?}) after a later loss: {events:?}"
            );
        }
    }
    assert!(second.events().is_empty(), "the first sink is kept");
}

/// The id of the connection named `name` in `CLIENT LIST`.
async fn client_id(conn: &mut redis::aio::MultiplexedConnection, name: &str) -> Option<u64> {
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(conn)
        .await
        .unwrap();
    let needle = format!(" name={name} ");
    let mut ids = list.lines().filter(|l| l.contains(&needle)).map(|l| {
        l.split(' ')
            .find_map(|f| f.strip_prefix("id="))
            .and_then(|id| id.parse().ok())
            .expect("an id")
    });
    let id = ids.next();
    assert!(ids.next().is_none(), "one connection named {name}");
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_subscription_is_lost_then_delivered_again() {
    let ns = namespace("kill");
    let (a, b) = (backend(&ns), backend(&ns));
    let heartbeat = Duration::from_millis(50);
    let rb = watch(&b, heartbeat);
    rb.delivered_after(Instant::now()).await;

    let mut conn = raw().await;
    let name = b.bus.client_name();
    let id = client_id(&mut conn, &name)
        .await
        .expect("the bus connection is named");
    let killed_at = Instant::now();
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("ID")
        .arg(id)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(killed, 1);
    rb.until("lost after the kill", |events| {
        events
            .iter()
            .any(|(at, e)| *e == Event::Lost && *at > killed_at)
    })
    .await;
    rb.delivered_after(killed_at).await;
    let new_id = client_id(&mut conn, &name).await.expect("reconnected");
    assert_ne!(new_id, id);

    // And the new subscription carries invalidations.
    let k = format!("{ns}:after-kill");
    a.write(&k, value("v"), TTL).await.unwrap();
    rb.delivered_after(Instant::now()).await;
    assert_eq!(rb.names().0, vec![k.clone()]);
    let _: () = redis::cmd("DEL")
        .arg(&k)
        .query_async(&mut conn)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_frame_is_lost_and_an_everything_frame_too() {
    let ns = namespace("garbage");
    let b = backend(&ns);
    let rb = watch(&b, Duration::from_millis(50));
    rb.delivered_after(Instant::now()).await;
    let mut conn = raw().await;
    let before = rb.count(|e| *e == Event::Lost);
    let _: i64 = redis::cmd("PUBLISH")
        .arg(&b.inv_channel)
        .arg(&b"k\x01\x02"[..])
        .query_async(&mut conn)
        .await
        .unwrap();
    rb.until("lost", |events| {
        events.iter().filter(|(_, e)| *e == Event::Lost).count() > before
    })
    .await;
    let everything = super::inv::encode::<&str>(super::inv::Kind::Keys, &[9; 8], &[]);
    let _: i64 = redis::cmd("PUBLISH")
        .arg(&b.inv_channel)
        .arg(everything)
        .query_async(&mut conn)
        .await
        .unwrap();
    rb.until("lost again", |events| {
        events.iter().filter(|(_, e)| *e == Event::Lost).count() > before + 1
    })
    .await;
    rb.delivered_after(Instant::now()).await;
    assert_eq!(rb.names(), (Vec::new(), Vec::new()));
}

#[tokio::test]
async fn the_breaker_opening_is_lost() {
    let ns = namespace("breaker");
    let options = RedisOptions {
        breaker_threshold: 1,
        connect_timeout: Duration::from_millis(200),
        ..RedisOptions::default()
    };
    let b = backend_at("redis://127.0.0.1:1", &ns, options);
    let rb = watch(&b, Duration::from_millis(50));
    assert!(b.write(&format!("{ns}:k"), value("v"), TTL).await.is_err());
    assert!(b.conns.breaker().is_open());
    rb.until("lost", |events| {
        events.iter().any(|(_, e)| *e == Event::Lost)
    })
    .await;
    assert_eq!(rb.count(|e| matches!(e, Event::Delivered(_))), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_heartbeat_counts_while_the_breaker_is_open() {
    let ns = namespace("breaker-gate");
    let b = backend(&ns);
    let rb = watch(&b, Duration::from_millis(20));
    rb.delivered_after(Instant::now()).await;
    let breaker = b.conns.breaker();
    while !breaker.failure() {}
    let opened = Instant::now();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !rb.events()
            .iter()
            .any(|(at, e)| matches!(e, Event::Delivered(_)) && *at > opened),
        "delivered while the breaker was open: {:?}",
        rb.events()
    );
    breaker.success();
    rb.delivered_after(Instant::now()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fills_still_wake_waiters_while_watching() {
    let ns = namespace("fills");
    let b = backend(&ns);
    let rb = watch(&b, Duration::from_millis(50));
    rb.delivered_after(Instant::now()).await;
    assert!(b.bus.ready(Duration::from_secs(1)).await);
    let key = format!("{ns}:waited");
    let registration = b.bus.register(&key);
    let notified = registration.notify().notified();
    tokio::pin!(notified);
    notified.as_mut().enable();
    let mut conn = raw().await;
    let _: i64 = redis::cmd("PUBLISH")
        .arg(super::CHANNEL)
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(2), notified)
        .await
        .expect("the fill woke the waiter");
}

/// Percentiles of `values` (sorted here).
fn percentiles(values: &mut [i128]) -> String {
    values.sort_unstable();
    let at = |q: f64| values[((values.len() as f64 - 1.0) * q).round() as usize];
    format!(
        "p50 {} us, p99 {} us, min {} us, max {} us",
        at(0.5),
        at(0.99),
        values[0],
        values[values.len() - 1]
    )
}

/// Signed microseconds from `from` to `to`.
fn micros(from: Instant, to: Instant) -> i128 {
    if to >= from {
        (to - from).as_micros() as i128
    } else {
        -((from - to).as_micros() as i128)
    }
}

/// How long after `write` returns in one process another process's sink has the key (and
/// how long after the write was called). Prints p50 / p99 (`--nocapture` shows them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_latency() {
    const WRITES: usize = 1000;
    let ns = namespace("latency");
    let (a, b) = (backend(&ns), backend(&ns));
    let rb = watch(&b, Duration::from_millis(100));
    rb.delivered_after(Instant::now()).await;
    let keys: Vec<String> = (0..WRITES).map(|i| format!("{ns}:{i}")).collect();
    let mut times = Vec::with_capacity(WRITES);
    for key in &keys {
        let called = Instant::now();
        a.write(key, value("v"), TTL).await.unwrap();
        times.push((called, Instant::now()));
    }
    rb.until("every write", |events| {
        events
            .iter()
            .filter(|(_, e)| matches!(e, Event::Keys(_)))
            .count()
            >= WRITES
    })
    .await;
    let received: std::collections::HashMap<String, Instant> = rb
        .events()
        .into_iter()
        .filter_map(|(at, e)| match e {
            Event::Keys(k) => Some((k.into_iter().next().unwrap(), at)),
            _ => None,
        })
        .collect();
    // Signed: the subscriber may have the message before the writer has its reply.
    let mut after_return: Vec<i128> = keys
        .iter()
        .zip(&times)
        .map(|(k, &(_, returned))| micros(returned, received[k]))
        .collect();
    let mut after_call: Vec<i128> = keys
        .iter()
        .zip(&times)
        .map(|(k, &(called, _))| micros(called, received[k]))
        .collect();
    let mut round_trip: Vec<i128> = times.iter().map(|&(c, r)| micros(c, r)).collect();
    let early = after_return.iter().filter(|&&l| l < 0).count();
    eprintln!(
        "{WRITES} writes; delivered after write returned: {}; {early} before it returned\n\
         delivered after write was called: {}\n\
         write round trip: {}",
        percentiles(&mut after_return),
        percentiles(&mut after_call),
        percentiles(&mut round_trip),
    );
    assert!(
        after_return[WRITES * 99 / 100] < 1_000_000,
        "p99 under a second"
    );

    let mut conn = raw().await;
    for chunk in keys.chunks(100) {
        let _: () = redis::cmd("DEL")
            .arg(chunk)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
}

/// A server that speaks just enough RESP for the bus (setup, `SUBSCRIBE`) and never answers
/// `PING`: a server that stopped answering, or a half-open connection. Returns its URL and
/// the number of connections it accepted.
async fn silent_server() -> (String, Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("redis://{}", listener.local_addr().unwrap());
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let (read, mut write) = socket.into_split();
                let mut read = BufReader::new(read);
                let mut line = String::new();
                loop {
                    line.clear();
                    if read.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let n: usize = line.trim_end()[1..].parse().unwrap();
                    let mut args = Vec::new();
                    for _ in 0..n {
                        line.clear();
                        read.read_line(&mut line).await.unwrap();
                        let len: usize = line.trim_end()[1..].parse().unwrap();
                        let mut arg = vec![0; len + 2];
                        read.read_exact(&mut arg).await.unwrap();
                        arg.truncate(len);
                        args.push(String::from_utf8(arg).unwrap());
                    }
                    let reply = match args[0].to_ascii_uppercase().as_str() {
                        "SUBSCRIBE" => args[1..]
                            .iter()
                            .enumerate()
                            .map(|(i, ch)| {
                                format!(
                                    "*3\r\n$9\r\nsubscribe\r\n${}\r\n{ch}\r\n:{}\r\n",
                                    ch.len(),
                                    i + 1
                                )
                            })
                            .collect(),
                        "PING" => String::new(),
                        _ => "+OK\r\n".to_owned(),
                    };
                    if write.write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (url, accepted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswered_heartbeat_is_lost_and_the_connection_is_made_again() {
    use std::sync::atomic::Ordering;
    let (url, accepted) = silent_server().await;
    let b = backend_at(&url, &namespace("silent"), RedisOptions::default());
    let heartbeat = Duration::from_millis(50);
    let rb = watch(&b, heartbeat);
    // Lost at the subscription, then at the missed deadline.
    rb.until("two losses", |events| {
        events.iter().filter(|(_, e)| *e == Event::Lost).count() >= 2
    })
    .await;
    // Given up after GIVE_UP heartbeats: a new connection.
    let started = Instant::now();
    while accepted.load(Ordering::SeqCst) < 2 {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "no reconnection"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(rb.count(|e| matches!(e, Event::Delivered(_))), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_after_the_fill_subscription_subscribes_the_running_connection() {
    let ns = namespace("late-watch");
    let (a, b) = (backend(&ns), backend(&ns));
    assert!(b.bus.ready(Duration::from_secs(1)).await, "fills only");
    let mut conn = raw().await;
    let id = client_id(&mut conn, &b.bus.client_name()).await.unwrap();
    let rb = watch(&b, Duration::from_millis(50));
    rb.delivered_after(Instant::now()).await;
    assert_eq!(
        client_id(&mut conn, &b.bus.client_name()).await,
        Some(id),
        "the same connection"
    );
    let k = format!("{ns}:k");
    a.write(&k, value("v"), TTL).await.unwrap();
    rb.delivered_after(Instant::now()).await;
    assert_eq!(rb.names().0, vec![k.clone()]);
    let _: () = redis::cmd("DEL")
        .arg(&k)
        .query_async(&mut conn)
        .await
        .unwrap();
}

/// `refresh`: the lease goes to one caller, only while the key holds the entry that was read;
/// the fill stores only while the lease stands and the key still holds that entry; a write or
/// an invalidation voids a running refresh; every key the refresh touches has a TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_stores_only_over_the_entry_it_started_from() {
    use crate::envelope;
    let ns = namespace("refresh");
    let (a, b) = (backend(&ns), backend(&ns));
    let key = format!("{ns}:k");
    let lease_key = crate::key::aux_key("__cr:refresh:", &key);
    let ttl = Duration::from_secs(60);
    let lease = Duration::from_secs(5);
    let envelope_of = |v: &str| envelope::encode(&v, Duration::from_millis(3), None).unwrap();
    let old = envelope_of("old");
    let header = envelope::header_of(&old).unwrap();
    a.write(&key, Stored::bytes(old.clone()), ttl)
        .await
        .unwrap();
    let mut conn = raw().await;

    // One lease across processes.
    let won = a.refresh_lease(&key, "t1", &header, lease).await.unwrap();
    assert!(won.is_some());
    assert!(
        b.refresh_lease(&key, "t2", &header, lease)
            .await
            .unwrap()
            .is_none()
    );
    let pttl: i64 = redis::cmd("PTTL")
        .arg(&lease_key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(pttl > 0 && pttl <= 5_000, "the lease's PTTL is {pttl}");
    // Stored over the entry it started from; the lease is given back.
    let new = Stored::bytes(envelope_of("new"));
    assert!(
        a.refresh_fill(&key, new.clone(), ttl, won.as_ref().unwrap(), &header, None)
            .await
            .unwrap()
    );
    assert_eq!(a.read(&key).await.unwrap().unwrap().bytes, new.bytes);
    let exists: i64 = redis::cmd("EXISTS")
        .arg(&lease_key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(exists, 0);
    // The entry changed: no lease for a refresh of the old one.
    assert!(
        b.refresh_lease(&key, "t3", &header, lease)
            .await
            .unwrap()
            .is_none()
    );

    // A write during the refresh voids it.
    let header = envelope::header_of(&new.bytes).unwrap();
    let won = a
        .refresh_lease(&key, "t4", &header, lease)
        .await
        .unwrap()
        .unwrap();
    b.write(&key, Stored::bytes(envelope_of("written")), ttl)
        .await
        .unwrap();
    assert!(
        !a.refresh_fill(
            &key,
            Stored::bytes(envelope_of("late")),
            ttl,
            &won,
            &header,
            None
        )
        .await
        .unwrap()
    );
    let value =
        |stored: Option<Stored>| envelope::decode::<String>(&stored.unwrap().bytes).unwrap();
    assert_eq!(value(a.read(&key).await.unwrap()), "written");

    // An invalidation during the refresh voids it.
    let written = a.read(&key).await.unwrap().unwrap();
    let header = envelope::header_of(&written.bytes).unwrap();
    let won = a
        .refresh_lease(&key, "t5", &header, lease)
        .await
        .unwrap()
        .unwrap();
    b.invalidate(&[&key]).await.unwrap();
    assert!(
        !a.refresh_fill(
            &key,
            Stored::bytes(envelope_of("late")),
            ttl,
            &won,
            &header,
            None
        )
        .await
        .unwrap()
    );
    assert!(a.read(&key).await.unwrap().is_none());
    let exists: i64 = redis::cmd("EXISTS")
        .arg(&lease_key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(exists, 0, "the invalidation deleted the lease");

    // Another fill in between (the entry expired and was loaded again): not stored either.
    let first = envelope_of("first");
    b.write(&key, Stored::bytes(first.clone()), ttl)
        .await
        .unwrap();
    let header = envelope::header_of(&first).unwrap();
    let won = a
        .refresh_lease(&key, "t6", &header, lease)
        .await
        .unwrap()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2)).await;
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg(&envelope_of("refilled")[..])
        .arg("PX")
        .arg(60_000)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        !a.refresh_fill(
            &key,
            Stored::bytes(envelope_of("late")),
            ttl,
            &won,
            &header,
            None
        )
        .await
        .unwrap()
    );
    assert_eq!(value(a.read(&key).await.unwrap()), "refilled");
    let _: () = redis::cmd("DEL")
        .arg(&key)
        .arg(&lease_key)
        .query_async(&mut conn)
        .await
        .unwrap();
}
