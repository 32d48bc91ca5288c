use cache_runtime::cached;

#[cached(key = "user:{id}", ttl = 60, unless = result.len())]
async fn get(id: u64) -> Vec<u64> {
    vec![id]
}

fn main() {}
