//! Classic `PUBLISH` vs sharded `SPUBLISH` on a Redis Cluster (docs/design-cluster.md §4.1):
//! write latency (a script that `SET`s a key and publishes, as the cache's `WRITE` does) at a
//! few open-loop rates, the nodes' CPU, and the memory of subscribing to 16384 shard channels.
//!
//! ```text
//! scripts/redis-cluster run cargo run --release -p cache-benches --bin cluster-pubsub
//! ```
//!
//! Needs `REDIS_CLUSTER_URLS`. Classic: one subscriber on one node (the bus). Sharded: one
//! subscriber per master, subscribed to every shard channel of that master's slots (what a
//! process would need to receive every invalidation).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::{Script, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in bytes {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// A hash tag for every slot: `tags[slot]` hashes to `slot`.
fn slot_tags() -> Vec<String> {
    let mut tags = vec![String::new(); 16384];
    let mut left = 16384;
    let mut n = 0u64;
    while left > 0 {
        let tag = format!("{n:x}");
        let slot = usize::from(crc16(tag.as_bytes()) % 16384);
        if tags[slot].is_empty() {
            tags[slot] = tag;
            left -= 1;
        }
        n += 1;
    }
    tags
}

/// The masters (port) and their slot ranges, from `CLUSTER SLOTS`.
async fn masters(port: u16) -> BTreeMap<u16, Vec<(u16, u16)>> {
    let mut conn = plain(port).await;
    let table: Value = redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut out: BTreeMap<u16, Vec<(u16, u16)>> = BTreeMap::new();
    let Value::Array(ranges) = table else {
        panic!("CLUSTER SLOTS")
    };
    for r in ranges {
        let Value::Array(r) = r else { continue };
        let (Value::Int(a), Value::Int(b), Value::Array(m)) = (&r[0], &r[1], &r[2]) else {
            continue;
        };
        let Value::Int(p) = m[1] else { continue };
        out.entry(p as u16)
            .or_default()
            .push((*a as u16, *b as u16));
    }
    out
}

