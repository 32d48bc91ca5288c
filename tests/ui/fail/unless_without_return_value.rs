use cache_runtime::cached;

#[cached(key = "touch:{id}", ttl = 60, unless = result.is_empty())]
async fn touch(id: u64) {
    let _ = id;
}

fn main() {}
