//! The pub/sub side of one Redis cache: one pub/sub connection per `Cache` (named
//! `cr-bus:<origin>` with `CLIENT SETNAME` over TCP and Unix sockets; over TLS unnamed, see
//! `connect`), subscribed lazily, which carries
//!
//! * **fill notifications** (`__cr:fills`), fanned out in-process to the callers waiting for a
//!   key's fill. A fill (or a released lease, a write) publishes the key, but only when someone
//!   waits for it (the lease script sets a "waiters" flag). Pub/sub delivery is at most once (a
//!   dropped subscription loses messages), so waiters also re-check on a bounded, jittered
//!   timer; and when the subscription comes back after a drop, every waiter is woken to
//!   re-check at once;
//! * **invalidations** (`__cr:inv:<namespace>`, see `inv`), once [`Bus::watch`] registered a
//!   sink: other processes' writes, invalidations and tag invalidations, decoded and passed to
//!   the sink's `keys` / `tags`. This process's own frames are passed on too: its store
//!   already removed its copies, before and after the write, but a write whose call timed out
//!   may still be applied in Redis later, and only its message then removes a copy read in
//!   between (an extra removal costs at most a miss). A frame that cannot be decoded is logged
//!   and reported as `lost`.
//!
//! **Health.** While a sink is registered, the task sends `PING` on the subscribed connection
//! every `heartbeat` and expects the answer within `heartbeat`. When the answer comes, it first
//! passes on every message already received, then calls `delivered(sent)`, `sent` being the
//! instant taken just before the `PING` was sent. `lost` is called when the answer is late
//! (and the connection is dropped and made again after [`GIVE_UP`] heartbeats without one),
//! when the subscription drops or fails, when the subscriber task ends (its runtime shut down),
//! after every (re)subscription (whatever was published in between is gone), for an
//! undecodable frame, and when the command connection's breaker opens. `delivered(sent)` is
//! only called for a `PING` sent after the last `lost`, and not while the breaker is open: after
//! a `lost`, the next answered heartbeat makes the stream trusted again. `lost` and `delivered`
//! are called under one lock, so the sink sees them in the order they were decided.
//!
//! **Why "drain, then delivered" is right** (verified in redis-rs 1.8.1,
//! `src/aio/pubsub.rs`). Redis answers a connection's commands in order and writes a message
//! to a subscriber's output buffer when the `PUBLISH` runs; so every message published before
//! the server handled our `PING` precedes the `PONG` on the socket (RESP2 subscribed mode
//! answers `["pong", ""]`, a push-shaped array). In redis-rs, one driver task
//! (`PipelineSink::poll_read` → `handle_message`) decodes the socket's values in order: a
//! message goes to the stream's unbounded channel (`sender.send(msg)`, synchronously, before
//! the next value is decoded), and the `pong` array is recognised as a confirmation
//! (`is_confirmation`, the `b"pong"` test) that completes the oldest in-flight request's
//! oneshot (`handle_confirmation`). So by the time `PubSubSink::ping` resolves on our task,
//! every earlier message has been pushed to the channel (the oneshot's completion
//! happens-after those sends). They may not have been *received* from the channel yet (the
//! driver runs on another thread, and our loop may see the answer before the messages queued
//! ahead of it). Hence the drain after the `PONG`: the stream is polled without blocking (and
//! outside Tokio's cooperative budget, which could otherwise make a ready channel look empty)
//! until it is empty, and only then is `delivered` called. Because of the drain, the loop can
//! look at the answer and the timer *before* the stream: a flood of messages cannot starve
//! the heartbeat. (RESP3 answers `PONG` as a plain reply, which completes the request the same
//! way, in order.)
//!
//! **On a Redis Cluster** the subscription is classic pub/sub on one node (a seed, or another
//! node the slot table named: `Config::clients` are tried in turn, then the nodes the last
//! heartbeat learnt), which receives every node's `PUBLISH`es over the cluster bus. A `PONG`
//! from that node says nothing about messages still travelling from the other masters, so the
//! heartbeat is an echo instead (see `echo`): a heartbeat frame published on every master, on
//! this backend's own channel, and `delivered(sent)` once all of them came back through the
//! subscription. A publish that fails (a master down) is a missed heartbeat (`lost`), and so
//! is a change of the master set; echoes that do not all come back within `heartbeat` are a
//! late heartbeat, as above.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use futures_util::{FutureExt, StreamExt};
use redis::Msg;
use redis::aio::{PubSub, PubSubSink, PubSubStream};
use tokio::sync::Notify;

