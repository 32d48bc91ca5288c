use cache_runtime::cached;

#[cached(key = "user:{id}", ttl = 60, cache_none)]
async fn find(id: u64) -> Option<String> {
    (id > 0).then(|| id.to_string())
}

#[cached(key = "user:{id}", ttl = 60, cache_none = "30s")]
async fn lookup(id: u64) -> Result<Option<String>, std::io::Error> {
    Ok((id > 0).then(|| id.to_string()))
}

fn main() {
    let _ = find(1);
    let _ = lookup(1);
}
