use cache_runtime::cached;

#[cached(key = "user:{id}", ttl = 60)]
async fn get(id: u64) -> String {
    format!("{id} {:?}", __cache_key)
}

fn main() {}
