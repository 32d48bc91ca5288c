//! `#[write_behind]` end to end, through the expansion: on Redis a call queues (its body does
//! not run), a `#[cached]` read of the key returns the new value at once, and a `Worker` runs
//! the body later with `current_id()` set; on memory the body runs inline.
//!
//! The functions name their caches (`cache = ..`): a `#[write_behind]` function's arguments
//! are queued, so the cache cannot be one of them. Each cache has a namespace of its own.

use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use cache_runtime::write_behind::{Worker, current_id};
use cache_runtime::{Cache, cached, write_behind};
use serde::{Deserialize, Serialize};

use cache_tests::{redis_url, unique_namespace};

static REDIS: LazyLock<Cache> = LazyLock::new(|| {
    Cache::builder()
        .redis(redis_url())
        .namespace(unique_namespace("wb_macro"))
        .build_sync()
        .expect("valid configuration")
});

static MEMORY: LazyLock<Cache> = LazyLock::new(Cache::memory);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Note {
    text: String,
}

/// One run of a body: (function, id, text, the write's id).
type Run = (&'static str, u64, String, Option<String>);

/// What the bodies applied.
static APPLIED: Mutex<Vec<Run>> = Mutex::new(Vec::new());

fn applied(function: &str, id: u64) -> Vec<(String, Option<String>)> {
    APPLIED
        .lock()
        .unwrap()
        .iter()
        .filter(|(f, i, ..)| *f == function && *i == id)
        .map(|(_, _, text, write)| (text.clone(), write.clone()))
        .collect()
}

fn apply(function: &'static str, id: u64, note: &Note) {
    let write = current_id().map(|w| w.as_str().to_owned());
    APPLIED
        .lock()
        .unwrap()
        .push((function, id, note.text.clone(), write));
}

#[write_behind(cache = REDIS, key = "note:{id}", ttl = 60, value = note, queue = "wbm-notes")]
async fn save_note(id: u64, note: Note) -> Result<(), String> {
    apply("save_note", id, &note);
    Ok(())
}

#[cached(cache = REDIS, key = "note:{id}", ttl = 60)]
async fn read_note(id: u64) -> Option<Note> {
    // The database: it never has the note before the worker applied it.
    let _ = id;
    None
}

#[write_behind(cache = MEMORY, key = "note:{id}", value = note, queue = "wbm-notes")]
async fn save_note_in_memory(id: u64, note: Note) {
    apply("save_note_in_memory", id, &note);
}

#[cached(cache = MEMORY, key = "note:{id}")]
async fn read_note_in_memory(id: u64) -> Option<Note> {
    let _ = id;
    None
}

fn note(text: &str) -> Note {
    Note {
        text: text.to_owned(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_queues_reads_its_write_and_a_worker_applies_it() {
    save_note(1, note("queued")).await.unwrap();
    assert!(
        applied("save_note", 1).is_empty(),
        "the body ran at call time"
    );
    // Read-your-writes: the value is in the cache before the database has it.
    assert_eq!(read_note(1).await, Some(note("queued")));

    let worker = Worker::builder(&REDIS)
        .queues(["wbm-notes"])
        .poll(Duration::from_millis(50))
        .start()
        .expect("a worker on a Redis cache");
    assert!(
        worker.flush_for(Duration::from_secs(20)).await,
        "the queue drains"
    );
    let done = applied("save_note", 1);
    assert_eq!(done.len(), 1, "applied once: {done:?}");
    assert_eq!(done[0].0, "queued");
    assert!(done[0].1.is_some(), "current_id() is set in the body");
    assert_eq!(read_note(1).await, Some(note("queued")));
    worker.shutdown().await;
}

#[tokio::test]
async fn memory_runs_the_body_inline() {
    save_note_in_memory(2, note("inline")).await;
    let done = applied("save_note_in_memory", 2);
    assert_eq!(done.len(), 1, "the body ran in the call: {done:?}");
    assert!(done[0].1.is_some(), "current_id() is set in the body");
    assert_eq!(read_note_in_memory(2).await, Some(note("inline")));
}
