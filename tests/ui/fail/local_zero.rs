use cache_runtime::cached;

#[cached(key = "setting:{key}", ttl = 600, local = 0)]
async fn setting(key: String) -> String {
    key
}

fn main() {}