use super::conn::Target;
use super::echo::{self, Echo};
use super::inv;
use crate::backend::Invalidations;
use crate::breaker::{Breaker, FailureKind, FailureLog};

/// After this many heartbeats without an answer to a `PING`, the connection is given up on
/// (dropped and made again): a half-open connection, a server that stopped answering.
const GIVE_UP: u32 = 4;

/// What the bus needs to know, fixed when the backend is built.
pub(super) struct Config {
    /// The servers to subscribe on, tried in turn: the one Redis, or a cluster's seed nodes
    /// (classic pub/sub on a cluster delivers every node's messages to a subscriber on any
    /// node). Behind Sentinel, the master is resolved on every connection attempt instead.
    pub(super) clients: Vec<redis::Client>,
    /// Whether they are a cluster's nodes: a `PING`'s answer then does not show that every
    /// message published before it was delivered (another node's messages come over the
    /// cluster bus), so the heartbeat is an echo through every master instead (see `echo`),
    /// and the subscription may also move to the nodes the cluster names, not only to the
    /// seeds.
    pub(super) cluster: bool,
    /// The server, or (Sentinel) the master, resolved on every connection attempt.
    pub(super) target: Target,
    /// The fill notifications' channel.
    pub(super) fills: &'static str,
    /// This cache's invalidation channel.
    pub(super) invalidations: String,
    /// This backend's origin: the pub/sub connection's name (`cr-bus:<origin>`).
    pub(super) origin: inv::Origin,
    pub(super) connect_timeout: Duration,
    pub(super) log: Arc<FailureLog>,
    /// The command connection's breaker: while it is open, no heartbeat counts.
    pub(super) breaker: Arc<Breaker>,
}

impl Config {
    /// The pub/sub connection's client name.
    fn client_name(&self) -> String {
        let mut name = String::from("cr-bus:");
        for b in self.origin {
            name.push_str(&format!("{b:02x}"));
        }
        name
    }
}

/// A registered sink and its heartbeat.
struct Watch {
    sink: Arc<dyn Invalidations>,
    heartbeat: Duration,
}

struct Shared {
    /// Per key: the notification, and how many registrations hold it.
    waiters: Mutex<HashMap<String, (Arc<Notify>, usize)>>,
    subscribed: AtomicBool,
    /// Woken whenever `subscribed` becomes true.
    ready: Notify,
    /// The number of the running subscriber task (0: none runs).
    alive: AtomicU64,
    /// The sink, once [`Bus::watch`] was called.
    watch: OnceLock<Watch>,
    /// Woken when `watch` is set, so that a running task subscribes to the invalidations.
    watch_added: Notify,
    /// How many times `lost` was called; held while calling `lost` or `delivered`.
    losses: Mutex<u64>,
}

impl Shared {
    fn wake(&self, key: &str) {
        let notify = self
            .waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .map(|(n, _)| n.clone());
        if let Some(n) = notify {
            n.notify_waiters();
        }
    }

    fn wake_all(&self) {
        let all: Vec<Arc<Notify>> = self
            .waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|(n, _)| n.clone())
            .collect();
        for n in all {
            n.notify_waiters();
        }
    }

    /// Tells the sink (if any) that messages may have been missed.
    fn lose(&self) {
        if let Some(watch) = self.watch.get() {
            let mut losses = self.losses.lock().unwrap_or_else(|e| e.into_inner());
            *losses += 1;
            watch.sink.lost();
        }
    }

    /// The number of `lost` calls so far.
    fn losses(&self) -> u64 {
        *self.losses.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Tells the sink that everything published before `sent` was delivered, unless `lost`
    /// was called since the `PING` was sent (`losses` then) or the breaker is open.
    fn deliver(&self, losses: u64, sent: Instant, breaker: &Breaker) {
        if let Some(watch) = self.watch.get() {
            let current = self.losses.lock().unwrap_or_else(|e| e.into_inner());
            if *current == losses && !breaker.is_open() {
                watch.sink.delivered(sent);
            }
        }
    }

    /// An invalidation message: decoded and passed to the sink.
    fn invalidated(&self, config: &Config, payload: &[u8]) {
        let Some(watch) = self.watch.get() else {
            return;
        };
        match inv::decode(payload) {
            Ok(frame) if frame.is_everything() => self.lose(),
            Ok(frame) => {
                tracing::trace!(
                    target: "cache_runtime",
                    "invalidation from {:02x?}: {:?}",
                    frame.origin,
                    frame.kind
                );
                match frame.kind {
                    inv::Kind::Keys => watch.sink.keys(&mut frame.names()),
                    inv::Kind::Tags => watch.sink.tags(&mut frame.names()),
                    // Another backend's echo where it does not belong: it changes nothing.
                    inv::Kind::Heartbeat => {}
                }
            }
            Err(e) => {
                config.log.warn(
                    FailureKind::Decode,
                    &format_args!(
                        "undecodable message on {} ({e}, {} bytes); the in-process tier is cleared",
                        config.invalidations,
                        payload.len()
                    ),
                );
                self.lose();
            }
        }
    }
}

