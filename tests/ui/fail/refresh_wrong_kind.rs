use cache_runtime::{cache_evict, cache_put};

#[cache_put(key = "setting:{key}", refresh = "80%")]
async fn save(key: String, value: String) -> String {
    format!("{key}={value}")
}

#[cache_evict(keys = ["setting:{key}"], refresh)]
async fn delete(key: String) {
    let _ = key;
}

fn main() {}
