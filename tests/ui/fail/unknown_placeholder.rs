use cache_runtime::cached;

#[cached(key = "user:{user_id}:{lang}", ttl = 60)]
async fn get(id: u64, lang: &str) -> String {
    format!("{id}:{lang}")
}

fn main() {}