pub(crate) struct Bus {
    config: Arc<Config>,
    shared: Arc<Shared>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Drop for Bus {
    fn drop(&mut self) {
        if let Some(task) = self.task.lock().unwrap_or_else(|e| e.into_inner()).take() {
            task.abort();
        }
    }
}

/// A caller's interest in one key's fill. Dropping it unregisters (when it is the last).
pub(crate) struct Registration<'a> {
    bus: &'a Bus,
    key: String,
    notify: Arc<Notify>,
}

impl Registration<'_> {
    /// The notification to await; enable it before re-checking, so that a wake-up between the
    /// check and the await is not lost.
    pub(crate) fn notify(&self) -> &Notify {
        &self.notify
    }
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        let mut map = self
            .bus
            .shared
            .waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some((_, count)) = map.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                map.remove(&self.key);
            }
        }
    }
}

impl Bus {
    pub(super) fn new(config: Config) -> Bus {
        Bus {
            config: Arc::new(config),
            shared: Arc::new(Shared {
                waiters: Mutex::new(HashMap::new()),
                subscribed: AtomicBool::new(false),
                ready: Notify::new(),
                alive: AtomicU64::new(0),
                watch: OnceLock::new(),
                watch_added: Notify::new(),
                losses: Mutex::new(0),
            }),
            task: Mutex::new(None),
        }
    }

    /// Registers interest in `key`'s fill.
    pub(crate) fn register(&self, key: &str) -> Registration<'_> {
        let mut map = self
            .shared
            .waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let entry = map
            .entry(key.to_owned())
            .or_insert_with(|| (Arc::new(Notify::new()), 0));
        entry.1 += 1;
        let notify = entry.0.clone();
        drop(map);
        Registration {
            bus: self,
            key: key.to_owned(),
            notify,
        }
    }

    /// Starts the subscriber if needed and waits (at most `timeout`) until it is subscribed.
    /// Returns whether it is: if not, waiters rely on their re-checks.
    pub(crate) async fn ready(&self, timeout: Duration) -> bool {
        if self.shared.subscribed.load(Ordering::Acquire) && self.running() {
            return true;
        }
        self.start();
        let ready = self.shared.ready.notified();
        tokio::pin!(ready);
        ready.as_mut().enable();
        if self.shared.subscribed.load(Ordering::Acquire) {
            return true;
        }
        let _ = tokio::time::timeout(timeout, ready).await;
        self.shared.subscribed.load(Ordering::Acquire)
    }

    /// Whether the subscription is up.
    pub(crate) fn is_subscribed(&self) -> bool {
        self.shared.subscribed.load(Ordering::Acquire) && self.running()
    }

    /// Registers `sink` (the first call's is kept) for this cache's invalidations, with a
    /// heartbeat every `heartbeat`, and makes sure the subscriber runs. Repeated calls cost
    /// two atomic loads while the subscriber runs.
    pub(super) fn watch(&self, sink: &Arc<dyn Invalidations>, heartbeat: Duration) {
        if self.shared.watch.get().is_some() && self.shared.alive.load(Ordering::Acquire) != 0 {
            return;
        }
        self.watch_slow(sink, heartbeat);
    }

    #[cold]
    fn watch_slow(&self, sink: &Arc<dyn Invalidations>, heartbeat: Duration) {
        let watch = Watch {
            sink: sink.clone(),
            heartbeat: heartbeat.max(Duration::from_millis(1)),
        };
        if self.shared.watch.set(watch).is_ok() {
            self.shared.watch_added.notify_waiters();
        }
        self.start();
    }

    /// What the breaker calls when it opens: the sink is told that messages may be lost.
    pub(super) fn on_lost(&self) -> impl Fn() + Send + Sync + 'static {
        let shared = self.shared.clone();
        move || shared.lose()
    }

    /// The pub/sub connection's client name (`CLIENT LIST` shows it).
    #[cfg(test)]
    pub(super) fn client_name(&self) -> String {
        self.config.client_name()
    }

    /// Whether the subscriber task is alive (it dies with the runtime that spawned it).
    fn running(&self) -> bool {
        self.task
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|t| !t.is_finished())
    }

    pub(super) fn start(&self) {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let mut task = self.task.lock().unwrap_or_else(|e| e.into_inner());
        if task.as_ref().is_some_and(|t| !t.is_finished()) {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let number = NEXT.fetch_add(1, Ordering::Relaxed);
        self.shared.alive.store(number, Ordering::Release);
        let (config, shared) = (self.config.clone(), self.shared.clone());
        *task = Some(handle.spawn(subscribe_forever(config, shared, number)));
    }
}

