use cache_runtime::cached;

#[cached(key = "user:{id}", ttl = 60, ttl = "5m")]
async fn get(id: u64) -> u64 {
    id
}

fn main() {}
