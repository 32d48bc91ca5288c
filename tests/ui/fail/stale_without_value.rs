use cache_runtime::{cache_put, cached};

#[cached(key = "price:{id}", ttl = 60, stale)]
async fn price(id: u64) -> Result<u64, std::io::Error> {
    Ok(id)
}

#[cached(key = "quote:{id}", ttl = 60, stale = 0)]
async fn quote(id: u64) -> Result<u64, std::io::Error> {
    Ok(id)
}

#[cache_put(key = "price:{id}", stale = "10m")]
async fn save_price(id: u64) -> Result<u64, std::io::Error> {
    Ok(id)
}

fn main() {}
