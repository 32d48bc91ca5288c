use cache_runtime::cached;

#[cached(key = "setting:{key}", ttl = 600, local = "30 parsecs")]
async fn setting(key: String) -> String {
    key
}

#[cached(key = "other:{key}", ttl = 600, local = true)]
async fn other(key: String) -> String {
    key
}

fn main() {}