async fn plain(port: u16) -> redis::aio::MultiplexedConnection {
    redis::Client::open(format!("redis://127.0.0.1:{port}"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

async fn info_field(port: u16, section: &str, field: &str) -> f64 {
    let mut conn = plain(port).await;
    let text: String = redis::cmd("INFO")
        .arg(section)
        .query_async(&mut conn)
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

async fn cpu(ports: &[u16]) -> f64 {
    let mut total = 0.0;
    for &p in ports {
        total += info_field(p, "cpu", "used_cpu_sys").await
            + info_field(p, "cpu", "used_cpu_user").await;
    }
    total
}

/// A raw RESP2 subscriber: sends `commands`, then reads and discards forever. Returns the
/// socket's reader task.
async fn subscriber(port: u16, commands: Vec<Vec<u8>>) -> tokio::task::JoinHandle<()> {
    let stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (mut r, mut w) = stream.into_split();
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 1 << 16];
        while let Ok(n) = r.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    });
    for chunk in commands.chunks(512) {
        w.write_all(&chunk.concat()).await.unwrap();
    }
    // Keep the writer alive with the reader.
    tokio::spawn(async move {
        let _w = w;
        std::future::pending::<()>().await;
    });
    reader
}

fn pack(args: &[&str]) -> Vec<u8> {
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.get_packed_command()
}

/// Open-loop writes at `rate`/s for `secs`: latencies (µs) from each write's scheduled start.
async fn run(
    conn: &redis::cluster_async::ClusterConnection,
    script: &Script,
    tags: &Arc<Vec<String>>,
    sharded: bool,
    rate: u64,
    secs: u64,
) -> Vec<u64> {
    let lat = Arc::new(Mutex::new(Vec::with_capacity((rate * secs) as usize)));
    let start = Instant::now();
    let total = rate * secs;
    let mut tasks = Vec::new();
    for i in 0..total {
        let at = start + Duration::from_nanos(i * 1_000_000_000 / rate);
        tokio::time::sleep_until(at.into()).await;
        let (mut conn, script, tags, lat) =
            (conn.clone(), script.clone(), tags.clone(), lat.clone());
        tasks.push(tokio::spawn(async move {
            let tag = &tags[(i * 7919 % 16384) as usize];
            let key = format!("bench:{{{tag}}}:{i}");
            let channel = if sharded {
                format!("__cr:inv:bench:{{{tag}}}")
            } else {
                "__cr:inv:bench".to_owned()
            };
            let cmd = if sharded { "SPUBLISH" } else { "PUBLISH" };
            let _: i64 = script
                .key(&key)
                .arg("kbench-frame-of-about-fifty-bytes-like-an-invalidation")
                .arg(cmd)
                .arg(&channel)
                .invoke_async(&mut conn)
                .await
                .unwrap();
            lat.lock().unwrap().push(at.elapsed().as_micros() as u64);
        }));
        if tasks.len() > 4096 {
            for t in tasks.drain(..2048) {
                t.await.unwrap();
            }
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut v = Arc::try_unwrap(lat).unwrap().into_inner().unwrap();
    v.sort_unstable();
    v
}

fn pct(v: &[u64], p: f64) -> f64 {
    v[((v.len() as f64 - 1.0) * p) as usize] as f64 / 1000.0
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let urls: Vec<String> = std::env::var("REDIS_CLUSTER_URLS")
        .expect("REDIS_CLUSTER_URLS")
        .split(',')
        .map(str::to_owned)
        .collect();
    let ports: Vec<u16> = urls
        .iter()
        .map(|u| u.rsplit(':').next().unwrap().parse().unwrap())
        .collect();
    let tags = Arc::new(slot_tags());
    let masters = masters(ports[0]).await;
    let conn = redis::cluster::ClusterClient::new(urls.clone())
        .unwrap()
        .get_async_connection()
        .await
        .unwrap();
    let script = Script::new(
        "redis.call('SET', KEYS[1], ARGV[1], 'PX', 10000) \
         return redis.call(ARGV[2], ARGV[3], ARGV[1])",
    );

    // Subscribers: the classic bus (one node), and one process's shard subscriptions.
    let _classic = subscriber(ports[0], vec![pack(&["SUBSCRIBE", "__cr:inv:bench"])]).await;
    let mem_before: f64 = {
        let mut m = 0.0;
        for p in masters.keys() {
            m += info_field(*p, "memory", "used_memory").await;
        }
        m
    };
    let sub_start = Instant::now();
    let mut sharded_subs = Vec::new();
    for (port, ranges) in &masters {
        let mut cmds = Vec::new();
        for &(a, b) in ranges {
            for slot in a..=b {
                let ch = format!("__cr:inv:bench:{{{}}}", tags[usize::from(slot)]);
                cmds.push(pack(&["SSUBSCRIBE", &ch]));
            }
        }
        sharded_subs.push(subscriber(*port, cmds).await);
    }
    // Wait until every master counts its shard channels.
    for port in masters.keys() {
        let mut conn = plain(*port).await;
        let want: usize = masters[port]
            .iter()
            .map(|&(a, b)| usize::from(b - a) + 1)
            .sum();
        loop {
            let chans: Vec<String> = redis::cmd("PUBSUB")
                .arg("SHARDCHANNELS")
                .arg("__cr:inv:bench:*")
                .query_async(&mut conn)
                .await
                .unwrap();
            if chans.len() >= want {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let sub_time = sub_start.elapsed();
    let mem_after: f64 = {
        let mut m = 0.0;
        for p in masters.keys() {
            m += info_field(*p, "memory", "used_memory").await;
        }
        m
    };
    println!(
        "16384 shard channels, one subscriber per master (one process): subscribed in {:?}, \
         masters' used_memory +{:.1} MiB ({:.0} bytes per subscription)",
        sub_time,
        (mem_after - mem_before) / 1048576.0,
        (mem_after - mem_before) / 16384.0
    );

    // Warm up (script loads, connections).
    run(&conn, &script, &tags, false, 500, 1).await;
    run(&conn, &script, &tags, true, 500, 1).await;
    println!("rate/s   mode      p50 ms  p99 ms  max ms  nodes' CPU s");
    for rate in [1000u64, 5000, 10000] {
        for sharded in [false, true] {
            let c0 = cpu(&ports).await;
            let v = run(&conn, &script, &tags, sharded, rate, 3).await;
            let c1 = cpu(&ports).await;
            println!(
                "{rate:>6}   {:<8} {:>7.2} {:>7.2} {:>7.2} {:>8.2}",
                if sharded { "SPUBLISH" } else { "PUBLISH" },
                pct(&v, 0.5),
                pct(&v, 0.99),
                pct(&v, 1.0),
                c1 - c0
            );
        }
    }
}