/// Marks the end of a subscriber task, however it ends (its runtime shut down, say): clears
/// `subscribed` and `alive`, so that the next waiter or `watch` starts a new one, and tells
/// the sink.
struct Ended {
    shared: Arc<Shared>,
    number: u64,
}

impl Drop for Ended {
    fn drop(&mut self) {
        self.shared.subscribed.store(false, Ordering::Release);
        let _ =
            self.shared
                .alive
                .compare_exchange(self.number, 0, Ordering::AcqRel, Ordering::Acquire);
        self.shared.lose();
    }
}

async fn subscribe_forever(config: Arc<Config>, shared: Arc<Shared>, number: u64) {
    let _ended = Ended {
        shared: shared.clone(),
        number,
    };
    let mut backoff = Duration::from_millis(50);
    // Which server to try next: the next one after each failure.
    let mut turn = 0usize;
    // On a cluster: the echo heartbeat's state, and the nodes it learnt.
    let mut echo = config.cluster.then(|| {
        Echo::new(
            config.clients[0].get_connection_info().clone(),
            config.origin,
            config.connect_timeout,
            config.connect_timeout,
        )
    });
    loop {
        let watching = shared.watch.get().is_some();
        // (Behind Sentinel there are none: `connect` asks the sentinels.)
        let client = candidate(&config, echo.as_ref(), turn);
        let connected = tokio::time::timeout(config.connect_timeout, async {
            let (pubsub, master, client) = connect(&config, client.as_ref()).await?;
            let (mut sink, stream) = pubsub.split();
            let mut channels = vec![config.fills];
            if watching {
                channels.push(config.invalidations.as_str());
                channels.extend(echo.as_ref().map(Echo::channel));
            }
            sink.subscribe(&channels).await?;
            Ok::<_, redis::RedisError>((sink, stream, master, client))
        })
        .await;
        match connected {
            Ok(Ok((sink, stream, master, client))) => {
                backoff = Duration::from_millis(50);
                shared.subscribed.store(true, Ordering::Release);
                shared.ready.notify_waiters();
                // Fills published while we were not subscribed are lost: re-check now.
                shared.wake_all();
                // So are invalidations: nothing from before may be trusted.
                shared.lose();
                let why = serve(
                    &config,
                    &shared,
                    (sink, stream),
                    watching,
                    echo.as_mut(),
                    client.get_connection_info(),
                    master,
                )
                .await;
                shared.subscribed.store(false, Ordering::Release);
                shared.lose();
                config.log.warn(
                    FailureKind::Unavailable,
                    &format_args!(
                        "the redis subscription dropped ({why}); fill waiters re-check and the in-process tier is off until it is back"
                    ),
                );
            }
            Ok(Err(e)) => config.log.warn(
                FailureKind::Unavailable,
                &format_args!(
                    "cannot subscribe to redis notifications ({}); fill waiters re-check instead",
                    super::tls::describe(&e, config.clients.first())
                ),
            ),
            Err(_) => config.log.warn(
                FailureKind::Timeout,
                &format_args!(
                    "subscribing to redis notifications timed out; fill waiters re-check instead"
                ),
            ),
        }
        turn = turn.wrapping_add(1);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// The server to subscribe on at attempt `turn`: the seeds in turn, then (on a cluster) the
/// other nodes the last slot table named, so that the subscription finds a live node even
/// when every seed is down.
fn candidate(config: &Config, echo: Option<&Echo>, turn: usize) -> Option<redis::Client> {
    let mut all = config.clients.clone();
    if let Some(echo) = echo {
        for info in echo.nodes() {
            let known = all
                .iter()
                .any(|c| c.get_connection_info().addr() == info.addr());
            if !known {
                if let Ok(client) = redis::Client::open(info) {
                    all.push(client);
                }
            }
        }
    }
    if all.is_empty() {
        return None;
    }
    Some(all.swap_remove(turn % all.len()))
}

/// A connection to the server, named `config.client_name()` when it is a TCP or Unix socket
/// (redis-rs has no way to send `CLIENT SETNAME` on a pub/sub connection, and the server
/// refuses it once subscribed in RESP2: it is sent on the socket first, then redis-rs does its
/// usual setup on it). TLS addresses (`rediss://`) go through redis-rs, **unnamed**: naming
/// them the same way would mean doing the TLS handshake here, a second copy of redis-rs's
/// rustls setup (roots, client certificate) to keep in step with it. The client carries the
/// builder's certificates (`tls`), so this connection is configured as the command
/// connections are; redis-rs sends `AUTH` and `SELECT` on it like on any connection.
/// Behind Sentinel, the sentinels are asked for the master first (`client` is not used); its
/// epoch is returned (0 otherwise).
async fn connect(
    config: &Config,
    client: Option<&redis::Client>,
) -> redis::RedisResult<(PubSub, u64, redis::Client)> {
    let (client, master) = match (client, &config.target) {
        (Some(client), Target::Single(_) | Target::Cluster(_)) => (client.clone(), 0),
        _ => config.target.resolve().await?,
    };
    let info = client.get_connection_info();
    let settings = info.redis_settings();
    let pubsub = match info.addr() {
        redis::ConnectionAddr::Tcp(host, port) => {
            let mut socket = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
            socket.set_nodelay(true)?;
            name_connection(&mut socket, settings, &config.client_name()).await?;
            PubSub::new(settings, socket).await
        }
        #[cfg(unix)]
        redis::ConnectionAddr::Unix(path) => {
            let mut socket = tokio::net::UnixStream::connect(path).await?;
            name_connection(&mut socket, settings, &config.client_name()).await?;
            PubSub::new(settings, socket).await
        }
        _ => client.get_async_pubsub().await,
    }?;
    Ok((pubsub, master, client))
}

/// Sends `AUTH` (if the URL has a password) and `CLIENT SETNAME name` on a new connection and
/// reads their one-line replies. Errors in the replies are ignored: redis-rs authenticates
/// again on this connection and reports a failure itself; an unnamed connection works too.
async fn name_connection<S>(
    socket: &mut S,
    settings: &redis::RedisConnectionInfo,
    name: &str,
) -> std::io::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut pipe = redis::pipe();
    if let Some(password) = settings.password() {
        let auth = pipe.cmd("AUTH");
        if let Some(user) = settings.username() {
            auth.arg(user);
        }
        auth.arg(password);
    }
    pipe.cmd("CLIENT").arg("SETNAME").arg(name);
    socket.write_all(&pipe.get_packed_pipeline()).await?;
    // Each reply is one line (`+OK`, or `-ERR ...`), and nothing else comes before the next
    // command: reading up to the last line's end leaves the socket at a command boundary.
    let mut lines = pipe.len();
    let (mut buf, mut last) = ([0u8; 256], 0u8);
    while lines > 0 {
        let n = socket.read(&mut buf).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        for &b in &buf[..n] {
            if last == b'\r' && b == b'\n' {
                lines -= 1;
            }
            last = b;
        }
    }
    Ok(())
}

/// The heartbeat in flight.
struct Ping {
    answer: Pin<Box<dyn Future<Output = Answer> + Send>>,
    /// Whether `answer` completed (it is not polled again).
    answered: bool,
    /// Taken just before it was sent.
    sent: Instant,
    /// `Shared::losses` when it was sent.
    losses: u64,
    /// Whether its deadline passed (`lost` was called).
    late: bool,
    /// On a cluster: the echoes that came back.
    round: Option<echo::Round>,
}

/// How a heartbeat was answered.
enum Answer {
    /// A single server's `PONG`.
    Pong(redis::RedisResult<redis::Value>),
    /// A cluster's echo was published (on these masters), or not.
    Sent(echo::Sent),
}

/// What woke the serving loop.
enum Event {
    Message(Option<Msg>),
    Answer(Answer),
    Watched,
    Timer,
}

/// Serves one subscription (on the server `subscribed`) until it fails (or, behind Sentinel,
/// the master it is connected to, of epoch `master`, is not the master any more); returns why
/// it ended. `echo` is the cluster's heartbeat (a single server's is a `PING`).
async fn serve(
    config: &Config,
    shared: &Shared,
    (sink, mut stream): (PubSubSink, PubSubStream),
    mut watching: bool,
    mut echo: Option<&mut Echo>,
    subscribed: &redis::ConnectionInfo,
    master: u64,
) -> &'static str {
    let moved = config.target.moved_from(master);
    tokio::pin!(moved);
    let mut ping: Option<Ping> = None;
    // Heartbeats in a row that could not get the subscribed node's slot table (a cluster).
    let mut unanswered_tables = 0u32;
    // The first heartbeat goes at once: the stream is trusted after its answer.
    let mut next_ping = Instant::now();
    let timer = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(timer);
    loop {
        let watched = shared.watch_added.notified();
        tokio::pin!(watched);
        watched.as_mut().enable();
        if !watching && shared.watch.get().is_some() {
            let mut sink = sink.clone();
            let mut channels = vec![config.invalidations.as_str()];
            channels.extend(echo.as_deref().map(Echo::channel));
            let subscribed =
                tokio::time::timeout(config.connect_timeout, sink.subscribe(&channels)).await;
            if !matches!(subscribed, Ok(Ok(()))) {
                return "subscribing to the invalidation channel failed";
            }
            watching = true;
            shared.lose();
            next_ping = Instant::now();
        }
        let heartbeat = shared.watch.get().map(|w| w.heartbeat);
        match (&ping, heartbeat) {
            (None, Some(_)) if watching => timer.as_mut().reset(next_ping.into()),
            (Some(p), Some(h)) if !p.late => timer.as_mut().reset((p.sent + h).into()),
            (Some(p), Some(h)) => timer.as_mut().reset((p.sent + h * GIVE_UP).into()),
            _ => timer
                .as_mut()
                .reset((Instant::now() + Duration::from_secs(3600)).into()),
        }
        // The answer first (it drains the stream), the timer next, so that neither is starved.
        let event = tokio::select! {
            biased;
            answer = async { ping.as_mut().expect("guarded").answer.as_mut().await },
                if ping.as_ref().is_some_and(|p| !p.answered) => Event::Answer(answer),
            () = &mut timer => Event::Timer,
            msg = stream.next() => Event::Message(msg),
            () = &mut watched, if !watching => Event::Watched,
            () = &mut moved => return "the sentinels named another master",
        };
        let h = heartbeat.unwrap_or_default();
        match event {
            Event::Message(Some(msg)) => match echo.as_deref() {
                Some(e) if msg.get_channel_name() == e.channel() => {
                    if let Some(p) = ping.as_mut() {
                        if let Some(round) = p.round.as_mut() {
                            if let Some((seq, master)) = own_echo(config, &msg) {
                                round.echo(seq, master);
                            }
                        }
                    }
                    if let Some(next) = echoed(shared, config, &mut ping, h) {
                        next_ping = next;
                    }
                }
                _ => dispatch(config, shared, &msg),
            },
            Event::Message(None) => return "the connection closed",
            Event::Answer(Answer::Sent(Ok(masters))) => {
                unanswered_tables = 0;
                let p = ping.as_mut().expect("answered");
                p.answered = true;
                if echo
                    .as_deref_mut()
                    .is_some_and(|e| e.masters_changed(&masters))
                {
                    // A failover or a reshard: what a master that left published may be lost.
                    shared.lose();
                    tracing::info!(
                        target: "cache_runtime",
                        "the redis cluster's masters changed; the in-process tier is cleared"
                    );
                }
                if let Some(round) = p.round.as_mut() {
                    round.published(masters.len());
                }
                if let Some(next) = echoed(shared, config, &mut ping, h) {
                    next_ping = next;
                }
            }
            Event::Answer(Answer::Sent(Err(failure))) => {
                // A missed heartbeat: a master could not be reached, or the slot table.
                let p = ping.take().expect("answered");
                shared.lose();
                config.log.warn(
                    FailureKind::Unavailable,
                    &format_args!(
                        "a heartbeat could not be published on the redis cluster ({failure}); the in-process tier is off until one comes back"
                    ),
                );
                if matches!(failure, echo::Failure::Subscribed(_)) {
                    unanswered_tables += 1;
                    if unanswered_tables >= GIVE_UP {
                        return "the subscribed node did not give its slot table";
                    }
                }
                next_ping = (p.sent + h).max(Instant::now());
            }
            Event::Answer(Answer::Pong(Err(_))) => return "a heartbeat failed",
            Event::Answer(Answer::Pong(Ok(_))) => {
                let p = ping.take().expect("answered");
                // Everything published before the PING is in the channel by now: pass it on
                // before saying so (see the module docs).
                loop {
                    match tokio::task::unconstrained(stream.next()).now_or_never() {
                        Some(Some(msg)) => dispatch(config, shared, &msg),
                        Some(None) => return "the connection closed",
                        None => break,
                    }
                }
                shared.deliver(p.losses, p.sent, &config.breaker);
                next_ping = (p.sent + h).max(Instant::now());
            }
            Event::Watched => {}
            Event::Timer => match &mut ping {
                None => {
                    if watching {
                        let losses = shared.losses();
                        let sent = Instant::now();
                        let (answer, round): (Pin<Box<dyn Future<Output = Answer> + Send>>, _) =
                            match echo.as_deref_mut() {
                                Some(echo) => {
                                    let (round, publish) = echo.send(subscribed);
                                    (Box::pin(publish.map(Answer::Sent)), Some(round))
                                }
                                None => {
                                    let mut sink = sink.clone();
                                    let pong = async move {
                                        Answer::Pong(sink.ping::<redis::Value>().await)
                                    };
                                    (Box::pin(pong), None)
                                }
                            };
                        ping = Some(Ping {
                            answer,
                            answered: false,
                            sent,
                            losses,
                            late: false,
                            round,
                        });
                    }
                }
                Some(p) if !p.late => {
                    p.late = true;
                    shared.lose();
                    config.log.warn(
                        FailureKind::Timeout,
                        &format_args!(
                            "a heartbeat on the redis subscription was not answered within {:?}; the in-process tier is off until one is",
                            heartbeat.unwrap_or_default()
                        ),
                    );
                }
                Some(_) => return "heartbeats went unanswered",
            },
        }
    }
}

