use cache_runtime::cached;

#[cached(key = "user:{id}", ttl = 60, cache_none)]
async fn get(id: u64) -> Result<String, std::io::Error> {
    Ok(id.to_string())
}

fn main() {}
