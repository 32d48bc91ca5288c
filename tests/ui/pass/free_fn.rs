use cache_runtime::cached;

#[cached(key = "user:{id}", ttl = 60)]
async fn get(id: u64) -> Result<String, std::io::Error> {
    Ok(id.to_string())
}

fn main() {
    let _ = get(1);
}
