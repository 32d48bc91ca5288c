use cache_runtime::{cache_evict, cache_put};

#[cache_put(key = "setting:{key}", local)]
async fn save(key: String, value: String) -> String {
    format!("{key}={value}")
}

#[cache_evict(keys = ["setting:{key}"], local = "30s")]
async fn delete(key: String) {
    let _ = key;
}

fn main() {}