/// The sequence number and master index of `msg` when it is one of this backend's echoes.
fn own_echo(config: &Config, msg: &Msg) -> Option<(u64, u16)> {
    let frame = inv::decode(msg.get_payload_bytes()).ok()?;
    if frame.origin != config.origin {
        return None;
    }
    frame.heartbeat()
}

/// On a cluster: when every master's echo of the heartbeat in flight came back, everything
/// published before it was sent has been received (see `echo`): tells the sink, and returns
/// when the next heartbeat is due.
fn echoed(
    shared: &Shared,
    config: &Config,
    ping: &mut Option<Ping>,
    heartbeat: Duration,
) -> Option<Instant> {
    let done = ping
        .as_ref()
        .is_some_and(|p| p.answered && p.round.as_ref().is_some_and(echo::Round::complete));
    if !done {
        return None;
    }
    let p = ping.take()?;
    shared.deliver(p.losses, p.sent, &config.breaker);
    Some((p.sent + heartbeat).max(Instant::now()))
}

/// One message: a fill wakes its waiters, an invalidation goes to the sink.
fn dispatch(config: &Config, shared: &Shared, msg: &Msg) {
    let channel = msg.get_channel_name();
    if channel == config.fills {
        if let Ok(key) = std::str::from_utf8(msg.get_payload_bytes()) {
            shared.wake(key);
        }
    } else if channel == config.invalidations {
        shared.invalidated(config, msg.get_payload_bytes());
    }
}
